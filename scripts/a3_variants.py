"""A3 variants side by side: CW-l_inf (``A3``) and the EnResNet code's C&W (``cwl2``) on each evaluated model.

    PYTHONPATH=$PWD python scripts/a3_variants.py [--runs=runs/demo,runs/paper/cpu/*,runs/kept/*] \
        [--tags=a3_vs_cwl2,a3var] [--results=results/cpu]

Each run directory matched by ``--runs`` (comma-separated globs) contributes its evaluation file
``evaluation-<tag>.json`` of the first tag of ``--tags`` it has (``python -m experiments.evaluate --run=RUN
--attacks=a1,a2,a3,cwl2 --eot_samples=0 --max_examples=N --tag=TAG``); a run without one is skipped with
one line. The evaluation is copied to ``<results>/a3_variants/<run>.json`` (portable: the run named
relative to the repository; the run's dataset, model and the tag added from its ``config.json``), and
``<results>/a3_variants.md`` and ``.json`` are rebuilt from every copy kept there, so a model evaluated
once keeps its row after its run directory is gone. Nothing found and nothing kept: one line, exit 2.

Per model: the accuracies in the paper's per-attack counting (correct under the attack), the paper's
pattern for its A3 (``A2 < A3 < N`` on every row of the paper) tested on ``cwl2``, the exact McNemar test
of A3 vs cwl2 (and of cwl2 vs natural) on the same images when the evaluation kept per-image masks, and
the paper's numbers when the run is a row of the paper's tables (Table II first).
"""

import argparse
import glob
import os
import sys
from typing import Any

from enquant import config as config_lib
from enquant import files
from enquant import results as results_lib
from experiments.paper import checks
from experiments.paper import reports
from experiments.paper import scales
from experiments.paper import tables

ATTACKS = ("A1", "A2", "A3", "cwl2")  # A1 optional; the others are needed for a row
PAPER_COLUMNS = ("N", "A1", "A2", "A3")
TABLE_ORDER = ("II", "I", "V", "VI", "VIII")  # tables with an A3 column; a run in several takes the first
COUNTING = ("per-attack counting, as the paper's tables: an image counts for an attack when the model is "
            "correct on the attacked image, whatever the clean pass gives (so an attack may exceed the "
            "natural accuracy of the same images by noise draws)")
A3_COLUMN = ("The tables' A3 column is CW-l_inf (attack `a3`): every committed run was evaluated with it; "
             "`cwl2` attacks any committed row from its kept model (`python -m experiments.evaluate "
             "--run=results/cpu/runs/<run>.npz --attacks=a1,a2,a3,cwl2`).")
SCRIPT = "PYTHONPATH=$PWD python scripts/a3_variants.py"
HEADER = ("run", "dataset", "model", "eps", "images", "natural", "A1", "A2", "A3 (CW-l_inf)", "cwl2",
          "cwl2 > A2", "A2 < cwl2 < natural", "paper row", "paper N", "paper A1", "paper A2", "paper A3")


class Error(ValueError):
  """Bad input; the message is one line."""


def paper_rows(scale: str) -> dict[str, tuple[str, tables.Row]]:
  """``{run name at scale: (table, row)}`` for every row of the paper with N, A2 and A3 numbers."""
  out = {}
  for name in TABLE_ORDER:
    for row in tables.TABLES[name].rows:
      if row.oracle is None and {"N", "A2", "A3"} <= dict(row.paper).keys():
        out.setdefault(scales.run_name(scales.build_config(row, scale)), (name, row))
  return out


def paper_pattern() -> tuple[int, int]:
  """``(rows with A2 < A3 < N, rows giving N, A2 and A3)`` over every table of the paper."""
  rows = [dict(r.paper) for t in tables.TABLES.values() for r in t.rows]
  rows = [p for p in rows if {"N", "A2", "A3"} <= p.keys()]
  return sum(p["A2"] < p["A3"] < p["N"] for p in rows), len(rows)


def find_evaluations(patterns: list[str], tags: list[str]) -> tuple[list[tuple[str, str, str]], list[str]]:
  """``([(run directory, evaluation path, tag)], skip lines)`` for the run directories of ``patterns``."""
  found, skipped = [], []
  for pattern in patterns:
    runs = sorted(d for d in glob.glob(pattern) if os.path.isdir(d))
    if not runs:
      skipped.append(f"skipped: no run directory matches {pattern}")
    for run in runs:
      paths = [(os.path.join(run, f"evaluation-{tag}.json"), tag) for tag in tags]
      hits = [(p, tag) for p, tag in paths if os.path.exists(p)]
      if hits:
        found.append((run, *hits[0]))
      else:
        skipped.append(f"skipped: {run} has no evaluation-{{{','.join(tags)}}}.json")
  return found, skipped


