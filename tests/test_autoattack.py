"""AutoAttack in JAX (enquant.attacks: autoattack, fab, square) on models with known optima.

Linear models only (a conv net costs a minute of compilation per attack); keys are ``rbg`` typed keys,
which compile about twice as fast as threefry on XLA:CPU.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enquant import attacks
from enquant import sanity
from enquant.attacks import autoattack
from enquant.attacks import fab
from enquant.attacks import square

H = W = 8
# Cheap settings shared by the tests (shared settings and shapes share compiled attacks).
SMALL = autoattack.AutoAttackConfig(apgd_steps=20, fab_steps=20, square_queries=300, n_target_classes=6)


def _key(seed):
  return jax.random.key(seed, impl="rbg")


def _apply_linear(weights, bias, gradient_scale, x, key=None):
  del key
  x = gradient_scale * x + jax.lax.stop_gradient((1 - gradient_scale) * x)  # 0: masked gradients
  return x.reshape(x.shape[0], -1) @ weights + bias


def _linear(weights, bias, gradient_scale=1.0):
  """A linear model as a ``Partial``: models of the same shapes share compiled attacks."""
  return jax.tree_util.Partial(_apply_linear, jnp.asarray(weights, jnp.float32),
                               jnp.asarray(bias, jnp.float32), jnp.float32(gradient_scale))


def _best_logit_gap(x, y, weights, bias, eps):
  """Exact ``max_{x' in ball(x, eps) & [0, 1]} (z_j - z_y)(x')`` per example and class j (linear)."""
  xf = np.asarray(x, np.float64).reshape(len(x), -1)
  gaps = np.empty((len(x), weights.shape[1]))
  for i in range(len(x)):
    d = weights - weights[:, [y[i]]]                      # (features, classes)
    up, down = np.minimum(eps, 1 - xf[i])[:, None], np.minimum(eps, xf[i])[:, None]
    gaps[i] = xf[i] @ d + bias - bias[y[i]] + np.sum(np.where(d > 0, d * up, -d * down), axis=0)
    gaps[i, y[i]] = -np.inf
  return gaps


@functools.lru_cache(maxsize=None)
def _linear10_data():
  """A 10-class linear model on 8x8x1 images, 24 correctly classified images, half robust at eps."""
  rng = np.random.default_rng(0)
  weights = rng.normal(size=(H * W, 10))
  bias = rng.normal(size=10)
  x = rng.uniform(0.1, 0.9, (24, H, W, 1)).astype(np.float32)
  y = np.argmax(x.reshape(24, -1) @ weights + bias, axis=-1)
  eps = 0.05
  robust = np.max(_best_logit_gap(x, y, weights, bias, eps), axis=1) <= 0
  assert 0 < robust.sum() < 24
  return weights, bias, x, y, eps, robust


@pytest.fixture(scope="module")
def linear10():
  """``(logits_fn, x, y, eps, robust)``: :func:`_linear10_data` with the exact robust mask."""
  weights, bias, x, y, eps, robust = _linear10_data()
  return _linear(weights, bias), jnp.asarray(x), jnp.asarray(y), eps, robust


def _assert_in_ball(x_adv, x, eps):
  x_adv, x = np.asarray(x_adv), np.asarray(x)
  assert np.all(np.abs(x_adv - x) <= eps + 1e-6) and x_adv.min() >= 0 and x_adv.max() <= 1


# ----------------------------------------------------------------------------------------------------
# Pieces with closed forms
# ----------------------------------------------------------------------------------------------------


def test_project_linf_is_the_minimal_step_onto_hyperplane_and_box():
  rng = np.random.default_rng(1)
  t = rng.uniform(0, 1, (300, 6)).astype(np.float32)
  w = rng.normal(size=(300, 6)).astype(np.float32) * (rng.uniform(size=(300, 6)) > 0.2)
  b = (rng.normal(size=300) * 1.5).astype(np.float32)
  d = np.asarray(jax.jit(fab.project_linf)(t, w, b))
  for i in range(300):  # oracle: bisection on the l_inf radius lam of g(lam) = |<w,t> - b|
    c = w[i] @ t[i] - b[i]
    ws = w[i] * np.sign(c or 1.0)
    room = np.where(ws < 0, 1 - t[i], t[i])
    g = lambda lam, ws=ws, room=room: np.sum(np.abs(ws) * np.minimum(lam, room))  # noqa: E731
    lam = 1.0
    if g(1.0) >= abs(c):
      lo, hi = 0.0, 1.0
      for _ in range(50):
        lo, hi = ((lo + hi) / 2, hi) if g((lo + hi) / 2) < abs(c) else (lo, (lo + hi) / 2)
      lam = hi
    step = np.minimum(lam, room)
    expected = np.where(ws != 0, np.where(ws < 0, step, -step), 0.0)
    np.testing.assert_allclose(d[i], expected, atol=2e-5)
  feasible = np.abs(np.sum(w * (t + d), 1) - b) < 1e-4
  assert feasible.mean() > 0.5 and np.all((t + d >= -1e-6) & (t + d <= 1 + 1e-6))


def test_targeted_dlr_loss_matches_the_reference_formula_and_targets_follow_logit_ranks():
  logits = jnp.asarray([[5.0, 1.0, 3.0, 4.0, 0.0], [0.0, 2.0, 1.0, -1.0, 6.0]])
  y, t = jnp.asarray([0, 4]), jnp.asarray([2, 1])
  expected = [-(5 - 3) / (5 - (3 + 1) / 2), -(6 - 2) / (6 - (1 + 0) / 2)]
  np.testing.assert_allclose(attacks.targeted_dlr_loss(logits, y, t), expected, rtol=1e-6)
  # Shift and scale invariance (a property of DLR losses).
  np.testing.assert_allclose(attacks.targeted_dlr_loss(3 * logits + 7, y, t), expected, rtol=1e-5)
  ranks = [attacks.objectives.nth_largest_class(logits, n) for n in (1, 2, 3, 4)]
  np.testing.assert_array_equal(np.stack(ranks, 1), [[0, 3, 2, 1], [4, 1, 2, 0]])
  with pytest.raises(ValueError, match="at least 4 classes"):
    attacks.targeted_dlr_loss(logits[:, :3], y, t)


def test_fab_finds_the_minimal_linf_distance_of_a_linear_binary_model():
  rng = np.random.default_rng(2)
  w = rng.normal(size=H * W)
  x = rng.uniform(0.3, 0.7, (6, H, W, 1)).astype(np.float32)
  f = x.reshape(6, -1) @ w
  bias = -np.median(f)                                       # half the examples on each side
  y = (f + bias > 0).astype(np.int32)
  logits_fn = _linear(np.stack([np.zeros_like(w), w], 1), [0.0, bias])
  minimal = np.abs(f + bias) / np.abs(w).sum()               # far from the box faces: |f| / ||w||_1
  assert minimal.max() < 0.2
  fab_t = jax.jit(lambda eps: fab.fab_t(logits_fn, jnp.asarray(x), jnp.asarray(y), eps=eps))
  x_adv = np.asarray(fab_t(jnp.float32(1.0)))                # no constraint: FAB's minimal point
  dist = np.abs(x_adv - x).reshape(6, -1).max(1)
  assert np.all(dist >= minimal - 1e-5) and np.all(dist <= minimal * 1.02 + 1e-5), (dist, minimal)
  assert np.all(np.argmax(logits_fn(x_adv), -1) != y)
  # FAB-T keeps a point only within eps.
  np.testing.assert_array_equal(fab_t(jnp.float32(minimal.min() * 0.95)), x)


def test_square_reaches_the_optimal_corner_of_a_linear_binary_model():
  """margin = bias - <g, x> is minimised at the corner x + eps * sign(g); the model stays robust there,
  so Square spends its whole budget and must end exactly on the corner (every pixel, the last row and
  column included)."""
  rng = np.random.default_rng(3)
  g = rng.normal(size=(H, W, 2))
  x = rng.uniform(0.2, 0.8, (4, H, W, 2)).astype(np.float32)
  eps = 0.02
  corner = x + eps * np.sign(g)
  bias = np.max(corner.reshape(4, -1) @ g.ravel()) + 1.0
  logits_fn = _linear(np.stack([np.zeros(g.size), g.ravel()], 1), [bias, 0.0])
  res = square.square_run(logits_fn, jnp.asarray(x), jnp.zeros(4, jnp.int32), eps=eps, key=_key(0))
  assert res.queries.tolist() == [square.N_QUERIES + 1] * 4
  np.testing.assert_allclose(res.x_best, corner, atol=1e-6)
  np.testing.assert_allclose(res.margin, bias - corner.reshape(4, -1) @ g.ravel(), rtol=1e-4)


def test_square_schedule_is_the_references():
  assert [square.p_schedule(i) for i in (0, 10, 11, 50, 51, 200, 201, 8000, 8001)] == [
      0.8, 0.8, 0.4, 0.4, 0.2, 0.2, 0.1, 0.8 / 256, 0.8 / 512]
  assert square.window_sides(32, 32) == (29, 20, 14, 10, 7, 5, 4, 3, 2, 1)


def test_apgd_t_reaches_a_class_only_through_its_target_rank():
  """z_6 grows with the first half of the pixels, z_7 with the second; each example can raise one of
  them past the label. For A class 6 is the 7th largest logit (a target among 6), for B class 7 is the
  8th (not a target): APGD-T with 6 targets breaks A towards class 6 and leaves B alone."""
  half = H * W // 2
  weights = np.zeros((H * W, 10))
  weights[:half, 6] = weights[half:, 7] = 2.5                # eps = 0.1 moves z_6 or z_7 by 8
  bias = np.array([10.0, 9, 8, 7, 6, 5, 4.8 - 2.5 * half * 0.5, 3 - 2.5 * half * 0.5, 4.5, 1])
  logits_fn = _linear(weights, bias)
  a = np.r_[np.full(half, 0.5), np.zeros(half)]              # z_6 = 4.8 (7th), z_7 = -37
  b = np.r_[np.zeros(half), np.full(half, 0.5)]              # z_7 = 3 (8th), z_6 = -35.2
  x = jnp.asarray(np.stack([a, b] * 12).reshape(24, H, W, 1), jnp.float32)
  y = jnp.zeros(24, jnp.int32)
  res = autoattack.run(logits_fn, x, y, eps=0.1, key=_key(0), version="custom", attacks=["apgd-t"],
                       config=SMALL)
  np.testing.assert_array_equal(np.argmax(logits_fn(res.x_adv), -1), [6, 0] * 12)
  np.testing.assert_array_equal(res.robust, [False, True] * 12)
  _assert_in_ball(res.x_adv, x, 0.1)


# ----------------------------------------------------------------------------------------------------
# The ensemble: semantics
# ----------------------------------------------------------------------------------------------------


def test_standard_autoattack_finds_exactly_the_non_robust_examples_of_a_linear_model(linear10):
  logits_fn, x, y, eps, robust = linear10
  result = autoattack.run(logits_fn, x, y, eps=eps, key=_key(0), config=SMALL)
  np.testing.assert_array_equal(result.robust, robust)
  np.testing.assert_array_equal(result.robust_rescored, result.robust)   # deterministic model
  assert list(result.accuracy) == ["clean", "apgd-ce", "apgd-t", "fab-t", "square"]
  accs = [float(a) for a in result.accuracy.values()]
  assert accs[0] == 1.0 and accs == sorted(accs, reverse=True)           # never increases
  assert accs[-1] == pytest.approx(robust.mean())
  _assert_in_ball(result.x_adv, x, eps)
  pred = np.argmax(logits_fn(result.x_adv), -1)
  np.testing.assert_array_equal(pred != np.asarray(y), ~robust)
  np.testing.assert_array_equal(np.asarray(result.x_adv)[robust], np.asarray(x)[robust])
  again = autoattack.run(logits_fn, x, y, eps=eps, key=_key(0), config=SMALL)
  chex.assert_trees_all_equal(again.x_adv, result.x_adv)                 # reproducible


def test_attacks_run_in_order_and_only_on_examples_still_robust():
  """Attack A breaks examples {1, 2}, attack B {2, 3}; example 0 is misclassified from the start."""
  logits_fn = _linear(np.stack([np.zeros(H * W), np.eye(H * W)[0] * 10], 1), [2.0, 0.0])
  x = jnp.full((5, H, W, 1), 0.1).at[0, 0, 0, 0].set(0.5)
  y = jnp.zeros(5, jnp.int32)

  def breaker(members, value):
    def attack(logits_fn, x, y, *, eps, key):
      del logits_fn, y, key
      return x.at[jnp.asarray(members), 0, 0, 0].add(value * eps)
    return attack

  result = autoattack.run(logits_fn, x, y, eps=0.4, key=_key(0), version="custom",
                          attacks=[("A", breaker([1, 2], 1.0)), ("B", breaker([2, 3], 0.5))])
  np.testing.assert_array_equal(result.clean, [0, 1, 1, 1, 1])
  np.testing.assert_array_equal(result.robust, [0, 0, 0, 0, 1])
  np.testing.assert_allclose(list(result.accuracy.values()), [0.8, 0.4, 0.2])
  np.testing.assert_allclose(np.asarray(result.x_adv)[:, 0, 0, 0], [0.5, 0.5, 0.5, 0.3, 0.1])


def test_randomized_models_are_counted_two_ways():
  """A coin-flip model: AutoAttack's count needs 3 lucky draws (clean + 2 decisions), a re-score 1."""

  def coin(x, key):
    return jax.random.normal(key, (x.shape[0], 2))

  def identity(logits_fn, x, y, *, eps, key):
    del logits_fn, y, eps, key
    return x

  x = jnp.full((1024, 2, 2, 1), 0.5)
  result = autoattack.run(coin, x, jnp.zeros(1024, jnp.int32), eps=0.1, key=_key(0),
                          version="custom", attacks=[("a", identity), ("b", identity)])
  assert 0.08 < float(result.robust.mean()) < 0.17                      # 1/8
  assert 0.44 < float(result.robust_rescored.mean()) < 0.56              # 1/2
  assert not np.any(np.asarray(result.robust) & ~np.asarray(result.clean))


