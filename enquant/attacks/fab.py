"""FAB-T: the targeted Fast Adaptive Boundary attack, l_inf (Croce & Hein), as run by AutoAttack.

FAB is a *minimum-norm* attack: it looks for the adversarial point closest to ``x`` in l_inf and does not
take ``eps`` as a constraint; AutoAttack counts an example as broken when that point is misclassified and
within ``eps``. Each iteration linearises ``z_t - z_y`` (the target logit minus the true one) at the
iterate, projects both the iterate and the clean image onto the linearised decision hyperplane
intersected with the box [0, 1] (the exact minimal l_inf step: :func:`project_linf`), and moves to a
convex combination of the two projections with overshoot ``eta``; the weight ``alpha`` of the clean
image's projection is ``min(|d_1| / (|d_1| + |d_2|), alpha_max)``. Whenever the iterate is misclassified
it is recorded (if closer than the best so far) and pulled back towards ``x`` by the factor ``beta``.

Everything follows AutoAttack's ``fab_base.py`` / ``fab_pt.py`` / ``fab_projections.py`` with its
defaults (100 iterations, ``alpha_max = 0.1``, ``eta = 1.05``, ``beta = 0.9``, targets: the 2nd to the
10th largest clean logits, one run per target, no random start) and AutoAttack's acceptance rule (a
fresh forward pass must misclassify the returned point and its l_inf distance must be ``<= eps``).
Differences: fixed shapes (every example of the batch is computed; only the examples that are still
``active`` and not yet broken take a result), keys are explicit, and the target loop stops early once
every active example is broken. The reference has no EOT for FAB; neither has this.

Key schedule: run ``t`` of :func:`fab_t` uses ``fold_in(key, t)``, split into the key of the clean pass
that picks the target, the key of :func:`fab_targeted`, and the key of the acceptance pass.
:func:`fab_targeted` splits its key into ``start_key, loop_key``; iteration ``i`` uses
``split(fold_in(loop_key, i))`` for the gradient and the misclassification check. ``key=None`` (only for
deterministic models) passes ``None`` to ``logits_fn``.

References:
  Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary attack",
  ICML 2020 (FAB).
  Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks", ICML 2020 (FAB-T in AutoAttack).
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from enquant.attacks import core
from enquant.attacks import objectives

# AutoAttack's defaults (fab_base.py, autoattack.py set_version("standard")).
STEPS = 100
ALPHA_MAX = 0.1
ETA = 1.05
BETA = 0.9
N_TARGET_CLASSES = 9
_NOT_FOUND = 1e10


def project_linf(t: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """Minimal l_inf step onto a hyperplane within the box: ``argmin ||d||_inf`` s.t. ``<w, t + d> = b``
  and ``0 <= t + d <= 1``, per row.

  Moving every coordinate by at most ``lam`` towards the side that reduces ``|<w, .> - b|`` (within the
  box) changes ``<w, .>`` by ``g(lam) = sum_i |w_i| min(lam, r_i)``, ``r_i`` the room to the box's
  face in that direction. ``g`` is piecewise linear and non-decreasing with breakpoints at the sorted
  ``r_i``: the answer is the smallest ``lam`` with ``g(lam) = |<w, t> - b|``, found from the cumulative
  sums at the breakpoints. When no point of the box reaches the hyperplane the step goes to the box's
  corner closest to it (as the reference). Coordinates with ``w_i = 0`` do not move.

  Args:
    t: ``(batch, n)`` points in [0, 1].
    w: ``(batch, n)`` hyperplane normals.
    b: ``(batch,)`` offsets.

  Returns:
    ``(batch, n)`` steps ``d``.

  References:
    Croce & Hein, ICML 2020 (FAB), Proposition 2; AutoAttack's ``projection_linf``.
  """
  c = jnp.sum(w * t, axis=-1) - b
  sign = jnp.where(c >= 0, 1.0, -1.0).astype(t.dtype)
  w = w * sign[:, None]
  c = c * sign  # >= 0: <w, .> must decrease by c
  toward_one = w < 0
  room = jnp.where(toward_one, 1.0 - t, t)
  abs_w = jnp.abs(w)
  order = jnp.argsort(room, axis=-1)
  room_s = jnp.take_along_axis(room, order, axis=-1)
  w_s = jnp.take_along_axis(abs_w, order, axis=-1)
  filled = jnp.cumsum(w_s * room_s, axis=-1)               # sum_{j <= k} |w_j| r_j
  rest = jnp.sum(abs_w, axis=-1, keepdims=True) - jnp.cumsum(w_s, axis=-1)  # sum_{j > k} |w_j|
  g = filled + room_s * rest                               # g at the k-th breakpoint
  n = t.shape[-1]
  k = jnp.sum(g < c[:, None], axis=-1)                     # first breakpoint with g >= c
  feasible = k < n
  kc = jnp.minimum(k, n - 1)[:, None]
  below = jnp.take_along_axis(filled - w_s * room_s, kc, axis=-1)[:, 0]   # sum_{j < k} |w_j| r_j
  slope = jnp.take_along_axis(rest + w_s, kc, axis=-1)[:, 0]             # sum_{j >= k} |w_j|
  lam = jnp.maximum((c - below) / jnp.where(slope > 0, slope, 1.0), 0.0)
  step = jnp.where(feasible[:, None], jnp.minimum(lam[:, None], room), room)
  return jnp.where(w != 0, jnp.where(toward_one, step, -step), 0.0)


class FABResult(NamedTuple):
  """Result of :func:`fab_targeted`, per example.

  Attributes:
    x_adv: the closest misclassified point found (``x`` where none was found).
    distance: its l_inf distance to ``x`` (``1e10`` where none was found).
    found: whether a misclassified point was found.
  """

  x_adv: jax.Array
  distance: jax.Array
  found: jax.Array


def _check(x, y, steps, alpha_max, eta, beta, name) -> None:
  if getattr(x, "ndim", 0) < 2:
    raise ValueError(f"{name}: x needs a batch axis and features, got shape {getattr(x, 'shape', None)}")
  if getattr(y, "ndim", None) != 1 or y.shape[0] != x.shape[0]:
    raise ValueError(f"{name}: labels must have shape ({x.shape[0]},), got {getattr(y, 'shape', None)}")
  core.check_int(steps, f"{name}: steps")
  for label, v, lo, hi in (("alpha_max", alpha_max, 0.0, 1.0), ("beta", beta, 0.0, 1.0)):
    if core.is_number(v) and not lo <= v <= hi:
      raise ValueError(f"{name}: {label} must be in [{lo}, {hi}], got {v}")
  if core.is_number(eta) and not (eta >= 1.0 and math.isfinite(eta)):
    raise ValueError(f"{name}: eta must be finite and >= 1, got {eta}")


def _fab_targeted(logits_fn, x, y, target, *, key, steps, alpha_max, eta, beta, random_start, eps
                  ) -> FABResult:
  batch = x.shape[0]
  x0 = x.reshape(batch, -1)
  start_key, loop_key = core.split_key(key, 2)
  if random_start:
    t = jax.random.uniform(start_key, x0.shape, x.dtype, -1.0, 1.0)
    t = t / jnp.max(jnp.abs(t), axis=-1, keepdims=True)
    x1 = jnp.clip(x0 + 0.5 * eps * t, 0.0, 1.0)
  else:
    x1 = x0
  rows = jnp.arange(batch)

  def diff(xf, k):  # z_t - z_y per example (the reference's ``diffy``)
    z = logits_fn(xf.reshape(x.shape), k)
    d = z[rows, target] - z[rows, y]
    return jnp.sum(d), d

  diff_grad = jax.grad(diff, has_aux=True)

  def body(i, state):
    x1, adv, best = state
    grad_key, check_key = core.split_key(core.fold_key(loop_key, i), 2)
    w, f = diff_grad(x1, grad_key)
    b = jnp.sum(w * x1, axis=-1) - f                      # linearised boundary: <w, z> = b
    d = project_linf(jnp.concatenate([x1, x0]), jnp.concatenate([w, w]), jnp.concatenate([b, b]))
    d1, d2 = d[:batch], d[batch:]
    a1 = jnp.maximum(jnp.max(jnp.abs(d1), axis=-1), 1e-8)
    a2 = jnp.maximum(jnp.max(jnp.abs(d2), axis=-1), 1e-8)
    alpha = jnp.clip(a1 / (a1 + a2), 0.0, alpha_max)[:, None]
    x1 = jnp.clip((x1 + eta * d1) * (1.0 - alpha) + (x0 + eta * d2) * alpha, 0.0, 1.0)
    is_adv = jnp.argmax(logits_fn(x1.reshape(x.shape), check_key), axis=-1) != y
    dist = jnp.max(jnp.abs(x1 - x0), axis=-1)
    better = is_adv & (dist < best)
    adv = jnp.where(better[:, None], x1, adv)
    best = jnp.where(better, dist, best)
    x1 = jnp.where(is_adv[:, None], x0 + (x1 - x0) * beta, x1)
    return x1, adv, best

  init = (x1, x0, jnp.full((batch,), _NOT_FOUND, x.dtype))
  _, adv, best = jax.lax.fori_loop(0, steps, body, init)
  found = best < _NOT_FOUND
  return FABResult(jax.lax.stop_gradient(adv.reshape(x.shape)), best, found)


def fab_targeted(logits_fn: core.LogitsFn, x: jax.Array, y: jax.Array, target: jax.Array, *, key=None,
                 steps: int = STEPS, alpha_max: float = ALPHA_MAX, eta: float = ETA,
                 beta: float = BETA, random_start: bool = False, eps=None) -> FABResult:
  """One targeted FAB run (l_inf): the closest misclassified point found near the ``y``/``target``
  boundary, without an eps constraint.

  Args:
    logits_fn: ``logits_fn(x, key) -> (batch, classes)`` logits, the model in inference mode.
    x: images in [0, 1] with a leading batch axis.
    y: ``(batch,)`` int labels.
    target: ``(batch,)`` int target classes (the hyperplane of ``z_target - z_y`` is linearised).
    key: PRNG key (module docstring); ``None`` only for deterministic models without random start.
    steps: iterations (static Python int).
    alpha_max: largest weight of the clean image's projection.
    eta: overshoot of the projection step (>= 1).
    beta: backward step towards ``x`` after a misclassified iterate.
    random_start: start from ``x + eps/2 * t / max|t|``, ``t ~ U(-1, 1)`` (the reference's restarts).
    eps: radius of the random start.

  Returns:
    A :class:`FABResult`. Success is judged on the model's prediction (``argmax != y``), not on the
    target.

  References:
    Croce & Hein, ICML 2020 (FAB), Algorithm 1.
  """
  _check(x, y, steps, alpha_max, eta, beta, "fab_targeted")
  if random_start and (eps is None or key is None):
    raise ValueError("fab_targeted: random_start needs eps and a key")
  return _fab_targeted(logits_fn, x, y, jnp.asarray(target), key=key, steps=steps,
                       alpha_max=alpha_max, eta=eta, beta=beta, random_start=random_start, eps=eps)


def fab_t_run(logits_fn: core.LogitsFn, x, y, active, *, eps, key,
              n_target_classes: int = N_TARGET_CLASSES, steps: int = STEPS,
              alpha_max: float = ALPHA_MAX, eta: float = ETA, beta: float = BETA):
  """AutoAttack's FAB-T on the ``active`` examples (arguments unchecked): ``(x_adv, found)``, ``x``
  where not found."""
  num_classes = jax.eval_shape(logits_fn, x, key).shape[-1]

  def attempt(t):
    clean_key, run_key, check_key = core.split_key(core.fold_key(key, t), 3)
    target = objectives.nth_largest_class(logits_fn(x, clean_key), t + 2)
    res = _fab_targeted(logits_fn, x, y, target, key=run_key, steps=steps, alpha_max=alpha_max,
                        eta=eta, beta=beta, random_start=False, eps=eps)
    wrong = jnp.argmax(logits_fn(res.x_adv, check_key), axis=-1) != y
    return res.x_adv, res.found & wrong & (core.linf_norm(res.x_adv - x) <= eps)

  x_out, found = core.first_success(attempt, x, active, min(n_target_classes, num_classes - 1))
  return jax.lax.stop_gradient(x_out), found


def fab_t(logits_fn: core.LogitsFn, x: jax.Array, y: jax.Array, *, eps, key=None,
          n_target_classes: int = N_TARGET_CLASSES, steps: int = STEPS, alpha_max: float = ALPHA_MAX,
          eta: float = ETA, beta: float = BETA) -> jax.Array:
  """FAB-T as in AutoAttack (l_inf): targeted FAB towards each of the top ``n_target_classes`` other
  classes in turn, keeping the first point within ``eps`` that a fresh forward pass misclassifies.

  Targets are the 2nd, 3rd, ... largest logits of the clean image (``min(n_target_classes, classes -
  1)`` of them); examples the model already misclassifies at ``x`` are left alone.

  Args:
    logits_fn: ``logits_fn(x, key) -> (batch, classes)`` logits, the model in inference mode.
    x: images in [0, 1] with a leading batch axis.
    y: ``(batch,)`` int labels.
    eps: l_inf radius of the acceptance test (may be traced).
    key: PRNG key (module docstring); ``None`` only for deterministic models.
    n_target_classes: number of target classes (9 in AutoAttack).
    steps: FAB iterations per target (100).
    alpha_max, eta, beta: FAB's step parameters (0.1, 1.05, 0.9).

  Returns:
    The adversarial images (``x`` where the attack failed), gradient stopped.

  Raises:
    ValueError: for bad shapes or parameters.

  References:
    Croce & Hein, ICML 2020 (FAB); Croce & Hein, ICML 2020 (AutoAttack).
  """
  _check(x, y, steps, alpha_max, eta, beta, "fab_t")
  core.check_int(n_target_classes, "fab_t: n_target_classes")
  core.check_eps(eps, "fab_t")
  clean_key, run_key = core.split_key(key, 2)
  active = jnp.argmax(logits_fn(x, clean_key), axis=-1) == y
  x_adv, _ = fab_t_run(logits_fn, x, y, active, eps=eps, key=run_key,
                       n_target_classes=n_target_classes, steps=steps, alpha_max=alpha_max, eta=eta,
                       beta=beta)
  return x_adv


__all__ = ["FABResult", "fab_t", "fab_t_run", "fab_targeted", "project_linf"]
