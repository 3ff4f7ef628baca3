"""Shapes, parameter counts, EnResNet noise and ensemble semantics."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enquant.models import conv as conv_lib
from enquant.models import add_noise, count_params, EnResNet, ModelConfig, PreActBlock

TINY = dict(depth=8, widths=(4, 8, 8))


def _abstract_params(cfg, hw=32, c=3):
  model = EnResNet(cfg)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, hw, hw, c)))
  return shapes["params"]


@pytest.mark.parametrize("depth,n,expected", [(20, 1, 272_282), (20, 2, 544_564), (56, 1, 855_578)])
def test_parameter_counts_match_the_paper(depth, n, expected):
  # Paper Table II: ResNet20 0.27M, En2ResNet20 0.54M (1x1 projection shortcuts as in EnResNet's code).
  # Independent count: stem 3*3*3*16; per block 2 convs + 2 BNs; shortcuts 16*32 + 32*64; final BN; fc.
  stages = [(depth - 2) // 6] * 3
  widths = [16, 32, 64]
  total, cin = 27 * 16, 16
  for s, (blocks, w) in enumerate(zip(stages, widths)):
    for b in range(blocks):
      total += 2 * cin + 9 * cin * w + 2 * w + 9 * w * w
      if cin != w:
        total += cin * w
      cin = w
  total += 2 * 64 + 64 * 10 + 10
  assert total * n == expected
  assert count_params(_abstract_params(ModelConfig(depth=depth, ensembles=n))) == expected


def test_one_channel_input_and_stage_override():
  cfg = ModelConfig(stages=(1, 2, 1), widths=(4, 8, 16), ensembles=3)
  params = _abstract_params(cfg, hw=28, c=1)
  chex.assert_shape(params["stem"]["kernel"], (3, 3, 3, 1, 4))
  assert "stage2_block2" in params and "stage2_block3" not in params
  assert cfg.name == "En3ResNet10"


def test_bad_depth_and_config_raise_clear_errors():
  with pytest.raises(ValueError, match="6n\\+2"):
    ModelConfig(depth=21).block_stages
  with pytest.raises(ValueError, match="ensembles"):
    ModelConfig(ensembles=0)
  with pytest.raises(ValueError, match="noise_coef"):
    ModelConfig(noise_coef=-1.0)


@pytest.fixture(scope="module")
def tiny():
  model = EnResNet(ModelConfig(num_classes=5, ensembles=2, noise_coef=0.1, **TINY))
  x = jax.random.uniform(jax.random.PRNGKey(1), (6, 8, 8, 3))
  variables = model.init(jax.random.PRNGKey(0), x)
  apply = jax.jit(model.apply, static_argnames="train")
  return model, variables, x, apply


def test_noise_is_reproducible_per_key_and_differs_across_keys(tiny):
  _, variables, x, apply = tiny
  a = apply(variables, x, jax.random.PRNGKey(3))
  b = apply(variables, x, jax.random.PRNGKey(3))
  c = apply(variables, x, jax.random.PRNGKey(4))
  chex.assert_shape(a, (6, 5))
  chex.assert_trees_all_equal(a, b)
  assert float(jnp.max(jnp.abs(a - c))) > 1e-4


def test_noise_coefficient_zero_is_exactly_deterministic(tiny):
  _, variables, x, _ = tiny
  model0 = EnResNet(ModelConfig(num_classes=5, ensembles=2, noise_coef=0.0, **TINY))
  apply0 = jax.jit(model0.apply)
  chex.assert_trees_all_equal(apply0(variables, x, jax.random.PRNGKey(3)),
                              apply0(variables, x, jax.random.PRNGKey(5)))


def test_add_noise_formula():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 5, 5, 3)) * 3.0 + 1.0
  key = jax.random.PRNGKey(7)
  expected = x + 0.1 * jnp.std(x) * jax.random.normal(key, x.shape)
  chex.assert_trees_all_close(add_noise(x, 0.1, key), expected, rtol=1e-6)


def test_block_noise_scale_is_coef_times_one_batch_std():
  block_noisy = PreActBlock(16, noise_coef=0.25)
  block_clean = PreActBlock(16, noise_coef=0.0)
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 16, 16, 16))
  v = jax.jit(block_clean.init, static_argnames="train")(jax.random.PRNGKey(1), x, train=False)
  clean = jax.jit(lambda v, x: block_clean.apply(v, x, train=False))(v, x)
  noisy = jax.jit(lambda v, x, k: block_noisy.apply(v, x, train=False, rngs={"noise": k}))(
      v, x, jax.random.PRNGKey(2))
  z = (noisy - clean) / (0.25 * jnp.std(clean))
  # z should be standard normal: 32768 draws give mean/std within a few 1e-2.
  assert abs(float(jnp.mean(z))) < 0.03
  assert abs(float(jnp.std(z)) - 1.0) < 0.03


def test_ensemble_of_identical_members_equals_one_member():
  cfg1 = ModelConfig(num_classes=5, ensembles=1, noise_coef=0.0, **TINY)
  cfg3 = ModelConfig(num_classes=5, ensembles=3, noise_coef=0.0, **TINY)
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 8, 8, 3))
  one = EnResNet(cfg1)
  v1 = one.init(jax.random.PRNGKey(0), x)
  v3 = jax.tree.map(lambda a: jnp.concatenate([a] * 3), v1)
  chex.assert_trees_all_close(jax.jit(EnResNet(cfg3).apply)(v3, x, jax.random.PRNGKey(0)),
                              jax.jit(one.apply)(v1, x, jax.random.PRNGKey(0)), atol=1e-6)


def test_members_are_independent_and_logits_are_averaged():
  cfg = ModelConfig(num_classes=5, ensembles=2, noise_coef=0.0, **TINY)
  model = EnResNet(cfg)
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 8, 8, 3))
  v = model.init(jax.random.PRNGKey(0), x)
  assert not np.allclose(v["params"]["stem"]["kernel"][0], v["params"]["stem"]["kernel"][1])
  single = jax.jit(EnResNet(ModelConfig(num_classes=5, ensembles=1, noise_coef=0.0, **TINY)).apply)
  member = lambda i: single(jax.tree.map(lambda a: a[i:i + 1], v), x, jax.random.PRNGKey(0))
  chex.assert_trees_all_close(jax.jit(model.apply)(v, x, jax.random.PRNGKey(0)),
                              (member(0) + member(1)) / 2, atol=1e-6)


def test_vmapped_unrolled_and_grouped_members_give_the_same_logits_and_stats():
  # Three members (groups of 4 and 8 channels), the stride-2 projection shortcut and the noise included.
  cfg = ModelConfig(num_classes=5, ensembles=3, noise_coef=0.1, **TINY)
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 8, 8, 3))
  v = EnResNet(cfg).init(jax.random.PRNGKey(0), x)
  key = jax.random.PRNGKey(2)
  apply = {m: jax.jit(EnResNet(cfg, member_map=m).apply, static_argnames="train")
           for m in ("vmap", "unrolled", "grouped")}
  outs = {m: fn(v, x, key, train=True) for m, fn in apply.items()}
  chex.assert_shape(outs["vmap"][0], (4, 5))
  chex.assert_trees_all_equal_shapes(outs["vmap"][1], v["batch_stats"])
  # Running statistics moved towards the batch statistics.
  assert not np.allclose(outs["vmap"][1]["bn_final"]["mean"], v["batch_stats"]["bn_final"]["mean"])
  chex.assert_trees_all_close(outs["vmap"], outs["unrolled"], atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(outs["vmap"], outs["grouped"], atol=1e-5, rtol=1e-5)
  # Inference (running statistics) and the input gradient an attack takes, in one program each.
  value_and_grad = {m: jax.jit(jax.value_and_grad(
      lambda xx, m=m: jnp.sum(EnResNet(cfg, member_map=m).apply(v, xx, key) ** 2)))
                    for m in ("unrolled", "grouped")}
  chex.assert_trees_all_close(value_and_grad["unrolled"](x), value_and_grad["grouped"](x), atol=1e-5)
  jaxpr = str(jax.make_jaxpr(lambda xx: EnResNet(cfg, member_map="grouped").apply(v, xx, key))(x))
  assert jaxpr.count("feature_group_count=3") == 2 * 3 + 2  # conv1, conv2 per block + 2 shortcuts
  with pytest.raises(ValueError, match="member_map"):
    EnResNet(cfg, member_map="pmap")


def test_grouped_members_in_bfloat16_stay_close_to_float32():
  cfg = ModelConfig(num_classes=5, ensembles=2, noise_coef=0.0, **TINY)
  x = jax.random.uniform(jax.random.PRNGKey(1), (4, 8, 8, 3))
  v = EnResNet(cfg).init(jax.random.PRNGKey(0), x)
  bf16 = dataclasses.replace(cfg, compute_dtype="bfloat16")
  f32 = EnResNet(cfg, member_map="grouped").apply(v, x, None)
  got = EnResNet(bf16, member_map="grouped").apply(v, x, None)
  assert got.dtype == jnp.float32
  assert 0 < float(jnp.max(jnp.abs(got - f32))) < 0.05 * float(jnp.max(jnp.abs(f32)))


@pytest.mark.parametrize("hw,k,stride,pad", [(8, 3, 1, (1, 1)), (8, 3, 2, (1, 1)), (7, 3, 2, (1, 1)),
                                             (8, 1, 2, (0, 0)), (7, 1, 1, (0, 0)), (6, 5, 3, (2, 1))])
def test_layout_conv_values_and_gradients_equal_the_plain_convolution(hw, k, stride, pad):
  rng = np.random.default_rng(hw + k + stride)
  x = jnp.asarray(rng.standard_normal((2, hw, hw + 1, 3)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k, 3, 4)), jnp.float32)
  ct = jnp.asarray(rng.standard_normal(conv_lib.conv2d(x, w, (stride, stride), (pad, pad)).shape),
                   jnp.float32)

  def plain(x, w):
    return jax.lax.conv_general_dilated(x, w, (stride, stride), (pad, pad),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def layout(x, w):
    return conv_lib.conv2d(x, w, (stride, stride), (pad, pad))

  for fn in (plain, layout):  # the cotangent makes every output element count differently
    assert fn(x, w).shape == ct.shape
  outs = [jax.jit(jax.value_and_grad(lambda a, b, f=f: jnp.sum(ct * f(a, b)), (0, 1)))(x, w)
          for f in (plain, layout)]
  chex.assert_trees_all_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
  # Inside a rolled loop too (where the layout matters on XLA:CPU).
  loop = lambda f: jax.jit(lambda a: jax.lax.fori_loop(
      0, 2, lambda i, z: z - 0.01 * jax.grad(lambda q: jnp.sum(ct * f(q, w)))(z), a))(x)
  chex.assert_trees_all_close(loop(plain), loop(layout), atol=1e-5, rtol=1e-5)


def test_stock_and_layout_conv_models_share_parameters_and_numbers(tiny):
  model, variables, x, _ = tiny
  stock = EnResNet(model.config, conv_grad="lax")
  key = jax.random.PRNGKey(5)
  grad = lambda m: jax.jit(jax.grad(lambda xx: jnp.sum(m.apply(variables, xx, key) ** 2)))(x)
  chex.assert_trees_all_close(grad(model), grad(stock), atol=1e-5, rtol=1e-4)
  with pytest.raises(ValueError, match="conv_grad"):
    EnResNet(model.config, conv_grad="cudnn")


def test_bfloat16_compute_matches_float32_within_tolerance(tiny):
  model, variables, x, apply = tiny
  bf16 = EnResNet(ModelConfig(**{**dataclasses.asdict(model.config), "compute_dtype": "bfloat16"}))
  key = jax.random.PRNGKey(2)
  ref = apply(variables, x, key)
  got = jax.jit(bf16.apply)(variables, x, key)
  assert got.dtype == jnp.float32
  # bf16 keeps 8 bits of mantissa: logits agree to a few percent of their spread.
  err = float(jnp.max(jnp.abs(got - ref)) / (jnp.max(ref) - jnp.min(ref)))
  assert 0 < err < 0.05, err  # bf16 really ran (not float32) and stayed close
  with pytest.raises(ValueError, match="compute_dtype"):
    ModelConfig(compute_dtype="float16")


def test_deterministic_models_accept_key_none_and_randomized_ones_refuse_it(tiny):
  model, variables, x, _ = tiny
  det = EnResNet(dataclasses.replace(model.config, noise_coef=0.0))
  chex.assert_trees_all_equal(det.apply(variables, x, None), det.apply(variables, x, jax.random.PRNGKey(9)))
  with pytest.raises(ValueError, match="pass a PRNG key"):
    model.apply(variables, x, None)
