"""Auto-PGD (Croce & Hein 2020), l_inf: APGD-CE, APGD-DLR, their restarts, and APGD-T.

Keys follow :mod:`enquant.attacks.fgsm_pgd`'s schedule with ``steps + 1`` step keys (the last one for the
gradient at the start point). The loop runs ``steps + 1`` iterations, the first one evaluating the start
point, so a compiled APGD holds one copy of the model's gradient (half the compile time of a start
gradient outside the loop). Restart ``r`` of :func:`apgd_restarts` uses ``fold_in(key, r)``; target
``t`` of APGD-T uses ``split(fold_in(key, t))`` into the key of the clean pass that picks the target and
the key of its APGD run.

References:
  Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks", ICML 2020.
"""

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from enquant.attacks import core
from enquant.attacks import objectives

APGD_LOSSES = ("ce", "dlr")


def apgd_checkpoints(steps: int) -> tuple[int, ...]:
  """APGD's checkpoints ``w_j = ceil(p_j * steps)``, ``w_0 = 0`` included, increasing, <= steps.

  ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, computed exactly in
  hundredths (no float round-off in the ceiling). Duplicates (small ``steps``) are dropped.
  """
  core.check_int(steps, "apgd_checkpoints: steps")
  p = [0, 22]  # in units of 0.01
  while True:
    nxt = p[-1] + max(p[-1] - p[-2] - 3, 6)
    if nxt > 100:
      break
    p.append(nxt)
  w = []
  for pj in p:
    wj = -(-pj * steps // 100)  # ceil
    if not w or wj > w[-1]:
      w.append(wj)
  return tuple(w)


class APGDState(NamedTuple):
  """Loop state of :func:`apgd`; every field is per example.

  Attributes:
    x: current iterate x^(k).
    x_prev: previous iterate x^(k-1) (momentum).
    grad: gradient at ``x``.
    loss: loss at ``x``.
    eta: ``(batch,)`` step sizes.
    x_best: highest-loss point so far (x_max).
    loss_best: its loss (f_max).
    grad_best: its gradient.
    x_adv: last misclassified point found.
    found: ``(batch,)`` whether a misclassified point was found.
    n_increase: count of loss increases since the last checkpoint.
    loss_best_at_check: f_max at the last checkpoint.
    reduced_at_check: whether the step size was halved at the last checkpoint.
  """

  x: jax.Array
  x_prev: jax.Array
  grad: jax.Array
  loss: jax.Array
  eta: jax.Array
  x_best: jax.Array
  loss_best: jax.Array
  grad_best: jax.Array
  x_adv: jax.Array
  found: jax.Array
  n_increase: jax.Array
  loss_best_at_check: jax.Array
  reduced_at_check: jax.Array


def apgd(logits_fn: core.LogitsFn, x: jax.Array, y: jax.Array, *, eps, steps: int = 100, key=None,
         loss="ce", eot_samples: int = 1, rho: float = 0.75, random_start: bool = True,
         unroll: bool | int = False) -> jax.Array:
  """Auto-PGD (APGD-CE / APGD-DLR), the step-size-free core of AutoAttack, l_inf.

  Algorithm 1 of Croce & Hein (2020): initial step ``eta = 2 eps``; momentum 0.75 (none on the first
  step): ``z = P(x_k + eta sign(g_k))``, ``x_{k+1} = P(x_k + 0.75 (z - x_k) + 0.25 (x_k - x_{k-1}))``.
  At each checkpoint ``w_j`` (:func:`apgd_checkpoints`) an example's step size is halved and it
  restarts from its best point (``x_max``, with its gradient) if
    1. the loss increased in fewer than ``rho * (w_j - w_{j-1})`` of the steps since ``w_{j-1}``, or
    2. its step size was not halved at ``w_{j-1}`` and ``f_max`` has not increased since ``w_{j-1}``.
  Per-example tracking throughout. Returns, per example, the last misclassified point found (the start
  point included), or else the highest-loss point.

  Differences from AutoAttack's code (autopgd_base.py), all minor: the checkpoints follow the paper's
  ``p_j`` recurrence (the code uses integer windows ``int(0.22 N)`` shrinking by ``int(0.03 N)``);
  condition 1 uses the paper's strict ``<`` (code: ``<=``); condition 2 is also checked at ``w_1``
  (code: skipped). As in the code, the random start is ``x + eps * t / max|t|`` with ``t ~ U(-1, 1)``
  (on the sphere of the ball) clipped to [0, 1]. After a restart the next loss comparison is against
  ``f_max`` (the paper's ``x^(k) = x_max``; the code compares with the abandoned iterate). With EOT
  the loss and the logits used for tracking are the averages over the noise samples (the code uses
  the last sample's logits).

  Args:
    logits_fn: ``logits_fn(x, key) -> (batch, classes)`` logits, the model in inference mode.
    x: images in [0, 1] with a leading batch axis.
    y: ``(batch,)`` int labels.
    eps: l_inf radius (may be traced).
    steps: number of iterations N (static Python int >= 1).
    key: PRNG key (module docstring).
    loss: ``"ce"`` or ``"dlr"`` (needs >= 3 classes), or the loss as data: an index into
      :data:`APGD_LOSSES` (may be traced; :func:`apgd_loss`), so APGD-CE and APGD-DLR share one
      compiled program.
    eot_samples: number of noise keys each loss is averaged over (EOT).
    rho: threshold of condition 1.
    random_start: start from a random point of the ball's surface (AutoAttack's default) or from ``x``.
    unroll: ``lax.fori_loop`` unrolling; rolled by default (many steps: compile time).

  Returns:
    The adversarial images, gradient stopped.

  References:
    Croce & Hein, ICML 2020.
  """
  core.check_inputs(x, y, eps, key, eot_samples, random_start, name="apgd")
  core.check_int(steps, "apgd: steps")
  loss_fn = None
  if isinstance(loss, str):
    if loss not in APGD_LOSSES:
      raise ValueError(f"apgd: loss must be one of {APGD_LOSSES}, got {loss!r}")
  else:
    loss_fn, loss = apgd_loss(loss), "ce"
  if not (core.is_number(rho) and 0.0 < rho <= 1.0):
    raise ValueError(f"apgd: rho must be in (0, 1], got {rho!r}")
  state = apgd_run(logits_fn, x, y, eps=eps, steps=steps, key=key, loss=loss,
                   eot_samples=eot_samples, rho=rho, random_start=random_start, unroll=unroll,
                   loss_fn=loss_fn)
  return jax.lax.stop_gradient(jnp.where(core.expand(state.found, x), state.x_adv, state.x_best))


def apgd_loss(index) -> Callable:
  """APGD's loss chosen by data: ``loss_fn(logits, y)`` is the ``index``-th of :data:`APGD_LOSSES`
  (0: cross-entropy, 1: DLR; ``index`` may be traced).

  Both losses are computed on the logits (a few operations per example) and one is selected, so its
  value and gradient equal those of the named loss; models with fewer than 3 classes (no DLR) get the
  cross-entropy whatever ``index`` is (callers refuse DLR for them: :func:`check_loss_classes`).
  """

  def loss_fn(logits, y):
    ce = objectives.cross_entropy(logits, y)
    if logits.shape[-1] < 3:
      return ce
    return jnp.where(jnp.asarray(index) == APGD_LOSSES.index("dlr"), objectives.dlr_loss(logits, y), ce)

  return loss_fn


def check_loss_classes(loss: str, num_classes: int) -> None:
  """Raises ValueError when ``loss`` (``"ce"`` or ``"dlr"``) is undefined for ``num_classes``."""
  if loss == "dlr" and num_classes < 3:
    raise ValueError(f"apgd-dlr needs at least 3 classes (the DLR loss), got {num_classes}")


def _start(x, eps, start_key, random_start):
  if not random_start:
    return x
  batch = x.shape[0]
  t = jax.random.uniform(start_key, x.shape, x.dtype, -1.0, 1.0)
  t_max = core.expand(jnp.max(jnp.abs(t.reshape(batch, -1)), axis=1), x)
  x0 = jnp.clip(x + eps * t / (t_max + 1e-12), 0.0, 1.0)
  return core.project_ball(x0, x, eps)


def _step(s: APGDState, j, *, x, y, eps, grad_fn, step_keys, is_check, threshold) -> APGDState:
  """Iteration ``j`` of the loop of :func:`apgd_run`: ``j = 0`` evaluates the start point ``s.x`` (its
  gradient, loss and misclassification fill the state), ``j >= 1`` is APGD's step ``i = j - 1``
  (Algorithm 1, with the checkpoint rules of :func:`apgd`)."""

  def where(mask, a, b):
    return jnp.where(core.expand(mask, x), a, b)

  first = j == 0
  n_keys = threshold.shape[0]  # steps + 1: the start point's key is the last
  momentum = jnp.where(j > 1, 0.75, 1.0).astype(x.dtype)
  eta = core.expand(s.eta, x)
  z = core.project_ball(s.x + eta * jnp.sign(s.grad), x, eps)
  x_new = core.project_ball(s.x + momentum * (z - s.x) + (1.0 - momentum) * (s.x - s.x_prev), x, eps)
  x_new = jnp.where(first, s.x, x_new)
  grad, loss_val, logits = grad_fn(x_new, y, core.step_key(step_keys, (j - 1) % n_keys))

  wrong = jnp.argmax(logits, axis=-1) != y
  improved = (loss_val > s.loss_best) | first
  x_best = where(improved, x_new, s.x_best)
  grad_best = where(improved, grad, s.grad_best)
  loss_best = jnp.where(improved, loss_val, s.loss_best)
  n_increase = jnp.where(first, 0, s.n_increase + (loss_val > s.loss).astype(jnp.int32))

  check = is_check[j]
  cond1 = n_increase < threshold[j]
  cond2 = (~s.reduced_at_check) & (loss_best <= s.loss_best_at_check)
  reduce = check & (cond1 | cond2)
  return APGDState(
      x=where(reduce, x_best, x_new),
      x_prev=s.x,
      grad=where(reduce, grad_best, grad),
      loss=jnp.where(reduce, loss_best, loss_val),
      eta=jnp.where(reduce, s.eta / 2.0, s.eta),
      x_best=x_best, loss_best=loss_best, grad_best=grad_best,
      x_adv=where(wrong, x_new, s.x_adv), found=s.found | wrong,
      n_increase=jnp.where(check, 0, n_increase),
      loss_best_at_check=jnp.where(check | first, loss_best, s.loss_best_at_check),
      reduced_at_check=jnp.where(check, reduce, s.reduced_at_check))


def apgd_run(logits_fn: core.LogitsFn, x, y, *, eps, steps: int, key, loss: str = "ce",
             eot_samples: int = 1, rho: float = 0.75, random_start: bool = True,
             unroll: bool | int = False, loss_fn: Callable | None = None) -> APGDState:
  """The APGD iterations of :func:`apgd` (arguments unchecked); returns the final :class:`APGDState`.

  ``loss_fn(logits, y) -> (batch,)`` replaces the named ``loss`` when given (e.g. the targeted DLR loss
  of APGD-T); misclassification is still tracked against ``y``.
  """
  checkpoints = apgd_checkpoints(steps)
  # Indexed by loop iteration j (j = 0: the start point; j = i + 1: step i).
  is_check = np.zeros(steps + 1, bool)
  window = np.ones(steps + 1, np.float32)
  for w_prev, w in zip(checkpoints[:-1], checkpoints[1:]):
    is_check[w] = True  # after step index w-1 (iteration w) the iterate is x^(w)
    window[w] = w - w_prev

  grad_fn = core.eot_loss_grad(logits_fn, objectives.LOSSES[loss] if loss_fn is None else loss_fn,
                               eot_samples)
  start_key, step_keys = core.key_schedule(key, steps + 1)
  batch = x.shape[0]
  x0 = _start(x, eps, start_key, random_start)
  zeros = jnp.zeros((batch,), x.dtype)
  state = APGDState(  # gradient, losses and found are set by the loop's first iteration
      x=x0, x_prev=x0, grad=jnp.zeros_like(x0), loss=zeros,
      eta=jnp.broadcast_to(2.0 * jnp.asarray(eps, x.dtype), (batch,)),
      x_best=x0, loss_best=zeros, grad_best=jnp.zeros_like(x0), x_adv=x0,
      found=jnp.zeros((batch,), bool), n_increase=jnp.zeros((batch,), jnp.int32),
      loss_best_at_check=zeros, reduced_at_check=jnp.zeros((batch,), bool))
  step = functools.partial(_step, x=x, y=y, eps=eps, grad_fn=grad_fn, step_keys=step_keys,
                           is_check=jnp.asarray(is_check), threshold=jnp.asarray(rho * window))
  return jax.lax.fori_loop(0, steps + 1, lambda j, s: step(s, j), state, unroll=unroll)


def apgd_restarts(logits_fn: core.LogitsFn, x, y, active, *, eps, key, loss: str, steps: int,
                  restarts: int, eot_samples: int = 1, rho: float = 0.75):
  """APGD-CE/-DLR with random starts, restarted (``fold_in(key, r)``) on the ``active`` examples still
  unbroken; ``(x_adv, found)``, ``x`` where not found."""

  def attempt(r):
    s = apgd_run(logits_fn, x, y, eps=eps, steps=steps, key=jax.random.fold_in(key, r), loss=loss,
                 eot_samples=eot_samples, rho=rho, random_start=True, unroll=False)
    return s.x_adv, s.found

  return core.first_success(attempt, x, active, restarts)


def apgd_t_run(logits_fn: core.LogitsFn, x, y, active, *, eps, key, steps: int,
               n_target_classes: int, eot_samples: int = 1, rho: float = 0.75):
  """AutoAttack's APGD-T on the ``active`` examples; ``(x_adv, found)``, ``x`` where not found."""
  num_classes = jax.eval_shape(logits_fn, x, key).shape[-1]
  if num_classes < 4:
    raise ValueError(f"apgd-t needs at least 4 classes (targeted DLR), got {num_classes}")

  def attempt(t):
    clean_key, run_key = jax.random.split(jax.random.fold_in(key, t))
    target = objectives.nth_largest_class(logits_fn(x, clean_key), t + 2)
    s = apgd_run(logits_fn, x, y, eps=eps, steps=steps, key=run_key, loss="dlr",
                 eot_samples=eot_samples, rho=rho, random_start=True, unroll=False,
                 loss_fn=functools.partial(objectives.targeted_dlr_loss, target=target))
    return s.x_adv, s.found

  return core.first_success(attempt, x, active, min(n_target_classes, num_classes - 1))


def apgd_t(logits_fn: core.LogitsFn, x: jax.Array, y: jax.Array, *, eps, key, steps: int = 100,
           n_target_classes: int = 9, eot_samples: int = 1, rho: float = 0.75) -> jax.Array:
  """APGD-T as in AutoAttack: APGD on the targeted DLR loss towards each of the ``n_target_classes``
  classes with the largest clean logits after the top one (one run each, random start), keeping the
  first misclassified point found.

  Examples misclassified at ``x`` are left alone. Targets: ``min(n_target_classes, classes - 1)``.

  Args:
    logits_fn: ``logits_fn(x, key) -> (batch, classes)`` logits (>= 4 classes), inference mode.
    x: images in [0, 1] with a leading batch axis.
    y: ``(batch,)`` int labels.
    eps: l_inf radius (may be traced).
    key: PRNG key (required: random starts).
    steps: APGD iterations per target (100).
    n_target_classes: number of targets (9).
    eot_samples: noise draws each loss is averaged over (EOT).
    rho: APGD's step-size condition threshold.

  Returns:
    The adversarial images (``x`` where the attack failed), gradient stopped.

  References:
    Croce & Hein, ICML 2020 (APGD-T).
  """
  core.check_inputs(x, y, eps, key, eot_samples, True, name="apgd_t")
  core.check_int(steps, "apgd_t: steps")
  core.check_int(n_target_classes, "apgd_t: n_target_classes")
  clean_key, run_key = jax.random.split(key)
  active = jnp.argmax(logits_fn(x, clean_key), axis=-1) == y
  x_adv, _ = apgd_t_run(logits_fn, x, y, active, eps=eps, key=run_key, steps=steps,
                        n_target_classes=n_target_classes, eot_samples=eot_samples, rho=rho)
  return jax.lax.stop_gradient(x_adv)


__all__ = ["APGDState", "APGD_LOSSES", "apgd", "apgd_checkpoints", "apgd_loss", "apgd_restarts",
           "apgd_run", "apgd_t", "apgd_t_run", "check_loss_classes"]
