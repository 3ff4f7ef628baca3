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


def _take_raw(blob: np.ndarray, entries: list[tuple], path: str) -> dict[str, np.ndarray]:
  """The arrays described by checked header ``entries`` (path, shape, dtype), read back to back."""
  out, at = {}, 0
  for name, shape, dtype in entries:
    raw, at = _take_bytes(blob, at, dtype.itemsize * math.prod(shape), name)
    out[name] = np.frombuffer(raw.tobytes(), dtype).reshape(shape).copy()
  if at != blob.size:
    raise ValueError(f"{path}: arrays are longer than the header says: corrupt file")
  return out


# ------------------------------------------------------------------------------------ header checks

_MAX_DIM = 2 ** 31 - 1  # no dimension or integer of a header goes beyond this
_MAX_NDIM = 8
_MAX_IMAGE_SIDE = 1 << 16
# The type of each model configuration field in a header: an integer, a number, a string, a list of
# integers, or a list of integers or null.
_CONFIG_TYPES = {"num_classes": "int", "depth": "int", "ensembles": "int", "noise_coef": "number",
                 "widths": "ints", "stages": "ints or null", "compute_dtype": "str", "noise_rng": "str"}


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= _MAX_DIM


def _is_ints(v) -> bool:
  return isinstance(v, list) and len(v) <= 64 and all(_is_int(d) for d in v)


def _malformed(path: str, what: str, value) -> ValueError:
  return ValueError(f"{path}: malformed header: {what} is {json.dumps(value)[:80]}")


def _entries(meta: dict, key: str, path: str, *, dtypes: bool) -> list[tuple]:
  """``(name, shape, dtype or None)`` of header list ``key``, each field's type and bounds checked."""
  entries = meta[key]
  if not isinstance(entries, list):
    raise _malformed(path, f"{key!r}", entries)
  out = []
  for entry in entries:
    name = entry.get("path") if isinstance(entry, dict) else None
    if not isinstance(name, str) or not all(name.split("/")):
      raise _malformed(path, f"a path in {key!r}", name)
    shape = entry["shape"]
    if not _is_ints(shape) or len(shape) > _MAX_NDIM:
      raise _malformed(path, f"the shape of {name}", shape)
    dtype = None
    if dtypes:
      try:
        dtype = np.dtype(entry["dtype"]) if isinstance(entry["dtype"], str) else None
      except TypeError:
        dtype = None
      if dtype is None or dtype.kind not in "biuf":
        raise _malformed(path, f"the dtype of {name}", entry["dtype"])
    out.append((name, tuple(shape), dtype))
  return out


def _check_scalars(meta: dict, path: str) -> None:
  """Checks the header's scalar fields: bits, ternary method, stacked, checksums, model."""
  bits = meta["bits"]
  if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= quant.projections.MAX_BITS:
    raise ValueError(f"{path}: invalid bits {bits!r}")
  if meta["ternary_method"] not in quant.TERNARY_METHODS:
    raise _malformed(path, "ternary_method", meta["ternary_method"])
  if not isinstance(meta["stacked"], bool):
    raise _malformed(path, "stacked", meta["stacked"])
  crcs = meta["crc32"]
  if not isinstance(crcs, dict) or not all(isinstance(c, int) for c in crcs.values()):
    raise _malformed(path, "crc32", crcs)
  model = meta.get("model")
  if model is not None and (not isinstance(model, dict) or not isinstance(model.get("config"), dict)):
    raise ValueError(f"{path}: malformed model configuration in the header")


def _check_names(names: list[str], path: str) -> None:
  """Refuses a repeated leaf path, or one that is also the folder of another (``a/b`` and ``a/b/c``)."""
  ordered = sorted(names)
  for a, b in zip(ordered, ordered[1:]):
    if a == b or b.startswith(a + "/"):
      raise _malformed(path, "a leaf path given twice", b)


