"""Per-tensor projections onto quantized weight sets (binary, ternary, m-bit).

Every quantized set here has the form ``Q = R+ x C^n``: one non-negative float scale per tensor times an
integer code per entry, with codes in ``{-L, ..., L}`` (``L = 1`` for binary and ternary,
``L = 2^(bits-1) - 1`` for m-bit; binary codes exclude 0). Each projection is split in two:

* ``*_codes(w) -> (scale, codes)``: ``scale`` is a float32 scalar ``>= 0`` and ``codes`` an int8 array of
  ``w``'s shape. This is what export stores (bit-packed).
* ``project_*(w) = dequantize(scale, codes, w.dtype)``, i.e. exactly ``scale * codes.astype(w.dtype)``
  for float32 weights. P(w) is always computed through this product, so a loader that keeps
  ``(scale, codes)`` restores the identical P(w), bit for bit.

All functions are pure and jittable: the ``*_codes`` functions and :func:`dequantize` are
``jax.jit``-decorated (method / bit-width arguments static) and ``project_*`` compose them, so eager calls
compile the per-tensor work once per shape. They work on any shape (scalars and empty arrays included)
and return finite values for an all-zero tensor or huge (e.g. 1e30) entries: the magnitudes are
normalised by ``max|w|`` before any sum of squares, and the scale is multiplied back at the end. Inputs
must be finite.

Ensembles store their parameters stacked along axis 0 (``(members, H, W, I, O)`` conv kernels). A
projection applied to such a leaf directly would share ONE scale between all members; wrap it with
:func:`per_member` to project each member's tensor on its own.

References:
  Yin, Zhang, Lyu, Osher, Qi, Xin. "BinaryRelax: A relaxation approach for training deep neural networks
  with quantized weights." SIAM J. Imaging Sciences 11(4), 2018. https://arxiv.org/abs/1801.06313
  Rastegari, Ordonez, Redmon, Farhadi. "XNOR-Net." ECCV 2016 (binary scale ``mean|w|``).
  Li, Zhang, Liu. "Ternary weight networks." 2016. https://arxiv.org/abs/1605.04711
  Courbariaux, Bengio, David. "BinaryConnect." NeurIPS 2015. https://arxiv.org/abs/1511.00363
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array
Codes = tuple[Array, Array]  # (scale: float32 scalar, codes: int8 array of w's shape)

TERNARY_METHODS = ("exact", "twn", "br")
MBIT_METHODS = ("lloyd", "exact", "bcgd")
_BCGD_DELTA_CAP = 10.0  # quantize_fbit: delta = min(max|w| / (2^bits - 1), 10)
MAX_BITS = 8  # codes are int8: L = 2^(bits-1) - 1 <= 127
DEFAULT_LLOYD_ITERS = 50  # measured: converged on 3x3x64x64 Gaussian/Laplace kernels
_TWN_FACTOR = 0.7  # threshold = 0.7 * mean|w| (Li et al. 2016; BinaryRelax's quantize_tnn)


def _as_float_array(w) -> Array:
  w = jnp.asarray(w)
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"weights must be a floating-point array, got dtype {w.dtype}")
  return w


def _normalized_magnitudes(w: Array) -> tuple[Array, Array]:
  """Returns (|w| / max|w| flattened, max|w|) in float32; an all-zero w gives (zeros, 0)."""
  x = jnp.abs(w.astype(jnp.float32)).reshape(-1)
  amax = jnp.max(x, initial=0.0)
  return x / jnp.where(amax > 0, amax, 1.0), amax


def _clip_to_kept(scale: Array, w: Array, keep: Array) -> Array:
  """Clips a mean of kept magnitudes into [min, max] of the kept |w| (a no-op in exact arithmetic).

  It removes the last-bit rounding of the normalised mean (XLA may divide by multiplying with a
  reciprocal), so a tensor already in Q, whose kept |w| are all equal, gets exactly its own scale back.
  """
  a = jnp.abs(w.astype(jnp.float32)).reshape(-1)
  lo = jnp.min(jnp.where(keep, a, jnp.inf))
  hi = jnp.max(jnp.where(keep, a, 0.0))
  return jnp.where(jnp.any(keep), jnp.clip(scale, lo, hi), 0.0)


def _empty_codes(w: Array) -> Codes:
  return jnp.zeros((), jnp.float32), jnp.zeros(w.shape, jnp.int8)


def _signed_codes(w: Array, magnitude_codes: Array) -> Array:
  """sign(w) * magnitude_codes (flat, non-negative) as int8 of w's shape; sign(0) = 0."""
  sign = jnp.sign(w.astype(jnp.float32)).reshape(-1)
  return (sign * magnitude_codes).astype(jnp.int8).reshape(w.shape)


