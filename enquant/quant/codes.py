"""The ``(scale, codes)`` form of quantized tensors, shared by every projection.

A quantized tensor is one non-negative float32 scale times an int8 code per entry; :func:`dequantize`
is the one place the product ``P(w) = scale * codes`` is formed. The helpers here validate weights,
normalise magnitudes by ``max|w|`` (so sums of squares never overflow) and turn magnitude codes into
signed int8 codes. :mod:`enquant.quant.projections` (binary, ternary, factories) and
:mod:`enquant.quant.mbit` (m-bit) build on them.
"""

import functools

import jax
import jax.numpy as jnp

Array = jax.Array
Codes = tuple[Array, Array]  # (scale: float32 scalar, codes: int8 array of w's shape)

MAX_BITS = 8  # codes are int8: L = 2^(bits-1) - 1 <= 127


def as_float_array(w) -> Array:
  """``w`` as a jax array; ValueError unless its dtype is floating-point."""
  w = jnp.asarray(w)
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"weights must be a floating-point array, got dtype {w.dtype}")
  return w


def normalized_magnitudes(w: Array) -> tuple[Array, Array]:
  """Returns (|w| / max|w| flattened, max|w|) in float32; an all-zero w gives (zeros, 0)."""
  x = jnp.abs(w.astype(jnp.float32)).reshape(-1)
  amax = jnp.max(x, initial=0.0)
  return x / jnp.where(amax > 0, amax, 1.0), amax


def clip_to_kept(scale: Array, w: Array, keep: Array) -> Array:
  """Clips a mean of kept magnitudes into [min, max] of the kept |w| (a no-op in exact arithmetic).

  It removes the last-bit rounding of the normalised mean (XLA may divide by multiplying with a
  reciprocal), so a tensor already in Q, whose kept |w| are all equal, gets exactly its own scale back.
  """
  a = jnp.abs(w.astype(jnp.float32)).reshape(-1)
  lo = jnp.min(jnp.where(keep, a, jnp.inf))
  hi = jnp.max(jnp.where(keep, a, 0.0))
  return jnp.where(jnp.any(keep), jnp.clip(scale, lo, hi), 0.0)


def empty_codes(w: Array) -> Codes:
  """The codes of an empty tensor: scale 0 and an empty int8 array of ``w``'s shape."""
  return jnp.zeros((), jnp.float32), jnp.zeros(w.shape, jnp.int8)


def signed_codes(w: Array, magnitude_codes: Array) -> Array:
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


def check_bits(bits, minimum: int) -> int:
  """``bits`` if it is an integer in ``[minimum, MAX_BITS]``; ValueError naming it otherwise."""
  if isinstance(bits, bool) or not isinstance(bits, int) or not minimum <= bits <= MAX_BITS:
    raise ValueError(f"bits must be an integer in [{minimum}, {MAX_BITS}], got {bits!r}")
  return bits
