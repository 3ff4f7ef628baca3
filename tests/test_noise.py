"""The noise generators of enquant.models.noise: a bit-exact NumPy twin, the statistics of the normals,
independence across keys, vmap, and the configuration's backward compatibility."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from experiments.paper import scales as paper
from experiments.paper import reports
from enquant.config import ExperimentConfig
from enquant.models import add_noise, EnResNet, ModelConfig, PreActBlock
from enquant.models import noise

N = 1 << 20


def _lowbias32_np(x: np.ndarray) -> np.ndarray:
  # Wellons' lowbias32, written from its published C source with NumPy's wrapping uint32 arithmetic.
  x = x.astype(np.uint32)
  x ^= x >> np.uint32(16)
  x *= np.uint32(0x7FEB352D)
  x ^= x >> np.uint32(15)
  x *= np.uint32(0x846CA68B)
  x ^= x >> np.uint32(16)
  return x


def test_hash_bits_equal_a_numpy_twin_of_the_formula():
  key = jax.random.PRNGKey(42)
  s0, s1 = np.asarray(jax.random.bits(key, (2,), jnp.uint32))
  i = np.arange(3 * 5 * 7, dtype=np.uint32)
  with np.errstate(over="ignore"):
    expected = _lowbias32_np(_lowbias32_np(i * np.uint32(0x9E3779B9) + s0) ^ s1).reshape(3, 5, 7)
  np.testing.assert_array_equal(np.asarray(noise.hash_bits(key, (3, 5, 7))), expected)


@pytest.fixture(scope="module")
def draws():
  return np.asarray(jax.jit(lambda k: noise.hash_normal(k, (N,)))(jax.random.PRNGKey(0)), np.float64)


def test_hash_normals_have_the_moments_and_distribution_of_n01(draws):
  se = 1 / np.sqrt(N)
  assert abs(draws.mean()) < 5 * se
  assert abs(draws.var() - 1) < 5 * np.sqrt(2) * se
  assert abs(stats.skew(draws)) < 5 * np.sqrt(6) * se
  assert abs(stats.kurtosis(draws)) < 5 * np.sqrt(24) * se
  # Kolmogorov-Smirnov against N(0, 1): p < 1e-3 would reject.
  assert stats.kstest(draws, "norm").pvalue > 1e-3
  # Tails: P(|z| > 3) = 0.0027 (binomial standard error ~5e-5 at this N).
  assert abs(np.mean(np.abs(draws) > 3) - 0.0027) < 5 * np.sqrt(0.0027 / N)
  assert np.all(np.isfinite(draws)) and np.max(np.abs(draws)) < 5.5


def test_hash_bits_are_balanced_and_neighbours_uncorrelated(draws):
  bits = np.asarray(noise.hash_bits(jax.random.PRNGKey(1), (N,)))
  ones = ((bits[:, None] >> np.arange(32, dtype=np.uint32)) & 1).mean(axis=0)
  np.testing.assert_array_less(np.abs(ones - 0.5), 5 * 0.5 / np.sqrt(N))
  # A plain Weyl sequence (no hash) passes the distribution tests but fails these lag correlations.
  for lag in (1, 2, 7, 64):
    assert abs(np.corrcoef(draws[:-lag], draws[lag:])[0, 1]) < 5 / np.sqrt(N)


def test_hash_streams_of_different_keys_are_uncorrelated():
  base = jax.random.PRNGKey(3)
  keys = [jax.random.fold_in(base, 0), jax.random.fold_in(base, 1), jax.random.PRNGKey(4),
          jax.random.PRNGKey(5)]
  z = np.stack([np.asarray(noise.hash_normal(k, (N // 4,))) for k in keys])
  corr = np.corrcoef(z)
  off_diagonal = corr[~np.eye(len(keys), dtype=bool)]
  np.testing.assert_array_less(np.abs(off_diagonal), 5 / np.sqrt(N // 4))


def test_hash_normal_is_deterministic_in_the_key_and_composes_with_vmap():
  keys = jax.random.split(jax.random.PRNGKey(5), 3)
  one_by_one = jnp.stack([noise.hash_normal(k, (4, 6)) for k in keys])
  chex.assert_trees_all_equal(jax.jit(jax.vmap(lambda k: noise.hash_normal(k, (4, 6))))(keys), one_by_one)
  chex.assert_trees_all_equal(noise.hash_normal(keys[0], (4, 6)), one_by_one[0])
  assert noise.hash_normal(keys[0], (4, 6), jnp.bfloat16).dtype == jnp.bfloat16


def test_normal_dispatches_by_name_and_rejects_unknown_generators():
  key = jax.random.PRNGKey(9)
  chex.assert_trees_all_equal(noise.normal(key, (7,), rng="threefry"), jax.random.normal(key, (7,)))
  chex.assert_trees_all_equal(noise.normal(key, (7,), rng="hash"), noise.hash_normal(key, (7,)))
  with pytest.raises(ValueError, match="noise_rng must be one of"):
    noise.normal(key, (7,), rng="mersenne")
  with pytest.raises(ValueError, match="noise_rng must be one of"):
    ModelConfig(noise_rng="mersenne")


@pytest.mark.parametrize("rng", noise.NOISE_RNGS)
def test_model_noise_uses_the_configured_generator(rng):
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 5, 5, 3)) * 3.0 + 1.0
  key = jax.random.PRNGKey(7)
  expected = x + 0.1 * jnp.std(x) * noise.normal(key, x.shape, rng=rng)
  chex.assert_trees_all_close(add_noise(x, 0.1, key, rng), expected, rtol=1e-6)
  # Inside a block: the noise is coef * one batch std * the generator's draws.
  block = PreActBlock(8, noise_coef=0.25, noise_rng=rng)
  clean_block = PreActBlock(8, noise_coef=0.0)
  v = clean_block.init(jax.random.PRNGKey(1), x, train=False)
  clean = clean_block.apply(v, x, train=False)
  noisy = block.apply(v, x, train=False, rngs={"noise": key})
  z = (noisy - clean) / (0.25 * jnp.std(clean))
  assert abs(float(jnp.mean(z))) < 0.1 and abs(float(jnp.std(z)) - 1.0) < 0.1


def test_the_two_generators_give_different_draws_of_the_same_model():
  cfg = ModelConfig(num_classes=5, depth=8, widths=(4, 4, 4), ensembles=2, noise_coef=0.5)
  x = jax.random.uniform(jax.random.PRNGKey(1), (3, 8, 8, 3))
  variables = EnResNet(cfg).init(jax.random.PRNGKey(0), x)
  key = jax.random.PRNGKey(2)
  hashed = EnResNet(cfg).apply(variables, x, key)
  threefry = EnResNet(dataclasses.replace(cfg, noise_rng="threefry")).apply(variables, x, key)
  assert float(jnp.max(jnp.abs(hashed - threefry))) > 1e-3
  chex.assert_trees_all_equal(EnResNet(cfg).apply(variables, x, key), hashed)


def test_the_noise_generator_is_recorded_and_table_eight_mnist_rows_keep_threefry():
  assert ModelConfig().noise_rng == "hash"
  for rng in ("hash", "threefry"):  # recorded either way: configurations and run names say which
    cfg = ExperimentConfig(model=ModelConfig(noise_rng=rng))
    assert cfg.to_dict()["model"]["noise_rng"] == rng
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg
  # Table VIII's MNIST rows were trained with threefry; the other rows of the paper's tables use the hash,
  # and the table header says which rows differ.
  runs = {paper.run_name(c): c for _, c in paper.runs_of(paper.table("VIII"), "cpu")}
  assert runs["mnist-En2ResNet20-br1b-tradeoff-a1b8-5df078e4"].model.noise_rng == "threefry"
  assert {c.model.noise_rng for c in runs.values() if c.dataset != "mnist"} == {"hash"}
  header = reports.table_markdown(paper.table("VIII"), "cpu", [])
  assert "hash generator (mnist BR, mnist float: threefry" in header
