"""Per-example losses that attacks ascend: cross-entropy, the CW margin, DLR and targeted DLR.

References:
  Carlini & Wagner, "Towards evaluating the robustness of neural networks", 2017 (margin loss).
  Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks", ICML 2020 (DLR and targeted DLR losses).
"""

import jax
import jax.numpy as jnp


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


def neg_margin(logits: jax.Array, y: jax.Array) -> jax.Array:
  """``-margin``: the (unclamped) CW loss ``max_{j!=y} z_j - z_y`` per example."""
  return -margin(logits, y)


def targeted_dlr_loss(logits: jax.Array, y: jax.Array, target: jax.Array) -> jax.Array:
  """Targeted DLR loss ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` per example.

  ``z_pi1 >= z_pi2 >= ...`` are the sorted logits. Shift- and scale-invariant in the logits.

  Args:
    logits: ``(batch, classes)`` logits, at least 4 classes.
    y: ``(batch,)`` true labels.
    target: ``(batch,)`` target classes.

  Returns:
    ``(batch,)`` losses (maximised by the attack).

  Raises:
    ValueError: with fewer than 4 classes (``z_pi4`` does not exist).

  References:
    Croce & Hein, ICML 2020, Section 4 (targeted DLR); AutoAttack's ``dlr_loss_targeted``.
  """
  if logits.ndim != 2 or logits.shape[-1] < 4:
    raise ValueError(
        f"the targeted DLR loss needs at least 4 classes, got logits of shape {logits.shape}")
  rows = jnp.arange(logits.shape[0])
  z_sorted = jnp.sort(logits, axis=-1)
  return -(logits[rows, y] - logits[rows, target]) / (
      z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12)


def nth_largest_class(logits: jax.Array, n) -> jax.Array:
  """Class of the ``n``-th largest logit per row (``n = 1``: the top class; ``n`` may be traced)."""
  order = jnp.argsort(logits, axis=-1)
  col = logits.shape[-1] - n
  return jnp.take_along_axis(order, jnp.broadcast_to(col, (logits.shape[0], 1)).astype(jnp.int32),
                             axis=-1)[:, 0]


LOSSES = {"ce": cross_entropy, "cw": neg_margin, "dlr": dlr_loss}
"""Named per-example losses of the attacks (``loss=`` arguments)."""

__all__ = ["LOSSES", "cross_entropy", "dlr_loss", "margin", "neg_margin", "nth_largest_class",
           "targeted_dlr_loss"]
