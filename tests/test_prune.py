"""Channel pruning: the pruned model computes the same logits, with fewer parameters and MACs.

The model is a 2-member En_2 ResNet8 with widths (4, 8, 8) on 8x8x3 images: ternary weights (scale * codes in
{-1, 0, 1}, as P(w) of a ternary model), random BatchNorm statistics, then channels zeroed by hand:

member 0: stage1_block1 conv1 output channels 0 (bn2 constant +0.8: folded) and 1 (constant -0.8: dropped);
          stage2_block1 conv2 output channels 2, 5; stage3_block1 shortcut output channels 0, 7;
          stem output channel 1.
member 1: stage1_block1 conv1 input channel 2; stage2_block1 conv2 input channel 3 (never read);
          stage3_block1 conv1 output channels 2, 4 (constant +0.8, +0.3: folded) and 3 (-0.8: dropped).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enquant import prune, sparsity
from enquant.models import count_params, EnResNet, ModelConfig

CONFIG = ModelConfig(num_classes=10, depth=8, widths=(4, 8, 8), noise_coef=0.0, ensembles=2)
NOISY = dataclasses.replace(CONFIG, noise_coef=0.1)
SHAPE = (6, 8, 8, 3)

# Unpruned MACs per member per image (8x8x3 input), counted by hand:
#   stem 8*8*9*3*4; stage1 (8x8, 4->4) conv1 + conv2 8*8*9*4*4 each;
#   stage2 (4x4, 4->8) conv1 4*4*9*4*8, conv2 4*4*9*8*8, shortcut 4*4*4*8;
#   stage3 (2x2, 8->8) conv1 and conv2 2*2*9*8*8, shortcut 2*2*8*8; dense 8*10.
MEMBER_MACS = (8 * 8 * 9 * 3 * 4 + 2 * (8 * 8 * 9 * 4 * 4) + 4 * 4 * 9 * 4 * 8 + 4 * 4 * 9 * 8 * 8
               + 4 * 4 * 4 * 8 + 2 * (2 * 2 * 9 * 8 * 8) + 2 * 2 * 8 * 8 + 8 * 10)
# MACs saved by pruning, by hand (a folded channel costs one extra input channel of conv2: conv2_const).
SAVED_MACS = (
    # member 0
    (2 * 8 * 8 * 9 * 4 * 4) - (8 * 8 * 9 * 4 * 2 + 8 * 8 * 9 * 2 * 4 + 8 * 8 * 9 * 1 * 4)  # s1b1
    + 4 * 4 * 9 * 8 * 2  # s2b1: conv2 computes 6 of 8 outputs
    + 2 * 2 * 8 * 2  # s3b1: shortcut computes 6 of 8 outputs
    + 8 * 8 * 9 * 3 * 1  # stem: 3 of 4 outputs
    # member 1
    + 8 * 8 * 9 * 1 * 4  # s1b1: conv1 reads 3 of 4 inputs
    + 4 * 4 * 9 * 4 * 1 + 4 * 4 * 9 * 1 * 8  # s2b1: inner channel 3 removed from conv1 and conv2
    + (2 * 2 * 9 * 8 * 3) * 2 - 2 * 2 * 9 * 1 * 8  # s3b1: 3 inner channels removed, conv2_const added
)
# Parameters saved, by hand (kernels, BatchNorm scale + bias; conv2_const kernels are 3x3x1xO).
SAVED_PARAMS = (
    (72 + 4 + 72 - 36)  # m0 s1b1: conv1 3x3x4x2, bn2 2 channels, conv2 3x3x2x4 removed; +3x3x1x4
    + 3 * 3 * 8 * 2  # m0 s2b1: conv2 output channels
    + 8 * 2  # m0 s3b1: shortcut output channels
    + 3 * 3 * 3 * 1  # m0 stem output channel
    + (3 * 3 * 4 * 1 + 2 * 1)  # m1 s1b1: conv1 input channel, bn1 channel
    + (3 * 3 * 4 * 1 + 2 * 1 + 3 * 3 * 1 * 8)  # m1 s2b1: inner channel 3
    + (3 * 3 * 8 * 3 + 2 * 3 + 3 * 3 * 3 * 8 - 3 * 3 * 1 * 8)  # m1 s3b1: 3 inner channels, +conv2_const
)


def _ternary(rng, shape, scale):
  return (scale * rng.choice([-1.0, 0.0, 1.0], size=shape, p=[0.35, 0.3, 0.35])).astype(np.float32)


def _random_variables(seed=0):
  shapes = jax.eval_shape(EnResNet(CONFIG).init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = path[-1].key
    if name == "kernel" and len(s.shape) == 5:  # conv: one ternary scale per member
      return np.stack([_ternary(rng, s.shape[1:], rng.uniform(0.1, 0.3)) for _ in range(s.shape[0])])
    if name == "scale":
      return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
    if name == "var":
      return rng.uniform(0.5, 2.0, s.shape).astype(np.float32)
    return rng.normal(0.0, 0.5, s.shape).astype(np.float32)  # bias, mean, dense

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _zero_channels(v):
  p, s = v["params"], v["batch_stats"]

  def set_constant(block, member, channel, value):  # bn2 output for a zero input is exactly `value`
    s[block]["bn2"]["mean"][member, channel] = 0.0
    p[block]["bn2"]["bias"][member, channel] = value

  p["stage1_block1"]["conv1"]["kernel"][0, ..., [0, 1]] = 0
  set_constant("stage1_block1", 0, 0, 0.8)
  set_constant("stage1_block1", 0, 1, -0.8)
  p["stage2_block1"]["conv2"]["kernel"][0, ..., [2, 5]] = 0
  p["stage3_block1"]["shortcut"]["kernel"][0, ..., [0, 7]] = 0
  p["stem"]["kernel"][0, ..., 1] = 0
  p["stage1_block1"]["conv1"]["kernel"][1, :, :, 2, :] = 0
  p["stage2_block1"]["conv2"]["kernel"][1, :, :, 3, :] = 0
  p["stage3_block1"]["conv1"]["kernel"][1, ..., [2, 3, 4]] = 0
  set_constant("stage3_block1", 1, 2, 0.8)
  set_constant("stage3_block1", 1, 3, -0.8)
  set_constant("stage3_block1", 1, 4, 0.3)
  return v


@pytest.fixture(scope="module")
def setup():
  dense = _random_variables()
  report = sparsity.weight_report(dense["params"])
  assert report["total/zero_channels"] == report["total/zero_in_channels"] == 0  # no accidental zeros
  variables = _zero_channels(jax.tree.map(np.copy, dense))
  x = jax.random.uniform(jax.random.PRNGKey(1), SHAPE)
  pruned = prune.prune(CONFIG, variables, SHAPE)
  return variables, x, pruned


def test_macs_match_a_hand_count():
  assert prune.macs(CONFIG, (8, 8, 3)) == 2 * MEMBER_MACS == 2 * 44_624
  assert prune.macs(CONFIG, SHAPE) == prune.macs(CONFIG, (8, 8, 3))  # per image
  assert prune.flops(CONFIG, SHAPE) == 4 * MEMBER_MACS
  # ResNet20 on CIFAR: the literature's 40.55M MACs (stem, 18 3x3 convs, dense) + two 1x1 shortcuts.
  resnet20 = ModelConfig(depth=20, ensembles=1)
  assert prune.macs(resnet20, (32, 32, 3)) == 40_551_040 + 16 * 16 * 16 * 32 + 8 * 8 * 32 * 64
  with pytest.raises(ValueError, match="input_shape"):
    prune.macs(CONFIG, (8, 8))


def test_pruned_logits_equal_unpruned_without_noise(setup):
  variables, x, pruned = setup
  reference = prune.unpruned_logits_fn(CONFIG)
  key = jax.random.PRNGKey(3)
  expected = np.asarray(reference(variables, x, key))
  got = np.asarray(pruned.apply(x, key))
  np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
  assert np.abs(expected).max() > 0.1  # not a degenerate all-zero output
  # The positive BatchNorm constants matter: dropping them (making them zero) changes the logits.
  dropped = jax.tree.map(np.copy, variables)
  dropped["params"]["stage1_block1"]["bn2"]["bias"][0, 0] = -0.8
  dropped["params"]["stage3_block1"]["bn2"]["bias"][1, [2, 4]] = -0.8
  assert np.abs(np.asarray(reference(dropped, x, key)) - expected).max() > 1e-3


def test_pruned_model_is_smaller_by_the_hand_count(setup):
  variables, _, pruned = setup
  before = count_params(variables["params"])
  assert before == 2 * 2686
  assert pruned.num_params == before - SAVED_PARAMS
  assert pruned.macs(SHAPE) == 2 * MEMBER_MACS - SAVED_MACS
  assert pruned.flops(SHAPE) == 2 * pruned.macs(SHAPE)
  assert pruned.counts == {"inner_channels": 40, "inner_kept": 34, "inner_folded": 3,
                           "inner_zero_constant": 2, "inner_unread": 1, "inner_removed": 6,
                           "outputs_skipped": 5}


def test_each_member_is_pruned_on_its_own(setup):
  _, _, pruned = setup
  assert pruned.members == 2
  m0, m1 = (dict((name, dict(f)) for name, f in m.blocks) for m in pruned.modules)
  assert m0["stage1_block1"]["mid"] == 2 and m0["stage1_block1"]["folded"]
  assert m1["stage1_block1"]["mid"] == 4 and not m1["stage1_block1"]["folded"]
  assert m1["stage1_block1"]["bn1_channels"] == (0, 1, 3)  # bn1 only where conv1 reads
  assert m1["stage1_block1"]["conv1_inputs"] == (0, 1, 2)  # positions within bn1_channels
  assert m0["stage2_block1"]["conv2_outputs"] == (0, 1, 3, 4, 6, 7)
  assert m1["stage2_block1"]["conv2_outputs"] == tuple(range(8)) and m1["stage2_block1"]["mid"] == 7
  assert m0["stage3_block1"]["shortcut_outputs"] == tuple(range(1, 7))
  assert m1["stage3_block1"]["mid"] == 5 and m1["stage3_block1"]["folded"]
  assert pruned.modules[0].stem_outputs == (0, 2, 3) and pruned.modules[1].stem_outputs == (0, 1, 2, 3)
  shapes = [v["params"]["stage1_block1"]["conv1"]["kernel"].shape for v in pruned.variables]
  assert shapes == [(3, 3, 4, 2), (3, 3, 3, 4)]


@pytest.mark.parametrize("noise_rng", ["hash", "threefry"])
def test_pruned_noise_is_the_same_randomized_model(setup, noise_rng):
  # rbg keys: under vmap they give other numbers than key by key, so this also checks that the pruned
  # members' draws are made exactly as EnResNet.apply makes them (and they compile 5x faster here than
  # threefry keys; the draws go through the same code for every PRNG implementation), with the model's
  # own noise generator.
  variables, x, _ = setup
  noisy = dataclasses.replace(NOISY, noise_rng=noise_rng)
  pruned = prune.prune(noisy, variables, SHAPE)
  reference = prune.unpruned_logits_fn(noisy)
  key = jax.random.key(7, impl="rbg")
  expected = np.asarray(reference(variables, x, key))
  np.testing.assert_allclose(np.asarray(pruned.apply(x, key)), expected, rtol=0, atol=1e-5)
  other = np.asarray(pruned.apply(x, jax.random.key(8, impl="rbg")))
  assert np.abs(other - expected).max() > 1e-3  # the noise is really on
  noiseless = np.asarray(prune.unpruned_logits_fn(CONFIG)(variables, x, key))
  assert np.abs(noiseless - expected).max() > 1e-3


def test_pruning_report_measures_both_models(setup):
  variables, x, pruned = setup
  images = np.concatenate([np.asarray(x), np.asarray(x)[::-1]])  # 12 images, 2 batches of 6
  key = jax.random.PRNGKey(11)
  reference = prune.unpruned_logits_fn(CONFIG)
  logits = [np.asarray(reference(variables, jnp.asarray(images[i:i + 6]), jax.random.fold_in(key, b)))
            for b, i in enumerate((0, 6))]
  predictions = np.concatenate(logits).argmax(-1)
  labels = np.where(np.arange(12) % 3 == 0, (predictions + 1) % 10, predictions)  # 8 of 12 right
  report = prune.pruning_report(CONFIG, variables, images, labels, key, batch_size=6, pruned=pruned)
  assert report["accuracy_before"] == pytest.approx(8 / 12)
  assert report["accuracy_after"] == pytest.approx(8 / 12)
  assert report["prediction_agreement"] == 1.0
  after = [np.asarray(pruned.apply(jnp.asarray(images[i:i + 6]), jax.random.fold_in(key, b)))
           for b, i in enumerate((0, 6))]
  diff = max(np.abs(a - b).max() for a, b in zip(after, logits))
  assert report["max_abs_logit_diff"] == pytest.approx(diff, abs=1e-9)
  assert report["max_abs_logit_diff"] < 1e-5  # measured (float rounding), not assumed
  assert report["params_before"] == 2 * 2686 and report["params_after"] == pruned.num_params
  assert report["macs_after"] == 2 * MEMBER_MACS - SAVED_MACS
  assert report["flops_before"] == 2 * report["macs_before"] == 4 * MEMBER_MACS
  assert report["channels/inner_folded"] == 3 and report["examples"] == 12


def test_prune_rejects_mismatched_variables(setup):
  variables, _, pruned = setup
  with pytest.raises(ValueError, match="member axis"):
    prune.prune(dataclasses.replace(CONFIG, ensembles=3), variables)
  with pytest.raises(ValueError, match="do not match"):
    prune.prune(dataclasses.replace(CONFIG, widths=(4, 8, 16)), variables)
  with pytest.raises(ValueError, match="batch_stats"):
    prune.prune(CONFIG, variables["params"])
  with pytest.raises(ValueError, match="channels"):
    prune.prune(CONFIG, variables, (8, 8, 1))
  with pytest.raises(ValueError, match="images"):
    pruned.apply(jnp.zeros((2, 8, 8, 1)), jax.random.PRNGKey(0))
