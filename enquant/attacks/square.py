"""Square Attack (l_inf): score-based black-box random search, as run by AutoAttack.

The attack only queries logits. It starts from vertical stripes ``x + eps * s``, one random sign ``s``
per (column, channel), and then, for up to ``n_queries`` iterations, proposes to set a random square
window of side ``s_i`` (per channel one random sign) to ``x +- eps`` and keeps the proposal when it
lowers the margin loss ``z_y - max_{j != y} z_j``. The window side follows the reference's schedule of
the fraction ``p`` of pixels changed: ``p_init`` until query 10, halved at queries 10, 50, 200, 500,
1000, 2000, 4000, 6000 and 8000 (:func:`p_schedule`); ``s = max(round(sqrt(p * H * W)), 1)``, at most
``min(H, W)``. An example stops as soon as its margin is <= 0, and the loop stops when every active
example is broken.

Follows AutoAttack's ``square.py`` (``norm="Linf"``, ``loss="margin"``, ``p_init = 0.8``, 5000 queries,
``resc_schedule=False`` as in ``autoattack.py``), with these differences:
  - window positions and colours are drawn per example (the reference draws one window and one colour
    vector per iteration for the whole batch): the same distribution for every example, and an
    example's attack no longer depends on which other examples share its batch;
  - a window may sit at any of the ``H - s + 1`` vertical and ``W - s + 1`` horizontal positions (the
    reference draws ``int((H - s) * U(0, 1))``, which never places a window on the last position, so
    the last row and column keep their initial stripe; a documented fix);
  - fixed shapes: finished examples stay in the batch but are no longer updated.
Images must be NHWC (the reference's NCHW, transposed).

Key schedule: ``key`` is split into ``stripe_key, first_key, loop_key``; the stripes come from
``stripe_key``, the first query's model key is ``first_key``; query ``i`` (0-based) uses
``split(fold_in(loop_key, i), 4)`` for the rows, columns, colours and the model.

References:
  Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a query-efficient black-box adversarial
  attack via random search", ECCV 2020.
  Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks", ICML 2020.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from enquant.attacks import core
from enquant.attacks import objectives

N_QUERIES = 5000
P_INIT = 0.8
# Queries after which p halves (the reference's p_selection: ``p_init / 2`` for 10 < i <= 50, ...).
P_BOUNDARIES = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(i: int, p_init: float = P_INIT) -> float:
  """Fraction of pixels the ``i``-th query (0-based) changes: ``p_init / 2^k``, ``k`` the number of
  boundaries in :data:`P_BOUNDARIES` below ``i``."""
  return p_init / 2 ** sum(i > b for b in P_BOUNDARIES)


def window_sides(height: int, width: int, p_init: float = P_INIT) -> tuple[int, ...]:
  """Window side for each stage of :func:`p_schedule` (``len(P_BOUNDARIES) + 1`` stages)."""
  sides = []
  for k in range(len(P_BOUNDARIES) + 1):
    p = p_init / 2 ** k
    s = max(int(round(math.sqrt(p * height * width))), 1)
    sides.append(min(s, height, width))
  return tuple(sides)


class SquareResult(NamedTuple):
  """Result of :func:`square_run`, per example.

  Attributes:
    x_best: the lowest-margin point found (misclassified iff ``margin <= 0``).
    margin: its margin ``z_y - max_{j != y} z_j`` (as measured by the query that found it).
    queries: number of model queries the example used (the first one included).
  """

  x_best: jax.Array
  margin: jax.Array
  queries: jax.Array


def _check(x, y, eps, key, n_queries, p_init, name) -> None:
  core.check_images(x, name)
  if getattr(y, "ndim", None) != 1 or y.shape[0] != x.shape[0]:
    raise ValueError(f"{name}: labels must have shape ({x.shape[0]},), got {getattr(y, 'shape', None)}")
  core.check_eps(eps, name)
  if key is None:
    raise ValueError(f"{name}: a random search needs a key, got key=None")
  core.check_int(n_queries, f"{name}: n_queries", minimum=0)
  if not (core.is_number(p_init) and 0.0 < p_init <= 1.0):
    raise ValueError(f"{name}: p_init must be in (0, 1], got {p_init!r}")


def _square(logits_fn, x, y, active, *, eps, key, n_queries, p_init) -> SquareResult:
  batch, height, width, channels = x.shape
  sides = jnp.asarray(window_sides(height, width, p_init), jnp.int32)
  bounds = jnp.asarray(P_BOUNDARIES, jnp.int32)
  stripe_key, first_key, loop_key = jax.random.split(key, 3)

  def signs(k, shape):
    return jnp.where(jax.random.bernoulli(k, 0.5, shape), 1.0, -1.0).astype(x.dtype)

  def margin_at(x_new, k):
    return objectives.margin(logits_fn(x_new, k), y)

  x_best = jnp.clip(x + eps * signs(stripe_key, (batch, 1, width, channels)), 0.0, 1.0)
  margin0 = margin_at(x_best, first_key)
  queries0 = jnp.ones((batch,), jnp.int32)
  rows, cols = jnp.arange(height), jnp.arange(width)

  def cond(state):
    i, _, margin, _ = state
    return (i < n_queries) & jnp.any(active & (margin > 0))

  def body(state):
    i, x_best, margin_best, queries = state
    k_row, k_col, k_colour, k_model = jax.random.split(jax.random.fold_in(loop_key, i), 4)
    side = sides[jnp.sum(i > bounds)]
    top = jnp.floor(jax.random.uniform(k_row, (batch,)) * (height - side + 1)).astype(jnp.int32)
    left = jnp.floor(jax.random.uniform(k_col, (batch,)) * (width - side + 1)).astype(jnp.int32)
    in_rows = (rows >= top[:, None]) & (rows < top[:, None] + side)
    in_cols = (cols >= left[:, None]) & (cols < left[:, None] + side)
    window = (in_rows[:, :, None] & in_cols[:, None, :])[..., None]
    delta = 2.0 * eps * signs(k_colour, (batch, 1, 1, channels))
    x_new = jnp.where(window, x_best + delta, x_best)
    x_new = jnp.clip(jnp.clip(x_new, x - eps, x + eps), 0.0, 1.0)
    margin = margin_at(x_new, k_model)
    todo = active & (margin_best > 0)
    improved = todo & (margin < margin_best)
    return (i + 1, jnp.where(improved[:, None, None, None], x_new, x_best),
            jnp.where(improved, margin, margin_best), queries + todo.astype(jnp.int32))

  init = (jnp.asarray(0, jnp.int32), x_best, margin0, queries0)
  _, x_best, margin, queries = jax.lax.while_loop(cond, body, init)
  return SquareResult(jax.lax.stop_gradient(x_best), margin, queries)


def square_run(logits_fn: core.LogitsFn, x: jax.Array, y: jax.Array, *, eps, key,
               n_queries: int = N_QUERIES, p_init: float = P_INIT) -> SquareResult:
  """Square Attack (l_inf, margin loss) with its full result (best point, margin, query counts).

  Args:
    logits_fn: ``logits_fn(x, key) -> (batch, classes)`` logits, the model in inference mode (only
      its outputs are used: no gradients).
    x: NHWC images in [0, 1].
    y: ``(batch,)`` int labels.
    eps: l_inf radius (may be traced).
    key: PRNG key (module docstring).
    n_queries: iterations after the first query (5000 in AutoAttack).
    p_init: initial fraction of pixels per window (0.8).

  Returns:
    A :class:`SquareResult`.

  References:
    Andriushchenko et al., ECCV 2020, Algorithm 1 and the l_inf proposal distribution.
  """
  _check(x, y, eps, key, n_queries, p_init, "square_run")
  return _square(logits_fn, x, y, jnp.ones(x.shape[:1], bool), eps=eps, key=key,
                 n_queries=n_queries, p_init=p_init)


def square_linf(logits_fn: core.LogitsFn, x: jax.Array, y: jax.Array, *, eps, key,
                n_queries: int = N_QUERIES, p_init: float = P_INIT) -> jax.Array:
  """Square Attack (l_inf): the adversarial point where one was found, else the lowest-margin point.

  Args: as :func:`square_run`.

  Returns:
    The adversarial images inside the eps-ball and [0, 1], gradient stopped.

  References:
    Andriushchenko et al., ECCV 2020.
  """
  return square_run(logits_fn, x, y, eps=eps, key=key, n_queries=n_queries, p_init=p_init).x_best


def square_attack_run(logits_fn: core.LogitsFn, x, y, active, *, eps, key, n_queries: int = N_QUERIES,
                      p_init: float = P_INIT):
  """AutoAttack's use on the ``active`` examples (arguments unchecked): ``(x_adv, found)``, ``found``
  judged by a fresh forward pass as the reference's ``perturb`` does; ``x`` where not found."""
  run_key, check_key = jax.random.split(key)
  res = _square(logits_fn, x, y, active, eps=eps, key=run_key, n_queries=n_queries, p_init=p_init)
  found = active & (jnp.argmax(logits_fn(res.x_best, check_key), axis=-1) != y)
  return jnp.where(found[:, None, None, None], res.x_best, x), found


__all__ = ["N_QUERIES", "P_INIT", "SquareResult", "p_schedule", "square_attack_run", "square_linf",
           "square_run",
           "window_sides"]
