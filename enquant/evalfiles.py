"""Evaluation results on disk: per-image masks packed for results files, and the progress file that lets a
killed evaluation resume (:func:`enquant.evaluate.evaluate`'s ``resume_path``).

A progress file holds a fingerprint of everything that sets the evaluation's numbers, the finished
``"<batch>/<attack>"`` units and the per-image masks so far. A file with another fingerprint, or one that
cannot be read, is ignored (and overwritten by the next save): it never supplies numbers to another
evaluation.
"""

import hashlib
import json
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from enquant import files


def pack_mask(mask) -> str:
  """A boolean per-image mask as a compact hex string (8 images per byte) for results files."""
  return np.packbits(np.asarray(mask, bool)).tobytes().hex()


def unpack_mask(packed: str, n: int) -> np.ndarray:
  """Inverse of :func:`pack_mask` for ``n`` images."""
  bits = np.unpackbits(np.frombuffer(bytes.fromhex(packed), np.uint8))
  if bits.size < n or bits.size >= n + 8:
    raise ValueError(f"a packed mask of {bits.size} bits cannot hold {n} images")
  return bits[:n].astype(bool)


def fingerprint(settings: dict[str, Any], arrays: Sequence[Any]) -> str:
  """SHA-256 of JSON ``settings`` and of the dtype, shape and bytes of every array (typed PRNG keys by
  their key data)."""
  h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
  for a in arrays:
    if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a = jax.random.key_data(a)
    a = np.asarray(a)
    h.update(f"{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()


def load_progress(path: str | None, print_: str, masks: dict[str, np.ndarray]) -> set[str]:
  """Fills ``masks`` from the progress file at ``path`` if its fingerprint is ``print_``; returns its
  finished units (empty when there is no usable file)."""
  if path is None or not os.path.exists(path):
    return set()
  try:
    saved = files.read_json(path)
    if saved.get("fingerprint") != print_:
      return set()
    loaded = {name: unpack_mask(saved["masks"][name], len(m)) for name, m in masks.items()}
    done = set(saved["done"])
  except (ValueError, KeyError, TypeError, AttributeError):
    return set()  # unreadable or of another shape: start over
  for name, m in loaded.items():
    masks[name][:] = m
  return done


def save_progress(path: str, print_: str, masks: dict[str, np.ndarray], done: set[str]) -> None:
  """Writes the progress file atomically."""
  files.write_json_atomic(path, {"fingerprint": print_, "done": sorted(done),
                                 "masks": {k: pack_mask(v) for k, v in masks.items()}})


__all__ = ["fingerprint", "load_progress", "pack_mask", "save_progress", "unpack_mask"]