def _model(run: str) -> tuple[str | None, str | None]:
  """``(dataset, model)`` of a run from its ``config.json`` (None, None when it has none)."""
  path = os.path.join(run, "config.json")
  if not os.path.exists(path):
    return None, None
  try:
    cfg = config_lib.ExperimentConfig.from_dict(files.read_json(path))
  except (OSError, ValueError, TypeError) as e:
    raise Error(f"{path}: not a readable run configuration ({(str(e).splitlines() or [''])[0]})") from None
  return cfg.dataset, scales.run_name(cfg).split("-", 1)[1].rsplit("-", 1)[0]  # net-quant-loss


def read(path: str) -> results_lib.Evaluation:
  """The evaluation ``path``, validated (:func:`enquant.results.read_evaluation`) and holding A2, A3, cwl2
  and its eps; ResultsError or Error, one line naming it."""
  evaluation = results_lib.read_evaluation(path)
  missing = [k for k in ATTACKS[1:] if k not in evaluation.accuracy]
  if missing:
    raise Error(f"{path}: no {', '.join(missing)} accuracy (evaluate with --attacks=a1,a2,a3,cwl2)")
  eps = evaluation.data.get("eps")
  if isinstance(eps, bool) or not isinstance(eps, (int, float)):
    raise Error(f"{path}: eps must be a number, got {eps!r}")
  return evaluation


def portable_copy(run: str, path: str, tag: str) -> dict[str, Any]:
  """The evaluation ``path``, validated (:func:`read`), as kept: the run named relative to the working
  directory, with the run's dataset and model (its ``config.json``) and the tag."""
  dataset, model = _model(run)
  kept = reports.portable(read(path).to_dict())
  # A kept model's evaluation names its model file (the command's --run); a run directory's, the directory.
  return dict(kept, run=kept["run"] if kept.get("kept_model") else os.path.relpath(run), dataset=dataset,
              model=model, tag=tag)


def _test(evaluation: results_lib.Evaluation, first: str, second: str) -> dict[str, Any] | None:
  """``first - second`` on the same images (points, interval, b, c, exact McNemar p); None without masks."""
  if not {first, second} <= evaluation.masks.keys():
    return None
  d = checks.paired_difference(evaluation.mask(first), evaluation.mask(second))
  return {k: d[k] for k in ("diff", "low", "high", "b", "c", "p")}


def _paper(name: str, known: dict[str, tuple[str, tables.Row]]) -> dict[str, Any] | None:
  if name not in known:
    return None
  table, row = known[name]
  numbers = dict(row.paper)
  return {"table": table, "row": f"{row.net} {row.quant_label} {row.loss_label}",
          **{k: numbers.get(k) for k in PAPER_COLUMNS},
          "A2 < A3 < N": numbers["A2"] < numbers["A3"] < numbers["N"]}


def row_of(path: str, known: dict[str, tuple[str, tables.Row]]) -> dict[str, Any]:
  """One model's row from its kept evaluation ``path`` (module docstring)."""
  evaluation = read(path)
  data, acc = evaluation.data, {k: 100 * v for k, v in evaluation.accuracy.items()}
  name = os.path.basename(path)[:-len(".json")]
  specs = [s for s in data.get("attacks", []) if isinstance(s, dict)]
  eot = max([s.get("eot_samples", 1) for s in specs] + [0])
  attacks = [s["name"].lower() for s in specs if "-eot" not in s.get("name", "")]
  command = (f"python -m experiments.evaluate --run={data.get('run')} --attacks={','.join(attacks)} "
             f"--eot_samples={eot if eot > 1 else 0} --max_examples={evaluation.examples} "
             f"--tag={data.get('tag')}")
  return {
      "run": data.get("run"), "name": name, "dataset": data.get("dataset"), "model": data.get("model"),
      "eps": data.get("eps"), "images": evaluation.examples, "command": command,
      "accuracy": {k: evaluation.accuracy[k] for k in ("natural",) + ATTACKS if k in evaluation.accuracy},
      "cwl2 > A2": acc["cwl2"] > acc["A2"], "A2 < cwl2 < natural": acc["A2"] < acc["cwl2"] < acc["natural"],
      "masks": bool(evaluation.masks),
      "cwl2 vs A3": _test(evaluation, "cwl2", "A3"), "cwl2 vs natural": _test(evaluation, "cwl2", "natural"),
      "paper": _paper(name, known),
  }


