"""Attacks against closed forms on linear softmax models, and APGD against PGD on a tiny MLP."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from enquant import attacks

SHAPE = (2, 2, 3)  # per-image NHWC shape
D = int(np.prod(SHAPE))


def _linear(w, b):
  def logits_fn(x, key):
    del key
    return x.reshape(x.shape[0], -1) @ w + b
  return logits_fn


def _noisy_linear(w, b, sigma):
  def logits_fn(x, key):
    z = x.reshape(x.shape[0], -1) @ w + b
    return z + sigma * jax.random.normal(key, z.shape)
  return logits_fn


def _images(seed, n):
  """Uniform images with some pixels exactly at 0 and 1 (so the [0, 1] clip matters)."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(0.0, 1.0, (n,) + SHAPE).astype(np.float32)
  x[:, 0, 0, 0] = 0.0
  x[:, 1, 1, 2] = 1.0
  x[:, 0, 1, 1] = 0.02
  return jnp.asarray(x)


def _linear_model(seed, n_classes, scale=0.3):
  rng = np.random.default_rng(seed)
  w = jnp.asarray(rng.normal(0.0, scale, (D, n_classes)).astype(np.float32))
  b = jnp.asarray(rng.normal(0.0, 0.1, (n_classes,)).astype(np.float32))
  return w, b


def _ce_grad_linear(x, y, w, b, noise=0.0):
  """Closed-form d/dx sum_n CE(x_n W + b (+ noise), y_n) = (softmax(z) - onehot(y)) W^T."""
  z = np.asarray(x).reshape(x.shape[0], -1).astype(np.float64) @ np.asarray(w, np.float64)
  z = z + np.asarray(b, np.float64) + noise
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  p[np.arange(len(y)), np.asarray(y)] -= 1.0
  return (p @ np.asarray(w, np.float64).T).reshape(x.shape)


def _box(x, eps):
  x = np.asarray(x, np.float64)
  return np.maximum(x - eps, 0.0), np.minimum(x + eps, 1.0)


def _assert_in_ball(x_adv, x, eps):
  x_adv, x = np.asarray(x_adv), np.asarray(x)
  assert x_adv.shape == x.shape
  assert np.all(np.abs(x_adv - x) <= eps + 1e-6), np.abs(x_adv - x).max()
  assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


# --------------------------------------------------------------------------------------------------
# Binary linear model: the margin z_y - z_o = d.x + c is linear, so its minimum over the box
# [max(x - eps, 0), min(x + eps, 1)] is at the corner x*_i = lo_i if d_i > 0 else hi_i.
# --------------------------------------------------------------------------------------------------

EPS = 0.1


@pytest.fixture(scope="module")
def binary():
  w, b = _linear_model(1, 2)
  x = _images(2, 8)
  y = jnp.asarray(np.array([0, 1, 0, 1, 1, 0, 0, 1], np.int32))
  wy, wo = np.asarray(w)[:, np.asarray(y)].T, np.asarray(w)[:, 1 - np.asarray(y)].T  # (n, D)
  d = (wy - wo).reshape((-1,) + SHAPE)
  c = np.asarray(b)[np.asarray(y)] - np.asarray(b)[1 - np.asarray(y)]
  lo, hi = _box(x, EPS)
  corner = np.where(d > 0, lo, hi)
  min_margin = (d * corner).reshape(len(y), -1).sum(1) + c
  clean_margin = (d * np.asarray(x, np.float64)).reshape(len(y), -1).sum(1) + c
  assert np.all(np.abs(d) > 1e-3)  # a unique optimal corner
  return dict(f=_linear(w, b), x=x, y=y, corner=corner, min_margin=min_margin,
              clean_margin=clean_margin)


