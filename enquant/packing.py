"""Bit-packed codes of quantized weights: pack, unpack to exactly the same P(w), and a size report.

Each quantized conv kernel is stored as its per-member float32 scale(s) and its integer codes, bit-packed:

* ``bits == 1`` (binary): 1 bit per weight, ``1`` for code ``+1`` and ``0`` for ``-1``;
* ``bits == 2`` (ternary): 2 bits per weight, two's complement (``00`` = 0, ``01`` = +1, ``11`` = -1);
* ``bits == m`` (m-bit, 3..8): ``m`` bits per weight, two's complement (codes ``-L..L``,
  ``L = 2^(m-1) - 1``).

The codes of a kernel are laid out in C order over the whole (stacked) leaf, each code's bits least
significant first, and packed with ``np.packbits(..., bitorder="little")``: ``ceil(size * bits / 8)`` bytes,
plus ``4 * members`` bytes of scales. Every other leaf (dense layer, biases, BatchNorm, running statistics
when a ``{"params", "batch_stats"}`` tree is packed) is stored as it is (float32 for enquant models).

Exactness: the codes are computed by the same ``*_codes`` function that training's projection uses
(:func:`enquant.quant.make_codes`, per member), and :func:`unpack` forms ``P(w)`` with the same
:func:`enquant.quant.dequantize`, so ``unpack(pack(w))`` is bitwise ``quantized(w, per_member(
make_projection(bits)))``. A kernel that already lies in the quantized set (``P(w)`` itself, e.g. the
evaluated weights) is stored as it is: its scale and codes are recovered exactly, so unpacking returns it
bitwise even where projecting it again would move it by one ulp (the m-bit projection's Lloyd iterations).
:func:`pack` checks this round trip before returning.

The files that hold a packed model are :mod:`enquant.export` (which re-exports this module).
"""

from collections.abc import Mapping
import math
from typing import Any, Callable, NamedTuple, Union

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from enquant import quant

MaskOrFn = Union[Any, Callable[[Any], Any]]


class PackedKernel(NamedTuple):
  """One quantized kernel.

  Attributes:
    scale: float32 scales, shape ``(members,)`` for a stacked leaf, ``()`` otherwise.
    data: uint8 bit-packed codes (see the module docstring).
    shape: the kernel's shape.
  """

  scale: np.ndarray
  data: np.ndarray
  shape: tuple[int, ...]


class PackedModel(NamedTuple):
  """A packed parameter tree.

  Attributes:
    bits: bits per code (1 binary, 2 ternary, 3..8 m-bit).
    ternary_method: the ternary projection the codes came from (recorded; used when ``bits == 2``).
    stacked: whether axis 0 of every kernel is the ensemble member axis (one scale per member).
    kernels: ``{"/"-joined path: PackedKernel}`` of the quantized leaves.
    floats: ``{"/"-joined path: array}`` of the other leaves.
  """

  bits: int
  ternary_method: str
  stacked: bool
  kernels: dict[str, PackedKernel]
  floats: dict[str, np.ndarray]


# ---------------------------------------------------------------------------------------- bit fields


def _levels(bits: int) -> int:
  return 1 if bits <= 2 else 2 ** (bits - 1) - 1