def test_dataset_evaluation_of_the_rand_version_matches_run_and_the_analytic_answer(linear10):
  """The rand version (EOT over 20 draws) on a deterministic model: 20 equal gradients, so APGD-CE breaks
  exactly what it breaks without EOT (batch 0 of ``evaluate`` uses ``run``'s keys); the still-robust
  examples are gathered between attacks and the final mask is the analytic one."""
  logits_fn, x, y, eps, robust = linear10
  assert autoattack.describe("rand")["eot_samples"] == 20
  assert [n for n, _ in autoattack.attack_list("rand")] == ["apgd-ce", "apgd-dlr"]
  acc, masks = autoattack.evaluate(logits_fn, np.asarray(x), np.asarray(y), eps=eps, key=_key(0),
                                   version="rand", config=SMALL, batch_size=24, progress=False)
  np.testing.assert_array_equal(masks["robust"], robust)
  np.testing.assert_array_equal(masks["robust_rescored"], robust)
  assert np.all(masks["apgd-dlr"] <= masks["apgd-ce"]) and np.all(masks["apgd-ce"] <= masks["clean"])
  assert acc["autoattack"] == acc["apgd-dlr"] == pytest.approx(robust.mean()) and acc["n"] == 24
  no_eot = autoattack.run(logits_fn, x, y, eps=eps, key=_key(0), config=SMALL)
  assert acc["apgd-ce"] == pytest.approx(float(no_eot.accuracy["apgd-ce"]))