@functools.partial(jax.jit, static_argnames=("dtype",))
def dequantize(scale: Array, codes: Array, dtype=jnp.float32) -> Array:
  """The quantized tensor ``scale * codes`` in ``dtype`` (the one place P(w) is formed).

  For float32 this is exactly ``scale * codes.astype(jnp.float32)``.

  Args:
    scale: float scalar (or an array broadcastable against ``codes``, e.g. per-member scales).
    codes: integer codes.
    dtype: floating dtype of the result (the weights' dtype).

  Returns:
    ``scale * codes`` as ``dtype``.
  """
  return jnp.asarray(scale).astype(dtype) * codes.astype(dtype)


# ----------------------------------------------------------------------------------------- binary


@jax.jit
def binary_codes(w: Array) -> Codes:
  """Codes of the binary projection: ``scale = mean|w|``, ``codes = sign(w)`` with zeros -> +1.

  ``mean|w| * sign(w)`` is the exact Euclidean projection onto ``R+ x {-1, 1}^n``: for a fixed sign
  pattern ``s`` the best scale is ``<w, s>/n``, which ``s = sign(w)`` maximises.

  Args:
    w: float array of any shape.

  Returns:
    ``(scale, codes)``: float32 scalar ``>= 0`` and int8 codes in ``{-1, 1}`` of ``w``'s shape.
  """
  w = _as_float_array(w)
  if w.size == 0:
    return _empty_codes(w)
  x, amax = _normalized_magnitudes(w)
  scale = _clip_to_kept(amax * jnp.mean(x), w, jnp.ones(x.shape, bool))
  codes = jnp.where(w >= 0, 1, -1).astype(jnp.int8)
  return scale, codes


def project_binary(w: Array) -> Array:
  """Projection onto ``R+ x {-1, 1}^n``: ``mean|w| * sign(w)``, zeros go to ``+mean|w|``.

  Args:
    w: float array of any shape (one tensor).

  Returns:
    P(w), same shape and dtype as ``w``.

  References:
    Rastegari et al. 2016 (XNOR-Net); Yin et al. 2018 (BinaryRelax), ``quantize_bw``.
  """
  w = _as_float_array(w)
  return dequantize(*binary_codes(w), dtype=w.dtype)


# ---------------------------------------------------------------------------------------- ternary


def _ternary_exact_codes(w: Array) -> Codes:
  x, amax = _normalized_magnitudes(w)
  s = jnp.sort(x)[::-1]  # descending magnitudes
  csum = jnp.cumsum(s)
  k = jnp.arange(1, s.shape[0] + 1, dtype=jnp.float32)
  # For support size k the best error is ||w||^2 - (sum of top-k |w|)^2 / k. Only the ends of blocks of
  # equal magnitudes are candidates, so ties in |w| are kept or dropped together (deterministic); among
  # equal objectives argmax takes the smallest k (the sparser support).
  block_end = jnp.concatenate([s[:-1] > s[1:], jnp.ones((1,), bool)])
  objective = jnp.where(block_end, csum * (csum / k), -jnp.inf)
  threshold = s[jnp.argmax(objective)]
  keep = (x >= threshold) & (x > 0)
  count = jnp.sum(keep)
  scale_n = jnp.sum(jnp.where(keep, x, 0.0)) / jnp.maximum(count, 1).astype(jnp.float32)
  return _clip_to_kept(amax * scale_n, w, keep), _signed_codes(w, keep.astype(jnp.float32))