def _pct(row: dict[str, Any], key: str) -> str:
  value = row["accuracy"].get(key)
  return "-" if value is None else f"{100 * value:.2f}"


def _mcnemar(test: dict[str, Any] | None) -> str:
  if test is None:
    return "no per-image masks"
  return (f"{test['diff']:+.2f} [{test['low']:+.2f}, {test['high']:+.2f}]; {test['b']} / {test['c']}; "
          f"p {test['p']:.3g}")


def _paired_sentence(row: dict[str, Any]) -> str:
  test = row["cwl2 vs A3"]
  if test is None:
    return "the evaluation kept no per-image masks, so A3 and cwl2 are not compared image by image"
  if test["p"] >= checks.ALPHA or test["b"] == test["c"]:
    outcome = "no difference at the 5 % level"
  else:
    outcome = "CW-l_inf is the stronger attack" if test["b"] > test["c"] else "cwl2 is the stronger attack"
  return (f"on the same images A3 (CW-l_inf) {_pct(row, 'A3')} vs cwl2 {_pct(row, 'cwl2')}: {test['b']} "
          f"images only cwl2 leaves correct, {test['c']} only A3, exact McNemar p {test['p']:.3g}: {outcome}")


def _reproduces(row: dict[str, Any]) -> bool:
  """The paper's pattern on this model: cwl2 above A2 and below natural by more than the noise draws
  (fewer images correct under cwl2 than clean, exact McNemar p < 0.05); without masks, the numbers alone."""
  test = row["cwl2 vs natural"]
  if not row["A2 < cwl2 < natural"]:
    return False
  return test is None or (test["p"] < checks.ALPHA and test["c"] > test["b"])


def _pattern_sentence(row: dict[str, Any]) -> str:
  a2, cw, nat = _pct(row, "A2"), _pct(row, "cwl2"), _pct(row, "natural")
  test = row["cwl2 vs natural"]
  against = "" if test is None else (f"; cwl2 vs natural: {test['b']} / {test['c']} discordant images, "
                                     f"p {test['p']:.3g}")
  if _reproduces(row):
    return f"cwl2 lies between A2 and natural ({a2} < {cw} < {nat}{against}): the paper's pattern is reproduced"
  if row["A2 < cwl2 < natural"]:
    return (f"cwl2 lies between A2 and natural on the numbers ({a2} < {cw} < {nat}{against}), but is not "
            "distinguishable from natural at the 5 % level: it leaves the accuracy at the natural level, so "
            "the paper's pattern (A3 strictly between A2 and N) is not reproduced")
  if not row["cwl2 > A2"]:
    return f"cwl2 is not above A2 ({cw} vs {a2}): the paper's pattern is not reproduced"
  return (f"cwl2 is above A2 ({cw} vs {a2}) but not below natural ({nat}{against}): it leaves the accuracy "
          "at the natural level, so the paper's pattern (A3 strictly between A2 and N) is not reproduced")


def verdict(rows: list[dict[str, Any]]) -> list[str]:
  """The verdict paragraph, one sentence per model, then the count and the A3 column's sentence."""
  lines = []
  for row in rows:
    paper = row["paper"]
    ref = "" if paper is None else (
        f" The paper's row (Table {paper['table']}, {paper['row']}): N {paper['N']:.2f}, A2 "
        f"{paper['A2']:.2f}, A3 {paper['A3']:.2f}"
        f"{', A2 < A3 < N' if paper['A2 < A3 < N'] else ', not A2 < A3 < N'}.")
    lines.append(f"- {row['name']} ({row['dataset'] or 'dataset unknown'}, eps {row['eps']:g}, "
                 f"{row['images']} images): "
                 f"{_pattern_sentence(row)}; {_paired_sentence(row)}.{ref}")
  held = [r["name"] for r in rows if _reproduces(r)]
  above = sum(r["cwl2 > A2"] for r in rows)
  between = sum(r["A2 < cwl2 < natural"] for r in rows)
  lines += ["", f"cwl2 is above A2 on {above} of {len(rows)} models, between A2 and natural on the numbers on "
                f"{between}, and reproduces the paper's pattern (A2 < A3 < N, A3 below N beyond the noise "
                f"draws: exact McNemar p < 0.05) on {len(held)} of {len(rows)}"
                f"{': ' + ', '.join(held) if held else ''}. {A3_COLUMN}"]
  return lines


