"""The public core of the attacks: the model type, input checks, projection, keys, EOT and loops.

Conventions shared by all attacks of :mod:`enquant.attacks`:
  - the model is a :data:`LogitsFn` ``logits_fn(x, key) -> (batch, classes)`` in *inference* mode
    (BatchNorm with its running statistics). Deterministic models ignore ``key``; with ``key=None``
    ``None`` is passed on, which is only right for deterministic models;
  - images lie in [0, 1] with a leading batch axis; labels are ``(batch,)`` ints;
  - an attack's result lies in the l_inf eps-ball around ``x`` and in [0, 1] (:func:`project_ball`);
  - keys are explicit and split on a fixed schedule (:func:`key_schedule`), so results are reproducible;
  - bad arguments raise one ``ValueError`` naming the attack and the value, before any tracing.

EOT (expectation over transformation) for randomized models: :func:`eot_loss_grad` takes the gradient
of the loss averaged over ``eot_samples`` noise draws, one backward pass through the part of the model
that does not depend on the noise (vmapping over the keys leaves that part unbatched, and its cotangents
are summed before it). It equals the mean of the per-draw gradients up to float rounding.

References:
  Athalye, Carlini & Wagner, "Obfuscated gradients give a false sense of security", ICML 2018 (EOT).
"""

import math
import numbers
import zlib
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

LogitsFn = Callable[[jax.Array, Any], jax.Array]
"""``logits_fn(x, key) -> (batch, classes)`` logits, the model in inference mode."""

PAPER_EPS = 0.031
"""The paper's l_inf radius (CIFAR-10 scale, about 8/255)."""


# ----------------------------------------------------------------------------------------------------
# Validation (eager, on concrete Python values; traced values pass through)
# ----------------------------------------------------------------------------------------------------


def is_number(v) -> bool:
  """Whether ``v`` is a concrete real number (bools excluded)."""
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_int(value, name: str, minimum: int = 1) -> int:
  """Raises ``ValueError`` unless ``value`` is a Python int ``>= minimum``; returns it.

  Args:
    value: the value to check.
    name: how the error names it (e.g. ``"pgd: steps"``).
    minimum: the smallest allowed value.
  """
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name} must be a Python int >= {minimum}, got {value!r}")
  return value


def check_eps(eps, name: str) -> None:
  """Raises ``ValueError`` for a concrete eps that is negative or not finite."""
  if is_number(eps) and not (eps >= 0 and math.isfinite(eps)):
    raise ValueError(f"{name}: eps must be finite and >= 0, got {eps}")


def check_positive(value, name: str) -> None:
  """Raises ``ValueError`` for a concrete value that is not finite and > 0."""
  if is_number(value) and not (value > 0 and math.isfinite(value)):
    raise ValueError(f"{name} must be finite and > 0, got {value}")


def check_inputs(x, y, eps, key, eot_samples: int = 1, random_start: bool = False,
                 name: str = "attack") -> None:
  """The argument checks every attack runs first.

  Args:
    x: images with a leading batch axis.
    y: ``(batch,)`` labels.
    eps: l_inf radius (checked when concrete).
    key: PRNG key or ``None``.
    eot_samples: noise draws per gradient (a key is needed for more than one).
    random_start: whether the attack draws a random start (needs a key).
    name: the attack, for the error message.

  Raises:
    ValueError: one line naming the attack and the bad value.
  """
  if getattr(x, "ndim", 0) < 1:
    raise ValueError(f"{name}: x needs a leading batch axis, got shape {getattr(x, 'shape', None)}")
  if getattr(y, "ndim", None) != 1 or y.shape[0] != x.shape[0]:
    raise ValueError(
        f"{name}: labels must have shape ({x.shape[0]},), got {getattr(y, 'shape', None)}")
  check_eps(eps, name)
  check_int(eot_samples, f"{name}: eot_samples")
  if key is None and eot_samples > 1:
    raise ValueError(
        f"{name}: eot_samples={eot_samples} needs a key for the model's noise, got key=None")
  if key is None and random_start:
    raise ValueError(f"{name}: random_start=True needs a key, got key=None "
                     "(pass a key or random_start=False)")


