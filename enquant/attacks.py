"""White-box l_inf attacks on any ``logits_fn(x, key) -> logits``: FGSM, PGD (IFGSM), CW-l_inf, APGD.

Every attack works on images ``x`` in [0, 1] with a leading batch axis (NHWC or any other shape),
int labels ``y`` of shape ``(batch,)`` and any number of classes (read from the logits). It returns
``x_adv`` with ``|x_adv - x| <= eps`` elementwise (up to one float32 rounding of ``x + eps``) and
``0 <= x_adv <= 1``, gradient stopped. All attacks are pure functions of their inputs and an explicit
PRNG key, jittable (iteration counts are static Python ints, loops are ``lax.fori_loop``) and
composable with ``jax.vmap`` (``eps`` and ``step_size`` may be traced: one call over several eps).

The model function:
  ``logits_fn(x, key)`` must be the model in *inference* mode: BatchNorm uses its running statistics
  while crafting (build it with ``train=False``). An attack only sees logits, so it cannot switch the
  mode itself; a ``logits_fn`` running BatchNorm in training mode would be attacked in training mode.
  Deterministic models ignore ``key``. With ``key=None`` the attacks pass ``None`` to ``logits_fn``,
  which is only right for deterministic models; randomized models (EnResNet's noise) need a key.

Key schedule (fixed, so results are reproducible and tests can recompute them):
  ``start_key, loop_key = jax.random.split(key)``; the random start draws from ``start_key``; step
  ``i`` uses ``step_key = jax.random.split(loop_key, steps)[i]`` (APGD: ``split(loop_key, steps + 1)``,
  the last one for the gradient at the start point). With ``eot_samples == 1`` the model gets
  ``step_key`` itself, otherwise ``jax.random.split(step_key, eot_samples)`` (one model key per
  sample; the gradients are averaged, vmapped over the keys). FGSM uses ``key`` as its only step key.

Loops are rolled by default (``unroll=False``): one copy of the step in the compiled program, so compile
time does not grow with the number of steps. With JAX's stock convolution gradient XLA:CPU runs the
input-gradient convolutions inside a ``while`` loop ~4x slower than unrolled; enquant's models use
:mod:`enquant.models.conv`, whose input gradient is a forward-layout convolution, and there rolled loops are
as fast as unrolled ones (BUILD_NOTES.md). ``unroll=True`` is still accepted.

References:
  Goodfellow et al., "Explaining and harnessing adversarial examples", 2015 (FGSM).
  Kurakin et al., "Adversarial examples in the physical world", 2017 (IFGSM).
  Madry et al., "Towards deep learning models resistant to adversarial attacks", 2018 (PGD).
  Carlini & Wagner, "Towards evaluating the robustness of neural networks", 2017 (margin loss).
  Athalye et al., "Obfuscated gradients give a false sense of security", 2018 (EOT).
  Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks", ICML 2020 (APGD, DLR loss).
"""

import math
import numbers
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

LogitsFn = Callable[[jax.Array, Any], jax.Array]

PGD_LOSSES = ("ce", "cw")
APGD_LOSSES = ("ce", "dlr")


# ----------------------------------------------------------------------------------------------------
# Losses (per example; attacks ascend them)
# ----------------------------------------------------------------------------------------------------


def _check_logits(logits: jax.Array, y: jax.Array) -> None:
  if logits.ndim != 2:
    raise ValueError(f"logits must have shape (batch, classes), got {logits.shape}")
  if logits.shape[-1] < 2:
    raise ValueError(f"need at least 2 classes, got logits of shape {logits.shape}")
  if y.shape != logits.shape[:1]:
    raise ValueError(f"labels of shape {y.shape} do not match logits of shape {logits.shape}")