@pytest.mark.parametrize("loss", ["ce", "cw"])
def test_pgd_reaches_the_optimal_corner_of_the_eps_box(binary, loss):
  f, x, y = binary["f"], binary["x"], binary["y"]
  x_adv = jax.jit(lambda x, y, k: attacks.pgd(f, x, y, eps=EPS, step_size=0.04, steps=6, key=k,
                                              loss=loss))(x, y, jax.random.key(0))
  np.testing.assert_allclose(np.asarray(x_adv), binary["corner"], atol=1e-6)
  got = np.asarray(attacks.margin(f(x_adv, None), y))
  np.testing.assert_allclose(got, binary["min_margin"], atol=1e-5)
  assert np.all(binary["min_margin"] < binary["clean_margin"])
  # the [0, 1] clip is active at the optimum: some coordinates sit at 0 or 1, not at x -/+ eps
  x0 = np.asarray(x, np.float64)
  clipped = (binary["corner"] == 0.0) & (x0 - EPS < 0) | (binary["corner"] == 1.0) & (x0 + EPS > 1)
  assert clipped.any()


def test_cw_linf_drives_the_margin_to_the_analytic_minimum(binary):
  f, x, y = binary["f"], binary["x"], binary["y"]
  run = jax.jit(lambda x, y, kappa: attacks.cw_linf(f, x, y, eps=EPS, step_size=0.03, steps=6,
                                                    kappa=kappa))
  got = np.asarray(attacks.margin(f(run(x, y, 1e3), None), y))
  np.testing.assert_allclose(got, binary["min_margin"], atol=1e-5)
  # kappa = 0: examples that can be fooled stop just past the boundary, the others reach the minimum
  got0 = np.asarray(attacks.margin(f(run(x, y, 0.0), None), y))
  foolable = binary["min_margin"] < 0
  assert foolable.any() and (~foolable).any()
  assert np.all(got0[foolable] < 0)
  assert np.any(got0[foolable] > binary["min_margin"][foolable] + 1e-3)  # stopped before the corner
  np.testing.assert_allclose(got0[~foolable], binary["min_margin"][~foolable], atol=1e-5)


def test_apgd_ce_reaches_the_minimum_or_fools_on_a_linear_model(binary):
  f, x, y = binary["f"], binary["x"], binary["y"]
  x_adv = jax.jit(lambda k: attacks.apgd(f, x, y, eps=EPS, steps=10, key=k))(jax.random.key(1))
  _assert_in_ball(x_adv, x, EPS)
  got = np.asarray(attacks.margin(f(x_adv, None), y))
  foolable = binary["min_margin"] < 0
  assert np.all(got[foolable] < 0)
  np.testing.assert_allclose(got[~foolable], binary["min_margin"][~foolable], atol=1e-5)


# --------------------------------------------------------------------------------------------------
# Multi-class linear models: FGSM closed form; every attack inside the eps-ball and [0, 1].
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_classes", [3, 10])
def test_fgsm_equals_the_closed_form_on_linear_softmax(n_classes):
  w, b = _linear_model(3, n_classes)
  x = _images(4, 6)
  y = jnp.asarray(np.arange(6) % n_classes, jnp.int32)
  eps = 0.05
  x_adv = attacks.fgsm(_linear(w, b), x, y, eps=eps)
  grad = _ce_grad_linear(x, y, w, b)
  assert np.all(np.abs(grad) > 1e-6)
  expected = np.clip(np.asarray(x, np.float64) + eps * np.sign(grad), 0.0, 1.0)
  np.testing.assert_allclose(np.asarray(x_adv), expected, atol=1e-6)
  assert np.any(expected == 0.0) and np.any(expected == 1.0)  # the clip was exercised


def _mlp(seed, n_classes, hidden=32):
  rng = np.random.default_rng(seed)
  w1 = jnp.asarray(rng.normal(0, 2.0 / np.sqrt(D), (D, hidden)).astype(np.float32))
  b1 = jnp.asarray(rng.normal(0, 0.5, (hidden,)).astype(np.float32))
  w2 = jnp.asarray(rng.normal(0, 2.0 / np.sqrt(hidden), (hidden, n_classes)).astype(np.float32))

  def logits_fn(x, key):
    del key
    return jax.nn.relu(x.reshape(x.shape[0], -1) @ w1 + b1) @ w2

  return logits_fn


