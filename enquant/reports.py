"""Paper tables rebuilt from run results: the paper's numbers and ours side by side, as Markdown and JSON.

:func:`table_rows` pairs every row of a :class:`enquant.paper.Table` with the ``results.json`` of its run
(and, for transfer rows, the transfer evaluation); :func:`table_markdown` renders them with the protocol in
the header. Missing runs appear as ``pending``, never as numbers. :func:`check_rows` tests a table's
claim on our runs: paired differences of two runs on the same test images, with a 95 % interval;
:func:`trend_rows` the claims about one number per run (M, sparsity) that no per-image difference tests.
"""

import math
import os
from typing import Any

import numpy as np

from enquant import evalfiles
from enquant import paper as paper_lib

Z95 = 1.959964  # two-sided 95 % normal quantile


def _fmt(value: float | None, column: str) -> str:
  if value is None:
    return "-"
  return f"{value:.4f}" if column == "M" else f"{value:.2f}"


def table_rows(tbl: paper_lib.Table, scale: str, results: dict[str, dict], transfers: dict[tuple, dict]
               ) -> list[dict[str, Any]]:
  """One dict per table row: labels, run name, state, and per column the paper's number, ours, the difference.

  Args:
    tbl: the table.
    scale: "paper", "cpu" or "gpu<E>".
    results: ``results.json`` contents by run name (finished runs only).
    transfers: transfer evaluations by ``(target run name, oracle run name)``.
  """
  out = []
  for row in tbl.rows:
    cfg = paper_lib.build_config(row, scale)
    name = paper_lib.run_name(cfg)
    res = results.get(name)
    oracle_name = None
    transfer = None
    if row.oracle is not None:
      oracle_name = paper_lib.run_name(paper_lib.build_config(row.oracle, scale))
      transfer = transfers.get((name, oracle_name))
    done = res is not None and (row.oracle is None or transfer is not None)
    entry: dict[str, Any] = {
        "net": row.net, "dataset": row.dataset, "run_dataset": cfg.dataset, "run_net": cfg.model.name,
        "quant": row.quant_label, "loss": row.loss_label, "run": name, "oracle_run": oracle_name,
        "oracle": None if row.oracle is None else f"{row.oracle.net} {row.oracle.quant_label}",
        "state": "done" if done else "pending", "columns": {},
        "wall_seconds": None if res is None else (
            res["train_seconds"] + res["eval_seconds"] if "train_seconds" in res and "eval_seconds" in res
            else res.get("wall_seconds")),
        "examples_robust": None if res is None else res.get("robust", {}).get("examples"),
        "dispersion_channels": None if res is None else _dispersion_channels(res),
    }
    paper_numbers = dict(row.paper)
    for column in tbl.columns:
      ours = paper_lib.measured(res, column, transfer) if done else None
      theirs = paper_numbers.get(column)
      entry["columns"][column] = {
          "paper": theirs, "ours": ours,
          "diff": None if ours is None or theirs is None else ours - theirs}
    if done:  # a transfer row's worst case and other attacks are the transfer's, not the white-box ones
      robust = transfer if transfer is not None else res.get("robust", {})
      entry["worst_case"] = (100 * robust["accuracy_worst_case"] if "accuracy_worst_case" in robust
                             else None)
      extra = {k: 100 * v for k, v in robust.get("accuracy", {}).items()
               if k not in ("natural", "n", *tbl.columns)}
      entry["extra_attacks"] = extra
    out.append(entry)
  return out


def accuracies(results: dict) -> dict[str, float]:
  """A run's headline accuracies from its ``results.json``: ``N`` and every attack (not the counts)."""
  robust = results.get("robust", {}).get("accuracy", {})
  return {"N": results.get("natural_accuracy"),
          **{k: v for k, v in robust.items() if k not in ("n", "natural")}}


