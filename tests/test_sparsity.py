"""Sparsity reports, the M bound and distinct-value counts on hand-made parameter trees."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enquant import sparsity
from enquant.models import EnResNet, ModelConfig


def _single_tree():
  """One (unstacked) network: a 1x1 conv (2 in, 3 out), a 3x3 conv (1 in, 2 out), a dense layer, a bias."""
  a = np.array([[1.0, 0.0, 0.0],
                [-2.0, 0.0, 0.0]], np.float32).reshape(1, 1, 2, 3)  # out 1, 2 zero; in 0, 1 nonzero
  b = np.zeros((3, 3, 1, 2), np.float32)
  b[0, 0, 0, 0] = 3.0  # out 1 zero; in 0 nonzero
  return {
      "a": {"kernel": a},
      "b": {"kernel": b},
      "fc": {"kernel": np.zeros((2, 4), np.float32), "bias": np.zeros((4,), np.float32)},
  }


def test_weight_report_counts_on_a_hand_made_tree():
  r = sparsity.weight_report(_single_tree())
  # a: 6 weights, 4 zeros; output channels 1, 2 zero (of 3); input channels: none zero (of 2).
  assert (r["a/kernel/zeros"], r["a/kernel/size"]) == (4, 6)
  assert r["a/kernel/weight_sparsity"] == pytest.approx(4 / 6)
  assert (r["a/kernel/zero_channels"], r["a/kernel/channels"]) == (2, 3)
  assert (r["a/kernel/zero_in_channels"], r["a/kernel/in_channels"]) == (0, 2)
  assert r["a/kernel/mean_abs"] == pytest.approx(3.0 / 6)
  # b: 18 weights, 17 zeros; output channel 1 zero (of 2); the single input channel is not zero.
  assert (r["b/kernel/zeros"], r["b/kernel/size"]) == (17, 18)
  assert (r["b/kernel/zero_channels"], r["b/kernel/channels"]) == (1, 2)
  assert (r["b/kernel/zero_in_channels"], r["b/kernel/in_channels"]) == (0, 1)
  # The dense kernel (2 axes) and the bias are not conv kernels.
  assert not any(k.startswith("fc/") for k in r)
  assert (r["total/zero_weights"], r["total/conv_weights"]) == (21, 24)
  assert r["total/weight_sparsity"] == pytest.approx(21 / 24)
  assert (r["total/zero_channels"], r["total/channels"]) == (3, 5)
  assert r["total/channel_sparsity"] == pytest.approx(3 / 5)
  assert (r["total/zero_in_channels"], r["total/in_channels"]) == (0, 3)
  assert r["total/m_bound"] == pytest.approx(max(3.0 / 6, 3.0 / 18))
  # Every input channel has its layer's zero fraction (a: 2/3 and 2/3; b: one channel): no dispersion.
  assert r["a/kernel/zero_dispersion"] == r["total/zero_dispersion"] == 0.0


def test_zero_dispersion_is_one_for_independent_zeros_and_k_for_whole_zero_channels():
  # By hand: H = W = 1, 2 input channels x 2 outputs; zeros (1, 0) and (1, 1): k = 2, p = 3/4, f = (1/2, 1).
  w = np.array([[0.0, 1.0], [0.0, 0.0]], np.float32).reshape(1, 1, 2, 2)
  expected = ((0.5 - 0.75) ** 2 + (1 - 0.75) ** 2) * 2 / (0.75 * 0.25) / 2
  assert sparsity.zero_dispersion({"c": {"kernel": w}}) == pytest.approx(expected)  # 2/3
  rng = np.random.default_rng(0)
  shape = (2, 3, 3, 64, 32)  # stacked: 2 members, 128 input channels of k = 288 weights
  iid = np.where(rng.random(shape) < 0.4, 0.0, 1.0).astype(np.float32)
  assert sparsity.zero_dispersion({"c": {"kernel": iid}}) == pytest.approx(1.0, abs=0.4)  # sd ~ 0.125
  whole = np.ones(shape, np.float32)
  whole[:, :, :, rng.random(64) < 0.3, :] = 0.0  # whole input channels zero, the others without a zero
  r = sparsity.weight_report({"c": {"kernel": whole}, "d": {"kernel": iid}})
  assert r["c/kernel/zero_dispersion"] == pytest.approx(3 * 3 * 32)  # k: fully structured
  assert r["total/zero_dispersion"] == pytest.approx((r["c/kernel/zero_dispersion"]
                                                       + r["d/kernel/zero_dispersion"]) / 2)  # 128 channels each
  assert r["total/dispersion_channels"] == 256
  dense = np.ones((1, 3, 3, 5, 4), np.float32)
  mixed = sparsity.weight_report({"c": {"kernel": iid}, "e": {"kernel": dense}})
  assert mixed["total/dispersion_channels"] == 128  # the layer without a zero is not averaged
  assert mixed["total/in_channels"] == 133
  assert mixed["total/zero_dispersion"] == pytest.approx(r["d/kernel/zero_dispersion"])
  no_zeros = {"c": {"kernel": np.ones(shape, np.float32)}}  # binary weights: nothing to disperse
  assert sparsity.zero_dispersion(no_zeros) == 0.0


def test_dispersion_chance_matches_simulated_independent_zeros():
  # Two layers, 24 + 40 = 64 input channels pooled; zeros independent at each layer's own rate.
  from experiments.paper import checks as reports  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1)
  def draw():
    return {"a": {"kernel": np.where(rng.random((1, 3, 3, 24, 16)) < 0.3, 0.0, 1.0)},
            "b": {"kernel": np.where(rng.random((1, 3, 3, 40, 8)) < 0.6, 0.0, 1.0)}}
  values = np.array([sparsity.zero_dispersion(draw()) for _ in range(400)])
  assert values.mean() == pytest.approx(1.0, abs=0.05)
  assert values.std() == pytest.approx(np.sqrt(2 / 64), rel=0.2)  # the sd dispersion_chance assumes
  diffs = values[:200] - values[200:]
  outside = np.mean(np.abs(diffs) > reports.dispersion_chance(64, 64))
  assert outside < 0.12  # ~5 % expected beyond two standard deviations
  assert reports.dispersion_chance(64, 64) == pytest.approx(2 * np.sqrt(4 / 64))


def test_weight_report_counts_every_member_of_a_stacked_tree():
  k = np.ones((2, 3, 3, 2, 4), np.float32)
  k[0, :, :, :, 1] = 0  # member 0: output channel 1 zero (18 weights)
  k[1, :, :, :, 0] = 0  # member 1: output channels 0 and 3 zero (36 weights)
  k[1, :, :, :, 3] = 0
  k[1, :, :, 1, :] = 0  # member 1: input channel 1 zero too (+ 2 channels x 9 = 18 more zeros)
  params = {"conv": {"kernel": k}, "bn": {"scale": np.zeros((2, 4), np.float32)}}
  r = sparsity.weight_report(params)
  assert (r["conv/kernel/size"], r["conv/kernel/zeros"]) == (144, 18 + 36 + 18)
  assert (r["conv/kernel/channels"], r["conv/kernel/zero_channels"]) == (8, 3)
  assert (r["conv/kernel/in_channels"], r["conv/kernel/zero_in_channels"]) == (4, 1)
  assert r["total/channel_sparsity"] == pytest.approx(3 / 8)
  assert r["total/weight_sparsity"] == pytest.approx(72 / 144)
  # An all-zero member zeroes every channel of that member only.
  k2 = np.ones((2, 1, 1, 3, 5), np.float32)
  k2[1] = 0
  r2 = sparsity.weight_report({"c": {"kernel": k2}})
  assert (r2["total/zero_channels"], r2["total/channels"]) == (5, 10)
  assert (r2["total/zero_in_channels"], r2["total/in_channels"]) == (3, 6)


def test_m_bound_is_the_largest_member_mean_abs_over_conv_layers():
  k1 = np.zeros((2, 1, 1, 1, 4), np.float32)
  k1[0, 0, 0, 0] = [1, -1, 1, -1]  # member 0: mean|w| = 1
  k1[1, 0, 0, 0] = [3, 0, 0, -1]  # member 1: mean|w| = 1
  k2 = np.full((2, 3, 3, 1, 1), 0.5, np.float32)
  k2[1, 0, 0, 0, 0] = -5.0  # member 1: (8 * 0.5 + 5) / 9 = 1.0
  k2[1, 1, 1, 0, 0] = 5.5  # now (7 * 0.5 + 5 + 5.5) / 9 = 14 / 9
  dense = np.full((2, 3, 3), 100.0, np.float32)  # not a conv layer: ignored
  params = {"k1": {"kernel": k1}, "k2": {"kernel": k2}, "fc": {"kernel": dense}}
  assert sparsity.m_bound(params) == pytest.approx(14 / 9)
  # The mean is over one member, not over the stacked leaf (that would be (1 + 1) / 2 = 1 for k1, and
  # (0.5 + 14/9) / 2 for k2).
  assert sparsity.m_bound({"k1": {"kernel": k1}}) == pytest.approx(1.0)
  assert sparsity.m_bound({"fc": {"kernel": dense}}) == 0.0
  assert sparsity.weight_report(params)["total/m_bound"] == pytest.approx(14 / 9)


def test_mask_selects_layers_and_must_match():
  tree = _single_tree()
  mask = {"a": {"kernel": False}, "b": {"kernel": True},
          "fc": {"kernel": False, "bias": False}}
  r = sparsity.weight_report(tree, mask)
  assert r["total/conv_weights"] == 18 and "a/kernel/zeros" not in r
  assert sparsity.m_bound(tree, mask) == pytest.approx(3.0 / 18)
  with pytest.raises(ValueError, match="structure"):
    sparsity.weight_report(tree, {"a": {"kernel": True}})
  with pytest.raises(ValueError, match="4 axes"):
    sparsity.weight_report(tree, {"a": {"kernel": True}, "b": {"kernel": True},
                                  "fc": {"kernel": False, "bias": True}})


def test_resnet20_counts_match_the_papers_table_vii_definitions():
  variables = jax.eval_shape(EnResNet(ModelConfig(depth=20)).init, jax.random.PRNGKey(0),
                             jnp.zeros((1, 32, 32, 3)))
  params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), variables["params"])
  paper = sparsity.weight_report(params, sparsity.spatial_conv_mask)
  # "0.268M" conv weights and "627 channels" = input channels of the 19 3x3 convolutions.
  assert paper["total/conv_weights"] == 3 * 3 * (3 * 16 + 6 * 16 * 16 + 16 * 32 + 5 * 32 * 32
                                                 + 32 * 64 + 5 * 64 * 64) == 267_696
  assert paper["total/in_channels"] == 3 + 6 * 16 + (16 + 5 * 32) + (32 + 5 * 64) == 627
  assert paper["total/channels"] == 16 + 6 * 16 + 6 * 32 + 6 * 64 == 688
  full = sparsity.weight_report(params)  # the 1x1 projection shortcuts included
  assert full["total/conv_weights"] == 267_696 + 16 * 32 + 32 * 64
  assert full["total/channels"] == 688 + 32 + 64
  assert full["total/in_channels"] == 627 + 16 + 32


def test_distinct_values_and_bits_per_weight():
  rng = np.random.default_rng(0)
  binary = (0.3 * rng.choice([-1.0, 1.0], (2, 3, 3, 4, 4))).astype(np.float32)
  ternary = (0.2 * rng.choice([-1.0, 0.0, 1.0], (2, 3, 3, 4, 4))).astype(np.float32)
  fourbit = (0.1 * rng.integers(-7, 8, (2, 3, 3, 8, 8))).astype(np.float32)
  fourbit[1] *= 2.0  # another member's scale: still <= 15 values per member
  floats = rng.normal(size=(2, 3, 3, 4, 4)).astype(np.float32)
  params = {"b": {"kernel": binary}, "t": {"kernel": ternary}, "q": {"kernel": fourbit},
            "f": {"kernel": floats}}
  counts = sparsity.distinct_values(params)
  assert counts == {"b/kernel": 2, "t/kernel": 3, "q/kernel": 15, "f/kernel": 144}
  bits = sparsity.bits_per_weight(params)
  assert (bits["b/kernel"], bits["t/kernel"], bits["q/kernel"], bits["f/kernel"]) == (1, 2, 4, 8)
  sizes = {"b": 288, "t": 288, "q": 1152, "f": 288}
  expected = (1 * 288 + 2 * 288 + 4 * 1152 + 8 * 288) / sum(sizes.values())
  assert bits["total/bits_per_weight"] == pytest.approx(expected)
  assert bits["total/max_bits"] == 8