def packed_nbytes(size: int, bits: int) -> int:
  """Bytes of ``size`` codes at ``bits`` bits each: ``ceil(size * bits / 8)``."""
  return (size * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
  """Bit-packs integer codes (binary: ``{-1, 1}``; else two's complement in ``bits`` bits).

  Args:
    codes: integer array of codes.
    bits: 1..8.

  Returns:
    uint8 array of ``packed_nbytes(codes.size, bits)`` bytes.

  Raises:
    ValueError: for codes outside the set of ``bits``.
  """
  codes = np.asarray(codes).astype(np.int16).ravel()
  if bits == 1:
    if codes.size and not np.all((codes == 1) | (codes == -1)):
      raise ValueError("binary codes must be -1 or +1")
    fields = (codes > 0).astype(np.uint8)
  else:
    levels = _levels(bits)
    if codes.size and np.abs(codes).max() > levels:
      raise ValueError(f"{bits}-bit codes must lie in [-{levels}, {levels}], got |code| up to "
                       f"{np.abs(codes).max()}")
    fields = (codes & ((1 << bits) - 1)).astype(np.uint8)
  planes = (fields[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
  return np.packbits(planes.ravel(), bitorder="little")


def unpack_codes(data: np.ndarray, size: int, bits: int) -> np.ndarray:
  """Inverse of :func:`pack_codes`: ``size`` int8 codes.

  Raises:
    ValueError: when ``data`` has the wrong length, nonzero padding bits or an invalid code.
  """
  data = np.asarray(data)
  if data.dtype != np.uint8 or data.shape != (packed_nbytes(size, bits),):
    raise ValueError(f"packed codes must be {packed_nbytes(size, bits)} uint8 bytes for {size} "
                     f"{bits}-bit codes, got {data.dtype} {data.shape}")
  planes = np.unpackbits(data, bitorder="little")
  if planes[size * bits:].any():
    raise ValueError("packed codes have nonzero padding bits: corrupt data")
  planes = planes[:size * bits].reshape(size, bits).astype(np.int16)
  fields = (planes << np.arange(bits, dtype=np.int16)).sum(axis=1)
  if bits == 1:
    return np.where(fields > 0, 1, -1).astype(np.int8)
  codes = np.where(fields >= 1 << (bits - 1), fields - (1 << bits), fields)
  levels = _levels(bits)
  if codes.size and np.abs(codes).max() > levels:
    raise ValueError(f"invalid {bits}-bit code {int(codes[np.abs(codes) > levels][0])} (allowed "
                     f"-{levels}..{levels}): corrupt data")
  return codes.astype(np.int8)


# ------------------------------------------------------------------------------------------ packing


def _recover_codes(v: np.ndarray, bits: int) -> tuple[np.float32, np.ndarray] | None:
  """``(scale, codes)`` with ``float32(scale) * codes == v`` exactly, if ``v`` lies in the set; else None."""
  levels = _levels(bits)
  mags = np.unique(np.abs(v[v != 0]))
  if mags.size == 0:
    return (np.float32(0.0), np.ones(v.shape, np.int8) if bits == 1 else np.zeros(v.shape, np.int8))
  if mags.size > levels or (bits == 1 and np.any(v == 0)):  # binary codes are never 0
    return None
  for q in range(1, levels + 1):
    guess = np.float32(mags[0] / np.float32(q))
    candidates = [guess]
    for direction in (np.inf, -np.inf):
      a = guess
      for _ in range(2):
        a = np.nextafter(a, np.float32(direction))
        candidates.append(a)
    for a in candidates:
      if not a > 0:
        continue
      q_mags = np.rint(mags / a)
      if q_mags.max() > levels or not np.array_equal(a * q_mags.astype(np.float32), mags):
        continue
      codes = np.rint(v / a).astype(np.int8)
      if bits == 1:
        codes = np.where(v >= 0, 1, -1).astype(np.int8)
      if np.array_equal(a * codes.astype(np.float32), v):
        return np.float32(a), codes
  return None


def flatten(tree) -> dict[str, Any]:
  if not isinstance(tree, Mapping):
    raise ValueError(f"params must be a nested dict of arrays, got {type(tree).__name__}")
  flat = flax.traverse_util.flatten_dict(tree)
  out = {}
  for path, leaf in flat.items():
    if any(not isinstance(k, str) or "/" in k or not k for k in path):
      raise ValueError(f"parameter names must be non-empty strings without '/', got path {path}")
    out["/".join(path)] = leaf
  return out


def _mask_flat(params, mask: MaskOrFn | None) -> dict[str, bool]:
  tree = quant.resolve_mask(mask, params)
  return {k: bool(v) for k, v in flatten(tree).items()}


def _expand(scale: np.ndarray, ndim: int) -> np.ndarray:
  return np.reshape(scale, np.shape(scale) + (1,) * (ndim - np.ndim(scale)))


def _dequantize(kernel: PackedKernel, bits: int) -> jax.Array:
  size = math.prod(kernel.shape)
  codes = unpack_codes(kernel.data, size, bits).reshape(kernel.shape)
  return quant.dequantize(jnp.asarray(_expand(kernel.scale, len(kernel.shape))), jnp.asarray(codes))


def pack(params, bits: int, ternary_method: str = "exact", mask: MaskOrFn | None = None,
         stacked: bool = True) -> PackedModel:
  """Quantizes and bit-packs the masked kernels; keeps the other leaves as they are.

  Args:
    params: a nested dict of arrays: the float weights ``w`` (e.g. ``float_weights(opt_state)``) or
      weights already in the quantized set (``P(w)``); a ``{"params", "batch_stats"}`` tree works too.
    bits: 1 (binary), 2 (ternary) or 3..8 (m-bit), as in training.
    ternary_method: the ternary projection of training (``"exact"``, ``"twn"``, ``"br"``).
    mask: the quantized leaves (default :func:`enquant.quant.conv_kernel_mask`).
    stacked: axis 0 of every quantized leaf is the ensemble member axis (one scale per member), as in
      :class:`enquant.models.EnResNet`'s variables.

  Returns:
    A :class:`PackedModel`; ``unpack`` of it is ``P(w)`` on the kernels (bitwise, see the module
    docstring) and the other leaves unchanged.

  Raises:
    ValueError: for bad ``bits``/``ternary_method``, a mask that does not match, non-float kernels or
      kernels without a member axis when ``stacked``.
  """
  codes_fn = quant.make_codes(bits, ternary_method)  # validates bits and ternary_method
  if stacked:
    codes_fn = quant.per_member(codes_fn)
  flat = flatten(params)
  is_quantized = _mask_flat(params, mask)
  kernels, floats = {}, {}
  for path, leaf in flat.items():
    if not is_quantized[path]:
      floats[path] = np.asarray(leaf)
      continue
    w = jnp.asarray(leaf)
    if not jnp.issubdtype(w.dtype, jnp.floating):
      raise ValueError(f"{path}: quantized leaves must be float arrays, got dtype {w.dtype}")
    if stacked and w.ndim < 1:
      raise ValueError(f"{path}: stacked=True needs a leading member axis, got shape {w.shape}")
    scale, codes = codes_fn(w)
    scale, codes = np.asarray(scale, np.float32), np.asarray(codes)
    target = np.asarray(quant.dequantize(jnp.asarray(_expand(scale, w.ndim)), jnp.asarray(codes), w.dtype))
    v = np.asarray(w)
    if not np.array_equal(target, v):  # already in Q? then store it as it is
      members = [v] if not stacked else list(v)
      recovered = [_recover_codes(m, bits) for m in members]
      if all(r is not None for r in recovered):
        scale = np.asarray([r[0] for r in recovered], np.float32).reshape(scale.shape)
        codes = np.stack([r[1] for r in recovered]).reshape(codes.shape)
        target = v
    kernel = PackedKernel(scale=scale, data=pack_codes(codes, bits), shape=tuple(w.shape))
    if not np.array_equal(np.asarray(_dequantize(kernel, bits)), target):
      raise ValueError(f"internal error: {path} does not round-trip through its packed codes")
    kernels[path] = kernel
  return PackedModel(bits=bits, ternary_method=ternary_method, stacked=bool(stacked), kernels=kernels,
                     floats=floats)


def unpack(packed: PackedModel) -> dict[str, Any]:
  """The parameter tree: ``scale * codes`` (via :func:`enquant.quant.dequantize`) and the float leaves.

  Args:
    packed: from :func:`pack` or :func:`load`.

  Returns:
    A nested dict of ``jax.Array``.

  Raises:
    ValueError: for invalid packed codes.
  """
  flat = {tuple(path.split("/")): _dequantize(k, packed.bits) for path, k in packed.kernels.items()}
  flat.update({tuple(path.split("/")): jnp.asarray(a) for path, a in packed.floats.items()})
  return flax.traverse_util.unflatten_dict(flat)


# ------------------------------------------------------------------------------------------ report


def size_report(params, packed: PackedModel) -> dict[str, float]:
  """Bytes of the model as float32 vs packed.

  Args:
    params: the model's parameter tree (any values; only shapes are used) that ``packed`` came from.
    packed: its :class:`PackedModel`.

  Returns:
    ``float32_bytes`` (every leaf as float32), ``packed_bytes`` (= ``code_bytes + scale_bytes +
    float_bytes``), ``compression`` (float32 / packed), ``quantized_weights``, ``kernel_float32_bytes``,
    ``kernel_packed_bytes`` (codes + scales), ``kernel_compression``, ``bits_per_quantized_weight``
    (codes and scales, in bits per kernel weight), ``code_bits_per_weight`` (codes only), ``bits``.

  Raises:
    ValueError: when ``params`` and ``packed`` do not hold the same leaves and shapes.
  """
  flat = {k: tuple(np.shape(v)) for k, v in flatten(params).items()}
  stored = {k: tuple(v.shape) for k, v in packed.kernels.items()}
  stored.update({k: tuple(np.shape(v)) for k, v in packed.floats.items()})
  if flat != stored:
    raise ValueError(f"params and packed model differ: leaves {sorted(set(flat) ^ set(stored))} or shapes")
  total = sum(math.prod(s) for s in flat.values())
  n_quant = sum(math.prod(k.shape) for k in packed.kernels.values())
  code_bytes = sum(int(k.data.nbytes) for k in packed.kernels.values())
  scale_bytes = sum(int(np.asarray(k.scale).nbytes) for k in packed.kernels.values())
  float_bytes = sum(int(np.asarray(a).nbytes) for a in packed.floats.values())
  packed_bytes = code_bytes + scale_bytes + float_bytes
  kernel_bytes = code_bytes + scale_bytes
  return {
      "bits": packed.bits,
      "float32_bytes": 4 * total,
      "packed_bytes": packed_bytes,
      "compression": 4 * total / packed_bytes if packed_bytes else 0.0,
      "quantized_weights": n_quant,
      "kernel_float32_bytes": 4 * n_quant,
      "kernel_packed_bytes": kernel_bytes,
      "kernel_compression": 4 * n_quant / kernel_bytes if kernel_bytes else 0.0,
      "code_bytes": code_bytes,
      "scale_bytes": scale_bytes,
      "float_bytes": float_bytes,
      "bits_per_quantized_weight": 8 * kernel_bytes / n_quant if n_quant else 0.0,
      "code_bits_per_weight": 8 * code_bytes / n_quant if n_quant else 0.0,
  }
