"""m-bit projections onto ``R+ x {0, +-1, ..., +-L}^n``, ``L = 2^(bits-1) - 1`` (Lloyd, exact, BCGD).

:func:`mbit_codes` gives ``(scale, codes)`` and :func:`project_mbit` the quantized tensor
``dequantize(scale, codes)``; both are re-exported by :mod:`enquant.quant.projections`, whose docstring
describes the conventions (codes, scales, finiteness) shared with the binary and ternary projections.

References:
  Yin, Zhang, Lyu, Osher, Qi, Xin. "BinaryRelax: A relaxation approach for training deep neural networks
  with quantized weights." SIAM J. Imaging Sciences 11(4), 2018. https://arxiv.org/abs/1801.06313
  Lloyd. "Least squares quantization in PCM." IEEE Transactions on Information Theory 28(2), 1982.
"""

import functools

import jax
import jax.numpy as jnp

from enquant.quant.codes import Array
from enquant.quant.codes import as_float_array
from enquant.quant.codes import check_bits
from enquant.quant.codes import Codes
from enquant.quant.codes import dequantize
from enquant.quant.codes import empty_codes
from enquant.quant.codes import normalized_magnitudes
from enquant.quant.codes import signed_codes

MBIT_METHODS = ("lloyd", "exact", "bcgd")
_BCGD_DELTA_CAP = 10.0  # quantize_fbit: delta = min(max|w| / (2^bits - 1), 10)
DEFAULT_LLOYD_ITERS = 50  # measured: converged on 3x3x64x64 Gaussian/Laplace kernels


def _least_squares(x: Array, q: Array) -> tuple[Array, Array]:
  """Best scale a = <x, q>/<q, q> (0 when q = 0) for magnitude codes q, and the error ||x - a q||^2."""
  qq = jnp.sum(q * q)
  a = jnp.sum(x * q) / jnp.where(qq > 0, qq, 1.0)
  return a, jnp.sum(jnp.square(x - a * q))


def _nearest_levels(x: Array, a: Array, levels: int) -> Array:
  """The nearest level of x / a in {0, ..., levels} (ties round up); all 0 when a = 0."""
  q = jnp.clip(jnp.floor(x / jnp.where(a > 0, a, 1.0) + 0.5), 0, levels)
  return jnp.where(a > 0, q, 0.0)


def _binaryrelax_mbit_init(x: Array, levels: int) -> Array:
  """BinaryRelax's m-bit code on magnitudes normalised to max 1: delta = 1/(2^bits - 1) = 1/(2L+1).

  Level j covers [(2j-1) delta, (2j+1) delta) (odd-multiple bins), capped at L.
  """
  return jnp.minimum(jnp.floor((x * (2 * levels + 1) + 1.0) / 2.0), levels)


def _exact_mbit_scale(x: Array, levels: int) -> Array:
  """The globally optimal scale of min_{a >= 0, q in {0..L}^n} ||x - a q||^2, by a breakpoint sweep.

  With the nearest-level codes, q_i(a) steps from j-1 to j as a decreases through x_i / (j - 1/2). Between
  consecutive breakpoints the codes are fixed and the error is a quadratic in a, minimised by the
  least-squares scale clipped to the interval. Sorting the n*L breakpoints and accumulating <x, q> and
  <q, q> gives every interval's optimum at once (O(nL log nL)).
  """
  j = jnp.arange(1, levels + 1, dtype=jnp.float32)
  breakpoints = (x[:, None] / (j - 0.5)[None, :]).reshape(-1)
  d_xq = jnp.broadcast_to(x[:, None], (x.shape[0], levels)).reshape(-1)
  d_qq = jnp.broadcast_to((2.0 * j - 1.0)[None, :], (x.shape[0], levels)).reshape(-1)
  neg_hi, d_xq, d_qq = jax.lax.sort((-breakpoints, d_xq, d_qq), num_keys=1)  # decreasing breakpoints
  hi = -neg_hi
  lo = jnp.concatenate([hi[1:], jnp.zeros((1,), jnp.float32)])
  s_xq = jnp.cumsum(d_xq)
  s_qq = jnp.cumsum(d_qq)
  a = jnp.clip(s_xq / s_qq, lo, hi)
  err = jnp.sum(x * x) - a * (2.0 * s_xq - a * s_qq)
  return a[jnp.argmin(err)]


def _bcgd_codes(w: Array, levels: int) -> Codes:
  """BinaryRelax/BCGD's ``quantize_fbit`` generalised to ``L`` levels (4 bits: L = 7, delta = max|w|/15).

  ``delta = min(max|w| / (2L + 1), 10)``; the code of ``|w|`` is the number of thresholds
  ``(2k - 1) delta`` (k = 1..L) it exceeds strictly: 0 at or below delta, ``j`` on ``((2j-1) delta,
  (2j+1) delta]``, ``L`` above ``(2L-1) delta``. The scale is the least-squares ``<|w|, q> / <q, q>``.
  Thresholds compare the raw magnitudes as the reference does; the scale is computed on magnitudes
  normalised by ``max|w|`` (no overflow for huge entries).
  """
  mag = jnp.abs(w.astype(jnp.float32)).reshape(-1)
  x, amax = normalized_magnitudes(w)
  delta = jnp.minimum(amax / (2 * levels + 1), _BCGD_DELTA_CAP)
  thresholds = (2.0 * jnp.arange(1, levels + 1, dtype=jnp.float32) - 1.0) * delta
  q = jnp.sum(mag[:, None] > thresholds[None, :], axis=1).astype(jnp.float32)
  a, _ = _least_squares(x, q)
  return amax * a, signed_codes(w, q)