def test_run_composes_with_jit_and_vmap_over_eps(linear10):
  """``run`` (here with the public ``apgd_t`` as a custom attack) under ``jit`` and ``vmap``."""
  logits_fn, x, y, _, _ = linear10

  def public_apgd_t(logits_fn, x, y, *, eps, key):
    return attacks.apgd_t(logits_fn, x, y, eps=eps, key=key, steps=20, n_target_classes=3)

  @jax.jit
  def robust_accuracy(eps):
    res = autoattack.run(logits_fn, x, y, eps=eps, key=_key(3), version="custom",
                         attacks=[("apgd-t", public_apgd_t)])
    return jnp.mean(res.robust)

  accs = np.asarray(jax.vmap(robust_accuracy)(jnp.asarray([0.0, 0.05, 0.3])))
  assert accs[0] == 1.0 and accs[0] >= accs[1] >= accs[2] and accs[2] < 0.5


def test_sanity_checks_pass_on_a_linear_model_and_flag_masked_gradients(linear10):
  """Exact attacks on a linear model pass every check; the same model with zero input gradients
  (gradient masking) lets black-box Square beat white-box APGD, and the report says so."""
  logits_fn, x, y, eps, robust = linear10
  cfg = sanity.SanityConfig(steps=20, strong_steps=40, square_queries=300, eps_fractions=(0, 0.5, 1))
  common = dict(eps=eps, key=_key(5), batch_size=24, config=cfg, attack_config=SMALL, progress=False)
  report = sanity.sanity_checks(logits_fn, x, y, **common)
  assert report["passed"] and report["deterministic"], sanity.format_report(report)
  checks = report["checks"]
  assert checks["eps0_equals_clean"]["eps0"] == checks["eps0_equals_clean"]["clean"] == 1.0
  assert checks["non_increasing_in_eps"]["robust_accuracy"][2] == pytest.approx(robust.mean())
  assert checks["blackbox_not_stronger"]["images_only_square_breaks"] == 0
  assert checks["eot_gap"]["passed"] is None
  masked = _linear(*_linear10_data()[:2], gradient_scale=0.0)
  report = sanity.sanity_checks(masked, x, y, **common)
  assert not report["passed"] and not report["checks"]["blackbox_not_stronger"]["passed"]
  assert "**FAIL**" in sanity.format_report(report)