ATTACKS = {
    "fgsm": lambda f, x, y, eps, k: attacks.fgsm(f, x, y, eps=eps),
    "pgd": lambda f, x, y, eps, k: attacks.pgd(f, x, y, eps=eps, step_size=eps / 3, steps=5, key=k),
    "pgd-cw": lambda f, x, y, eps, k: attacks.pgd(f, x, y, eps=eps, step_size=eps / 3, steps=5, key=k,
                                                  loss="cw"),
    "cw_linf": lambda f, x, y, eps, k: attacks.cw_linf(f, x, y, eps=eps, step_size=eps / 3, steps=5,
                                                       kappa=5.0),
    "apgd-ce": lambda f, x, y, eps, k: attacks.apgd(f, x, y, eps=eps, steps=5, key=k),
    "apgd-dlr": lambda f, x, y, eps, k: attacks.apgd(f, x, y, eps=eps, steps=5, key=k, loss="dlr"),
}


def test_every_attack_stays_inside_the_eps_ball_and_the_unit_box():
  f = _mlp(5, 10)  # 10 classes here; 3 in the vmap test below
  x = _images(6, 8)
  y = jnp.argmax(f(x, None), -1).astype(jnp.int32)
  eps = 0.15
  run_all = jax.jit(lambda x, y, k: {name: fn(f, x, y, eps, k) for name, fn in ATTACKS.items()})
  ce = lambda z: float(jnp.mean(attacks.cross_entropy(f(z, None), y)))
  for name, x_adv in run_all(x, y, jax.random.key(2)).items():
    _assert_in_ball(x_adv, x, eps)
    assert np.abs(np.asarray(x_adv) - np.asarray(x)).max() > 0.9 * eps, name  # it moved
    assert ce(x_adv) > ce(x), name  # and it hurt (labels are the clean predictions)


# --------------------------------------------------------------------------------------------------
# EOT: PGD against an independent Python-loop reference with closed-form gradients.
# --------------------------------------------------------------------------------------------------


def _reference_pgd(x, y, w, b, sigma, *, eps, step_size, steps, key, eot_samples):
  """Documented key schedule, Python loop, closed-form CE gradient of a noisy linear model."""
  start_key, loop_key = jax.random.split(key)
  u = np.asarray(jax.random.uniform(start_key, x.shape, jnp.float32, -1.0, 1.0))
  x0 = np.asarray(x, np.float32)
  x_adv = np.clip(x0 + np.float32(eps) * u, 0.0, 1.0)
  n_classes = w.shape[1]
  step_keys = jax.random.split(loop_key, steps)
  for i in range(steps):
    step_key = step_keys[i]
    keys = [step_key] if eot_samples == 1 else list(jax.random.split(step_key, eot_samples))
    grads = [_ce_grad_linear(x_adv, y, w, b,
                             sigma * np.asarray(jax.random.normal(k, (x.shape[0], n_classes))))
             for k in keys]
    g = np.mean(grads, axis=0)
    x_adv = np.clip(np.clip(x_adv + np.float32(step_size) * np.sign(g), x0 - np.float32(eps),
                            x0 + np.float32(eps)), 0.0, 1.0).astype(np.float32)
  return x_adv


@pytest.fixture(scope="module")
def noisy():
  w, b = _linear_model(7, 4, scale=0.2)
  sigma = 3.0  # noise dominates: which keys the EOT samples use changes the result
  x = _images(8, 6)
  y = jnp.asarray(np.array([0, 1, 2, 3, 0, 1], np.int32))
  f = _noisy_linear(w, b, sigma)
  run = jax.jit(lambda x, y, k, eot: attacks.pgd(f, x, y, eps=0.1, step_size=0.02, steps=4, key=k,
                                                 eot_samples=eot), static_argnums=3)
  return dict(w=w, b=b, sigma=sigma, x=x, y=y, f=f, run=run)