def _ternary_threshold_codes(w: Array, scale_over_all: bool) -> Codes:
  x, amax = _normalized_magnitudes(w)
  delta = _TWN_FACTOR * jnp.mean(x)
  if scale_over_all:
    # BinaryRelax's quantize_tnn: index = |w| >= delta; scale = mean(|w| * index) over all entries.
    keep = x >= delta
    scale = amax * jnp.mean(jnp.where(keep, x, 0.0))
  else:
    # TWN: keep |w| > delta; scale = mean of the kept |w|.
    keep = x > delta
    count = jnp.maximum(jnp.sum(keep), 1).astype(jnp.float32)
    scale = _clip_to_kept(amax * jnp.sum(jnp.where(keep, x, 0.0)) / count, w, keep)
  return scale, _signed_codes(w, keep.astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("method",))
def ternary_codes(w: Array, method: str = "exact") -> Codes:
  """Codes of the ternary projection (see :func:`project_ternary` for the methods).

  Args:
    w: float array of any shape.
    method: ``"exact"``, ``"twn"`` or ``"br"``.

  Returns:
    ``(scale, codes)``: float32 scalar ``>= 0`` and int8 codes in ``{-1, 0, 1}`` of ``w``'s shape.

  Raises:
    ValueError: for an unknown method or non-float weights.
  """
  if method not in TERNARY_METHODS:
    raise ValueError(f"ternary method must be one of {TERNARY_METHODS}, got {method!r}")
  w = _as_float_array(w)
  if w.size == 0:
    return _empty_codes(w)
  if method == "exact":
    return _ternary_exact_codes(w)
  return _ternary_threshold_codes(w, scale_over_all=(method == "br"))


def project_ternary(w: Array, method: str = "exact") -> Array:
  """Ternary quantization onto ``R+ x {-1, 0, 1}^n``.

  Methods:
    * ``"exact"``: the true Euclidean projection. With ``|w|`` sorted in decreasing order, a support of
      size ``k`` with the least-squares scale leaves the error ``||w||^2 - (sum of top-k |w|)^2 / k``, so
      the best ``k`` maximises ``(sum of top-k |w|)^2 / k``; the scale is the mean of the kept ``|w|``.
      Entries of equal magnitude are kept or dropped together; equal objectives pick the sparser support.
    * ``"twn"``: Ternary Weight Networks' approximation: keep ``|w| > 0.7 * mean|w|``, scale = mean of
      the kept ``|w|``.
    * ``"br"``: as BinaryRelax's ``quantize_tnn``: keep ``|w| >= 0.7 * mean|w|``, scale = mean over ALL
      entries of ``|w| * kept`` (a smaller scale than TWN's; not idempotent, so not a projection in the
      strict sense). Their cap ``min(threshold, 100)`` is left out: it never binds for network weights.

  Args:
    w: float array of any shape (one tensor).
    method: ``"exact"`` (default), ``"twn"`` or ``"br"``.

  Returns:
    P(w), same shape and dtype as ``w``.

  References:
    Yin et al. 2018 (BinaryRelax); Li, Zhang, Liu 2016 (Ternary weight networks).
  """
  w = _as_float_array(w)
  return dequantize(*ternary_codes(w, method=method), dtype=w.dtype)


# ------------------------------------------------------------------------------------------ m-bit


