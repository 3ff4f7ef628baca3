"""Packed models as files: save, load, and a standalone model rebuilt from its file alone.

The codes are those of :mod:`enquant.packing` (re-exported here: ``export.pack``, ``export.unpack``,
``export.size_report``, ...).

Files (:func:`save` / :func:`load`) are ``.npz`` archives (no pickles) with a JSON header and a CRC-32 per
array; a truncated, corrupt or foreign file raises ``ValueError``. A file saved with the BatchNorm running
statistics and the model configuration is a standalone model: :func:`load_model` rebuilds the
:class:`enquant.models.EnResNet` and its variables from it alone.
"""

from collections.abc import Mapping
import json
import math
import os
from typing import Any
import zipfile
import zlib

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from enquant import files
from enquant import quant
from enquant.models import EnResNet, ModelConfig
from enquant.packing import (PackedKernel, PackedModel, flatten, pack, pack_codes, packed_nbytes, size_report,
                             unpack, unpack_codes)

FORMAT = "enquant-packed"
VERSION = 2  # 2 added the optional BatchNorm statistics and model configuration; 1 is still read
_READABLE_VERSIONS = (1, 2)
_META = "__meta__"


def _crc(a: np.ndarray) -> int:
  return zlib.crc32(np.ascontiguousarray(a).tobytes())


def _raw_entries(flat: Mapping[str, Any]) -> tuple[list[dict], np.ndarray]:
  """Header entries (path, shape, dtype) and the concatenated raw bytes of ``flat``'s arrays."""
  arrays = {name: np.asarray(a) for name, a in flat.items()}
  entries = [{"path": name, "shape": list(a.shape), "dtype": a.dtype.str} for name, a in arrays.items()]
  blob = np.frombuffer(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays.values()), np.uint8)
  return entries, blob


def _model_header(model_config, input_shape) -> dict:
  if isinstance(model_config, ModelConfig):
    model_config = model_config.to_dict()
  if not isinstance(model_config, Mapping):
    raise ValueError(f"model_config must be a ModelConfig or a dict, got {type(model_config).__name__}")
  header = {"config": dict(model_config)}
  if input_shape is not None:
    header["input_shape"] = [int(d) for d in input_shape]
  return header


def save(path: str | os.PathLike, packed: PackedModel, *, batch_stats=None, model_config=None,
         input_shape: tuple[int, ...] | None = None) -> None:
  """Writes ``packed`` as an ``.npz`` archive, atomically (a temporary file, then ``os.replace``).

  The archive holds ``codes`` (all kernels' packed codes, concatenated), ``scales`` (all float32 scales),
  ``floats`` (the raw bytes of the other leaves), optionally ``batch_stats`` (the raw bytes of the
  BatchNorm running statistics) and a JSON header with each leaf's path, shape and dtype, the model
  configuration and a CRC-32 of every array. The file is the packed bytes plus the header (about 60
  bytes per leaf) plus about 1 KB of archive overhead.

  Args:
    path: destination file (written as given; no suffix is added).
    packed: a :class:`PackedModel`.
    batch_stats: the model's BatchNorm running statistics (a nested dict of arrays), if packing params.
    model_config: the :class:`enquant.models.ModelConfig` (or its dict); with ``batch_stats`` it makes
      the file a standalone model for :func:`load_model`.
    input_shape: ``(height, width, channels)`` of the model's images, checked by :func:`load_model`.

  Raises:
    ValueError: when ``packed`` is not a PackedModel or ``model_config`` is not a config.
  """
  if not isinstance(packed, PackedModel):
    raise ValueError(f"save expects a PackedModel, got {type(packed).__name__}")
  kernels = [{"path": name, "shape": list(k.shape)} for name, k in packed.kernels.items()]
  floats, float_blob = _raw_entries(packed.floats)
  arrays = {
      "codes": np.concatenate([np.asarray(k.data, np.uint8).ravel() for k in packed.kernels.values()]
                              + [np.zeros(0, np.uint8)]),
      "scales": np.concatenate([np.asarray(k.scale, np.float32).ravel()
                                for k in packed.kernels.values()] + [np.zeros(0, np.float32)]),
      "floats": float_blob,
  }
  meta = {"format": FORMAT, "version": VERSION, "bits": packed.bits,
          "ternary_method": packed.ternary_method, "stacked": packed.stacked, "kernels": kernels,
          "floats": floats}
  if batch_stats is not None:
    meta["batch_stats"], arrays["batch_stats"] = _raw_entries(flatten(jax.device_get(batch_stats)))
  if model_config is not None:
    meta["model"] = _model_header(model_config, input_shape)
  meta["crc32"] = {k: _crc(a) for k, a in arrays.items()}
  arrays[_META] = np.frombuffer(json.dumps(meta).encode("utf-8"), np.uint8)
  files.write_bytes_atomic(os.fspath(path), lambda f: np.savez(f, **arrays))