@pytest.mark.parametrize("eot_samples", [1, 3])
def test_pgd_with_eot_matches_a_python_reference(noisy, eot_samples):
  key = jax.random.key(11)
  got = noisy["run"](noisy["x"], noisy["y"], key, eot_samples)
  want = _reference_pgd(noisy["x"], noisy["y"], noisy["w"], noisy["b"], noisy["sigma"], eps=0.1,
                        step_size=0.02, steps=4, key=key, eot_samples=eot_samples)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)


def test_eot_changes_the_attack_on_a_randomized_model(noisy):
  key = jax.random.key(11)
  one = noisy["run"](noisy["x"], noisy["y"], key, 1)
  many = noisy["run"](noisy["x"], noisy["y"], key, 3)
  assert np.abs(np.asarray(one) - np.asarray(many)).max() > 0.01


def test_eot_on_a_deterministic_model_equals_the_plain_attack(binary):
  f, x, y = binary["f"], binary["x"], binary["y"]
  run = jax.jit(lambda k, eot: attacks.pgd(f, x, y, eps=EPS, step_size=0.02, steps=3, key=k,
                                           eot_samples=eot), static_argnums=1)
  key = jax.random.key(3)
  np.testing.assert_array_equal(np.asarray(run(key, 1)), np.asarray(run(key, 4)))


# --------------------------------------------------------------------------------------------------
# vmap over eps
# --------------------------------------------------------------------------------------------------


def test_attacks_vmap_over_eps_and_match_separate_calls():
  f = _mlp(9, 3)
  x = _images(10, 4)
  y = jnp.argmax(f(x, None), -1).astype(jnp.int32)
  key = jax.random.key(4)
  names = ("fgsm", "pgd", "cw_linf", "apgd-dlr")
  one = jax.jit(lambda eps: {name: ATTACKS[name](f, x, y, eps, key) for name in names})
  epss = jnp.asarray([0.0, 0.05, 0.2])
  batched = jax.jit(jax.vmap(one))(epss)
  for i, eps in enumerate(epss):
    separate = one(eps)
    for name in names:
      chex.assert_shape(batched[name], (3,) + x.shape)
      np.testing.assert_allclose(np.asarray(batched[name][i]), np.asarray(separate[name]), atol=1e-6,
                                 err_msg=name)
      _assert_in_ball(batched[name][i], x, float(eps))
  for name in names:  # eps = 0 moves nothing; eps = 0.2 moves
    np.testing.assert_array_equal(np.asarray(batched[name][0]), np.asarray(x))
    assert np.abs(np.asarray(batched[name][2]) - np.asarray(x)).max() > 0.1


# --------------------------------------------------------------------------------------------------
# APGD
# --------------------------------------------------------------------------------------------------


def test_apgd_checkpoints_follow_the_paper_recurrence():
  # p = 0, .22, .41, .57, .70, .80, .87, .93, .99 (p_{j+1} = p_j + max(p_j - p_{j-1} - .03, .06))
  assert attacks.apgd_checkpoints(100) == (0, 22, 41, 57, 70, 80, 87, 93, 99)
  assert attacks.apgd_checkpoints(10) == (0, 3, 5, 6, 7, 8, 9, 10)  # ceil, duplicates dropped
  assert attacks.apgd_checkpoints(1) == (0, 1)