def margin(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Classification margin ``z_y - max_{j != y} z_j`` per example (negative iff misclassified).

  Args:
    logits: ``(batch, classes)`` logits.
    y: ``(batch,)`` int labels.

  Returns:
    ``(batch,)`` margins.
  """
  _check_logits(logits, y)
  onehot = jax.nn.one_hot(y, logits.shape[-1], dtype=bool)
  z_y = jnp.sum(jnp.where(onehot, logits, 0.0), axis=-1)
  z_other = jnp.max(jnp.where(onehot, -jnp.inf, logits), axis=-1)
  return z_y - z_other


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Softmax cross-entropy per example."""
  _check_logits(logits, y)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(log_p, y[:, None].astype(jnp.int32), axis=-1)[:, 0]


def dlr_loss(logits: jax.Array, y: jax.Array) -> jax.Array:
  """Difference of Logits Ratio ``-(z_y - max_{j!=y} z_j) / (z_pi1 - z_pi3 + 1e-12)`` per example.

  ``z_pi1 >= z_pi2 >= z_pi3`` are the sorted logits. Shift- and scale-invariant in the logits.

  Raises:
    ValueError: with fewer than 3 classes (``z_pi3`` does not exist).

  References:
    Croce & Hein, ICML 2020, eq. (6).
  """
  _check_logits(logits, y)
  if logits.shape[-1] < 3:
    raise ValueError(f"the DLR loss needs at least 3 classes, got {logits.shape[-1]}")
  z_sorted = jnp.sort(logits, axis=-1)
  return -margin(logits, y) / (z_sorted[:, -1] - z_sorted[:, -3] + 1e-12)


def _neg_margin(logits: jax.Array, y: jax.Array) -> jax.Array:
  return -margin(logits, y)


_LOSSES = {"ce": cross_entropy, "cw": _neg_margin, "dlr": dlr_loss}


# ----------------------------------------------------------------------------------------------------
# Shared pieces
# ----------------------------------------------------------------------------------------------------


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_common(x, y, eps, key, eot_samples, random_start=False, name="attack") -> None:
  """Eager argument checks (only on concrete Python values; traced eps under vmap passes through)."""
  if getattr(x, "ndim", 0) < 1:
    raise ValueError(f"{name}: x needs a leading batch axis, got shape {getattr(x, 'shape', None)}")
  if getattr(y, "ndim", None) != 1 or y.shape[0] != x.shape[0]:
    raise ValueError(
        f"{name}: labels must have shape ({x.shape[0]},), got {getattr(y, 'shape', None)}")
  if _is_number(eps) and not (eps >= 0 and math.isfinite(eps)):
    raise ValueError(f"{name}: eps must be finite and >= 0, got {eps}")
  if not isinstance(eot_samples, int) or isinstance(eot_samples, bool) or eot_samples < 1:
    raise ValueError(f"{name}: eot_samples must be an int >= 1, got {eot_samples!r}")
  if key is None and eot_samples > 1:
    raise ValueError(
        f"{name}: eot_samples={eot_samples} needs a key for the model's noise, got key=None")
  if key is None and random_start:
    raise ValueError(f"{name}: random_start=True needs a key, got key=None "
                     "(pass a key or random_start=False)")


def _check_steps(steps, name, minimum=1) -> None:
  if not isinstance(steps, int) or isinstance(steps, bool) or steps < minimum:
    raise ValueError(f"{name}: steps must be a Python int >= {minimum}, got {steps!r}")


def _check_step_size(step_size, name) -> None:
  if _is_number(step_size) and not (step_size > 0 and math.isfinite(step_size)):
    raise ValueError(f"{name}: step_size must be finite and > 0, got {step_size}")


def _project(x_adv: jax.Array, x: jax.Array, eps) -> jax.Array:
  """Projection onto the l_inf eps-ball around x intersected with [0, 1]."""
  return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)


def _loss_grad_fn(logits_fn: LogitsFn, loss_fn: Callable, eot_samples: int):
  """Returns ``f(x, y, key) -> (grad_x, per-example loss, logits)``, EOT-averaged over noise keys.

  One gradient of the loss summed over the batch (examples are independent, so it equals the stack of
  per-example gradients). With EOT the per-sample gradients, losses and logits are averaged.
  """

  def total(x, y, key):
    logits = logits_fn(x, key)
    per_example = loss_fn(logits, y)
    return jnp.sum(per_example), (per_example, logits)

  value_and_grad = jax.value_and_grad(total, has_aux=True)

  def f(x, y, key):
    if eot_samples == 1:
      (_, (per_example, logits)), grad = value_and_grad(x, y, key)
      return grad, per_example, logits
    keys = jax.random.split(key, eot_samples)
    (_, (per_example, logits)), grad = jax.vmap(value_and_grad, in_axes=(None, None, 0))(x, y, keys)
    return jnp.mean(grad, axis=0), jnp.mean(per_example, axis=0), jnp.mean(logits, axis=0)

  return f


def _schedule(key, n_step_keys):
  """``(start_key, split(loop_key, n))`` with ``start_key, loop_key = split(key)``.

  Splitting once outside the loop (rather than ``fold_in`` inside it) keeps one PRNG hash in the
  compiled program instead of one per unrolled step.
  """
  if key is None:
    return None, None
  start_key, loop_key = jax.random.split(key)
  return start_key, jax.random.split(loop_key, n_step_keys)