def reproduction_report(name: str, committed: dict, rerun: dict) -> str:
  """One line: does a retrained run give its committed accuracies exactly, and if not, what moved (points)."""
  before, after = accuracies(committed), accuracies(rerun)
  if before == after:
    return f"reproduced: {name} gives the committed accuracies exactly ({before})"
  moved = []
  for k in sorted(set(before) | set(after)):
    b, a = before.get(k), after.get(k)
    if b != a:
      delta = f" ({100 * (a - b):+.2f})" if isinstance(a, (int, float)) and isinstance(b, (int, float)) else ""
      moved.append(f"{k} {b} -> {a}{delta}")
  return f"warning: {name} differs from its committed results: " + ", ".join(moved)


def rerun_differs(committed: dict, rerun: dict) -> bool:
  """Whether a retrained run gives another value for an accuracy its committed results hold (accuracies
  only one of them has, e.g. an attack added later, are an extension, not a difference)."""
  before, after = accuracies(committed), accuracies(rerun)
  return any(before[k] != after[k] for k in before.keys() & after.keys())


def reruns_markdown(scale: str, reruns: list[tuple[str, dict, dict]]) -> str:
  """``results/<scale>/reruns.md``: per retrained run ``(name, committed, rerun)``, each accuracy's
  committed value, the rerun's, and the difference (points)."""
  keys = sorted({k for _, c, r in reruns for k in accuracies(c).keys() & accuracies(r).keys()},
                key=lambda k: (k != "N", k))
  lines = [f"# Reruns of committed runs ({scale} scale)", "",
           "The same configuration and seeds (the same run name) trained again, possibly on another machine "
           "and a later commit of enquant (package versions: each file's `software`), against its committed "
           "results: committed -> rerun (difference in points). The tables keep the committed (first) run; a "
           "rerun that differs measures how far training, not the test sample, moves a row. Each rerun's "
           f"results: `results/{scale}/reruns/<run>.json`.", "",
           "| run | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
  for name, committed, rerun in sorted(reruns, key=lambda t: t[0]):
    before, after = accuracies(committed), accuracies(rerun)
    cells = [f"{100 * before[k]:.2f} -> {100 * after[k]:.2f} ({100 * (after[k] - before[k]):+.2f})"
             if isinstance(before.get(k), (int, float)) and isinstance(after.get(k), (int, float)) else "-"
             for k in keys]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def paired_difference(better, worse) -> dict[str, float]:
  """``better - worse`` accuracy (points) from per-image correctness on the same images, with the 95 %
  interval of the mean of the per-image differences (normal approximation; McNemar's setting).

  Returns:
    ``{"diff", "low", "high", "n", "verdict"}``; verdict "holds" (interval above 0), "reversed" (below 0)
    or "inconclusive".
  """
  a, b = np.asarray(better, bool), np.asarray(worse, bool)
  if a.shape != b.shape or a.ndim != 1 or a.size < 2:
    raise ValueError("paired masks must be two 1-D masks of the same length >= 2, got "
                     f"{a.shape} and {b.shape}")
  d = a.astype(np.float64) - b.astype(np.float64)
  mean, half = d.mean(), Z95 * d.std(ddof=1) / math.sqrt(d.size)
  low, high = 100 * (mean - half), 100 * (mean + half)
  verdict = "holds" if low > 0 else "reversed" if high < 0 else "inconclusive"
  return {"diff": 100 * mean, "low": low, "high": high, "n": int(d.size), "verdict": verdict}


def _masks(res: dict | None, transfer: dict | None) -> dict[str, np.ndarray] | None:
  source = transfer if transfer is not None else (res or {}).get("robust")
  if not source or "masks" not in source:
    return None
  n = int(source["accuracy"]["n"])
  return {k: evalfiles.unpack_mask(v, n) for k, v in source["masks"].items()}


def check_rows(tbl: paper_lib.Table, scale: str, results: dict[str, dict], transfers: dict[tuple, dict]
               ) -> list[dict[str, Any]]:
  """Every :class:`enquant.paper.Check` of ``tbl``: per column the paired difference (or the reason it is
  missing: a pending run, or results that predate per-image masks), and a verdict over its columns."""
  out = []
  for check in tbl.checks:
    sides, state = [], "done"
    for row in (check.better, check.worse):
      name = paper_lib.run_name(paper_lib.build_config(row, scale))
      transfer = None
      if row.oracle is not None:
        transfer = transfers.get((name, paper_lib.run_name(paper_lib.build_config(row.oracle, scale))))
      res = results.get(name)
      if res is None or (row.oracle is not None and transfer is None):
        state = "pending"
      elif state == "done" and _masks(res, transfer) is None:
        state = ("no per-image masks: the results predate them (python -m experiments.paper --add_masks "
                 "adds them from the run directory; without the trained model they cannot be added)")
      sides.append(None if state != "done" else _masks(res, transfer))
    entry: dict[str, Any] = {"check": check.label, "state": state, "columns": {}}
    carried = _carried_check(check, scale, transfers) if state not in ("done", "pending") else None
    if carried is not None:  # a transfer kept without masks, its check computed when the models existed
      entry = dict(carried[0], check=check.label,
                   verdict=f"{carried[0]['verdict']} (computed before; {carried[1]})")
    elif state == "done":
      for column in check.columns:
        key = "natural" if column == "N" else column
        entry["columns"][column] = paired_difference(sides[0][key], sides[1][key])
      verdicts = [v["verdict"] for v in entry["columns"].values()]
      entry["verdict"] = ("holds" if all(v == "holds" for v in verdicts) else
                          "reversed" if all(v == "reversed" for v in verdicts) else
                          ", ".join(f"{verdicts.count(v)} {v}" for v in ("holds", "inconclusive", "reversed")
                                    if v in verdicts))
    out.append(entry)
  return out


def _carried_check(check, scale: str, transfers: dict[tuple, dict]):
  """``(check entry, source)`` kept inside a transfer evaluation that was reconstructed without per-image
  masks (its models gone), or None."""
  row = check.better
  if row.oracle is None:
    return None
  key = tuple(paper_lib.run_name(paper_lib.build_config(r, scale)) for r in (row, row.oracle))
  transfer = transfers.get(key) or {}
  if "check" not in transfer or "masks" in transfer:
    return None
  return transfer["check"], transfer.get("reconstructed_from", "kept without masks")


def _dispersion_channels(res: dict[str, Any]) -> int | None:
  """The input channels a run's pooled zero dispersion (paper counting) averages. Runs written before
  ``total/dispersion_channels`` existed give every 3x3 input channel, the same number whenever every 3x3
  layer has both zero and nonzero weights (true of every ternary and 4-bit run committed before it)."""
  counted = res.get("efficiency", {}).get("sparsity_paper_counting", {})
  return counted.get("total/dispersion_channels", counted.get("total/in_channels"))


def dispersion_chance(channels_a: int, channels_b: int) -> float:
  """Twice the standard deviation of the difference of two runs' pooled zero dispersion when every zero
  falls independently (``2 sqrt(2 / C_a + 2 / C_b)``, C the input channels pooled): each channel's
  standardised squared deviation is then about chi-square with 1 degree of freedom (variance 2), and the
  index is their mean. Checked by simulation in the tests. A difference below it is not evidence of
  structure; seed-to-seed spread of trained runs can only add to it."""
  return 2.0 * math.sqrt(2.0 / channels_a + 2.0 / channels_b)


def trend_rows(tbl: paper_lib.Table, scale: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Every :class:`enquant.paper.Trend` of ``tbl`` from its :func:`table_rows`: the difference ``larger -
  smaller`` of the column, the paper's and ours, and our verdict (holds: > 0, reversed: < 0, tie; for
  zero dispersion also tie when the difference is within :func:`dispersion_chance`, kept as ``chance``)."""
  by_run = {r["run"]: r for r in rows if r["state"] == "done"}
  out = []
  for trend in tbl.trends:
    theirs = [dict(r.paper).get(trend.column) for r in (trend.larger, trend.smaller)]
    ours = [by_run.get(paper_lib.run_name(paper_lib.build_config(r, scale))) for r in (trend.larger,
                                                                                       trend.smaller)]
    entry: dict[str, Any] = {"trend": trend.label, "column": trend.column,
                             "paper": None if None in theirs else theirs[0] - theirs[1]}
    values = [None if r is None else r["columns"][trend.column]["ours"] for r in ours]
    if None in values:
      entry["state"] = "pending"
    else:
      diff = values[0] - values[1]
      channels = [r.get("dispersion_channels") for r in ours]
      chance = (dispersion_chance(*channels) if trend.column == "zero_dispersion" and None not in channels
                else 0.0)
      entry.update(state="done", ours=diff,
                   verdict="holds" if diff > chance else "reversed" if diff < -chance else "tie")
      if chance:
        entry["chance"] = chance
    out.append(entry)
  return out


def _trends_markdown(trends: list[dict[str, Any]]) -> list[str]:
  lines = ["## Trends on our runs", "",
           "The first row's number minus the second's (points of sparsity, M, or zero dispersion), the "
           "paper's and ours. One run each, so there is no interval: a difference of a few tenths of a point "
           "may be seed noise. A zero-dispersion difference within twice its standard deviation under "
           "independent zeros (2 sqrt(2/C1 + 2/C2), C the input channels counted) is a tie.", "",
           "| trend | paper | ours | verdict |", "|---|---|---|---|"]
  for t in trends:
    fmt = (lambda v: "-" if v is None else f"{v:+.4f}") if t["column"] == "M" else (
        lambda v: "-" if v is None else f"{v:+.2f}")
    verdict = t.get("verdict", t["state"]) + (f" (chance {t['chance']:.2f})" if "chance" in t else "")
    lines.append(f"| {t['trend']} | {fmt(t['paper'])} | {fmt(t.get('ours'))} | {verdict} |")
  return lines + [""]


def _checks_markdown(tbl: paper_lib.Table, checks: list[dict[str, Any]]) -> list[str]:
  columns = [c for c in tbl.columns + ("N", "A1", "A2", "A3") if any(c in k.columns for k in tbl.checks)]
  columns = list(dict.fromkeys(columns))
  lines = ["## Claim check on our runs", "",
           "Accuracy of the first run minus the second's, in points, on the same test images (N: clean "
           "accuracy on those images), with the 95 % interval of the paired per-image differences. *holds*: the "
           "interval lies above 0; *reversed*: below 0; *inconclusive*: it contains 0. The interval covers "
           "the sampling of test images only: each row is one training run, so seed-to-seed variation is "
           "not in it.", "",
           "| check | " + " | ".join(columns) + " | verdict |", "|" + "---|" * (len(columns) + 2)]
  for entry in checks:
    cells = [entry["check"]]
    for c in columns:
      v = entry["columns"].get(c)
      cells.append("-" if v is None else
                   f"{v['diff']:+.2f} [{v['low']:+.2f}, {v['high']:+.2f}] {v['verdict']}")
    cells.append(entry.get("verdict", entry["state"]))
    lines.append("| " + " | ".join(cells) + " |")
  return lines + [""]


def _noise_note(tbl: paper_lib.Table) -> str:
  """Which generator drew EnResNet's N(0, 1) noise in the table's rows (enquant.models.noise)."""
  legacy = [f"{r.dataset} {r.quant_label}" for r in tbl.rows
            if (r.noise_rng or paper_lib.PAPER_NOISE_RNG) != paper_lib.PAPER_NOISE_RNG]
  note = f"Noise normals from the {paper_lib.PAPER_NOISE_RNG} generator"
  return note + (f" ({', '.join(legacy)}: threefry, as trained before the hash existed)." if legacy else ".")


def table_markdown(tbl: paper_lib.Table, scale: str, rows: list[dict[str, Any]],
                   checks: list[dict[str, Any]] | None = None,
                   trends: list[dict[str, Any]] | None = None) -> str:
  """The Markdown of a rebuilt table (header with the protocol and the claim, the rows, then the claim
  checks of :func:`check_rows` and the trends of :func:`trend_rows`)."""
  if scale == "paper":
    protocol = ("paper scale: the paper's protocol (200 epochs, PGD-10 training attack, A1-A3 at eps 0.031 "
                "on the whole test set).")
  elif paper_lib.gpu_epochs(scale) is not None:
    protocol = paper_lib.gpu_note(paper_lib.gpu_epochs(scale))
  else:
    kinds = sorted({paper_lib.cpu_kind(r) for r in tbl.rows})
    labels = {"claim": "CIFAR/SVHN rows", "direct": "MNIST/Fashion-MNIST rows"}
    protocol = " ".join(f"*{labels[k]}:* {paper_lib.CPU_NOTES[k]}" for k in kinds)
  cfgs = [paper_lib.build_config(r, scale) for r in tbl.rows]
  seeds = lambda values: ", ".join(str(v) for v in sorted(set(values)))
  protocol += (f" Seeds: training {seeds(c.train.seed for c in cfgs)} (initialisation, batches, augmentation, "
               f"noise, training attack), evaluation {seeds(c.eval.seed for c in cfgs)}; one training run per "
               "row.")
  lines = [f"# Table {tbl.name}: {tbl.title}", "",
           f"**Claim:** {tbl.claim}.", "", f"**Protocol:** {protocol}", "",
           "Numbers in %, except M and zero_dispersion (the dispersion index of the input channels' zero "
           "fractions of the 3x3 kernels: 1 = zeros scattered independently, 9 x out-channels = whole zero "
           "channels; the paper has no such number). *paper* = the paper's value, *ours* = this run, "
           "*diff* = ours - paper. "
           "A2 = IFGSM-20 (step 0.003), A3 = CW-l_inf (50 steps, margin loss; the paper's C&W was an L2 "
           "attack), worst = per-image worst case over every attack run at eps 0.031. wall = every training epoch "
           "(over all calls of a resumed run) + the final evaluation's last call (runs before stop 10: the "
           "last call only). " + _noise_note(tbl),
           ""]
  header = ["net", "dataset", "quant", "loss"]
  if tbl.transfer:
    header.append("oracle")
  for c in tbl.columns:
    header += [f"{c} paper", f"{c} ours", f"{c} diff"]
  header += ["worst", "other attacks (ours)", "run (dataset, net)", "wall"]
  lines.append("| " + " | ".join(header) + " |")
  lines.append("|" + "---|" * len(header))
  for r in rows:
    cells = [r["net"], r["dataset"], r["quant"], r["loss"]]
    if tbl.transfer:
      cells.append(r["oracle"] or "")
    for c in tbl.columns:
      v = r["columns"][c]
      diff = "-" if v["diff"] is None else f"{v['diff']:+.2f}" if c != "M" else f"{v['diff']:+.4f}"
      cells += [_fmt(v["paper"], c), _fmt(v["ours"], c) if r["state"] == "done" else "pending", diff]
    cells.append(_fmt(r.get("worst_case"), "N"))
    cells.append(", ".join(f"{k} {v:.2f}" for k, v in sorted(r.get("extra_attacks", {}).items())) or "-")
    cells.append(f"{r['run_dataset']}, {r['run_net']}")
    wall = r.get("wall_seconds")
    cells.append("-" if wall is None else f"{wall / 60:.0f} min")
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  lines.append("")
  if checks:
    lines += _checks_markdown(tbl, checks)
  if trends:
    lines += _trends_markdown(trends)
  return "\n".join(lines)


STUDY_COLUMNS = ("epochs", "N", "A1", "A2", "A3", "weight sparsity", "channel sparsity",
                 "in-channel sparsity", "zero dispersion", "M", "train min")


def portable(results: dict) -> dict:
  """A run's results (or a transfer evaluation) as committed under ``results/``: its machine's absolute
  paths made relative to the cwd."""
  return {k: os.path.relpath(v) if k in ("workdir", "dataset_source", "oracle") and isinstance(v, str)
          and os.path.isabs(v) else v for k, v in results.items()}


def study_row(results: dict) -> dict[str, Any]:
  """One row of a training-length study from a run's ``results.json``: accuracies and sparsities in %,
  channels counted as the paper counts them, M, training minutes."""
  counted = results["efficiency"]["sparsity_paper_counting"]
  acc = results.get("robust", {}).get("accuracy", {})
  pct = lambda v: None if v is None else 100 * v
  return {"epochs": results["config"]["train"]["epochs"], "N": pct(results["natural_accuracy"]),
          **{a: pct(acc.get(a)) for a in ("A1", "A2", "A3")},
          "weight sparsity": pct(counted["total/weight_sparsity"]),
          "channel sparsity": pct(counted["total/channel_sparsity"]),
          "in-channel sparsity": pct(counted["total/in_channel_sparsity"]),
          "zero dispersion": counted.get("total/zero_dispersion"), "M": results["m_bound"],
          "train min": results["train_seconds"] / 60}


def study_markdown(name: str, rows: list[dict[str, Any]]) -> str:
  """The training-length study of run ``name`` as Markdown (rows from :func:`study_row`)."""
  def fmt(column, v):
    if v is None:
      return "-"
    return str(v) if column == "epochs" else f"{v:.4f}" if column == "M" else f"{v:.2f}"
  lines = [f"# {name}, trained longer", "",
           f"`python -m experiments.epochs_study --run={name}`: the same configuration for more epochs "
           "(learning-rate milestones and Binary-Relax's lambda schedule rescaled). Accuracies and "
           "sparsities in %; channels counted as the paper counts them (3x3 convolutions); zero "
           "dispersion 1 = zeros scattered independently; M = max over epochs of max over conv layers of mean |w|.", "",
           "| " + " | ".join(STUDY_COLUMNS) + " |", "|" + "---|" * len(STUDY_COLUMNS)]
  lines += ["| " + " | ".join(fmt(c, r[c]) for c in STUDY_COLUMNS) + " |" for r in rows]
  return "\n".join(lines) + "\n"


SEED_COLUMNS = ("N", "A1", "A2", "A3")


def seed_row(results: dict, seed: int) -> dict[str, Any]:
  """One row of a seeds study from a run's ``results.json``: N on the whole test set, A1-A3 on the
  evaluated images (%), training minutes, and the per-image correctness for paired differences."""
  robust = results.get("robust", {})
  acc = robust.get("accuracy", {})
  n = int(acc.get("n", 0))
  masks = {k: evalfiles.unpack_mask(v, n) for k, v in robust.get("masks", {}).items()}
  train = results.get("train_seconds")
  return {"seed": seed, "N": 100 * results["natural_accuracy"],
          **{a: None if a not in acc else 100 * acc[a] for a in SEED_COLUMNS[1:]},
          "train min": None if train is None else train / 60, "masks": masks}


def across_seeds(values: list[float]) -> dict[str, Any]:
  """Mean, sample sd and the 95 % Student-t interval of the mean of per-seed ``values`` (e.g. one
  difference between two configurations per training seed): what training noise leaves of a claim."""
  from scipy import stats  # pylint: disable=g-import-not-at-top  (a JAX dependency)
  v = np.asarray(values, np.float64)
  if v.ndim != 1 or v.size < 2:
    raise ValueError(f"across_seeds needs >= 2 values, got {v.size}")
  mean, sd = float(v.mean()), float(v.std(ddof=1))
  half = float(stats.t.ppf(0.975, v.size - 1)) * sd / math.sqrt(v.size)
  verdict = "holds" if mean - half > 0 else "reversed" if mean + half < 0 else "inconclusive"
  return {"mean": mean, "sd": sd, "low": mean - half, "high": mean + half, "seeds": int(v.size),
          "verdict": verdict}


def seeds_markdown(runs: list[str], rows: dict[str, list[dict[str, Any]]]) -> tuple[str, dict]:
  """The seeds study of one run (its spread over training seeds) or of two (``runs[0] - runs[1]`` per
  seed, on the same test images, and across seeds) as Markdown, with the numbers as a dict."""
  def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)
  lines = [f"# Training seeds: {' vs '.join(runs)}", "",
           f"`python -m experiments.seeds_study --runs={','.join(runs)}`: each configuration trained again "
           "from other seeds (initialisation, batches, noise, training attacks); seed 0 is the table's run. "
           "Evaluation images and attack keys are the same for every seed. N on the whole test set, A1-A3 "
           "on the evaluated images, in %.", "",
           "| run | seed | " + " | ".join(SEED_COLUMNS) + " | train min |",
           "|---|---|" + "---|" * (len(SEED_COLUMNS) + 1)]
  summary: dict[str, Any] = {"runs": runs, "spread": {}, "difference": None}
  for run in runs:
    for r in rows[run]:
      lines.append(f"| {run} | {r['seed']} | " + " | ".join(fmt(r[c]) for c in SEED_COLUMNS)
                   + f" | {fmt(r['train min'], '.1f')} |")
  lines += ["", "Spread over seeds (sample sd, points):", "", "| run | seeds | " + " | ".join(SEED_COLUMNS)
            + " |", "|---|---|" + "---|" * len(SEED_COLUMNS)]
  for run in runs:
    spread = {c: float(np.std([r[c] for r in rows[run]], ddof=1)) if len(rows[run]) > 1
              and all(r[c] is not None for r in rows[run]) else None for c in SEED_COLUMNS}
    summary["spread"][run] = spread
    lines.append(f"| {run} | {len(rows[run])} | " + " | ".join(fmt(spread[c]) for c in SEED_COLUMNS) + " |")
  if len(runs) == 2:
    a, b = ({r["seed"]: r for r in rows[run]} for run in runs)
    seeds = sorted(set(a) & set(b))
    lines += ["", f"{runs[0]} minus {runs[1]}, per seed (paired on the evaluated images, 95 % interval) and "
              "across seeds (mean, sd, 95 % t interval of the mean over seeds):", "",
              "| seed | " + " | ".join(SEED_COLUMNS) + " |", "|---|" + "---|" * len(SEED_COLUMNS)]
    per_seed = {c: [] for c in SEED_COLUMNS}
    for s in seeds:
      cells = []
      for c in SEED_COLUMNS:
        mask = "natural" if c == "N" else c
        d = a[s][c] - b[s][c] if a[s][c] is not None and b[s][c] is not None else None
        if d is not None:
          per_seed[c].append(d)
        if mask in a[s]["masks"] and mask in b[s]["masks"]:
          pd = paired_difference(a[s]["masks"][mask], b[s]["masks"][mask])
          cells.append(f"{pd['diff']:+.2f} [{pd['low']:+.2f}, {pd['high']:+.2f}]" + (
              f" (all images {d:+.2f})" if c == "N" and d is not None else ""))
        else:
          cells.append("-" if d is None else f"{d:+.2f}")
      lines.append(f"| {s} | " + " | ".join(cells) + " |")
    over = {c: across_seeds(v) if len(v) >= 2 else None for c, v in per_seed.items()}
    lines.append("| across seeds | " + " | ".join(
        "-" if o is None else f"{o['mean']:+.2f} (sd {o['sd']:.2f}) [{o['low']:+.2f}, {o['high']:+.2f}]: "
        f"{o['verdict']}" for o in over.values()) + " |")
    summary["difference"] = {"seeds": seeds, "per_seed": per_seed, "across_seeds": over}
  return "\n".join(lines) + "\n", summary


__all__ = ["STUDY_COLUMNS", "SEED_COLUMNS", "accuracies", "across_seeds", "check_rows", "dispersion_chance",
           "paired_difference", "portable", "reproduction_report", "rerun_differs", "reruns_markdown",
           "seed_row", "seeds_markdown", "study_markdown", "study_row", "table_markdown", "table_rows",
           "trend_rows"]