@pytest.fixture(scope="module")
def mlp_problem():
  f = _mlp(12, 10, hidden=64)
  x = _images(13, 64)
  y = jnp.argmax(f(x, None), -1).astype(jnp.int32)
  return f, x, y


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_is_at_least_as_strong_as_pgd_with_the_same_budget(mlp_problem, loss):
  f, x, y = mlp_problem
  eps, steps, key = 0.06, 20, jax.random.key(5)
  acc = lambda z: float(jnp.mean(jnp.argmax(f(z, None), -1) == y))
  x_pgd = jax.jit(lambda k: attacks.pgd(f, x, y, eps=eps, step_size=eps / 4, steps=steps, key=k,
                                                unroll=False))(key)
  run_apgd = jax.jit(lambda k: attacks.apgd(f, x, y, eps=eps, steps=steps, key=k, loss=loss))
  x_apgd = run_apgd(key)
  _assert_in_ball(x_apgd, x, eps)
  assert 0.0 < acc(x_pgd) < 1.0  # a non-trivial problem: the comparison can fail
  assert acc(x_apgd) <= acc(x_pgd)
  np.testing.assert_array_equal(np.asarray(run_apgd(key)), np.asarray(x_apgd))  # reproducible
  assert not np.array_equal(np.asarray(run_apgd(jax.random.key(6))), np.asarray(x_apgd))


def _reference_apgd(x, c, *, eps, steps, rho=0.75, curvature=20.0):
  """Algorithm 1 of Croce & Hein (2020), a scalar Python loop per example, for the 1-pixel model below.

  Loss f(p) = softplus(h(p)), h(p) = -curvature (p - c)^2 - 1: CE of label 0 for logits (0, h(p)); the
  model never misclassifies, so APGD returns x_max. sign(grad f) = sign(c - p).
  """
  w = attacks.apgd_checkpoints(steps)
  f = lambda p: np.logaddexp(np.float32(0.0), -curvature * (p - c_n) ** 2 - 1.0)
  out_x, out_eta = [], []
  for x_n, c_n in zip(np.asarray(x, np.float32)[:, 0], c):
    lo, hi = max(x_n - eps, 0.0), min(x_n + eps, 1.0)
    proj = lambda v: float(np.clip(v, lo, hi))
    x_k = x_prev = float(x_n)
    f_k = f_max = f_check = f(x_k)
    x_max, eta, count, reduced_check, w_prev = x_k, 2.0 * eps, 0, False, 0
    for k in range(steps):
      alpha = 1.0 if k == 0 else 0.75
      z = proj(x_k + eta * np.sign(c_n - x_k))
      x_new = proj(x_k + alpha * (z - x_k) + (1.0 - alpha) * (x_k - x_prev))
      f_new = f(x_new)
      if f_new > f_max:
        x_max, f_max = x_new, f_new
      count += f_new > f_k
      x_prev, x_k, f_k = x_k, x_new, f_new
      if k + 1 in w[1:]:
        reduce = count < rho * (k + 1 - w_prev) or (not reduced_check and f_max <= f_check)
        if reduce:
          eta /= 2.0
          x_k, f_k = x_max, f_max
        reduced_check, f_check, count, w_prev = reduce, f_max, 0, k + 1
    out_x.append(x_max)
    out_eta.append(eta)
  return np.asarray(out_x), np.asarray(out_eta)


@pytest.mark.parametrize("rho, steps", [(0.75, 20), (0.5, 30)])
def test_apgd_step_size_halving_and_restarts_match_a_reference_of_algorithm_1(rho, steps):
  c = np.array([0.537, 0.139, 0.95, 0.40, 0.20, 0.73], np.float32)  # loss peaks; 0.95 lies outside
  x = jnp.asarray(np.array([[0.40], [0.30], [0.60], [0.52], [0.20], [0.75]], np.float32))
  eps = 0.25

  def logits_fn(x, key):
    del key
    h = -20.0 * (x[:, 0] - c) ** 2 - 1.0
    return jnp.stack([jnp.zeros_like(h), h], axis=-1)

  y = jnp.zeros(6, jnp.int32)
  run = jax.jit(lambda x: (
      attacks.apgd(logits_fn, x, y, eps=eps, steps=steps, random_start=False, rho=rho),
      attacks.apgd_run(
          logits_fn, x, y, eps=eps, steps=steps, key=None, loss="ce", eot_samples=1, rho=rho,
          random_start=False, unroll=False)))
  x_adv, state = run(x)
  want_x, want_eta = _reference_apgd(x, c, eps=eps, steps=steps, rho=rho)
  np.testing.assert_allclose(np.asarray(x_adv)[:, 0], want_x, atol=1e-6)
  np.testing.assert_allclose(np.asarray(state.eta), want_eta, rtol=1e-6)
  assert len(set(want_eta.tolist())) > 2  # examples were halved different numbers of times
  assert not np.asarray(state.found).any()