def check_images(x, name: str, what: str = "") -> None:
  """Raises ``ValueError`` unless ``x`` is a batch of NHWC images ``(N, H, W, C)``.

  Args:
    x: the array to check.
    name: the caller, e.g. ``"autoattack.run"``.
    what: why images are needed (e.g. ``" for Square"``), appended to the message.
  """
  shape = getattr(x, "shape", None)
  if shape is None or len(shape) != 4:
    raise ValueError(f"{name} needs images of shape (N, H, W, C){what}, got shape {shape}")


# ----------------------------------------------------------------------------------------------------
# The l_inf ball
# ----------------------------------------------------------------------------------------------------


def project_ball(x_adv: jax.Array, x: jax.Array, eps) -> jax.Array:
  """Projection onto the l_inf eps-ball around ``x`` intersected with [0, 1]."""
  return jnp.clip(jnp.clip(x_adv, x - eps, x + eps), 0.0, 1.0)


def uniform_start(x: jax.Array, eps, key) -> jax.Array:
  """A uniform point of the eps-ball around ``x``, clipped to [0, 1] (Madry et al.'s random start)."""
  noise = jax.random.uniform(key, x.shape, x.dtype, -1.0, 1.0)
  return jnp.clip(x + eps * noise, 0.0, 1.0)


def linf_norm(d: jax.Array) -> jax.Array:
  """Per-example l_inf norm of ``d`` (leading batch axis)."""
  return jnp.max(jnp.abs(d.reshape(d.shape[0], -1)), axis=-1)


def expand(mask: jax.Array, x: jax.Array) -> jax.Array:
  """A ``(batch,)`` mask reshaped to broadcast against ``x``."""
  return mask.reshape((-1,) + (1,) * (x.ndim - 1))


# ----------------------------------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------------------------------


def key_schedule(key, n_step_keys: int):
  """``(start_key, split(loop_key, n))`` with ``start_key, loop_key = split(key)``; ``(None, None)``
  for ``key=None``.

  Splitting once outside the loop (rather than ``fold_in`` inside it) keeps one PRNG hash in the
  compiled program instead of one per unrolled step.
  """
  if key is None:
    return None, None
  start_key, loop_key = jax.random.split(key)
  return start_key, jax.random.split(loop_key, n_step_keys)


def step_key(step_keys, i):
  """Key ``i`` of :func:`key_schedule`'s step keys (``None`` without keys)."""
  return None if step_keys is None else step_keys[i]


def fold_key(key, i):
  """``fold_in(key, i)``, or ``None`` for ``key=None``."""
  return None if key is None else jax.random.fold_in(key, i)


def split_key(key, n: int) -> tuple:
  """``split(key, n)`` as a tuple, or ``n`` times ``None`` for ``key=None``."""
  return (None,) * n if key is None else tuple(jax.random.split(key, n))


def stream_id(name: str, first: int = 1, size: int = 2**31 - 1) -> int:
  """A stable id of a name in ``[first, first + size)`` (a CRC-32): the key stream of an attack.

  ``fold_in(key, stream_id(name))`` gives every attack its own keys, so adding or reordering attacks
  changes no other number. :mod:`enquant.evaluate` uses the defaults; AutoAttack keeps 0 and 1 for its
  clean and re-scoring passes (``first=2, size=2**31 - 3``).
  """
  return zlib.crc32(name.encode()) % size + first


# ----------------------------------------------------------------------------------------------------
# Gradients with EOT
# ----------------------------------------------------------------------------------------------------