def _check_bits(bits, minimum: int) -> int:
  if isinstance(bits, bool) or not isinstance(bits, int) or not minimum <= bits <= MAX_BITS:
    raise ValueError(f"bits must be an integer in [{minimum}, {MAX_BITS}], got {bits!r}")
  return bits


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
  x, amax = _normalized_magnitudes(w)
  delta = jnp.minimum(amax / (2 * levels + 1), _BCGD_DELTA_CAP)
  thresholds = (2.0 * jnp.arange(1, levels + 1, dtype=jnp.float32) - 1.0) * delta
  q = jnp.sum(mag[:, None] > thresholds[None, :], axis=1).astype(jnp.float32)
  a, _ = _least_squares(x, q)
  return amax * a, _signed_codes(w, q)


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
  levels = 2 ** (_check_bits(bits, 2) - 1) - 1
  if method not in MBIT_METHODS:
    raise ValueError(f"m-bit method must be one of {MBIT_METHODS}, got {method!r}")
  if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
    raise ValueError(f"iters must be a non-negative integer, got {iters!r}")
  w = _as_float_array(w)
  if w.size == 0:
    return _empty_codes(w)
  if method == "bcgd":
    return _bcgd_codes(w, levels)
  x, amax = _normalized_magnitudes(w)

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
  return amax * a, _signed_codes(w, q)


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
  w = _as_float_array(w)
  return dequantize(*mbit_codes(w, bits=bits, method=method, iters=iters), dtype=w.dtype)


# -------------------------------------------------------------------------------------- factories


def _check_method(name: str, value, allowed) -> str:
  if value not in allowed:
    raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
  return value


def make_codes(bits: int, ternary_method: str = "exact", mbit_method: str = "lloyd"
               ) -> Callable[[Array], Codes]:
  """The ``w -> (scale, codes)`` function for a bit width (1 binary, 2 ternary, 3..8 m-bit).

  Args:
    bits: 1 (binary), 2 (ternary, as in the BinaryRelax code), or 3..8 (m-bit).
    ternary_method: used when ``bits == 2``: ``"exact"``, ``"twn"`` or ``"br"``.
    mbit_method: used when ``bits >= 3``: ``"lloyd"``, ``"exact"`` or ``"bcgd"``.

  Returns:
    A jittable function of one tensor.

  Raises:
    ValueError: for bad ``bits`` or methods.
  """
  bits = _check_bits(bits, 1)
  ternary_method = _check_method("ternary_method", ternary_method, TERNARY_METHODS)
  mbit_method = _check_method("mbit_method", mbit_method, MBIT_METHODS)
  if bits == 1:
    return binary_codes
  if bits == 2:
    return functools.partial(ternary_codes, method=ternary_method)
  return functools.partial(mbit_codes, bits=bits, method=mbit_method)


def make_projection(bits: int, ternary_method: str = "exact", mbit_method: str = "lloyd"
                    ) -> Callable[[Array], Array]:
  """The projection ``w -> P(w)`` for a bit width (1 binary, 2 ternary, 3..8 m-bit).

  Args:
    bits: 1 (binary), 2 (ternary), or 3..8 (m-bit).
    ternary_method: used when ``bits == 2``: ``"exact"``, ``"twn"`` or ``"br"``.
    mbit_method: used when ``bits >= 3``: ``"lloyd"``, ``"exact"`` or ``"bcgd"``.

  Returns:
    A jittable function of one tensor, equal to ``dequantize(*make_codes(bits, ...)(w), w.dtype)``.

  Raises:
    ValueError: for bad ``bits`` or methods.
  """
  bits = _check_bits(bits, 1)
  ternary_method = _check_method("ternary_method", ternary_method, TERNARY_METHODS)
  mbit_method = _check_method("mbit_method", mbit_method, MBIT_METHODS)
  if bits == 1:
    return project_binary
  if bits == 2:
    return functools.partial(project_ternary, method=ternary_method)
  return functools.partial(project_mbit, bits=bits, method=mbit_method)


def per_member(fn: Callable) -> Callable:
  """``jax.vmap(fn)`` over a leading ensemble axis.

  Ensembles keep each parameter stacked along axis 0 (one slice per member). Quantization is per tensor
  and per member: each member's kernel gets its own scale. Wrapping a projection (or a codes function,
  whose scales then have shape ``(members,)``) with ``per_member`` does exactly that.

  Args:
    fn: a per-tensor function, e.g. ``project_ternary`` or ``make_codes(2)``.

  Returns:
    The function mapped over axis 0.
  """
  if not callable(fn):
    raise ValueError(f"per_member expects a callable, got {fn!r}")
  return jax.vmap(fn)
