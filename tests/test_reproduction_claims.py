"""REPRODUCTION.md's numbers against the committed results, through an independent recomputation of the
exact McNemar tests (scripts/docs_checks: it shares no code with experiments/paper/checks.py)."""

import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "docs_checks"))
import claims  # pylint: disable=wrong-import-position
import mcnemar  # pylint: disable=wrong-import-position

RESULTS = os.path.join(os.path.dirname(__file__), "..", "results", "cpu")


def _direct_p(b, c):
  """Two-sided exact binomial p by summing every outcome no more likely than b (at 1/2)."""
  n = b + c
  probs = [math.comb(n, k) / 2 ** n for k in range(n + 1)]
  return min(1.0, sum(p for p in probs if p <= probs[b] * (1 + 1e-7)))


@pytest.mark.parametrize("b,c", [(36, 21), (14, 5), (0, 7), (5, 5), (19, 6), (1, 0)])
def test_exact_p_matches_a_direct_binomial_sum(b, c):
  assert mcnemar.exact_p(b, c) == pytest.approx(_direct_p(b, c), rel=1e-9)


def test_mcnemar_counts_discordant_images_of_hand_made_masks():
  better = np.array([1, 1, 1, 0, 0, 1, 0, 1, 1, 1], bool)
  worse = np.array([1, 0, 0, 0, 1, 1, 0, 0, 0, 0], bool)
  out = mcnemar.mcnemar(better, worse)
  assert (out["b"], out["c"], out["n"]) == (5, 1, 10)
  assert out["diff"] == pytest.approx(40.0)
  assert out["p"] == pytest.approx(_direct_p(5, 1))  # 0.21875: not significant
  assert out["verdict"] == "inconclusive"
  assert mcnemar.verdict(0, 7) == "reversed" and mcnemar.verdict(12, 1) == "holds"


def test_mcnemar_rejects_unpaired_masks():
  with pytest.raises(ValueError, match="same length|one length"):
    mcnemar.mcnemar(np.ones(5, bool), np.ones(4, bool))


@pytest.mark.parametrize("b,c,n", [(36, 21, 1000), (14, 5, 1000), (30, 0, 1000), (3, 9, 200)])
def test_discordant_counts_come_back_from_their_interval(b, c, n):
  better = np.zeros(n, bool)
  worse = np.zeros(n, bool)
  better[:b] = True
  worse[b:b + c] = True
  out = mcnemar.mcnemar(better, worse)
  assert mcnemar.discordant_from_interval(out["diff"], out["low"], n) == (b, c)


@pytest.mark.skipif(not os.path.isdir(RESULTS), reason="no committed results")
def test_committed_checks_match_the_committed_tables_and_the_known_counts():
  checks = {(e["table"], e["check"]): e for e in mcnemar.run_checks(RESULTS)}
  assert len(checks) == len(mcnemar.CHECKS)
  a1 = checks[("I", "BR beats BC, En2")]["columns"]["A1"]
  assert (a1["b"], a1["c"], round(a1["p"], 3)) == (36, 21, 0.063)
  n = checks[("VIII", "float beats tnn, En5ResNet8 (CIFAR-10 stand-in)")]["columns"]["N"]
  assert (n["b"], n["c"], round(n["p"], 3)) == (14, 5, 0.064)
  for e in checks.values():  # recovered counts agree with the masks' own difference
    for v in e["columns"].values():
      assert 100 * (v["b"] - v["c"]) / v["n"] == pytest.approx(v["diff"], abs=1e-9)


@pytest.mark.skipif(not os.path.isdir(RESULTS), reason="no committed results")
def test_paper_gaps_are_the_ones_reproduction_quotes():
  gaps = claims.paper_gaps(RESULTS)
  assert gaps["mnist_within_1"] == (7, 8)
  low, high = gaps["transfer_minus_whitebox"]
  assert (round(low, 1), round(high, 1)) == (5.5, 10.9)
  four_bit = [v for k, q in gaps["float_minus_quantized"].items() if "4-bit" in k for v in q.values()]
  assert (round(min(four_bit), 1), round(max(four_bit), 1)) == (0.1, 7.2)


def test_dispersion_chance_is_twice_the_sd_of_a_difference_of_independent_indices():
  # Each channel's standardised squared deviation is ~chi-square(1) (variance 2): the mean over C channels
  # has variance 2 / C, so a difference of two runs' indices has sd sqrt(2/Ca + 2/Cb).
  rng = np.random.default_rng(0)
  ca, cb = 177, 401
  diffs = rng.chisquare(1, (4000, ca)).mean(1) - rng.chisquare(1, (4000, cb)).mean(1)
  assert claims.dispersion_chance(ca, cb) == pytest.approx(2 * diffs.std(), rel=0.05)


@pytest.mark.skipif(not os.path.isdir(RESULTS), reason="no committed results")
def test_sparsity_pairs_and_quantization_costs_are_the_ones_reproduction_quotes():
  pairs = claims.sparsity(RESULTS)
  depth = [p for p in pairs if p["pair"].startswith("depth")]
  assert len(depth) == 10 and sum(p["diff"] < 0 for p in depth) == 9
  assert sorted(p["verdict"] for p in depth).count("reversed") == 3
  members = {p["pair"]: p for p in pairs if p["pair"].startswith("members")}
  assert len(members) == 3
  assert [round(p["diff"], 2) for p in members.values()] == [-0.88, -8.21, 0.23]
  # The same pairs with each run's retraining where it moved: En2ResNet14's +0.23 turns to -0.54.
  assert [round(p["diff_retrained"], 2) for p in members.values()] == [-0.89, -5.17, -0.54]
  unmoved = [p for p in depth if p["diff_retrained"] is None]
  assert unmoved and all(not os.path.exists(os.path.join(RESULTS, "reruns", f"{p[k]}.json"))
                         for p in unmoved for k in ("more", "less"))
  moves = sorted(round(r["move"], 2) for r in claims.dispersion_reruns(RESULTS))
  assert (len(moves), moves[0], moves[-1]) == (8, -3.05, 0.17)
  gaps = [q["ours"][c] - q["ours"]["N"] for q in claims.quantization_cost(RESULTS) for c in ("A1", "A2", "A3")]
  assert (round(min(gaps), 1), round(max(gaps), 1)) == (-1.1, 1.5)


@pytest.mark.skipif(not os.path.isdir(RESULTS), reason="no committed results")
def test_the_retrained_mnist_check_recomputes_from_its_kept_masks():
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(RESULTS, "retrained_checks.json")) as f:
    kept = json.load(f)
  (check,) = kept["checks"]
  evals = {}
  for side in ("better", "other"):
    with open(os.path.join(RESULTS, "retrained", check[side] + ".json")) as f:
      evals[side] = json.load(f)
  for col, key in (("N", "natural"), ("A1", "A1"), ("A2", "A2"), ("A3", "A3")):
    better, other = (mcnemar.unpack_mask(e["masks"][key], e["examples"]) for e in (evals["better"],
                                                                                    evals["other"]))
    out = mcnemar.mcnemar(better, other)
    got = check["columns"][col]
    assert (out["b"], out["c"]) == (got["b"], got["c"]) and out["p"] == pytest.approx(got["p"], rel=1e-9)
    for side, e in evals.items():  # the kept accuracies are the masks' own
      assert 100 * e["accuracy"][key] == pytest.approx(kept["runs"][check[side]]["columns"][col]["retrained"])
