"""Per-tensor projections onto quantized weight sets (binary, ternary, m-bit).

Every quantized set here has the form ``Q = R+ x C^n``: one non-negative float scale per tensor times an
integer code per entry, with codes in ``{-L, ..., L}`` (``L = 1`` for binary and ternary,
``L = 2^(bits-1) - 1`` for m-bit; binary codes exclude 0). Each projection is split in two:

* ``*_codes(w) -> (scale, codes)``: ``scale`` is a float32 scalar ``>= 0`` and ``codes`` an int8 array of
  ``w``'s shape. This is what export stores (bit-packed).
* ``project_*(w) = dequantize(scale, codes, w.dtype)``, i.e. exactly ``scale * codes.astype(w.dtype)``
  for float32 weights. P(w) is always computed through this product, so a loader that keeps
  ``(scale, codes)`` restores the identical P(w), bit for bit.

Binary and ternary projections and the factories live here; the m-bit projection lives in
:mod:`enquant.quant.mbit` and the ``(scale, codes)`` helpers (:func:`dequantize`) in
:mod:`enquant.quant.codes`, both re-exported here.

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

from enquant.quant.codes import Array
from enquant.quant.codes import as_float_array
from enquant.quant.codes import check_bits
from enquant.quant.codes import clip_to_kept
from enquant.quant.codes import Codes
from enquant.quant.codes import dequantize
from enquant.quant.codes import empty_codes
from enquant.quant.codes import MAX_BITS
from enquant.quant.codes import normalized_magnitudes
from enquant.quant.codes import signed_codes
from enquant.quant.mbit import DEFAULT_LLOYD_ITERS
from enquant.quant.mbit import MBIT_METHODS
from enquant.quant.mbit import mbit_codes
from enquant.quant.mbit import project_mbit

TERNARY_METHODS = ("exact", "twn", "br")
_TWN_FACTOR = 0.7  # threshold = 0.7 * mean|w| (Li et al. 2016; BinaryRelax's quantize_tnn)


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
  w = as_float_array(w)
  if w.size == 0:
    return empty_codes(w)
  x, amax = normalized_magnitudes(w)
  scale = clip_to_kept(amax * jnp.mean(x), w, jnp.ones(x.shape, bool))
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
  w = as_float_array(w)
  return dequantize(*binary_codes(w), dtype=w.dtype)


# ---------------------------------------------------------------------------------------- ternary


def _ternary_exact_codes(w: Array) -> Codes:
  x, amax = normalized_magnitudes(w)
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
  return clip_to_kept(amax * scale_n, w, keep), signed_codes(w, keep.astype(jnp.float32))


def _ternary_threshold_codes(w: Array, scale_over_all: bool) -> Codes:
  x, amax = normalized_magnitudes(w)
  delta = _TWN_FACTOR * jnp.mean(x)
  if scale_over_all:
    # BinaryRelax's quantize_tnn: index = |w| >= delta; scale = mean(|w| * index) over all entries.
    keep = x >= delta
    scale = amax * jnp.mean(jnp.where(keep, x, 0.0))
  else:
    # TWN: keep |w| > delta; scale = mean of the kept |w|.
    keep = x > delta
    count = jnp.maximum(jnp.sum(keep), 1).astype(jnp.float32)
    scale = clip_to_kept(amax * jnp.sum(jnp.where(keep, x, 0.0)) / count, w, keep)
  return scale, signed_codes(w, keep.astype(jnp.float32))


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
  w = as_float_array(w)
  if w.size == 0:
    return empty_codes(w)
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
  w = as_float_array(w)
  return dequantize(*ternary_codes(w, method=method), dtype=w.dtype)


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
  bits = check_bits(bits, 1)
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
  bits = check_bits(bits, 1)
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


__all__ = ["Array", "Codes", "DEFAULT_LLOYD_ITERS", "MAX_BITS", "MBIT_METHODS", "TERNARY_METHODS",
           "binary_codes", "dequantize", "make_codes", "make_projection", "mbit_codes", "per_member",
           "project_binary", "project_mbit", "project_ternary", "ternary_codes"]