def markdown(rows: list[dict[str, Any]]) -> str:
  """The report (module docstring): command, counting, the rows, the paired tests and the verdict."""
  lines = ["# A3 variants: CW-l_inf (ours) vs the EnResNet code's C&W (cwl2)", "",
           f"Command: `{SCRIPT}` over the evaluations below (runs/demo comes from `python -m "
           "experiments.demo`, runs/paper/cpu/* from `python -m experiments.paper --scale=cpu`, "
           "results/cpu/runs/*.npz are the committed runs' kept models):", ""]
  lines += [f"- `{r['command']}`" for r in rows]
  held, total = paper_pattern()
  lines += ["", f"Counting: {COUNTING}. A2 is IFGSM-20, A3 CW-l_inf (50 steps, kappa 50), cwl2 the EnResNet "
            "code's C&W (L2, Adam, rescaled to eps). The paper's A3 lies between its A2 and N on "
            f"{held} of its {total} rows that give all three.", "",
            "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
  for r in rows:
    p = r["paper"] or {}
    paper = [f"Table {p['table']} {p['row']}" if p else "-"] + [
        "-" if p.get(k) is None else f"{p[k]:.2f}" for k in PAPER_COLUMNS]
    lines.append("| " + " | ".join([r["name"], r["dataset"] or "-", r["model"] or "-", f"{r['eps']:g}",
                                    str(r["images"])] + [_pct(r, k) for k in ("natural",) + ATTACKS]
                                   + ["yes" if r["cwl2 > A2"] else "no",
                                      "yes" if r["A2 < cwl2 < natural"] else "no"] + paper) + " |")
  lines += ["", "Paired tests on the same images (difference in points [95 % interval]; b / c discordant "
            "images; exact McNemar p):", "", "| run | cwl2 - A3 | cwl2 - natural |", "|---|---|---|"]
  lines += [f"| {r['name']} | {_mcnemar(r['cwl2 vs A3'])} | {_mcnemar(r['cwl2 vs natural'])} |" for r in rows]
  return "\n".join(lines + ["", "## Verdict", ""] + verdict(rows)) + "\n"


def build(args) -> list[dict[str, Any]]:
  """Copies the found evaluations, then the rows of every kept copy (Error when there is none)."""
  kept = os.path.join(args.results, "a3_variants")
  found, skipped = find_evaluations(args.runs.split(","), [t for t in args.tags.split(",") if t])
  for line in skipped:
    print(line)
  copies = {os.path.basename(os.path.normpath(run)): portable_copy(run, path, tag)
            for run, path, tag in found}
  if copies:  # every found evaluation validated before any is kept
    os.makedirs(kept, exist_ok=True)
  for name, data in copies.items():
    files.write_json_atomic(os.path.join(kept, name + ".json"), data)
  paths = sorted(glob.glob(os.path.join(kept, "*.json")))
  if not paths:
    raise Error(f"no evaluation-{{{args.tags}}}.json in the run directories {args.runs} and none kept "
                f"in {kept}")
  known = paper_rows(args.scale)
  return [row_of(p, known) for p in paths]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", default="runs/demo,runs/paper/cpu/*,runs/kept/*",
                      help="comma-separated globs of run directories")
  parser.add_argument("--tags", default="a3_vs_cwl2,a3var",
                      help="the evaluations' --tag, in order of preference (the first found is kept)")
  parser.add_argument("--results", default="results/cpu")
  parser.add_argument("--scale", default="cpu", choices=("cpu", "paper"),
                      help="the scale whose run names match the paper's table rows")
  args = parser.parse_args(argv)
  try:
    rows = build(args)
  except (Error, results_lib.ResultsError, OSError) as e:
    print(f"error: {(str(e).splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
    return 2
  text = markdown(rows)
  files.write_text_atomic(os.path.join(args.results, "a3_variants.md"), text)
  files.write_json_atomic(os.path.join(args.results, "a3_variants.json"), {
      "command": SCRIPT, "counting": COUNTING, "a3_column": A3_COLUMN, "rows": rows,
      "verdict": verdict(rows)})
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