def test_apgd_returns_a_misclassified_point_over_a_higher_loss_correct_one():
  # label 0, logits (0, .02 - .06 p, -3 + 2.9 p): misclassified iff p < 1/3; the CE loss increases with
  # p everywhere, so the best-loss point is the far corner x + eps (correctly classified) while the
  # only misclassified point ever visited is the start x itself.
  def logits_fn(x, key):
    del key
    p = x[:, 0]
    return jnp.stack([jnp.zeros_like(p), 0.02 - 0.06 * p, -3.0 + 2.9 * p], axis=-1)

  x = jnp.asarray([[0.0], [0.1], [0.5]])
  y = jnp.zeros(3, jnp.int32)
  x_adv = jax.jit(lambda x: attacks.apgd(logits_fn, x, y, eps=0.5, steps=4, random_start=False))(x)
  np.testing.assert_allclose(np.asarray(x_adv)[:, 0], [0.0, 0.1, 1.0], atol=1e-7)


def test_apgd_random_start_is_on_the_ball_surface_as_in_autoattack():
  # a constant model misclassifying everything: the (adversarial) start point is returned
  f = lambda x, key: jnp.stack([jnp.zeros(x.shape[0]), jnp.ones(x.shape[0]),
                                -jnp.ones(x.shape[0])], -1) + 0.0 * x.sum()
  x = _images(14, 3)
  y = jnp.zeros(3, jnp.int32)
  x_adv = jax.jit(lambda k: attacks.apgd(f, x, y, eps=0.1, steps=3, key=k, loss="dlr"))(
      jax.random.key(0))
  start_key, _ = jax.random.split(jax.random.key(0))
  t = np.asarray(jax.random.uniform(start_key, x.shape, jnp.float32, -1.0, 1.0))
  t_max = np.abs(t.reshape(3, -1)).max(1).reshape(3, 1, 1, 1)
  np.testing.assert_allclose(np.asarray(x_adv), np.clip(np.asarray(x) + 0.1 * t / t_max, 0, 1),
                             atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Losses and argument checks
# --------------------------------------------------------------------------------------------------


def test_margin_and_dlr_loss_by_hand():
  logits = jnp.asarray([[3.0, 1.0, 0.0, -1.0], [0.5, 2.0, 1.0, 0.0]])
  y = jnp.asarray([0, 0])
  np.testing.assert_allclose(np.asarray(attacks.margin(logits, y)), [2.0, -1.5])
  # sorted: [3, 1, 0, -1] -> pi1 - pi3 = 3; [2, 1, .5, 0] -> 2 - .5 = 1.5
  np.testing.assert_allclose(np.asarray(attacks.dlr_loss(logits, y)), [-2.0 / 3.0, 1.5 / 1.5],
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(attacks.cross_entropy(logits, y)),
                             -np.asarray(jax.nn.log_softmax(logits))[:, 0], rtol=1e-6)


def test_bad_arguments_raise_clear_errors(binary):
  f, x, y = binary["f"], binary["x"], binary["y"]
  with pytest.raises(ValueError, match="random_start=True needs a key"):
    attacks.pgd(f, x, y, eps=0.1, step_size=0.01, steps=2)
  with pytest.raises(ValueError, match="eot_samples=2 needs a key"):
    attacks.fgsm(f, x, y, eps=0.1, eot_samples=2)
  with pytest.raises(ValueError, match="eps must be finite and >= 0, got -0.1"):
    attacks.fgsm(f, x, y, eps=-0.1)
  with pytest.raises(ValueError, match="loss must be one of"):
    attacks.pgd(f, x, y, eps=0.1, step_size=0.01, steps=2, random_start=False, loss="kl")
  with pytest.raises(ValueError, match="steps must be a Python int >= 1, got 0"):
    attacks.cw_linf(f, x, y, eps=0.1, step_size=0.01, steps=0)
  with pytest.raises(ValueError, match="labels must have shape"):
    attacks.fgsm(f, x, y[:3], eps=0.1)
  with pytest.raises(ValueError, match="DLR loss needs at least 3 classes, got 2"):
    attacks.apgd(f, x, y, eps=0.1, steps=2, loss="dlr", random_start=False)


# --------------------------------------------------------------------------------------------------
# The public core
# --------------------------------------------------------------------------------------------------


def _noisy_conv_net(seed):
  """conv -> EnResNet's noise (``resnet.add_noise``, std of the whole tensor) -> relu -> conv -> dense."""
  from enquant.models import resnet  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  k1, k2 = (jnp.asarray(rng.normal(0, 0.5, s), jnp.float32) for s in ((3, 3, 3, 4), (3, 3, 4, 4)))
  dense = jnp.asarray(rng.normal(0, 0.5, (2 * 2 * 4, 5)), jnp.float32)

  def conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def logits_fn(x, key):
    h = resnet.add_noise(conv(x, k1), 0.5, key)
    return conv(jax.nn.relu(h), k2).reshape(x.shape[0], -1) @ dense
  return logits_fn


def test_eot_gradient_of_the_mean_equals_the_mean_of_vmapped_gradients():
  f = _noisy_conv_net(0)
  x, y, key = _images(14, 5), jnp.asarray([0, 1, 2, 3, 4]), jax.random.key(5)
  mean_grad = jax.jit(attacks.core.eot_loss_grad(f, attacks.cross_entropy, 6))(x, y, key)
  vmapped = jax.jit(attacks.core.eot_loss_grad_vmapped(f, attacks.cross_entropy, 6))(x, y, key)
  single = attacks.core.eot_loss_grad(f, attacks.cross_entropy, 1)(x, y, key)
  scale = float(jnp.max(jnp.abs(vmapped[0])))
  np.testing.assert_allclose(mean_grad[0], vmapped[0], atol=1e-5 * scale)
  np.testing.assert_allclose(mean_grad[1], vmapped[1], rtol=1e-5)   # per-example losses
  np.testing.assert_allclose(mean_grad[2], vmapped[2], rtol=1e-5, atol=1e-6)  # logits
  assert np.abs(np.asarray(single[0]) - np.asarray(vmapped[0])).max() > 1e-2 * scale  # noise matters


def test_stream_ids_reproduce_both_evaluations_key_streams():
  import zlib  # pylint: disable=g-import-not-at-top
  from enquant.attacks import autoattack  # pylint: disable=g-import-not-at-top
  for name in ("a1", "apgd-ce", "square", "none-r3"):
    crc = zlib.crc32(name.encode())
    assert attacks.core.stream_id(name) == crc % (2**31 - 1) + 1  # evaluate's key stream of a spec
    assert autoattack._stream(name) == crc % (2**31 - 3) + 2  # pylint: disable=protected-access


def test_first_success_keeps_each_examples_first_success_and_stops_early():
  x = jnp.zeros((4, 2))
  active = jnp.asarray([True, True, True, False])
  calls = []

  def attempt(t):
    calls.append(t)
    found = jnp.stack([t == 1, t >= 0, t == 7, t >= 0])   # example 2 breaks at 7: never reached
    return jnp.full((4, 2), t + 1.0), found

  x_out, found = attacks.core.first_success(attempt, x, active, 3)
  np.testing.assert_array_equal(found, [True, True, False, False])
  np.testing.assert_array_equal(x_out[:, 0], [2.0, 1.0, 0.0, 0.0])   # attempt 1 for 0, attempt 0 for 1
  x_out, found = attacks.core.first_success(attempt, x, jnp.asarray([False, True, False, False]), 3)
  np.testing.assert_array_equal(found, [False, True, False, False])


# --------------------------------------------------------------------------------------------------
# EnResNet's C&W: L2 with Adam, rescaled to eps
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cw_problem():
  """A 3-class linear model; the target is the second-largest clean logit, d = w_y - w_t."""
  w, b = _linear_model(12, 3, scale=0.4)
  x = jnp.asarray(np.random.default_rng(13).uniform(0.3, 0.7, (6,) + SHAPE).astype(np.float32))
  z = np.asarray(x.reshape(6, -1) @ w + b, np.float64)
  y = np.argmax(z, -1)
  t = np.argsort(z, -1)[:, -2]
  wn = np.asarray(w, np.float64)
  d = (wn[:, y] - wn[:, t]).T                                  # (6, D)
  m0 = z[np.arange(6), y] - z[np.arange(6), t]                 # > 0
  return dict(f=_linear(w, b), x=x, y=jnp.asarray(y, jnp.int32), t=t, d=d, m0=m0)


def test_cw_l2_reaches_the_closed_form_minimiser_of_its_objective(cw_problem):
  """min ||delta||^2 + c max(m0 + d.delta, 0) is delta = -lam d, lam = min(c / 2, m0 / ||d||^2):
  inside the hinge for a small c, on the decision boundary (the minimal L2 step) for a large one."""
  p = cw_problem
  x = np.asarray(p["x"], np.float64).reshape(6, -1)
  dd = np.sum(p["d"] ** 2, -1)
  for c in (0.1, 1.0):
    lam = np.minimum(c / 2, p["m0"] / dd)
    res = attacks.cw_l2(p["f"], p["x"], p["y"], steps=600, learning_rate=0.003, c=c)
    np.testing.assert_array_equal(res.target, p["t"])
    delta = np.asarray(res.w, np.float64).reshape(6, -1) - x
    np.testing.assert_allclose(delta, -lam[:, None] * p["d"], atol=3e-3)
    optimum = lam**2 * dd + c * np.maximum(p["m0"] - lam * dd, 0.0)
    assert np.all(np.asarray(res.objective) >= optimum * (1 - 1e-5))
    assert np.all(np.asarray(res.objective) <= optimum * 1.001)
  assert np.all(c / 2 > p["m0"] / dd) and np.all(0.1 / 2 < p["m0"] / dd)  # one case each


def test_cw_l2_rescaled_is_x_plus_eps_times_the_l2_step_inside_the_ball(cw_problem):
  p = cw_problem
  eps = 0.05
  res = attacks.cw_l2(p["f"], p["x"], p["y"])                    # the EnResNet script's settings
  x_adv = attacks.cw_l2_rescaled(p["f"], p["x"], p["y"], eps=eps)
  expected = np.clip(np.asarray(p["x"]) + eps * (np.asarray(res.w) - np.asarray(p["x"])), 0, 1)
  np.testing.assert_allclose(x_adv, expected, atol=1e-7)
  _assert_in_ball(x_adv, p["x"], eps)
  step = np.abs(np.asarray(res.w) - np.asarray(p["x"])).max()
  assert 0 < step <= 3 * 50 * 0.0006                             # Adam: about lr per step
  margin = lambda z: np.asarray(attacks.margin(p["f"](z, None), p["y"]))  # noqa: E731
  assert np.all(margin(res.w) < margin(p["x"]))                  # towards the target
  huge = attacks.cw_l2_rescaled(p["f"], p["x"], p["y"], eps=0.01, learning_rate=0.5, steps=20, c=1e3)
  _assert_in_ball(huge, p["x"], 0.01)                            # projected when |w - x| > 1
  with pytest.raises(ValueError, match="cw_l2: learning_rate must be finite and > 0"):
    attacks.cw_l2_rescaled(p["f"], p["x"], p["y"], eps=eps, learning_rate=0.0)
