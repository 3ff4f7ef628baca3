"""Training objectives, and adversarial training measurably beating natural training under PGD."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enquant import attacks
from enquant import config as config_lib
from enquant import data as data_lib
from enquant import losses
from enquant import train as train_lib
from enquant.models import EnResNet, ModelConfig

TINY = ModelConfig(num_classes=10, depth=8, widths=(4, 8, 8), noise_coef=0.1, ensembles=1)


@pytest.fixture(scope="module")
def setup():
  model = EnResNet(TINY)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(size=(8, 12, 12, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, 8), jnp.int32)
  variables = model.init(jax.random.PRNGKey(0), x)
  return model, variables, x, y


def _loss(cfg, model, variables, x, x_adv, y, key):
  _, loss_fn = losses.make_objective(cfg)
  return loss_fn(model, variables["params"], variables["batch_stats"], x, x_adv, y, key)


def _loss_and_grad(cfg, model, variables, x, x_adv, y, key):
  fn = lambda p, v: _loss(cfg, model, {**v, "params": p}, x, x_adv, y, key)
  return jax.jit(jax.value_and_grad(fn, has_aux=True))(variables["params"], variables)


def test_tradeoff_with_alpha0_beta1_equals_pgd_at(setup):
  model, variables, x, y = setup
  x_adv = jnp.clip(x + 0.05, 0, 1)
  key = jax.random.PRNGKey(3)
  at = losses.LossConfig(kind="at")
  tradeoff = losses.LossConfig(kind="tradeoff", alpha=0.0, beta=1.0)
  (l_at, (s_at, _)), g_at = _loss_and_grad(at, model, variables, x, x_adv, y, key)
  (l_to, (s_to, _)), g_to = _loss_and_grad(tradeoff, model, variables, x, x_adv, y, key)
  chex.assert_trees_all_close(l_at, l_to)
  chex.assert_trees_all_close(g_at, g_to)
  chex.assert_trees_all_close(s_at, s_to)


@pytest.mark.parametrize("members", [1, 2])
def test_tradeoff_loss_equals_two_sequential_passes_value_gradient_and_running_stats(setup, members):
  """The loss runs x and x' as one batched pass (losses.paired_forward); it must equal alpha CE(f(x)) +
  beta CE(f(x')) computed by two passes one after the other, in value, gradient and running statistics."""
  _, _, x, y = setup
  model = EnResNet(dataclasses.replace(TINY, ensembles=members))
  variables = model.init(jax.random.PRNGKey(0), x)
  # Running statistics away from their init (mean 0, var 1), so the rebuilt update is really tested.
  leaves, tree = jax.tree.flatten(variables["batch_stats"])
  keys = jax.random.split(jax.random.PRNGKey(7), len(leaves))
  variables = {**variables, "batch_stats": jax.tree.unflatten(
      tree, [s + jax.random.uniform(k, s.shape) for s, k in zip(leaves, keys)])}
  x_adv = jnp.clip(x - 0.05, 0, 1)
  key = jax.random.PRNGKey(4)
  k_nat, k_adv = jax.random.split(key)
  cfg = losses.LossConfig(kind="tradeoff", alpha=1.0, beta=8.0)
  (total, (stats, metrics)), grads = _loss_and_grad(cfg, model, variables, x, x_adv, y, key)

  def sequential(params):
    v = {**variables, "params": params}
    nat_logits, s1 = model.apply(v, x, k_nat, train=True)
    adv_logits, s2 = model.apply({**v, "batch_stats": s1}, x_adv, k_adv, train=True)
    return losses.cross_entropy(nat_logits, y) + 8.0 * losses.cross_entropy(adv_logits, y), s2

  (expected, expected_stats), expected_grads = jax.jit(jax.value_and_grad(sequential, has_aux=True))(
      variables["params"])
  chex.assert_trees_all_close(total, expected, rtol=1e-5)
  chex.assert_trees_all_close(metrics["loss"], total)
  chex.assert_trees_all_close(stats, expected_stats, rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(grads, expected_grads, rtol=1e-4, atol=1e-6)
  moved = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(stats),
                                                              jax.tree.leaves(variables["batch_stats"])))
  assert moved > 1e-3  # both passes really updated the running statistics


def test_train_mode_crafting_takes_batch_statistics_steps_and_updates_running_stats(setup):
  model, variables, x, y = setup
  key = jax.random.PRNGKey(5)
  cfg = dict(kind="at", eps=0.1, step_size=0.03, steps=1, random_start=False)
  perturb_train, _ = losses.make_objective(losses.LossConfig(attack_bn="train", **cfg))
  perturb_eval, _ = losses.make_objective(losses.LossConfig(attack_bn="eval", **cfg))
  x_train, stats_train = jax.jit(lambda v, k: perturb_train(model, v, x, y, k))(variables, key)
  x_eval, stats_eval = jax.jit(lambda v, k: perturb_eval(model, v, x, y, k))(variables, key)
  # By hand: one sign step of the batch-statistics CE gradient, with attacks.pgd's key schedule.
  step_key = jax.random.split(jax.random.split(key)[1], 1)[0]

  def ce(xx):
    logits, stats = model.apply(variables, xx, step_key, train=True)
    return jnp.sum(attacks.cross_entropy(logits, y)), stats

  g, stats = jax.jit(jax.grad(ce, has_aux=True))(x)
  chex.assert_trees_all_close(x_train, jnp.clip(x + 0.03 * jnp.sign(g), 0, 1), atol=1e-6)
  chex.assert_trees_all_close(stats_train, stats, atol=1e-6)
  chex.assert_trees_all_equal(stats_eval, variables["batch_stats"])  # eval mode leaves them alone
  assert not np.allclose(stats_train["bn_final"]["mean"], variables["batch_stats"]["bn_final"]["mean"])
  assert float(jnp.max(jnp.abs(x_train - x_eval))) > 0  # the two modes differ
  with pytest.raises(ValueError, match="eval mode"):
    losses.LossConfig(kind="trades", attack_bn="train")


def test_trades_kl_term_is_zero_when_x_adv_equals_x():
  model = EnResNet(dataclasses.replace(TINY, noise_coef=0.0))
  x = jax.random.uniform(jax.random.PRNGKey(0), (8, 12, 12, 1))
  y = jnp.arange(8) % 10
  variables = model.init(jax.random.PRNGKey(1), x)
  cfg = losses.LossConfig(kind="trades", beta=6.0)
  (total, (_, metrics)), _ = _loss_and_grad(cfg, model, variables, x, x, y, jax.random.PRNGKey(2))
  # Both passes are in training mode on the same batch: identical logits, KL exactly 0 (up to rounding).
  assert abs(float(metrics["kl"])) < 1e-6
  chex.assert_trees_all_close(total, metrics["nat_loss"], atol=1e-6)


def test_kl_divergence_matches_a_direct_computation():
  p = jnp.array([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]])
  q = jnp.array([[0.5, 1.0, 3.0], [1.0, 0.0, -1.0]])
  sp, sq = np.exp(p) / np.exp(p).sum(1, keepdims=True), np.exp(q) / np.exp(q).sum(1, keepdims=True)
  expected = np.mean(np.sum(sp * np.log(sp / sq), axis=1))
  np.testing.assert_allclose(losses.kl_divergence(p, q), expected, rtol=1e-5)


