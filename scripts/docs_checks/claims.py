"""The numbers REPRODUCTION.md quotes beside the paired checks, recomputed from the committed results.

* sparsity: every depth pair (depth 8 vs 14) of Table VII and the members comparison (En5ResNet8 and
  En2ResNet14 of Table VIII against En1 of the same depth, loss (6)) in channel sparsity (paper counting:
  zero input channels of the 3x3 kernels) and zero dispersion, with the chance level of a dispersion
  difference (``2 sqrt(2 / C_a + 2 / C_b)``, C the input channels pooled), and the same differences and
  indices on the retrained runs that moved (``reruns/``);
* Table I: what binarizing costs (float minus BR / BC) in N and A1-A3, ours and the paper's;
* the paper's own gaps: Table III (transfer minus white-box), Table VIII (float minus 4-bit / tnn);
* Table VIII's MNIST rows against the paper's numbers;
* Table IV: M, the epoch it is taken at, and M over the 3x3 kernels only;
* natural training under FGSM (A1) and CW (A3), the rows that have it.
"""

from __future__ import annotations

import glob
import json
import math
import os
from typing import Any

_COLS = ("N", "A1", "A2", "A3")


def _load(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _table(results: str, name: str) -> dict:
  return _load(os.path.join(results, f"table_{name}.json"))


def _rerun(results: str, run: str) -> str | None:
  """The results file of ``run``'s retraining with the same seeds, if it moved and was kept."""
  path = os.path.join(results, "reruns", f"{run}.json")
  return path if os.path.exists(path) else None


def _structure(results: str, run: str, retrained: bool = False) -> dict[str, float]:
  """Channel sparsity (paper counting), zero dispersion and its channel count of a committed run (of its
  retrained run where ``retrained`` and one moved)."""
  path = (retrained and _rerun(results, run)) or os.path.join(results, "runs", f"{run}.json")
  counted = _load(path)["efficiency"]["sparsity_paper_counting"]
  return {"in_channel_sparsity": 100 * counted["total/in_channel_sparsity"],
          "zero_dispersion": counted["total/zero_dispersion"],
          "channels": counted.get("total/dispersion_channels", counted["total/in_channels"])}


def dispersion_chance(channels_a: int, channels_b: int) -> float:
  """Twice the sd of the difference of two pooled zero-dispersion indices when zeros fall independently:
  each channel's standardised squared deviation is about chi-square(1) (variance 2), so ``2 sqrt(2/C_a +
  2/C_b)`` for C input channels pooled."""
  if channels_a < 1 or channels_b < 1:
    raise ValueError(f"channel counts must be >= 1, got {channels_a} and {channels_b}")
  return 2 * math.sqrt(2 / channels_a + 2 / channels_b)


def _compare(results: str, label: str, more: str, less: str) -> dict[str, Any]:
  """``more`` should be more channel-structured than ``less``: both measures and the verdict."""
  a, b = _structure(results, more), _structure(results, less)
  diff = a["zero_dispersion"] - b["zero_dispersion"]
  chance = dispersion_chance(a["channels"], b["channels"])
  retrained = None  # the same difference with each run's retraining where it moved (None: neither did)
  if _rerun(results, more) or _rerun(results, less):
    retrained = (_structure(results, more, retrained=True)["zero_dispersion"] -
                 _structure(results, less, retrained=True)["zero_dispersion"])
  return {"pair": label, "more": more, "less": less, "channel_sparsity": (a["in_channel_sparsity"],
          b["in_channel_sparsity"]), "dispersion": (a["zero_dispersion"], b["zero_dispersion"]),
          "diff": diff, "chance": chance, "diff_retrained": retrained,
          "verdict": "holds" if diff > chance else "reversed" if diff < -chance else "tie"}


def dispersion_reruns(results: str) -> list[dict[str, Any]]:
  """How far retraining with the same seeds moved the zero dispersion of every kept rerun that has one:
  run-to-run variation, which the chance level of :func:`dispersion_chance` does not cover."""
  out = []
  for path in sorted(glob.glob(os.path.join(results, "reruns", "*.json"))):
    run = os.path.basename(path)[:-5]
    before, after = (_load(p)["efficiency"]["sparsity_paper_counting"].get("total/zero_dispersion")
                     for p in (os.path.join(results, "runs", f"{run}.json"), path))
    if before and after is not None:  # float and binary weights have no zeros to disperse
      out.append({"run": run, "committed": before, "retrained": after, "move": after - before})
  return out


def sparsity(results: str) -> list[dict[str, Any]]:
  """Depth pairs of Table VII (same net, quant and loss; depth 14 should be more structured) and the
  members pairs (more members should be more structured)."""
  rows = _table(results, "VII")["rows"]
  by_key = {(r["run_net"], r["quant"], r["loss"]): r["run"] for r in rows}
  out = [_compare(results, f"depth: {r['run_net']} vs {r['run_net'][:-2]}8, {r['quant']}, {r['loss']}",
                  r["run"], by_key[(r["run_net"][:-2] + "8", r["quant"], r["loss"])])
         for r in rows if r["run_net"].endswith("14")]
  for r in _table(results, "VIII")["rows"]:
    if r["quant"] not in ("tnn", "4-bit") or r["run_dataset"] != "fmnist" or r["run_net"] == "En2ResNet20":
      continue
    depth = "14" if r["run_net"].endswith("14") else "8"
    ref = by_key.get((f"En1ResNet{depth}", r["quant"], r["loss"]))
    label = f"members: {r['run_net']} vs En1 of its depth, {r['quant']}, {r['loss']}"
    if ref and all(label != o["pair"] for o in out):
      out.append(_compare(results, label, r["run"], ref))
  return out


def _rows(results: str, name: str) -> list[dict]:
  return _table(results, name)["rows"]


def _value(row: dict, col: str, side: str) -> float:
  return row["columns"][col][side]


def quantization_cost(results: str) -> list[dict[str, Any]]:
  """Table I: float minus BR and float minus BC per ensemble size, ours and the paper's (points)."""
  rows = {(r["net"], r["quant"]): r for r in _rows(results, "I")}
  out = []
  for net in sorted({n for n, _ in rows}):
    for quant in ("BR", "BC"):
      f, q = rows[(net, "float")], rows[(net, quant)]
      out.append({"net": net, "quant": quant, **{
          side: {c: _value(f, c, side) - _value(q, c, side) for c in _COLS} for side in ("ours", "paper")}})
  return out


def paper_gaps(results: str) -> dict[str, Any]:
  """The paper's transfer minus white-box (Table III) and float minus 4-bit / tnn (Table VIII)."""
  white = {r["net"]: r for r in _rows(results, "I") if r["quant"] == "BR"}
  transfer = [_value(r, c, "paper") - _value(white[r["net"]], c, "paper")
              for r in _rows(results, "III") for c in ("A1", "A2", "A3")]
  viii = _rows(results, "VIII")
  quant_gap = {}
  for r in viii:
    if r["quant"] in ("4-bit", "tnn"):
      f = next(x for x in viii if x["dataset"] == r["dataset"] and x["quant"] == "float")
      quant_gap[f"{r['dataset']} {r['quant']}"] = {c: _value(f, c, "paper") - _value(r, c, "paper")
                                                    for c in _COLS}
  mnist = [abs(_value(r, c, "ours") - _value(r, c, "paper")) for r in viii if r["dataset"] == "mnist"
           for c in _COLS]
  return {"transfer_minus_whitebox": (min(transfer), max(transfer)), "float_minus_quantized": quant_gap,
          "mnist_within_1": (sum(d <= 1 for d in mnist), len(mnist)), "mnist_max_distance": max(mnist)}


def m_bound(results: str) -> list[dict[str, Any]]:
  """Table IV: M, the epoch it is taken at, and M over the 3x3 kernels (and its epoch)."""
  out = []
  for r in _rows(results, "IV"):
    res = _load(os.path.join(results, "runs", f"{r['run']}.json"))
    out.append({"run": r["run"], "M": res["m_bound"], "epoch": res.get("m_bound_epoch"),
                "M_3x3": res.get("m_bound_3x3"), "epoch_3x3": res.get("m_bound_3x3_epoch")})
  return out


def natural_training(results: str) -> list[dict[str, Any]]:
  """N, A1 and A3 of every naturally trained committed run (table runs and the training-length study)."""
  out = []
  for path in sorted(glob.glob(os.path.join(results, "runs", "*natural*.json")) +
                     glob.glob(os.path.join(results, "epochs_runs", "*natural*.json"))):
    res = _load(path)
    acc = res["robust"]["accuracy"]
    out.append({"run": os.path.basename(path)[:-5], "epochs": res["config"]["train"]["epochs"],
                "N": 100 * res["natural_accuracy"], "A1": 100 * acc["A1"], "A3": 100 * acc.get("A3", math.nan)})
  return out


def _markdown(data: dict[str, Any]) -> str:
  """The numbers of :func:`report` as short Markdown sections."""
  s = ["## Sparsity (depth pairs and members; in-channel sparsity %, zero dispersion)\n",
       "| pair | channel sparsity | dispersion | diff | chance | verdict | diff, retrained runs |",
       "|---|---|---|---|---|---|---|"]
  s += [f"| {o['pair']} | {o['channel_sparsity'][0]:.2f} vs {o['channel_sparsity'][1]:.2f} | "
        f"{o['dispersion'][0]:.2f} vs {o['dispersion'][1]:.2f} | {o['diff']:+.2f} | {o['chance']:.2f} | "
        f"{o['verdict']} | " + ("-" if o["diff_retrained"] is None else f"{o['diff_retrained']:+.2f}") + " |"
        for o in data["sparsity"]]
  s += ["\nZero dispersion of retrained runs (same seeds): " + "; ".join(
      f"{r['run']} {r['committed']:.2f} -> {r['retrained']:.2f}" for r in data["dispersion_reruns"])]
  s += ["\n## Table I: float minus quantized (points, N / A1 / A2 / A3)\n"]
  s += [f"- {q['net']} {q['quant']}: ours " + " / ".join(f"{q['ours'][c]:+.2f}" for c in _COLS) +
        "; paper " + " / ".join(f"{q['paper'][c]:+.2f}" for c in _COLS) for q in data["quantization_cost"]]
  g = data["paper_gaps"]
  s += ["\n## The paper's own gaps\n",
        "- Table III transfer minus white-box: {:.2f} to {:.2f}".format(*g["transfer_minus_whitebox"])]
  s += [f"- Table VIII float minus {k}: " + " / ".join(f"{v[c]:+.2f}" for c in _COLS)
        for k, v in g["float_minus_quantized"].items()]
  s += ["- MNIST numbers within 1 point of the paper: {} of {} (largest distance {:.2f})".format(
      *g["mnist_within_1"], g["mnist_max_distance"])]
  s += ["\n## Table IV: M (epoch), M over 3x3 kernels (epoch)\n"]
  s += [f"- {m['run']}: {m['M']:.4f} ({m['epoch']}), {m['M_3x3']:.4f} ({m['epoch_3x3']})" for m in data["m_bound"]]
  s += ["\n## Natural training (N on 10k images, A1 / A3 on 1,000)\n"]
  s += [f"- {r['run']} ({r['epochs']} epochs): N {r['N']:.2f}, A1 {r['A1']:.2f}, A3 {r['A3']:.2f}"
        for r in data["natural_training"]]
  return "\n".join(s) + "\n"


def report(results: str) -> dict[str, Any]:
  """Every number of this module: ``{"data": ..., "markdown": ...}``."""
  data = {"sparsity": sparsity(results), "dispersion_reruns": dispersion_reruns(results),
          "quantization_cost": quantization_cost(results),
          "paper_gaps": paper_gaps(results), "m_bound": m_bound(results),
          "natural_training": natural_training(results)}
  return {"data": data, "markdown": _markdown(data)}
