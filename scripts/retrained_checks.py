"""A claim check on retrained runs whose committed results keep no per-image masks.

    PYTHONPATH=$PWD python scripts/retrained_checks.py [--runs_root=runs/paper/cpu] [--results=results/cpu]

Table VIII's MNIST rows were committed without per-image masks or models. Each is trained again
(``python -m experiments.paper --run=RUN``, stopped after its last epoch's checkpoint) and evaluated with the
attacks of the check (``python -m experiments.evaluate --run=runs/paper/cpu/RUN --attacks=a1,a2,a3
--tag=a123``: the run's own evaluation seed, batch size and first 1,000 test images, and the same per-spec
keys as the run's own evaluation). This script then

* says, per column, whether the retrained run reproduces the committed accuracy on those images (N is the
  natural accuracy on the attacked images, the committed ``robust.accuracy.natural``);
* decides the pair's check on the retrained runs' masks (exact McNemar test, as the tables' checks);
* keeps the evaluation files, masks included, in ``<results>/retrained/<run>.json`` so that the check
  rebuilds without the run directories, and writes ``<results>/retrained_checks.md`` and ``.json``.
"""

import argparse
import os
import sys

from enquant import evalfiles
from enquant import files
from experiments.paper import checks
from experiments.paper import reports

# (table, claim, claimed-better run, other run)
PAIRS = (
    ("VIII", "float beats BR, En2ResNet20 mnist", "mnist-En2ResNet20-float-tradeoff-a1b8-b2000c22",
     "mnist-En2ResNet20-br1b-tradeoff-a1b8-5df078e4"),
)
COLUMNS = (("N", "natural"), ("A1", "A1"), ("A2", "A2"), ("A3", "A3"))  # (column, mask / accuracy key)


def reproduction(evaluation: dict, committed: dict) -> dict:
  """Per column: the committed accuracy on the attacked images, the retrained one (both in %); ``N full``:
  the natural accuracy on the whole test set (the retrained run's last epoch, the same pass as the final
  one), where the evaluation file carries it."""
  theirs = committed.get("robust", {}).get("accuracy", {})
  n_committed = committed.get("robust", {}).get("examples", theirs.get("n"))
  if n_committed is not None and n_committed != evaluation["examples"]:
    raise ValueError(f"the committed results attack {n_committed} images, the evaluation "
                     f"{evaluation['examples']}: not the same images")
  out = {col: {"committed": 100 * theirs[key], "retrained": 100 * evaluation["accuracy"][key]}
         for col, key in COLUMNS if key in theirs and key in evaluation["accuracy"]}
  if "last_epoch" in evaluation and "natural_accuracy" in committed:
    out["N full"] = {"committed": 100 * committed["natural_accuracy"],
                     "retrained": 100 * evaluation["last_epoch"]["test_acc"]}
  return out


def _masks(evaluation: dict) -> dict:
  n = evaluation["examples"]
  return {col: evalfiles.unpack_mask(evaluation["masks"][key], n) for col, key in COLUMNS
          if key in evaluation.get("masks", {})}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs_root", default="runs/paper/cpu")
  parser.add_argument("--results", default="results/cpu")
  parser.add_argument("--tag", default="a123", help="the evaluations' --tag")
  args = parser.parse_args(argv)
  kept = os.path.join(args.results, "retrained")
  names = sorted({r for pair in PAIRS for r in pair[2:]})
  for name in names:
    src = os.path.join(args.runs_root, name, f"evaluation-{args.tag}.json")
    if os.path.exists(src):  # kept as committed results are: no absolute path of this machine
      os.makedirs(kept, exist_ok=True)
      evaluation = files.read_json(src)
      rows = files.read_jsonl(os.path.join(args.runs_root, name, "metrics.jsonl"))
      if rows and "test_acc" in rows[-1]:  # the last epoch's N on the whole test set: the final N's pass
        evaluation["last_epoch"] = {"epoch": rows[-1]["epoch"], "test_acc": rows[-1]["test_acc"]}
      files.write_json_atomic(os.path.join(kept, name + ".json"), reports.portable(evaluation))
  evaluations = {n: files.read_json(p) for n in names
                 if os.path.exists(p := os.path.join(kept, n + ".json"))}
  out = {"runs": {}, "checks": []}
  lines = ["# Claim checks on retrained runs (committed without per-image masks)", "",
           "Each run trained again with its committed configuration and evaluated with the check's attacks "
           "on the same images as its committed evaluation (same seed and keys; N = natural accuracy on "
           "those images; N full = natural accuracy on the whole test set). *reproduces*: every column equals the committed accuracy, so the masks are "
           "those of the committed run; otherwise the check is one of the retrained runs.", "",
           "| run | N full | " + " | ".join(c for c, _ in COLUMNS) + " | reproduces |",
           "|---|" + "---|" * (len(COLUMNS) + 2)]
  for name in names:
    if name not in evaluations:
      lines.append(f"| {name} | - | " + " | ".join("-" for _ in COLUMNS) + " | not evaluated yet |")
      continue
    committed = files.read_json(os.path.join(args.results, "runs", name + ".json"))
    rep = reproduction(evaluations[name], committed)
    same = bool(rep) and all(abs(v["committed"] - v["retrained"]) < 1e-9 for v in rep.values())
    out["runs"][name] = {"columns": rep, "reproduces": same, "examples": evaluations[name]["examples"]}
    cells = [f"{v['retrained']:.2f}" + ("" if abs(v["committed"] - v["retrained"]) < 1e-9
                                       else f" (committed {v['committed']:.2f})")
             if (v := rep.get(c)) else "-" for c in ("N full",) + tuple(c for c, _ in COLUMNS)]
    lines.append(f"| {name} | " + " | ".join(cells) + f" | {'yes' if same else 'no'} |")
  lines += ["", "Accuracy of the first run minus the second's (points) with the 95 % interval of the paired "
            "per-image differences; b/c: images only the first / only the second run gets right; p: "
            "two-sided exact McNemar test.", "",
            "| table | claim | images | " + " | ".join(c for c, _ in COLUMNS) + " | verdict |",
            "|---|---|---|" + "---|" * (len(COLUMNS) + 1)]
  for table, claim, better, other in PAIRS:
    if better not in evaluations or other not in evaluations:
      lines.append(f"| {table} | {claim} | not evaluated yet |" + " |" * (len(COLUMNS) + 1))
      continue
    mb, mo = _masks(evaluations[better]), _masks(evaluations[other])
    columns = {c: checks.paired_difference(mb[c], mo[c]) for c, _ in COLUMNS if c in mb and c in mo}
    verdict = checks.overall([v["verdict"] for v in columns.values()])
    out["checks"].append({"table": table, "claim": claim, "better": better, "other": other,
                          "columns": columns, "verdict": verdict})
    cells = [f"{v['diff']:+.2f} [{v['low']:+.2f}, {v['high']:+.2f}] {v['b']}/{v['c']} p={v['p']:.3g}"
             if (v := columns.get(c)) else "-" for c, _ in COLUMNS]
    n = len(next(iter(mb.values())))
    lines.append(f"| {table} | {claim} | {n} | " + " | ".join(cells) + f" | {verdict} |")
  files.write_text_atomic(os.path.join(args.results, "retrained_checks.md"), "\n".join(lines) + "\n")
  files.write_json_atomic(os.path.join(args.results, "retrained_checks.json"), out)
  print("\n".join(lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