def test_trades_attack_stays_in_the_ball_and_increases_kl(setup):
  model, variables, x, _ = setup
  det_model = EnResNet(dataclasses.replace(TINY, noise_coef=0.0))
  craft = jax.jit(lambda v, xx, k: losses.trades_attack(
      det_model.logits_fn(v), xx, eps=0.1, step_size=0.04, steps=5, key=k, unroll=False))
  x_adv = craft(variables, x, jax.random.PRNGKey(0))
  assert float(jnp.max(jnp.abs(x_adv - x))) <= 0.1 + 1e-6
  assert float(jnp.min(x_adv)) >= 0 and float(jnp.max(x_adv)) <= 1
  k = jax.random.PRNGKey(9)
  det = jax.jit(det_model.logits_fn(variables))
  assert float(losses.kl_divergence(det(x, k), det(x_adv, k))) > 10 * float(
      losses.kl_divergence(det(x, k), det(jnp.clip(x + 0.001, 0, 1), k)))


def test_bad_loss_configs_raise():
  with pytest.raises(ValueError, match="loss must be one of"):
    losses.LossConfig(kind="madry")
  with pytest.raises(ValueError, match="alpha and beta"):
    losses.LossConfig(kind="tradeoff", alpha=-1.0)
  with pytest.raises(ValueError, match="train eps"):
    losses.LossConfig(kind="at", eps=0.0)


AT_MODEL = EnResNet(dataclasses.replace(TINY, widths=(8, 16, 16)))


def _train(kind: str, images, labels, steps_per_epoch, epochs=2):
  model = AT_MODEL
  cfg = config_lib.TrainConfig(epochs=epochs, batch_size=32, lr=0.2, lr_schedule="cosine")
  tx, _ = train_lib.make_optimizer(cfg, config_lib.QuantConfig(), steps_per_epoch)
  mesh = train_lib.data_mesh()
  state = train_lib.create_train_state(model, tx, jax.random.PRNGKey(0), data_lib.to_float(images[:1]))
  state = jax.device_put(state, train_lib.shardings(mesh)[0])
  objective = losses.make_objective(
      losses.LossConfig(kind=kind, alpha=1.0, beta=1.0, eps=0.2, step_size=0.1, steps=3))
  step = train_lib.make_train_step(model, tx, objective, augment=False, mesh=mesh)
  state = train_lib.run_epochs(step, state, images, labels, cfg=cfg, mesh=mesh, start_epoch=0,
                               stop_epoch=epochs, progress=False)
  return model, {"params": state.params, "batch_stats": state.batch_stats}


def test_adversarial_training_is_more_robust_than_natural_training():
  ds = data_lib.load("mnist", source="embedded", max_train=1280, max_test=200)
  spe = 1280 // 32
  x = data_lib.to_float(ds.test_images)
  y = jnp.asarray(ds.test_labels)
  robust = {}
  craft = jax.jit(lambda fn, xx, yy, k: attacks.pgd(fn, xx, yy, eps=0.2, step_size=0.05, steps=10,
                                                     key=k, unroll=False))
  for kind in ("natural", "tradeoff"):
    model, variables = _train(kind, ds.train_images, ds.train_labels, spe)
    fn = jax.tree_util.Partial(model.apply_eval, variables)  # one compilation for both models
    x_adv = craft(fn, x, y, jax.random.PRNGKey(5))
    k = jax.random.PRNGKey(6)
    robust[kind] = (float(jnp.mean(jnp.argmax(fn(x, k), -1) == y)),
                    float(jnp.mean(jnp.argmax(fn(x_adv, k), -1) == y)))
  # Same model size, same data, same images and keys: the adversarially trained model keeps clearly more
  # accuracy under PGD-10 at eps 0.2.
  print("clean, PGD-10 accuracy:", robust)
  assert robust["tradeoff"][1] > robust["natural"][1] + 0.15, robust
  assert robust["natural"][0] > 0.5, robust
