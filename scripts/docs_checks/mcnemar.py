"""Exact McNemar verdicts for the claim checks of REPRODUCTION.md, from the committed results alone.

For each paired check (two runs evaluated on the same test images) this reads the per-image correctness
masks committed in ``results/<scale>/runs/*.json`` (``robust.masks``) and ``results/<scale>/transfers/*.json``
(``masks``), counts the discordant images ``b`` (only the "better" side right) and ``c`` (only the "worse"
side right), and tests ``b`` against ``Binomial(b + c, 1/2)`` (two-sided exact, ``scipy.stats.binomtest``).
A column "holds" (b > c) or is "reversed" (c > b) only when p < 0.05; the difference ``(b - c) / n`` and its
95 % normal interval stay as the effect size. Transfers committed without masks keep their interval only;
their ``b + c`` is recovered from it (the interval's half-width fixes the variance of the per-image
differences, and so ``b + c``).

It also prints the other numbers REPRODUCTION.md quotes that are not paired checks: the sparsity trends
(depth pairs, members), the cost of quantization (Table I), the paper's own gaps (Tables III, VIII) and
MNIST's distance to the paper.

Usage (from the repository root)::

  python scripts/docs_checks/mcnemar.py [--results=results/cpu] [--json=out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, NamedTuple

import numpy as np
from scipy import stats

ALPHA = 0.05
Z95 = 1.959964  # two-sided 95 % normal quantile, as enquant's paired interval


class Check(NamedTuple):
  """One paired claim check.

  Attributes:
    table: the paper's table (roman numeral).
    label: what the check claims ("better" beats "worse").
    better: run name of the side the claim says is better.
    worse: run name of the other side.
    columns: accuracy columns compared ("N" = the natural mask on the evaluated images).
    oracle: for a transfer check, the oracle run whose examples attack ``better``.
  """
  table: str
  label: str
  better: str
  worse: str
  columns: tuple[str, ...]
  oracle: str | None = None


_ALL = ("N", "A1", "A2", "A3")
_ROBUST = ("A1", "A2", "A3")
_F = "fmnist-"
_E1BR, _E1BC, _E1F = _F + "En1ResNet8-br1b-at-4e0638c4", _F + "En1ResNet8-bc1b-at-00690997", _F + "En1ResNet8-float-at-decc62b5"
_E2BR, _E2BC, _E2F = _F + "En2ResNet8-br1b-at-6b23b62c", _F + "En2ResNet8-bc1b-at-cf443988", _F + "En2ResNet8-float-at-9e58c3e1"
_E5BR, _E5BC, _E5F = _F + "En5ResNet8-br1b-at-67969aca", _F + "En5ResNet8-bc1b-at-5c0c09fc", _F + "En5ResNet8-float-at-c5a5c833"
_E3BR, _E3F = _F + "En3ResNet8-br1b-at-6ee82641", _F + "En3ResNet8-float-at-ae628aab"
_V = _F + "En1ResNet8-float-"
_VIII = _F + "En5ResNet8-float-tradeoff-a1b8-d79d70a6"
_VIII14 = _F + "En2ResNet14-float-tradeoff-a1b8-8cbae947"

# The checks of the tables (cpu scale), run names as committed; the label says what the check claims.
CHECKS = (
    Check("I", "BR beats BC, En1", _E1BR, _E1BC, _ALL),
    Check("I", "BR beats BC, En2", _E2BR, _E2BC, _ALL),
    Check("I", "BR beats BC, En5", _E5BR, _E5BC, _ALL),
    Check("I", "En2 beats En1, float", _E2F, _E1F, _ALL),
    Check("I", "En2 beats En1, BC", _E2BC, _E1BC, _ALL),
    Check("I", "En2 beats En1, BR", _E2BR, _E1BR, _ALL),
    Check("I", "En5 beats En2, float", _E5F, _E2F, _ALL),
    Check("I", "En5 beats En2, BC", _E5BC, _E2BC, _ALL),
    Check("I", "En5 beats En2, BR", _E5BR, _E2BR, _ALL),
    Check("II", "En1 beats ResNet8, float", _E1F, _F + "ResNet8-float-at-78878527", _ROBUST),
    Check("II", "En1 beats ResNet8, BR", _E1BR, _F + "ResNet8-br1b-at-587b4405", _ROBUST),
    Check("II", "En2ResNet8 beats ResNet14, float", _E2F, _F + "ResNet14-float-at-dc1112f0", _ROBUST),
    Check("II", "En2ResNet8 beats ResNet14, BR", _E2BR, _F + "ResNet14-br1b-at-46b76d1a", _ROBUST),
    Check("III", "En2 BR: transfer from En2 float weaker", _E2BR, _E2BR, _ROBUST, _E2F),
    Check("III", "En2 BR: transfer from En3 BR weaker", _E2BR, _E2BR, _ROBUST, _E3BR),
    Check("III", "En2 BR: transfer from En3 float weaker", _E2BR, _E2BR, _ROBUST, _E3F),
    Check("III", "En5 BR: transfer from En5 float weaker", _E5BR, _E5BR, _ROBUST, _E5F),
    Check("III", "En5 BR: transfer from En1 BR weaker", _E5BR, _E5BR, _ROBUST, _E1BR),
    Check("III", "En5 BR: transfer from En1 float weaker", _E5BR, _E5BR, _ROBUST, _E1F),
    Check("V", "(6) beats (5), beta=1", _V + "tradeoff-a1b1-3d18b2e8", _V + "trades-a1b1-4821f23f", _ROBUST),
    Check("V", "(6) beats (5), beta=4", _V + "tradeoff-a1b4-9c4815b7", _V + "trades-a1b4-39653f9d", _ROBUST),
    Check("V", "(6) beats (5), beta=8", _V + "tradeoff-a1b8-ff4031f5", _V + "trades-a1b8-31bcf8ba", _ROBUST),
    Check("VI", "alpha=1 raises N, En1 beta=4", _F + "En1ResNet8-br1b-tradeoff-a1b4-6b8772ed", _E1BR, ("N",)),
    Check("VI", "alpha=1 raises N, En1 beta=8", _F + "En1ResNet8-br1b-tradeoff-a1b8-fd49a8a2", _E1BR, ("N",)),
    Check("VI", "alpha=1 raises N, En2 beta=4", _F + "En2ResNet8-br1b-tradeoff-a1b4-7a738c77", _E2BR, ("N",)),
    Check("VI", "alpha=1 raises N, En2 beta=8", _F + "En2ResNet8-br1b-tradeoff-a1b8-bf52cba1", _E2BR, ("N",)),
    Check("VI", "alpha=1 raises N, En5 beta=4", _F + "En5ResNet8-br1b-tradeoff-a1b4-dedc8189", _E5BR, ("N",)),
    Check("VI", "alpha=1 raises N, En5 beta=8", _F + "En5ResNet8-br1b-tradeoff-a1b8-d01b6f15", _E5BR, ("N",)),
    Check("VIII", "float beats BR, En2ResNet20 MNIST", "mnist-En2ResNet20-float-tradeoff-a1b8-b2000c22",
          "mnist-En2ResNet20-br1b-tradeoff-a1b8-5df078e4", _ALL),
    Check("VIII", "float beats BR, En2ResNet20 FMNIST", _F + "En2ResNet20-float-tradeoff-a1b8-2d842207",
          _F + "En2ResNet20-br1b-tradeoff-a1b8-a7aa277c", _ALL),
    Check("VIII", "float beats 4-bit, En5ResNet8 (CIFAR-10 stand-in)", _VIII,
          _F + "En5ResNet8-br4b-tradeoff-a1b8-1ab752fd", _ALL),
    Check("VIII", "float beats tnn, En5ResNet8 (CIFAR-10 stand-in)", _VIII,
          _F + "En5ResNet8-br2b-tradeoff-a1b8-035bd091", _ALL),
    Check("VIII", "float beats 4-bit, En2ResNet14 (CIFAR-100/SVHN stand-in)", _VIII14,
          _F + "En2ResNet14-br4b-tradeoff-a1b8-2ea17fd0", _ALL),
)


def unpack_mask(packed: str, n: int) -> np.ndarray:
  """Per-image correctness from its committed form (hex of ``np.packbits``) for ``n`` images."""
  bits = np.unpackbits(np.frombuffer(bytes.fromhex(packed), np.uint8))
  if bits.size < n or bits.size >= n + 8:
    raise ValueError(f"a packed mask of {bits.size} bits cannot hold {n} images")
  return bits[:n].astype(bool)


def mcnemar(better, worse) -> dict[str, Any]:
  """Exact McNemar test of ``better`` against ``worse`` on the same images.

  Args:
    better: per-image correctness of the side the claim says is better (1-D bool).
    worse: per-image correctness of the other side, same images.

  Returns:
    ``{"b", "c", "n", "p", "diff", "low", "high", "verdict"}``: discordant counts (only ``better`` right,
    only ``worse`` right), the two-sided exact binomial p of ``b`` in ``b + c`` trials at 1/2 (1 when
    ``b + c = 0``), the difference in points with its 95 % normal interval, and "holds" (p < 0.05, b > c),
    "reversed" (p < 0.05, c > b) or "inconclusive".
  """
  a, w = np.asarray(better, bool), np.asarray(worse, bool)
  if a.shape != w.shape or a.ndim != 1 or a.size < 2:
    raise ValueError(f"paired masks must be two 1-D masks of one length >= 2, got {a.shape} and {w.shape}")
  b, c = int(np.sum(a & ~w)), int(np.sum(~a & w))
  d = a.astype(np.float64) - w.astype(np.float64)
  half = Z95 * d.std(ddof=1) / math.sqrt(d.size)
  return {"b": b, "c": c, "n": int(d.size), "p": exact_p(b, c), "diff": 100 * d.mean(),
          "low": 100 * (d.mean() - half), "high": 100 * (d.mean() + half), "verdict": verdict(b, c)}


def exact_p(b: int, c: int) -> float:
  """Two-sided exact binomial p of ``b`` successes in ``b + c`` trials at 1/2 (1 for no trials)."""
  if b < 0 or c < 0:
    raise ValueError(f"discordant counts must be >= 0, got b={b}, c={c}")
  return 1.0 if b + c == 0 else float(stats.binomtest(b, b + c, 0.5).pvalue)


def verdict(b: int, c: int) -> str:
  """"holds" / "reversed" when the exact p < 0.05 (by the sign of b - c), else "inconclusive"."""
  if exact_p(b, c) >= ALPHA:
    return "inconclusive"
  return "holds" if b > c else "reversed"


def discordant_from_interval(diff: float, low: float, n: int) -> tuple[int, int]:
  """``(b, c)`` recovered from a paired difference and its 95 % interval (points) on ``n`` images.

  The per-image differences take values -1, 0, 1: with mean ``m = (b - c) / n`` and sample variance ``s^2``,
  ``b + c = (n - 1) s^2 + n m^2``; ``s`` follows from the half-width ``Z95 s / sqrt(n)``.
  """
  m, s = diff / 100, (diff - low) / 100 * math.sqrt(n) / Z95
  total, gap = round((n - 1) * s * s + n * m * m), round(n * m)
  if (total + gap) % 2 or abs(gap) > total:
    raise ValueError(f"no discordant counts fit diff={diff}, low={low}, n={n}")
  return (total + gap) // 2, (total - gap) // 2


def _load(path: str) -> dict:
  with open(path) as f:
    return json.load(f)


def _side_masks(results: str, run: str, oracle: str | None) -> dict[str, np.ndarray] | None:
  """The masks of ``run`` (white-box) or of its transfer from ``oracle``; None if not committed."""
  if oracle is None:
    path = os.path.join(results, "runs", f"{run}.json")
    source = _load(path).get("robust", {}) if os.path.exists(path) else {}
  else:
    path = os.path.join(results, "transfers", f"{run}--{oracle}.json")
    source = _load(path) if os.path.exists(path) else {}
  if "masks" not in source:
    return None
  n = int(source["accuracy"]["n"])
  return {("N" if k == "natural" else k): unpack_mask(v, n) for k, v in source["masks"].items()}


def _carried(results: str, check: Check) -> dict[str, dict] | None:
  """Columns of a transfer check kept without masks, with ``(b, c)`` recovered from their interval."""
  path = os.path.join(results, "transfers", f"{check.better}--{check.oracle}.json")
  if check.oracle is None or not os.path.exists(path):
    return None
  out = {}
  for col, v in _load(path).get("check", {}).get("columns", {}).items():
    b, c = discordant_from_interval(v["diff"], v["low"], int(v["n"]))
    out[col] = {**v, "b": b, "c": c, "p": exact_p(b, c), "verdict": verdict(b, c), "recovered": True}
  return out or None


def run_checks(results: str) -> list[dict[str, Any]]:
  """Every check of :data:`CHECKS` on the committed results under ``results``."""
  out = []
  for check in CHECKS:
    better = _side_masks(results, check.better, check.oracle)
    worse = _side_masks(results, check.worse, None)
    entry: dict[str, Any] = {"table": check.table, "check": check.label, "columns": {}}
    if better is None or worse is None:
      carried = _carried(results, check)
      entry["columns"] = carried or {}
      entry["state"] = "recovered from the committed interval" if carried else "no per-image masks"
    else:
      entry["state"] = "masks"
      entry["columns"] = {c: mcnemar(better[c], worse[c]) for c in check.columns}
    out.append(entry)
  return out


def format_checks(checks: list[dict[str, Any]]) -> str:
  """The checks as a Markdown table: per column diff [interval], b/c and the exact p, then the verdict."""
  lines = ["| table | check | column | diff [95 % interval] | b / c | exact p | verdict |",
           "|---|---|---|---|---|---|---|"]
  for e in checks:
    if not e["columns"]:
      lines.append(f"| {e['table']} | {e['check']} | - | - | - | - | {e['state']} |")
    for col, v in e["columns"].items():
      mark = " (b/c from the interval)" if v.get("recovered") else ""
      lines.append(f"| {e['table']} | {e['check']} | {col} | {v['diff']:+.2f} [{v['low']:+.2f}, "
                   f"{v['high']:+.2f}] | {v['b']} / {v['c']}{mark} | {v['p']:.3g} | {v['verdict']} |")
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--results", default="results/cpu", help="folder of the committed results")
  parser.add_argument("--json", default=None, help="also write every number to this JSON file")
  args = parser.parse_args(argv)
  if not os.path.isdir(os.path.join(args.results, "runs")):
    print(f"error: --results={args.results} has no runs/ folder of committed results", file=sys.stderr)
    return 2
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import claims  # pylint: disable=import-outside-toplevel
  checks = run_checks(args.results)
  print("## Paired checks (exact McNemar)\n\n" + format_checks(checks))
  extra = claims.report(args.results)
  print(extra["markdown"])
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"checks": checks, **extra["data"]}, f, indent=1, sort_keys=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