def _read_meta(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """The decoded header (format and version checked) and the arrays of an ``.npz``."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no packed model at {path}")
  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {name: npz[name] for name in npz.files}
  except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
    raise ValueError(f"{path} is not a readable packed model (corrupt or not an .npz): {e}") from None
  if _META not in arrays:
    raise ValueError(f"{path}: no header: not a packed enquant model")
  try:
    meta = json.loads(arrays.pop(_META).tobytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: corrupt header ({e})") from None
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise ValueError(f"{path}: not a packed enquant model (wrong format tag)")
  if meta.get("version") not in _READABLE_VERSIONS:
    raise ValueError(f"{path}: unsupported version {meta.get('version')!r} (this code reads "
                     f"{_READABLE_VERSIONS})")
  return meta, arrays


def _read(path: str | os.PathLike) -> tuple[PackedModel, dict | None, dict | None]:
  """``(packed, flat batch_stats or None, model header or None)`` of a file written by :func:`save`."""
  path = os.fspath(path)
  meta, arrays = _read_meta(path)
  try:
    _check_scalars(meta, path)
    kinfo = _entries(meta, "kernels", path, dtypes=False)
    finfo = _entries(meta, "floats", path, dtypes=True)
    sinfo = _entries(meta, "batch_stats", path, dtypes=True) if "batch_stats" in meta else None
  except KeyError as e:
    raise ValueError(f"{path}: malformed header (no {e})") from None
  bits, stacked, crcs = meta["bits"], meta["stacked"], meta["crc32"]
  expected = {"codes", "scales", "floats"} | ({"batch_stats"} if sinfo is not None else set())
  if set(arrays) != expected or set(crcs) != set(arrays):
    raise ValueError(f"{path}: arrays {sorted(arrays)} do not match the header")
  for name, a in arrays.items():
    if a.ndim != 1 or _crc(a) != crcs[name]:
      raise ValueError(f"{path}: checksum mismatch in {name!r}: corrupt data")
  codes, scales = arrays["codes"], arrays["scales"]
  if codes.dtype != np.uint8 or scales.dtype != np.float32 or any(
      arrays[k].dtype != np.uint8 for k in ("floats", "batch_stats") if k in arrays):
    raise ValueError(f"{path}: arrays have the wrong dtypes")
  _check_names([e[0] for e in kinfo + finfo], path)
  if sinfo is not None:
    _check_names([e[0] for e in sinfo], path)
  kernels, code_at, scale_at = {}, 0, 0
  for name, shape, _ in kinfo:
    data, code_at = _take_bytes(codes, code_at, packed_nbytes(math.prod(shape), bits), name)
    members = shape[0] if stacked and shape else 1
    scale, scale_at = _take_bytes(scales, scale_at, members, name)
    kernels[name] = PackedKernel(scale=scale.copy().reshape((members,) if stacked else ()),
                                 data=data.copy(), shape=shape)
  if code_at != codes.size or scale_at != scales.size:
    raise ValueError(f"{path}: arrays are longer than the header says: corrupt file")
  floats = _take_raw(arrays["floats"], finfo, path)
  batch_stats = _take_raw(arrays["batch_stats"], sinfo, path) if sinfo is not None else None
  packed = PackedModel(bits=bits, ternary_method=meta["ternary_method"], stacked=stacked,
                       kernels=kernels, floats=floats)
  return packed, batch_stats, meta.get("model")


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
  """The header's model configuration, each field's type and bounds checked before it is built."""
  config = header["config"]
  for key, kind in _CONFIG_TYPES.items():
    if key not in config:
      continue
    v = config[key]
    ok = {"int": _is_int(v), "ints": _is_ints(v), "ints or null": v is None or _is_ints(v),
          "str": isinstance(v, str),
          "number": isinstance(v, (int, float)) and not isinstance(v, bool)}[kind]
    if not ok:
      raise ValueError(f"{path}: model configuration field {key!r} must be {_kind_text(kind)}, got "
                       f"{json.dumps(v)[:80]}")
  try:
    return ModelConfig.from_dict(config)
  except TypeError as e:  # a field this version of enquant does not know
    raise ValueError(f"{path}: model configuration does not fit this enquant ({e})") from None
  except ValueError as e:  # a value ModelConfig refuses
    raise ValueError(f"{path}: invalid model configuration ({e})") from None


def _kind_text(kind: str) -> str:
  return {"int": f"an integer in [0, {_MAX_DIM}]", "ints": "a list of such integers",
          "ints or null": "a list of such integers or null", "str": "a string",
          "number": "a number"}[kind]


def _input_shape(header: dict, shapes: dict[str, tuple], path: str) -> tuple[int, int, int]:
  """The header's ``(height, width, channels)``; without one, 8x8 images with the stem's channels
  (parameter shapes do not depend on the image size)."""
  if "input_shape" not in header:
    stem = shapes.get("params/stem/kernel", ())
    return (8, 8, stem[-2] if len(stem) >= 2 else 3)
  shape = header["input_shape"]
  if not isinstance(shape, list) or len(shape) != 3 or not all(
      _is_int(d) and 1 <= d <= _MAX_IMAGE_SIDE for d in shape):
    raise _malformed(path, "input_shape", shape)
  return tuple(shape)


def _check_fits(model: EnResNet, shapes: dict[str, tuple], input_shape, path: str) -> None:
  """Raises ValueError unless ``shapes`` (flat variable paths) are exactly what ``model.init`` gives.

  The model is traced only when its block count is possible for the file (every block has arrays), so
  a configuration claiming millions of blocks is refused at once.
  """
  blocks = sum(model.config.block_stages)
  if blocks > len(shapes):
    raise ValueError(f"{path}: its configuration has {blocks} residual blocks, but the file holds only "
                     f"{len(shapes)} arrays: it does not fit the model of its configuration")
  sample = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
  want = {k: tuple(v.shape) for k, v in
          flatten(jax.eval_shape(model.init, jax.random.PRNGKey(0), sample)).items()}
  for name in sorted(set(want) | set(shapes)):
    if shapes.get(name) != want.get(name):
      raise ValueError(f"{path}: {name} does not fit the model of its configuration "
                       f"({shapes.get(name, 'missing')} vs {want.get(name, 'not in the model')})")


def _variable_shapes(packed: PackedModel, batch_stats: dict | None, path: str) -> dict[str, tuple]:
  """``{"params/...", "batch_stats/...": shape}`` of the variables a file holds (nothing unpacked)."""
  stored = {k: tuple(v.shape) for k, v in packed.kernels.items()}
  stored.update({k: tuple(np.shape(v)) for k, v in packed.floats.items()})
  if batch_stats is None and {k.split("/")[0] for k in stored} == {"params", "batch_stats"}:
    return stored  # a whole variables tree packed
  if batch_stats is None:
    raise ValueError(f"{path} holds no BatchNorm statistics: it is not a standalone model (saved "
                     "without batch_stats)")
  shapes = {f"params/{k}": v for k, v in stored.items()}
  shapes.update({f"batch_stats/{k}": tuple(np.shape(v)) for k, v in batch_stats.items()})
  return shapes


def load_model(path: str | os.PathLike) -> tuple[EnResNet, dict[str, Any]]:
  """Rebuilds the runnable model from a packed file alone.

  The file must have been saved with ``batch_stats`` and ``model_config`` (the pipeline's
  ``model_packed.npz`` is). The header is checked before anything is built: every field's type and
  bounds, and every array's shape against the model of the configuration. The parameters are ``P(w)``
  exactly as evaluated (see :func:`unpack`), so ``model.apply(variables, x, key)`` equals the evaluated
  model's logits for the same ``x`` and ``key``.

  Example::

      model, variables = export.load_model("runs/demo/model_packed.npz")
      logits = model.apply(variables, x, jax.random.PRNGKey(0))

  Args:
    path: a file written by :func:`save`.

  Returns:
    ``(model, variables)``: an :class:`enquant.models.EnResNet` and ``{"params", "batch_stats"}``.

  Raises:
    FileNotFoundError: when ``path`` does not exist.
    ValueError: corrupt file, a header field of the wrong type or out of bounds, a file saved without
      BatchNorm statistics or model configuration, or arrays that do not fit its configuration.
  """
  path = os.fspath(path)
  packed, batch_stats, header = _read(path)
  shapes = _variable_shapes(packed, batch_stats, path)
  if header is None:
    raise ValueError(f"{path} holds no model configuration: it is not a standalone model (saved "
                     "without model_config)")
  model = EnResNet(_model_config(header, path))
  _check_fits(model, shapes, _input_shape(header, shapes, path), path)
  params = unpack(packed)
  if batch_stats is None:
    return model, {"params": params["params"], "batch_stats": params["batch_stats"]}
  stats = flax.traverse_util.unflatten_dict({tuple(k.split("/")): jnp.asarray(v)
                                             for k, v in batch_stats.items()})
  return model, {"params": params, "batch_stats": stats}


__all__ = ["FORMAT", "VERSION", "PackedKernel", "PackedModel", "load", "load_model", "pack", "pack_codes",
           "packed_nbytes", "save", "size_report", "unpack", "unpack_codes"]
