"""The claims of a table tested on our runs: paired checks (exact McNemar test) and one-number trends.

:func:`check_rows` compares two runs on the same test images per column: the difference of accuracies, the
discordant counts (b: images only the first run gets right, c: only the second), the two-sided exact
McNemar p (the binomial test of b against b + c draws of a fair coin) that decides the verdict, and the
normal 95 % interval of the paired per-image differences as the effect size. :func:`trend_rows` judges
the claims about one number per run (M, sparsity) that no per-image difference can test.
"""

import fractions
import math
from typing import Any

import numpy as np

from enquant import results as results_lib
from experiments.paper import scales

Z95 = 1.959964  # two-sided 95 % normal quantile
ALPHA = 0.05  # the level of the McNemar test that decides a check


def mcnemar_p(b: int, c: int) -> float:
  """Two-sided exact McNemar p of ``b`` and ``c`` discordant pairs: ``min(1, 2 P[X <= min(b, c)])`` for
  ``X ~ Binomial(b + c, 1/2)`` (1 when there is no discordant pair), computed in exact arithmetic."""
  for name, v in (("b", b), ("c", c)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
      raise ValueError(f"discordant count {name} must be a non-negative integer, got {v!r}")
  m, k = int(b) + int(c), min(int(b), int(c))
  if m == 0:
    return 1.0
  tail = fractions.Fraction(sum(math.comb(m, i) for i in range(k + 1)), 2 ** m)
  return float(min(fractions.Fraction(1), 2 * tail))


def _verdict(diff: float, p: float) -> str:
  if p >= ALPHA or diff == 0:
    return "inconclusive"
  return "holds" if diff > 0 else "reversed"


def _decided(kept: dict[str, Any]) -> dict[str, Any]:
  """A kept paired comparison (difference, interval, discordant counts) decided by the McNemar test."""
  p = mcnemar_p(kept["b"], kept["c"])
  return dict(kept, p=p, verdict=_verdict(kept["b"] - kept["c"], p))


def paired_difference(better, worse) -> dict[str, Any]:
  """``better - worse`` accuracy (points) from per-image correctness on the same images.

  Returns:
    ``{"diff", "low", "high", "n", "b", "c", "p", "verdict"}``: the difference, the 95 % normal interval
    of the mean per-image difference (the effect size), the discordant counts, the exact McNemar p and
    the verdict it decides: "holds" (p < 0.05, better ahead), "reversed" (p < 0.05, worse ahead) or
    "inconclusive".
  """
  a, w = np.asarray(better, bool), np.asarray(worse, bool)
  if a.shape != w.shape or a.ndim != 1 or a.size < 2:
    raise ValueError("paired masks must be two 1-D masks of the same length >= 2, got "
                     f"{a.shape} and {w.shape}")
  d = a.astype(np.float64) - w.astype(np.float64)
  mean, half = d.mean(), Z95 * d.std(ddof=1) / math.sqrt(d.size)
  b, c = int(np.sum(a & ~w)), int(np.sum(~a & w))
  p = mcnemar_p(b, c)
  return {"diff": 100 * mean, "low": 100 * (mean - half), "high": 100 * (mean + half), "n": int(d.size),
          "b": b, "c": c, "p": p, "verdict": _verdict(mean, p)}


def _masks(res: results_lib.RunResults | None,
           transfer: results_lib.Evaluation | None) -> dict[str, np.ndarray] | None:
  source = transfer if transfer is not None else (res.robust if res is not None else None)
  if source is None or not source.masks:
    return None
  return source.unpacked_masks()


def overall(verdicts: list[str]) -> str:
  """One verdict over columns: "holds" or "reversed" when every column says so, else the counts."""
  if all(v == "holds" for v in verdicts):
    return "holds"
  if all(v == "reversed" for v in verdicts):
    return "reversed"
  return ", ".join(f"{verdicts.count(v)} {v}" for v in ("holds", "inconclusive", "reversed") if v in verdicts)


def _sides(check, scale, results, transfers, reruns):
  """``(state, [masks of better, masks of worse], retrained)`` of a check. A committed run without
  per-image masks (its model was not kept) lends the masks of its retrained run where there is one
  (``retrained``: those runs' names)."""
  sides, state, retrained = [], "done", []
  for row in (check.better, check.worse):
    name = scales.run_name(scales.build_config(row, scale))
    transfer = None
    if row.oracle is not None:
      transfer = transfers.get((name, scales.run_name(scales.build_config(row.oracle, scale))))
    res = results.get(name)
    masks = None if res is None else _masks(res, transfer)
    if masks is None and res is not None and row.oracle is None and name in reruns:
      masks = _masks(reruns[name], None)
      retrained += [name] if masks is not None else []
    if res is None or (row.oracle is not None and transfer is None):
      state = "pending"
    elif state == "done" and masks is None:
      state = "no per-image masks"
    sides.append(None if state != "done" else masks)
  return state, sides, retrained


def check_rows(tbl, scale: str, results: dict[str, results_lib.RunResults],
               transfers: dict[tuple, results_lib.Evaluation],
               reruns: dict[str, results_lib.RunResults] | None = None) -> list[dict[str, Any]]:
  """Every :class:`~experiments.paper.tables.Check` of ``tbl``: per column the paired comparison of
  :func:`paired_difference` (or why it is missing: a pending run, or no per-image masks), and a verdict
  over its columns. ``reruns``: retrained runs by name, whose masks stand in for a committed run kept
  without them (the entry's ``retrained`` names them, its verdict says so)."""
  out = []
  for check in tbl.checks:
    state, sides, retrained = _sides(check, scale, results, transfers, reruns or {})
    entry: dict[str, Any] = {"check": check.label, "state": state, "columns": {}}
    carried = _carried_check(check, scale, transfers) if state not in ("done", "pending") else None
    if carried is not None:  # kept as discordant counts in a transfer evaluation without masks
      columns = {k: _decided(v) for k, v in carried[0]["columns"].items()}
      entry = dict(entry, state="done", columns=columns,
                   verdict=f"{overall([v['verdict'] for v in columns.values()])} (from {carried[1]})")
    elif state == "done":
      for column in check.columns:
        key = "natural" if column == "N" else column
        entry["columns"][column] = paired_difference(sides[0][key], sides[1][key])
      entry["verdict"] = overall([v["verdict"] for v in entry["columns"].values()])
      if retrained:
        entry.update(retrained=retrained, verdict=entry["verdict"] + " (on the retrained run"
                     + ("s" if len(retrained) > 1 else "") + ")")
    out.append(entry)
  return out


def _carried_check(check, scale: str, transfers: dict[tuple, results_lib.Evaluation]):
  """``(check entry, source)`` kept inside a transfer evaluation without per-image masks, or None."""
  row = check.better
  if row.oracle is None:
    return None
  key = tuple(scales.run_name(scales.build_config(r, scale)) for r in (row, row.oracle))
  transfer = transfers.get(key)
  if transfer is None or "check" not in transfer.data or transfer.masks:
    return None
  return transfer.data["check"], transfer.data.get("reconstructed_from", "kept without masks")


def dispersion_chance(channels_a: int, channels_b: int) -> float:
  """Twice the standard deviation of the difference of two runs' pooled zero dispersion when every zero
  falls independently (``2 sqrt(2 / C_a + 2 / C_b)``, C the input channels pooled): each channel's
  standardised squared deviation is then about chi-square with 1 degree of freedom (variance 2), and the
  index is their mean. Checked by simulation in the tests. A difference below it is not evidence of
  structure; seed-to-seed spread of trained runs can only add to it."""
  return 2.0 * math.sqrt(2.0 / channels_a + 2.0 / channels_b)


def trend_rows(tbl, scale: str, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Every :class:`~experiments.paper.tables.Trend` of ``tbl`` from its table rows: the difference
  ``larger - smaller`` of the column, the paper's and ours, and our verdict (holds: > 0, reversed: < 0,
  tie; for zero dispersion also tie when the difference is within :func:`dispersion_chance`, kept as
  ``chance``)."""
  by_run = {r["run"]: r for r in rows if r["state"] == "done"}
  out = []
  for trend in tbl.trends:
    theirs = [dict(r.paper).get(trend.column) for r in (trend.larger, trend.smaller)]
    ours = [by_run.get(scales.run_name(scales.build_config(r, scale))) for r in (trend.larger, trend.smaller)]
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


def checks_markdown(tbl, checks: list[dict[str, Any]]) -> list[str]:
  """The claim checks as Markdown lines."""
  columns = list(dict.fromkeys(c for c in tbl.columns + ("N", "A1", "A2", "A3")
                               if any(c in k.columns for k in tbl.checks)))
  lines = ["## Claim check on our runs", "",
           "Accuracy of the first run minus the second's, in points, on the same test images (N: clean "
           "accuracy on those images; attacks in the paper's counting), with the 95 % interval of the paired "
           "per-image differences as the effect size; b/c: images only the first / only the second run gets "
           "right; p: two-sided exact McNemar test (binomial on b of b + c). *holds*: p < 0.05 and the first "
           "run ahead; *reversed*: p < 0.05 and the second ahead; *inconclusive*: p >= 0.05. The test "
           "covers the sampling of test images only: each row is one training run, so seed-to-seed "
           "variation is not in it.", "",
           "| check | " + " | ".join(columns) + " | verdict |", "|" + "---|" * (len(columns) + 2)]
  for entry in checks:
    cells = [entry["check"]]
    for c in columns:
      v = entry["columns"].get(c)
      cells.append("-" if v is None else f"{v['diff']:+.2f} [{v['low']:+.2f}, {v['high']:+.2f}] "
                   f"{v['b']}/{v['c']} p={v['p']:.3g} {v['verdict']}")
    cells.append(entry.get("verdict", entry["state"]))
    lines.append("| " + " | ".join(cells) + " |")
  return lines + [""]


def trends_markdown(trends: list[dict[str, Any]]) -> list[str]:
  """The trends as Markdown lines."""
  lines = ["## Trends on our runs", "",
           "The first row's number minus the second's (points of sparsity, M, or zero dispersion), the "
           "paper's and ours. One run each, so there is no interval: a difference of a few tenths of a point "
           "may be seed noise. A zero-dispersion difference within twice its standard deviation under "
           "independent zeros (2 sqrt(2/C1 + 2/C2), C the input channels counted) is a tie.", "",
           "| trend | paper | ours | verdict |", "|---|---|---|---|"]
  for t in trends:
    spec = "+.4f" if t["column"] == "M" else "+.2f"
    fmt = lambda v, s=spec: "-" if v is None else format(v, s)
    verdict = t.get("verdict", t["state"]) + (f" (chance {t['chance']:.2f})" if "chance" in t else "")
    lines.append(f"| {t['trend']} | {fmt(t['paper'])} | {fmt(t.get('ours'))} | {verdict} |")
  return lines + [""]


__all__ = ["ALPHA", "across_seeds", "check_rows", "checks_markdown", "dispersion_chance", "overall",
           "mcnemar_p", "paired_difference", "trend_rows", "trends_markdown"]