def test_bad_arguments_raise_value_errors(linear10):
  logits_fn, x, y, eps, _ = linear10
  with pytest.raises(ValueError, match="version"):
    autoattack.run(logits_fn, x, y, eps=eps, key=_key(0), version="plus")
  with pytest.raises(ValueError, match="custom"):
    autoattack.run(logits_fn, x, y, eps=eps, key=_key(0), attacks=["square"])
  with pytest.raises(ValueError, match="unknown attack"):
    autoattack.attack_list("custom", ["fab"])
  with pytest.raises(ValueError, match="unique"):
    autoattack.attack_list("custom", ["square", "square"])
  with pytest.raises(ValueError, match="key"):
    autoattack.run(logits_fn, x, y, eps=eps, key=None)
  with pytest.raises(ValueError, match="eps"):
    autoattack.run(logits_fn, x, y, eps=-1.0, key=_key(0))
  with pytest.raises(ValueError, match="apgd_steps"):
    autoattack.AutoAttackConfig(apgd_steps=0)
  with pytest.raises(ValueError, match=r"square_run needs images of shape \(N, H, W, C\)"):
    square.square_linf(logits_fn, x.reshape(24, -1), y, eps=eps, key=_key(0))


def _fixer(logits_fn, x, y, *, eps, key):
  """A custom "attack" that moves every image to where the linear model of the tests below is right."""
  del logits_fn, y, key
  return x.at[:, 0, 0, 0].add(-eps)