def eot_loss_grad(logits_fn: LogitsFn, loss_fn: Callable, eot_samples: int):
  """``f(x, y, key) -> (grad_x, per-example loss, logits)``, averaged over ``eot_samples`` noise draws.

  One gradient of the loss summed over the batch (examples are independent, so it equals the stack of
  per-example gradients). With ``eot_samples > 1`` the model runs on ``split(key, eot_samples)`` and the
  gradient is that of the mean loss over the draws (equal to the mean of the per-draw gradients; the
  work that does not depend on the noise is differentiated once); the losses and logits returned are the
  means over the draws.

  Args:
    logits_fn: the model.
    loss_fn: ``loss_fn(logits, y) -> (batch,)`` losses to ascend.
    eot_samples: noise draws (1: the model gets ``key`` itself).
  """
  if eot_samples == 1:
    def total(x, y, key):
      logits = logits_fn(x, key)
      per_example = loss_fn(logits, y)
      return jnp.sum(per_example), (per_example, logits)
  else:
    def total(x, y, key):
      keys = jax.random.split(key, eot_samples)
      logits = jax.vmap(logits_fn, in_axes=(None, 0))(x, keys)
      per_example = jnp.mean(jax.vmap(loss_fn, in_axes=(0, None))(logits, y), axis=0)
      return jnp.sum(per_example), (per_example, jnp.mean(logits, axis=0))

  value_and_grad = jax.value_and_grad(total, has_aux=True)

  def f(x, y, key):
    (_, (per_example, logits)), grad = value_and_grad(x, y, key)
    return grad, per_example, logits

  return f


def eot_loss_grad_vmapped(logits_fn: LogitsFn, loss_fn: Callable, eot_samples: int):
  """:func:`eot_loss_grad` computed as the mean of ``vmap(grad)`` over the draws (K backward passes
  through the whole model): the reference the tests and the benchmark compare against."""
  single = eot_loss_grad(logits_fn, loss_fn, 1)
  if eot_samples == 1:
    return single

  def f(x, y, key):
    keys = jax.random.split(key, eot_samples)
    grad, per_example, logits = jax.vmap(single, in_axes=(None, None, 0))(x, y, keys)
    return jnp.mean(grad, axis=0), jnp.mean(per_example, axis=0), jnp.mean(logits, axis=0)

  return f


# ----------------------------------------------------------------------------------------------------
# Loops
# ----------------------------------------------------------------------------------------------------


def first_success(attempt: Callable, x: jax.Array, active: jax.Array, count: int):
  """Runs ``attempt(t)`` for ``t = 0, 1, ..., count - 1`` while an active example is still unbroken.

  The loop of attacks with several targets or restarts (APGD restarts, APGD-T, FAB-T): each example keeps
  the candidate of the first attempt that breaks it; the loop stops early (``lax.while_loop``) once
  every active example is broken.

  Args:
    attempt: ``attempt(t) -> (x_candidate, found)`` with ``t`` a traced int32.
    x: the clean images (the result where no attempt succeeds).
    active: ``(batch,)`` the examples to attack.
    count: the number of attempts (a Python int or a traced value).

  Returns:
    ``(x_out, found)``.
  """

  def cond(state):
    t, _, found = state
    return (t < count) & jnp.any(active & ~found)

  def body(state):
    t, x_out, found = state
    x_cand, cand_found = attempt(t)
    success = active & ~found & cand_found
    return t + 1, jnp.where(expand(success, x), x_cand, x_out), found | success

  init = (jnp.asarray(0, jnp.int32), x, jnp.zeros(x.shape[:1], bool))
  _, x_out, found = jax.lax.while_loop(cond, body, init)
  return x_out, found


# ----------------------------------------------------------------------------------------------------
# Host-side helpers of the dataset evaluations
# ----------------------------------------------------------------------------------------------------


def as_partial(fn) -> jax.tree_util.Partial:
  """``fn`` as a ``jax.tree_util.Partial`` (a valid jit argument; a Partial holding the weights lets new
  weights of the same model reuse compiled attacks)."""
  if isinstance(fn, jax.tree_util.Partial):
    return fn
  if not callable(fn):
    raise ValueError(f"logits_fn must be callable, got {type(fn).__name__}")
  return jax.tree_util.Partial(fn)


def to_float(batch: np.ndarray) -> np.ndarray:
  """uint8 images scaled by 1/255, float images cast to float32."""
  if batch.dtype == np.uint8:
    return batch.astype(np.float32) / np.float32(255.0)
  return batch.astype(np.float32)


__all__ = [
    "LogitsFn", "PAPER_EPS", "as_partial", "check_eps", "check_images", "check_inputs", "check_int",
    "check_positive", "eot_loss_grad", "eot_loss_grad_vmapped", "expand", "first_success", "fold_key",
    "is_number", "key_schedule", "linf_norm", "project_ball", "split_key", "step_key", "stream_id",
    "to_float", "uniform_start",
]