def _take_bytes(blob: np.ndarray, offset: int, nbytes: int, what: str) -> tuple[np.ndarray, int]:
  if offset + nbytes > blob.size:
    raise ValueError(f"{what} runs past the end of its array: truncated or corrupt file")
  return blob[offset:offset + nbytes], offset + nbytes


def _take_raw(blob: np.ndarray, entries: list[dict], path: str) -> dict[str, np.ndarray]:
  """The arrays described by header ``entries`` (path, shape, dtype), read back to back from ``blob``."""
  out, at = {}, 0
  for info in entries:
    dtype, shape = np.dtype(info["dtype"]), tuple(int(d) for d in info["shape"])
    raw, at = _take_bytes(blob, at, dtype.itemsize * math.prod(shape), info["path"])
    out[info["path"]] = np.frombuffer(raw.tobytes(), dtype).reshape(shape).copy()
  if at != blob.size:
    raise ValueError(f"{path}: arrays are longer than the header says: corrupt file")
  return out


def _read(path: str | os.PathLike) -> tuple[PackedModel, dict | None, dict | None]:
  """``(packed, flat batch_stats or None, model header or None)`` of a file written by :func:`save`."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no packed model at {path}")
  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {name: npz[name] for name in npz.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
    raise ValueError(f"{path} is not a readable packed model (corrupt or not an .npz): {e}") from None

  def bad(msg):
    return ValueError(f"{path}: {msg}")

  if _META not in arrays:
    raise bad("no header: not a packed enquant model")
  try:
    meta = json.loads(arrays.pop(_META).tobytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise bad(f"corrupt header ({e})") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise bad("not a packed enquant model (wrong format tag)")
  if meta.get("version") not in _READABLE_VERSIONS:
    raise bad(f"unsupported version {meta.get('version')!r} (this code reads {_READABLE_VERSIONS})")
  try:
    bits, kinfo, finfo, crcs = meta["bits"], meta["kernels"], meta["floats"], meta["crc32"]
    ternary_method, stacked = meta["ternary_method"], bool(meta["stacked"])
    expected = {"codes", "scales", "floats"} | ({"batch_stats"} if "batch_stats" in meta else set())
    if set(arrays) != expected or set(crcs) != set(arrays):
      raise bad(f"arrays {sorted(arrays)} do not match the header")
    for name, a in arrays.items():
      if a.ndim != 1 or _crc(a) != crcs[name]:
        raise bad(f"checksum mismatch in {name!r}: corrupt data")
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= quant.projections.MAX_BITS:
      raise bad(f"invalid bits {bits!r}")
    codes, scales = arrays["codes"], arrays["scales"]
    if codes.dtype != np.uint8 or scales.dtype != np.float32 or any(
        arrays[k].dtype != np.uint8 for k in ("floats", "batch_stats") if k in arrays):
      raise bad("arrays have the wrong dtypes")
    kernels, code_at, scale_at = {}, 0, 0
    for info in kinfo:
      shape = tuple(int(d) for d in info["shape"])
      data, code_at = _take_bytes(codes, code_at, packed_nbytes(math.prod(shape), bits), info["path"])
      members = shape[0] if stacked and shape else 1
      scale, scale_at = _take_bytes(scales, scale_at, members, info["path"])
      kernels[info["path"]] = PackedKernel(scale=scale.copy().reshape((members,) if stacked else ()),
                                           data=data.copy(), shape=shape)
    if code_at != codes.size or scale_at != scales.size:
      raise bad("arrays are longer than the header says: corrupt file")
    floats = _take_raw(arrays["floats"], finfo, path)
    batch_stats = (_take_raw(arrays["batch_stats"], meta["batch_stats"], path)
                   if "batch_stats" in meta else None)
    model = meta.get("model")
    if model is not None and not isinstance(model.get("config"), dict):
      raise bad("malformed model configuration in the header")
  except (KeyError, TypeError, AttributeError) as e:
    raise bad(f"malformed header ({e!r})") from None
  packed = PackedModel(bits=bits, ternary_method=ternary_method, stacked=stacked, kernels=kernels,
                       floats=floats)
  return packed, batch_stats, model


def load(path: str | os.PathLike) -> PackedModel:
  """Reads a file written by :func:`save`, checking its header, sizes and checksums.

  Args:
    path: the file.

  Returns:
    The :class:`PackedModel` (the parameters; :func:`load_model` also restores BatchNorm statistics).

  Raises:
    FileNotFoundError: when ``path`` does not exist.
    ValueError: when the file is not a packed enquant model, is truncated or corrupt.
  """
  return _read(path)[0]


def _model_config(header: dict, path: str) -> ModelConfig:
  try:
    return ModelConfig.from_dict(header["config"])
  except TypeError as e:  # a field this version of enquant does not know
    raise ValueError(f"{path}: model configuration does not fit this enquant ({e})") from None


def _check_fits(model: EnResNet, variables, input_shape, path: str) -> None:
  """Raises ValueError unless ``variables`` have exactly the leaves and shapes ``model.init`` gives."""
  sample = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
  want = flatten(jax.eval_shape(model.init, jax.random.PRNGKey(0), sample))
  got = flatten(variables)
  for name in sorted(set(want) | set(got)):
    if name not in got or name not in want or tuple(np.shape(got[name])) != tuple(want[name].shape):
      raise ValueError(f"{path}: {name} does not fit the model of its configuration "
                       f"({np.shape(got[name]) if name in got else 'missing'} vs "
                       f"{want[name].shape if name in want else 'not in the model'})")


def load_model(path: str | os.PathLike) -> tuple[EnResNet, dict[str, Any]]:
  """Rebuilds the runnable model from a packed file alone.

  The file must have been saved with ``batch_stats`` and ``model_config`` (the pipeline's
  ``model_packed.npz`` is). The parameters are ``P(w)`` exactly as evaluated (see :func:`unpack`), so
  ``model.apply(variables, x, key)`` equals the evaluated model's logits for the same ``x`` and ``key``.

  Example::

      model, variables = export.load_model("runs/demo/model_packed.npz")
      logits = model.apply(variables, x, jax.random.PRNGKey(0))

  Args:
    path: a file written by :func:`save`.

  Returns:
    ``(model, variables)``: an :class:`enquant.models.EnResNet` and ``{"params", "batch_stats"}``.

  Raises:
    FileNotFoundError: when ``path`` does not exist.
    ValueError: corrupt file, or one saved without BatchNorm statistics or model configuration, or
      whose arrays do not fit its configuration.
  """
  path = os.fspath(path)
  packed, batch_stats, header = _read(path)
  params = unpack(packed)
  if batch_stats is None and set(params) == {"params", "batch_stats"}:  # a whole variables tree packed
    params, stats = params["params"], params["batch_stats"]
  elif batch_stats is not None:
    stats = flax.traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v)
                                               for k, v in batch_stats.items()})
  else:
    raise ValueError(f"{path} holds no BatchNorm statistics: it is not a standalone model (saved "
                     "without batch_stats)")
  if header is None:
    raise ValueError(f"{path} holds no model configuration: it is not a standalone model (saved "
                     "without model_config)")
  model = EnResNet(_model_config(header, path))
  variables = {"params": params, "batch_stats": stats}
  if "input_shape" in header:
    _check_fits(model, variables, header["input_shape"], path)
  return model, variables


__all__ = ["FORMAT", "VERSION", "PackedKernel", "PackedModel", "load", "load_model", "pack", "pack_codes",
           "packed_nbytes", "save", "size_report", "unpack", "unpack_codes"]