def test_an_image_misclassified_when_clean_never_counts_as_robust():
  """Images 0 and 1 are misclassified clean; the custom attack's point is classified correctly for
  every image. AutoAttack's count is clean-correct AND survives: 0 and 1 are never robust."""
  logits_fn = _linear(np.stack([np.zeros(H * W), np.eye(H * W)[0] * 10], 1), [2.0, 0.0])
  x = jnp.full((6, H, W, 1), 0.1).at[:2, 0, 0, 0].set(0.5)      # z_1 = 5 > z_0 = 2 for 0 and 1
  y = jnp.zeros(6, jnp.int32)
  common = dict(eps=0.45, key=_key(0), version="custom", attacks=[("fix", _fixer)])
  assert np.all(np.argmax(logits_fn(_fixer(None, x, y, eps=0.45, key=None)), -1) == 0)
  result = autoattack.run(logits_fn, x, y, **common)
  np.testing.assert_array_equal(result.clean, [0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(result.robust, [0, 0, 1, 1, 1, 1])
  acc, masks = autoattack.evaluate(logits_fn, np.asarray(x), np.asarray(y), batch_size=4,
                                   progress=False, **common)
  np.testing.assert_array_equal(masks["robust"], [0, 0, 1, 1, 1, 1])
  assert acc["autoattack"] <= acc["clean"]


def test_progress_is_reported_per_attack_and_per_chunk():
  """Attack A breaks images {1, 2}, B breaks {3}; 7 images in chunks of 2."""
  logits_fn = _linear(np.stack([np.zeros(H * W), np.eye(H * W)[0] * 10], 1), [2.0, 0.0])
  x = jnp.full((7, H, W, 1), 0.1)
  y = jnp.zeros(7, jnp.int32)

  def breaker(value):
    def attack(logits_fn, x, y, *, eps, key):
      del logits_fn, y, eps, key
      return jnp.where(x[:, :1, :1, :1] == value, 0.6, x)
    return attack

  x = x.at[1:3, 0, 0, 0].set(0.11).at[3, 0, 0, 0].set(0.12)
  attacks_ = [("A", breaker(jnp.float32(0.11))), ("B", breaker(jnp.float32(0.12)))]
  events = []
  autoattack.evaluate(logits_fn, np.asarray(x), np.asarray(y), eps=0.5, key=_key(0), version="custom",
                      attacks=attacks_, batch_size=2, progress=False, callback=events.append)
  got = [(e.attack, e.done, e.total, e.robust, e.n) for e in events]
  assert got == [("clean", 2, 7, 2, 7), ("clean", 4, 7, 4, 7), ("clean", 6, 7, 6, 7),
                 ("clean", 7, 7, 7, 7),
                 ("A", 2, 7, 6, 7), ("A", 4, 7, 5, 7), ("A", 6, 7, 5, 7), ("A", 7, 7, 5, 7),
                 ("B", 2, 5, 4, 7), ("B", 4, 5, 4, 7), ("B", 5, 5, 4, 7)]
  events.clear()
  autoattack.run(logits_fn, x, y, eps=0.5, key=_key(0), version="custom", attacks=attacks_,
                 progress=events.append)
  assert [(e.attack, e.done, e.robust) for e in events] == [("clean", 7, 7), ("A", 7, 5), ("B", 5, 4)]


def test_non_image_inputs_get_one_line_naming_the_shape(linear10):
  logits_fn, x, y, eps, _ = linear10
  flat = x.reshape(24, -1)
  with pytest.raises(ValueError, match=r"autoattack.run needs images of shape \(N, H, W, C\) for "
                                       r"Square \(NHWC\), got shape \(24, 64\)"):
    autoattack.run(logits_fn, flat, y, eps=eps, key=_key(0))
  with pytest.raises(ValueError, match=r"autoattack.evaluate needs images of shape \(N, H, W, C\)"):
    autoattack.evaluate(logits_fn, np.asarray(flat), np.asarray(y), eps=eps, key=_key(0))