def _step_key(step_keys, i):
  return None if step_keys is None else step_keys[i]


def _uniform_start(x, eps, start_key):
  noise = jax.random.uniform(start_key, x.shape, x.dtype, -1.0, 1.0)
  return jnp.clip(x + eps * noise, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------------
# FGSM, PGD, CW-l_inf
# ----------------------------------------------------------------------------------------------------


def fgsm(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, *, eps, key=None, loss: str = "ce",
         eot_samples: int = 1) -> jax.Array:
  """Fast Gradient Sign Method: ``clip(x + eps * sign(grad_x loss), 0, 1)``.

  Args:
    logits_fn: ``logits_fn(x, key) -> (batch, classes)`` logits, the model in inference mode.
    x: images in [0, 1] with a leading batch axis.
    y: ``(batch,)`` int labels.
    eps: l_inf radius (may be traced).
    key: PRNG key passed to ``logits_fn`` (``None`` for deterministic models).
    loss: ``"ce"`` (cross-entropy) or ``"cw"`` (negative margin).
    eot_samples: number of noise keys the gradient is averaged over (EOT).

  Returns:
    The adversarial images, gradient stopped.
  """
  _check_common(x, y, eps, key, eot_samples, name="fgsm")
  if loss not in PGD_LOSSES:
    raise ValueError(f"fgsm: loss must be one of {PGD_LOSSES}, got {loss!r}")
  grad, _, _ = _loss_grad_fn(logits_fn, _LOSSES[loss], eot_samples)(x, y, key)
  return jax.lax.stop_gradient(jnp.clip(x + eps * jnp.sign(grad), 0.0, 1.0))


def _sign_pgd(logits_fn, x, y, *, eps, step_size, steps, key, random_start, loss_fn, eot_samples,
              unroll):
  grad_fn = _loss_grad_fn(logits_fn, loss_fn, eot_samples)
  start_key, step_keys = _schedule(key, steps)
  x_adv = _uniform_start(x, eps, start_key) if random_start else x

  def body(i, x_adv):
    grad, _, _ = grad_fn(x_adv, y, _step_key(step_keys, i))
    return _project(x_adv + step_size * jnp.sign(grad), x, eps)

  x_adv = jax.lax.fori_loop(0, steps, body, x_adv, unroll=unroll)
  return jax.lax.stop_gradient(x_adv)


def pgd(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, *, eps, step_size, steps: int, key=None,
        random_start: bool = True, loss: str = "ce", eot_samples: int = 1,
        unroll: bool | int = False) -> jax.Array:
  """Projected gradient descent (IFGSM) in the l_inf ball: ``x <- P(x + step_size * sign(grad))``.

  ``P`` projects onto the eps-ball around the clean ``x`` *and* [0, 1] after every step. With
  ``random_start`` the attack starts from ``clip(x + U(-eps, eps), 0, 1)`` (Madry et al.); without it,
  from ``x`` (the paper's IFGSM).

  Args:
    logits_fn: ``logits_fn(x, key) -> (batch, classes)`` logits, the model in inference mode
      (BatchNorm with running statistics).
    x: images in [0, 1] with a leading batch axis.
    y: ``(batch,)`` int labels.
    eps: l_inf radius (may be traced, e.g. under ``vmap``).
    step_size: step of each sign-gradient update (may be traced).
    steps: number of steps (static Python int >= 1).
    key: PRNG key (see the module docstring for its schedule); required for ``random_start`` and EOT.
    random_start: start from a uniform point of the eps-ball.
    loss: ``"ce"`` cross-entropy or ``"cw"`` the (unclamped) CW margin ``-(z_y - max_{j!=y} z_j)``.
    eot_samples: number of noise keys each step's gradient is averaged over (EOT); 1 is plain PGD.
    unroll: ``lax.fori_loop`` unrolling (rolled by default: see the module docstring).

  Returns:
    The adversarial images, gradient stopped.

  Raises:
    ValueError: for a bad eps/step size/steps/loss/eot_samples, or ``random_start`` without a key.
  """
  _check_common(x, y, eps, key, eot_samples, random_start, name="pgd")
  _check_steps(steps, "pgd")
  _check_step_size(step_size, "pgd")
  if loss not in PGD_LOSSES:
    raise ValueError(f"pgd: loss must be one of {PGD_LOSSES}, got {loss!r}")
  return _sign_pgd(logits_fn, x, y, eps=eps, step_size=step_size, steps=steps, key=key,
                   random_start=random_start, loss_fn=_LOSSES[loss], eot_samples=eot_samples,
                   unroll=unroll)


def cw_linf(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, *, eps, step_size, steps: int, key=None,
            kappa: float = 0.0, eot_samples: int = 1, random_start: bool = False,
            unroll: bool | int = False) -> jax.Array:
  """Carlini-Wagner margin attack under l_inf PGD.

  Minimises ``max(z_y - max_{j!=y} z_j, -kappa)`` with sign-gradient steps projected onto the eps-ball
  and [0, 1]. Once an example's margin is below ``-kappa`` its gradient is zero and it stops moving
  (``kappa`` is the confidence; a large kappa, e.g. 50, keeps pushing as Madry et al.'s CW-l_inf does).
  This is a bounded l_inf attack, not the original's L2 objective with Adam.

  Args:
    logits_fn: ``logits_fn(x, key) -> (batch, classes)`` logits, the model in inference mode.
    x: images in [0, 1] with a leading batch axis.
    y: ``(batch,)`` int labels.
    eps: l_inf radius (may be traced).
    step_size: sign-gradient step (may be traced).
    steps: number of steps (static Python int >= 1).
    key: PRNG key (module docstring); required for ``random_start`` and EOT.
    kappa: confidence >= 0.
    eot_samples: number of noise keys each gradient is averaged over (EOT).
    random_start: start from a uniform point of the eps-ball instead of ``x``.
    unroll: ``lax.fori_loop`` unrolling (see :func:`pgd`).

  Returns:
    The adversarial images, gradient stopped.

  References:
    Carlini & Wagner, 2017, objective f_6; Madry et al., 2018 (l_inf PGD on the CW loss).
  """
  _check_common(x, y, eps, key, eot_samples, random_start, name="cw_linf")
  _check_steps(steps, "cw_linf")
  _check_step_size(step_size, "cw_linf")
  if _is_number(kappa) and not kappa >= 0:
    raise ValueError(f"cw_linf: kappa must be >= 0, got {kappa}")

  def loss_fn(logits, labels):
    return -jnp.maximum(margin(logits, labels), -kappa)

  return _sign_pgd(logits_fn, x, y, eps=eps, step_size=step_size, steps=steps, key=key,
                   random_start=random_start, loss_fn=loss_fn, eot_samples=eot_samples, unroll=unroll)


# ----------------------------------------------------------------------------------------------------
# APGD (Croce & Hein 2020)
# ----------------------------------------------------------------------------------------------------


def apgd_checkpoints(steps: int) -> tuple[int, ...]:
  """APGD's checkpoints ``w_j = ceil(p_j * steps)``, ``w_0 = 0`` included, increasing, <= steps.

  ``p_0 = 0``, ``p_1 = 0.22``, ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, computed exactly in
  hundredths (no float round-off in the ceiling). Duplicates (small ``steps``) are dropped.
  """
  _check_steps(steps, "apgd_checkpoints")
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


def apgd(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, *, eps, steps: int = 100, key=None,
         loss: str = "ce", eot_samples: int = 1, rho: float = 0.75, random_start: bool = True,
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
    loss: ``"ce"`` or ``"dlr"`` (needs >= 3 classes).
    eot_samples: number of noise keys each gradient is averaged over (EOT).
    rho: threshold of condition 1.
    random_start: start from a random point of the ball's surface (AutoAttack's default) or from ``x``.
    unroll: ``lax.fori_loop`` unrolling; rolled by default (many steps: compile time).

  Returns:
    The adversarial images, gradient stopped.

  References:
    Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
    parameter-free attacks", ICML 2020.
  """
  _check_common(x, y, eps, key, eot_samples, random_start, name="apgd")
  _check_steps(steps, "apgd")
  if loss not in APGD_LOSSES:
    raise ValueError(f"apgd: loss must be one of {APGD_LOSSES}, got {loss!r}")
  if not (_is_number(rho) and 0.0 < rho <= 1.0):
    raise ValueError(f"apgd: rho must be in (0, 1], got {rho!r}")
  state = _apgd_run(logits_fn, x, y, eps=eps, steps=steps, key=key, loss=loss, eot_samples=eot_samples,
                    rho=rho, random_start=random_start, unroll=unroll)
  found = state.found.reshape((-1,) + (1,) * (x.ndim - 1))
  return jax.lax.stop_gradient(jnp.where(found, state.x_adv, state.x_best))


def _apgd_run(logits_fn, x, y, *, eps, steps, key, loss, eot_samples, rho, random_start, unroll,
              loss_fn: Callable | None = None) -> APGDState:
  """The APGD iterations of :func:`apgd` (arguments already checked); returns the final state.

  ``loss_fn(logits, y) -> (batch,)`` replaces the named ``loss`` when given (e.g. the targeted DLR loss
  of :mod:`enquant.autoattack`); misclassification is still tracked against ``y``.
  """
  checkpoints = apgd_checkpoints(steps)
  is_check = np.zeros(steps, bool)
  window = np.ones(steps, np.float32)
  for w_prev, w in zip(checkpoints[:-1], checkpoints[1:]):
    is_check[w - 1] = True  # after step index w-1 the iterate is x^(w)
    window[w - 1] = w - w_prev
  is_check = jnp.asarray(is_check)
  threshold = jnp.asarray(rho * window)

  grad_fn = _loss_grad_fn(logits_fn, _LOSSES[loss] if loss_fn is None else loss_fn, eot_samples)
  start_key, step_keys = _schedule(key, steps + 1)
  batch = x.shape[0]
  per_example = (batch,) + (1,) * (x.ndim - 1)

  if random_start:
    t = jax.random.uniform(start_key, x.shape, x.dtype, -1.0, 1.0)
    t_max = jnp.max(jnp.abs(t.reshape(batch, -1)), axis=1).reshape(per_example)
    x0 = jnp.clip(x + eps * t / (t_max + 1e-12), 0.0, 1.0)
    x0 = _project(x0, x, eps)
  else:
    x0 = x
  grad0, loss0, logits0 = grad_fn(x0, y, _step_key(step_keys, steps))
  eta0 = jnp.broadcast_to(2.0 * jnp.asarray(eps, x.dtype), (batch,))
  state = APGDState(
      x=x0, x_prev=x0, grad=grad0, loss=loss0, eta=eta0,
      x_best=x0, loss_best=loss0, grad_best=grad0,
      x_adv=x0, found=jnp.argmax(logits0, axis=-1) != y,
      n_increase=jnp.zeros((batch,), jnp.int32),
      loss_best_at_check=loss0, reduced_at_check=jnp.zeros((batch,), bool))

  def where(mask, a, b):
    return jnp.where(mask.reshape(per_example), a, b)

  def body(i, s: APGDState) -> APGDState:
    momentum = jnp.where(i > 0, 0.75, 1.0).astype(x.dtype)
    eta = s.eta.reshape(per_example)
    z = _project(s.x + eta * jnp.sign(s.grad), x, eps)
    x_new = _project(s.x + momentum * (z - s.x) + (1.0 - momentum) * (s.x - s.x_prev), x, eps)
    grad, loss_val, logits = grad_fn(x_new, y, _step_key(step_keys, i))

    wrong = jnp.argmax(logits, axis=-1) != y
    x_adv = where(wrong, x_new, s.x_adv)
    found = s.found | wrong
    improved = loss_val > s.loss_best
    x_best = where(improved, x_new, s.x_best)
    grad_best = where(improved, grad, s.grad_best)
    loss_best = jnp.where(improved, loss_val, s.loss_best)
    n_increase = s.n_increase + (loss_val > s.loss).astype(jnp.int32)

    check = is_check[i]
    cond1 = n_increase < threshold[i]
    cond2 = (~s.reduced_at_check) & (loss_best <= s.loss_best_at_check)
    reduce = check & (cond1 | cond2)
    return APGDState(
        x=where(reduce, x_best, x_new),
        x_prev=s.x,
        grad=where(reduce, grad_best, grad),
        loss=jnp.where(reduce, loss_best, loss_val),
        eta=jnp.where(reduce, s.eta / 2.0, s.eta),
        x_best=x_best, loss_best=loss_best, grad_best=grad_best,
        x_adv=x_adv, found=found,
        n_increase=jnp.where(check, 0, n_increase),
        loss_best_at_check=jnp.where(check, loss_best, s.loss_best_at_check),
        reduced_at_check=jnp.where(check, reduce, s.reduced_at_check))

  return jax.lax.fori_loop(0, steps, body, state, unroll=unroll)


__all__ = [
    "APGDState", "apgd", "apgd_checkpoints", "cross_entropy", "cw_linf", "dlr_loss", "fgsm", "margin",
    "pgd",
]
