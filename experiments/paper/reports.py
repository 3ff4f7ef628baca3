"""Paper tables rebuilt from typed run results: our numbers beside the paper's, as Markdown and JSON.

:func:`table_rows` pairs every row of a :class:`~experiments.paper.tables.Table` with the
:class:`~enquant.results.RunResults` of its run (and, for transfer rows, the transfer evaluation);
:func:`table_markdown` renders them with the protocol, the counting of each column and the claim checks
(:mod:`experiments.paper.checks`). Missing runs appear as ``pending``, never as numbers. A row is a
*direct* comparison when our run has the paper's dataset and network; only then does the table show a
difference from the paper's number (a stand-in row shows the paper's row beside ours).
"""

import os
from typing import Any

from enquant import results as results_lib
from experiments.paper import checks as checks_lib
from experiments.paper import scales


def _fmt(value: float | None, column: str) -> str:
  if value is None:
    return "-"
  return f"{value:.4f}" if column == "M" else f"{value:.2f}"


def _pct(value: float | None) -> float | None:
  return None if value is None else 100 * value


def measured(res: results_lib.RunResults, column: str,
             transfer: results_lib.Evaluation | None = None) -> float | None:
  """The number of ``column`` (percent, M, or the zero dispersion) of a run (or of its transfer
  evaluation): sparsities in the paper's counting, attacks in the paper's counting."""
  if column == "M":
    return res.m_bound
  if column == "weight_sparsity":
    return _pct(res.sparsity("weight_sparsity"))
  if column == "channel_sparsity":
    return _pct(res.sparsity("in_channel_sparsity", paper_counting=True))
  if column == "zero_dispersion":  # a ratio (1: unstructured zeros), over the paper's 3x3 kernels
    return res.sparsity("zero_dispersion", paper_counting=True)
  if column == "N" and transfer is None:
    return 100 * res.natural_accuracy
  source = transfer if transfer is not None else res.robust
  key = "natural" if column == "N" else column
  return None if source is None else _pct(source.accuracy.get(key))


def _entry(row, cfg, name, res, oracle_name) -> dict[str, Any]:
  return {
      "net": row.net, "dataset": row.dataset, "run_dataset": cfg.dataset, "run_net": cfg.model.name,
      "comparison": "direct" if (cfg.dataset, cfg.model.name) == (row.dataset, row.net) else "stand-in",
      "quant": row.quant_label, "loss": row.loss_label, "run": name, "oracle_run": oracle_name,
      "oracle": None if row.oracle is None else f"{row.oracle.net} {row.oracle.quant_label}",
      "columns": {},
      "wall_seconds": None if res is None else res.seconds,
      "examples_robust": None if res is None or res.robust is None else res.robust.examples,
  }


def table_rows(tbl, scale: str, results: dict[str, results_lib.RunResults],
               transfers: dict[tuple, results_lib.Evaluation]) -> list[dict[str, Any]]:
  """One dict per table row: labels, run name, state, and per column the paper's number, ours and (direct
  comparisons only) the difference.

  Args:
    tbl: the table.
    scale: "paper", "cpu" or "gpu<E>".
    results: typed results by run name (finished runs only).
    transfers: transfer evaluations by ``(target run name, oracle run name)``.
  """
  out = []
  for row in tbl.rows:
    cfg = scales.build_config(row, scale)
    name = scales.run_name(cfg)
    res, oracle_name, transfer = results.get(name), None, None
    if row.oracle is not None:
      oracle_name = scales.run_name(scales.build_config(row.oracle, scale))
      transfer = transfers.get((name, oracle_name))
    done = res is not None and (row.oracle is None or transfer is not None)
    entry = _entry(row, cfg, name, res, oracle_name)
    if "zero_dispersion" in tbl.columns:  # the input channels the dispersion pools (its chance level)
      entry["dispersion_channels"] = None if res is None else res.sparsity("dispersion_channels", True)
    entry["state"] = "done" if done else "pending"
    paper_numbers = dict(row.paper)
    for column in tbl.columns:
      ours = measured(res, column, transfer) if done else None
      theirs = paper_numbers.get(column)
      direct = entry["comparison"] == "direct" and None not in (ours, theirs)
      entry["columns"][column] = {"paper": theirs, "ours": ours, "diff": ours - theirs if direct else None}
    if done:  # a transfer row's worst case and other attacks are the transfer's, not the white-box ones
      robust = transfer if transfer is not None else res.robust
      entry["worst_case"] = None if robust is None else _pct(robust.worst_case)
      entry["extra_attacks"] = {} if robust is None else {
          k: 100 * v for k, v in robust.accuracy.items() if k not in ("natural", *tbl.columns)}
    out.append(entry)
  return out