@functools.partial(jax.jit, static_argnames=("bits", "method", "iters"))
def mbit_codes(w: Array, bits: int = 4, method: str = "lloyd", iters: int = DEFAULT_LLOYD_ITERS) -> Codes:
  """Codes of the m-bit projection (see :func:`project_mbit`).

  Args:
    w: float array of any shape.
    bits: 2..8; codes lie in ``{-L, ..., L}``, ``L = 2^(bits-1) - 1``.
    method: ``"lloyd"`` (BinaryRelax start + Lloyd refinement), ``"exact"`` (breakpoint sweep) or
      ``"bcgd"`` (the BinaryRelax/BCGD code's ``quantize_fbit``, no refinement: the paper's 4-bit).
    iters: number of Lloyd iterations (``>= 0``; also run after the exact sweep, where they only
      re-fit the scale; unused by ``"bcgd"``).

  Returns:
    ``(scale, codes)``: float32 scalar ``>= 0`` and int8 codes of ``w``'s shape.

  Raises:
    ValueError: for bad ``bits``/``method``/``iters`` or non-float weights.
  """
  levels = 2 ** (check_bits(bits, 2) - 1) - 1
  if method not in MBIT_METHODS:
    raise ValueError(f"m-bit method must be one of {MBIT_METHODS}, got {method!r}")
  if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
    raise ValueError(f"iters must be a non-negative integer, got {iters!r}")
  w = as_float_array(w)
  if w.size == 0:
    return empty_codes(w)
  if method == "bcgd":
    return _bcgd_codes(w, levels)
  x, amax = normalized_magnitudes(w)

  def keep_better(best, a, q):
    best_a, best_q, best_e = best
    e = jnp.sum(jnp.square(x - a * q))
    better = e < best_e
    return jnp.where(better, a, best_a), jnp.where(better, q, best_q), jnp.where(better, e, best_e)

  def assign_and_fit(a, best):
    q = _nearest_levels(x, a, levels)
    a, _ = _least_squares(x, q)
    return a, keep_better(best, a, q)

  # Initialisation: BinaryRelax's code with its least-squares scale ...
  q0 = _binaryrelax_mbit_init(x, levels)
  a0, e0 = _least_squares(x, q0)
  best = (a0, q0, e0)
  if method == "exact":
    _, best = assign_and_fit(_exact_mbit_scale(x, levels), best)
  else:
    # ... or, if better, one of the L grids that put max|w| on level j (scale 1/j). These starts make
    # the projection idempotent: a tensor already in Q whose largest code is j < L is reproduced.
    best = jax.lax.fori_loop(
        1, levels + 1, lambda j, b: assign_and_fit(1.0 / j.astype(jnp.float32), b)[1], best)

  # Lloyd refinement: nearest-level assignment, then least-squares scale. Each half-step cannot increase
  # the error in exact arithmetic; the best-so-far is kept anyway so rounding cannot make it worse.
  _, (a, q, _) = jax.lax.fori_loop(0, iters, lambda _, c: assign_and_fit(*c), (best[0], best))
  return amax * a, signed_codes(w, q)


def project_mbit(w: Array, bits: int = 4, method: str = "lloyd", iters: int = DEFAULT_LLOYD_ITERS) -> Array:
  """m-bit quantization onto ``R+ x {0, +-1, ..., +-(2^(bits-1)-1)}^n``.

  Methods:
    * ``"lloyd"`` (default): initialisation as in BinaryRelax's code: ``delta = max|w| / (2^bits - 1)``,
      levels ``0..L`` by odd-multiple bins (``|w|`` in ``[(2j-1) delta, (2j+1) delta)`` -> ``j``), then
      the least-squares scale ``a = <|w|, q> / <q, q>``. The start is replaced by the best of the ``L``
      grids "``max|w|`` on level ``j``" when one of those has a smaller error (this makes the projection
      idempotent). Then ``iters`` Lloyd iterations (nearest-level assignment, least-squares scale) in a
      ``lax.fori_loop``, keeping the best-so-far: never worse than the BinaryRelax initialisation. It is
      a local method: on small tensors its error can exceed the true distance to the set noticeably
      (measured: up to ~30% on 72-entry Gaussian tensors, <= 2% on 2304-entry ones, ~0.02% on
      3x3x64x64 kernels).
    * ``"exact"``: the true Euclidean projection. The error of the nearest-level codes is piecewise
      quadratic in the scale; a sweep over the sorted ``n*L`` breakpoints finds the global optimum.
      It costs a sort of ``n*L`` numbers: ~0.2 s for a 3x3x64x64 4-bit kernel on a 2-core CPU (Lloyd:
      ~5 ms), so it suits evaluation, export or accelerators better than CPU training steps.
    * ``"bcgd"``: exactly the BinaryRelax/BCGD code's ``quantize_fbit`` (what the paper's 4-bit
      sparsity numbers come from): ``delta = max|w| / (2^bits - 1)``, code 0 at or below ``delta``,
      ``j`` on ``((2j-1) delta, (2j+1) delta]``, ``L`` above ``(2L-1) delta``, then the least-squares
      scale. Its zero bin is about twice Lloyd's (more sparsity, a larger error).

  Args:
    w: float array of any shape (one tensor).
    bits: 2..8 (4 by default: codes in ``{-7, ..., 7}``).
    method: ``"lloyd"``, ``"exact"`` or ``"bcgd"``.
    iters: number of Lloyd iterations.

  Returns:
    P(w), same shape and dtype as ``w``.

  References:
    Yin et al. 2018 (BinaryRelax); Lloyd, "Least squares quantization in PCM", IEEE T-IT 1982.
  """
  w = as_float_array(w)
  return dequantize(*mbit_codes(w, bits=bits, method=method, iters=iters), dtype=w.dtype)
