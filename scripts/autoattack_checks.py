"""Claim checks under AutoAttack: paired runs' AutoAttack masks, decided by the exact McNemar test.

    PYTHONPATH=$PWD python scripts/autoattack_checks.py [--runs_root=runs/paper/cpu] [--results=results/cpu]

For each pair below whose two runs have an AutoAttack evaluation (``python -m experiments.evaluate
--run=RUN --attacks=autoattack-rand|autoattack --max_examples=N --tag=aaN``), the evaluation files are
copied to ``<results>/autoattack/<run>.json`` (per-image masks included, so the check rebuilds without the
run directories) and the checks are written to ``<results>/autoattack_checks.md`` and ``.json``. An image
counts as robust under AutoAttack only if it is correct on the clean image and survives every attack. A
pair evaluated on different counts is compared on the first images both evaluated (the same test images).
"""

import argparse
import json
import os
import sys

from enquant import evalfiles
from enquant import files
from experiments.paper import checks
from experiments.paper import reports

# (table, claim, claimed-better run, other run): the rows that decide Tables I and II at cpu scale, and
# Table VIII's direct pairs (En2ResNet20, retrained: MNIST on 48 images, about half an hour per run;
# Fashion-MNIST on 128, one batch, 44 minutes per run on one core).
PAIRS = (
    ("I", "BR beats BC, En1ResNet8", "fmnist-En1ResNet8-br1b-at-4e0638c4",
     "fmnist-En1ResNet8-bc1b-at-00690997"),
    ("II", "En1ResNet8 beats ResNet8, BR", "fmnist-En1ResNet8-br1b-at-4e0638c4",
     "fmnist-ResNet8-br1b-at-587b4405"),
    ("II", "En1ResNet8 beats ResNet8, float", "fmnist-En1ResNet8-float-at-decc62b5",
     "fmnist-ResNet8-float-at-78878527"),
    ("VIII", "float beats BR, En2ResNet20 mnist", "mnist-En2ResNet20-float-tradeoff-a1b8-b2000c22",
     "mnist-En2ResNet20-br1b-tradeoff-a1b8-5df078e4"),
    ("VIII", "float beats BR, En2ResNet20 fmnist", "fmnist-En2ResNet20-float-tradeoff-a1b8-2d842207",
     "fmnist-En2ResNet20-br1b-tradeoff-a1b8-a7aa277c"),
)
KEYS = ("autoattack-rand", "autoattack")  # the version each evaluation ran (randomized / deterministic)


def _robust_mask(evaluation: dict):
  """The AutoAttack mask (robust AND clean-correct) of an evaluation file, and the version's name."""
  n = evaluation["examples"]
  for key in KEYS:
    if key in evaluation.get("masks", {}):
      return evalfiles.unpack_mask(evaluation["masks"][key], n), key
  raise ValueError(f"no AutoAttack mask among {sorted(evaluation.get('masks', {}))}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs_root", default="runs/paper/cpu")
  parser.add_argument("--results", default="results/cpu")
  parser.add_argument("--tags", default="aa500,aa128,aa100,aa48",
                      help="the evaluations' --tag, in order of preference (the first found is kept)")
  args = parser.parse_args(argv)
  kept = os.path.join(args.results, "autoattack")
  os.makedirs(kept, exist_ok=True)
  for name in {r for pair in PAIRS for r in pair[2:]}:
    found = [p for tag in args.tags.split(",") if os.path.exists(
        p := os.path.join(args.runs_root, name, f"evaluation-{tag}.json"))]
    if found:  # kept as committed results are: no absolute path of this machine
      files.write_json_atomic(os.path.join(kept, name + ".json"), reports.portable(files.read_json(found[0])))
  rows, lines = [], [
      "# Claim checks under AutoAttack (eps 0.031)", "",
      "Robust = correct on the clean image and under every attack of the version (AutoAttack's count); "
      "b / c = images only the claimed-better / the other run keeps; exact McNemar p. *retrained*: the "
      "model attacked is the run trained again, which differs from the committed one (its model, and its "
      "results where it has them, are in `reruns/`); the others reproduce their committed results.", "",
      "| table | claim | better (version) | other (version) | images | AA acc better / other "
      "| diff [95 %] | b / c | p | verdict |", "|---|---|---|---|---|---|---|---|---|---|"]
  for table, claim, better, other in PAIRS:
    paths = [os.path.join(kept, r + ".json") for r in (better, other)]
    if not all(os.path.exists(p) for p in paths):
      lines.append(f"| {table} | {claim} | {better} | {other} | not evaluated yet | | | | | |")
      continue
    (mb, vb), (mo, vo) = (_robust_mask(files.read_json(p)) for p in paths)
    n = min(mb.size, mo.size)
    mb, mo = mb[:n], mo[:n]
    d = checks.paired_difference(mb, mo)
    rows.append({"table": table, "claim": claim, "better": better, "other": other, "versions": [vb, vo],
                 "accuracy": [float(mb.mean()), float(mo.mean())], **d})
    retrained = [any(os.path.exists(os.path.join(args.results, "reruns", r + ext)) for ext in (".json", ".npz"))
                 for r in (better, other)]
    rows[-1]["retrained"] = retrained
    vb, vo = (v + (", retrained" if r else "") for v, r in zip((vb, vo), retrained))
    lines.append(f"| {table} | {claim} | {better} ({vb}) | {other} ({vo}) | {mb.size} | "
                 f"{100 * mb.mean():.2f} / "
                 f"{100 * mo.mean():.2f} | {d['diff']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] | "
                 f"{d['b']} / {d['c']} | {d['p']:.3g} | {d['verdict']} |")
  files.write_text_atomic(os.path.join(args.results, "autoattack_checks.md"), "\n".join(lines) + "\n")
  files.write_json_atomic(os.path.join(args.results, "autoattack_checks.json"), rows)
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