def reproduction_report(name: str, committed: results_lib.RunResults, rerun: results_lib.RunResults) -> str:
  """One line: does a retrained run give its committed accuracies exactly, and if not, what moved (points)."""
  before, after = committed.accuracies(), rerun.accuracies()
  if before == after:
    return f"reproduced: {name} gives the committed accuracies exactly ({before})"
  moved = []
  for k in sorted(set(before) | set(after)):
    b, a = before.get(k), after.get(k)
    if b != a:
      delta = f" ({100 * (a - b):+.2f})" if a is not None and b is not None else ""
      moved.append(f"{k} {b} -> {a}{delta}")
  return f"warning: {name} differs from its committed results: " + ", ".join(moved)


def rerun_differs(committed: results_lib.RunResults, rerun: results_lib.RunResults) -> bool:
  """Whether a retrained run gives another value for an accuracy its committed results hold (accuracies
  only one of them has, e.g. an attack added later, are an extension, not a difference)."""
  before, after = committed.accuracies(), rerun.accuracies()
  return any(before[k] != after[k] for k in before.keys() & after.keys())


def reruns_markdown(scale: str, reruns: list[tuple[str, results_lib.RunResults, results_lib.RunResults]]
                    ) -> str:
  """``results/<scale>/reruns.md``: per retrained run ``(name, committed, rerun)``, each accuracy's
  committed value, the rerun's, and the difference (points)."""
  keys = sorted({k for _, c, r in reruns for k in c.accuracies().keys() & r.accuracies().keys()},
                key=lambda k: (k != "N", k))
  lines = [f"# Reruns of committed runs ({scale} scale)", "",
           "The same configuration and seeds (the same run name) trained again, possibly on another machine "
           "and another version of enquant (package versions: each file's `software`), against its committed "
           "results: committed -> rerun (difference in points). The tables keep the committed (first) run; a "
           "rerun that differs measures how far training, not the test sample, moves a row. Each rerun's "
           f"results: `results/{scale}/reruns/<run>.json`.", "",
           "| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
  for name, committed, rerun in sorted(reruns, key=lambda t: t[0]):
    before, after = committed.accuracies(), rerun.accuracies()
    cells = [f"{100 * before[k]:.2f} -> {100 * after[k]:.2f} ({100 * (after[k] - before[k]):+.2f})"
             if k in before and k in after else "-" for k in keys]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _noise_note(tbl) -> str:
  """Which generator drew EnResNet's N(0, 1) noise in the table's rows (enquant.models.noise)."""
  others = [f"{r.dataset} {r.quant_label}" for r in tbl.rows
            if (r.noise_rng or scales.PAPER_NOISE_RNG) != scales.PAPER_NOISE_RNG]
  note = f"Noise normals from the {scales.PAPER_NOISE_RNG} generator"
  return note + (f" ({', '.join(others)}: threefry)." if others else ".")


def _protocol(tbl, scale: str) -> str:
  if scale == "paper":
    text = ("paper scale: the paper's protocol (200 epochs, PGD-10 training attack, A1-A3 at eps 0.031 on the "
            "whole test set).")
  elif scales.gpu_epochs(scale) is not None:
    text = scales.gpu_note(scales.gpu_epochs(scale))
  else:
    labels = {"claim": "CIFAR/SVHN rows", "direct": "MNIST/Fashion-MNIST rows"}
    text = " ".join(f"*{labels[k]}:* {scales.CPU_NOTES[k]}" for k in sorted({scales.cpu_kind(r) for r in tbl.rows}))
  cfgs = [scales.build_config(r, scale) for r in tbl.rows]
  seeds = lambda values: ", ".join(str(v) for v in sorted(set(values)))
  return text + (f" Seeds: training {seeds(c.train.seed for c in cfgs)} (initialisation, batches, augmentation, "
                 f"noise, training attack), evaluation {seeds(c.eval.seed for c in cfgs)}; one training run per "
                 "row.")


COUNTING = (
    "Numbers in %, except M and zero_dispersion (the dispersion index of the input channels' zero fractions "
    "of the 3x3 kernels: 1 = zeros scattered independently, 9 x out-channels = whole zero channels; the "
    "paper has no such number). Counting: N = clean accuracy on the whole test set; A1 = FGSM, A2 = IFGSM-20 "
    "(step 0.003), A3 = CW-l_inf (untargeted margin loss under PGD, 50 steps of 0.003, no random start; the "
    "paper's A3 lies between its A2 and N, and neither this attack nor the EnResNet code's C&W, `cwl2`, "
    "reproduces that: results/<scale>/a3_variants.md), and "
    "the other attacks count an image as robust when the attack leaves it correctly classified (the paper's "
    "counting); worst = per image, correct on the clean image AND under every attack at eps 0.031 (robust "
    "AND clean-correct, as RobustBench and AutoAttack count); sparsities count the 3x3 convolutions' input "
    "channels as the paper does. Each row shows ours, then the paper's numbers for the row (*paper*), then "
    "*diff* = ours - paper only where our run has the paper's dataset and network (a direct comparison; a "
    "stand-in row is a claim check, not a number match). wall = every training epoch (over all calls of a "
    "resumed run) + the final evaluation (the last call's wall time for a run that recorded only that).")


def _row_lines(tbl, r: dict[str, Any]) -> list[list[str]]:
  """The ours / paper / (direct only) diff lines of one table row."""
  label = f"{r['net']} {r['quant']} {r['loss']}" + (f", from {r['oracle']}" if tbl.transfer else "")
  cols = tbl.columns
  ours = [label, f"ours ({r['run_dataset']}, {r['run_net']})"] + [
      _fmt(r["columns"][c]["ours"], c) if r["state"] == "done" else "pending" for c in cols]
  wall = r.get("wall_seconds")
  ours += [_fmt(r.get("worst_case"), "N"),
           ", ".join(f"{k} {v:.2f}" for k, v in sorted(r.get("extra_attacks", {}).items())) or "-",
           "-" if wall is None else f"{wall / 60:.0f} min"]
  lines = [ours, ["", f"paper ({r['dataset']}, {r['net']})"] + [_fmt(r["columns"][c]["paper"], c) for c in cols]
           + ["", "", ""]]
  if r["comparison"] == "direct":
    diff = lambda v, c: "-" if v is None else f"{v:+.4f}" if c == "M" else f"{v:+.2f}"
    lines.append(["", "diff"] + [diff(r["columns"][c]["diff"], c) for c in cols] + ["", "", ""])
  return lines


def table_markdown(tbl, scale: str, rows: list[dict[str, Any]], checks: list[dict[str, Any]] | None = None,
                   trends: list[dict[str, Any]] | None = None) -> str:
  """The Markdown of a rebuilt table (header with the protocol, the claim and each column's counting; the
  rows; then the claim checks and the trends of :mod:`experiments.paper.checks`)."""
  lines = [f"# Table {tbl.name}: {tbl.title}", "", f"**Claim:** {tbl.claim}.", "",
           f"**Protocol:** {_protocol(tbl, scale)}", "", COUNTING + " " + _noise_note(tbl), ""]
  header = ["row", "numbers", *tbl.columns, "worst", "other attacks", "wall"]
  lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in rows:
    lines += ["| " + " | ".join(cells) + " |" for cells in _row_lines(tbl, r)]
  lines.append("")
  if checks:
    lines += checks_lib.checks_markdown(tbl, checks)
  if trends:
    lines += checks_lib.trends_markdown(trends)
  return "\n".join(lines)


def portable(results: dict) -> dict:
  """A run's results (or a transfer evaluation) as committed under ``results/``: absolute paths of the
  machine it ran on made relative to the cwd."""
  return {k: os.path.relpath(v) if k in ("workdir", "dataset_source", "oracle", "run") and isinstance(v, str)
          and os.path.isabs(v) else v for k, v in results.items()}


__all__ = ["COUNTING", "measured", "portable", "reproduction_report", "rerun_differs", "reruns_markdown",
           "table_markdown", "table_rows"]
