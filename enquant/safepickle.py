"""Pickles read without running code: only builtin containers and scalars, and numpy arrays.

The python versions of CIFAR are pickles. :func:`loads` reads them with a restricted unpickler that
resolves only the four numpy names needed to rebuild a numpy array (:data:`ALLOWED_GLOBALS`) and
refuses every other global and every persistent id, so a malicious file raises instead of running
anything.
"""

import io
import pickle

import numpy as np


def _numpy_reconstruct():
  try:
    from numpy._core import multiarray  # pylint: disable=g-import-not-at-top  # numpy >= 2
  except ImportError:  # numpy 1.x
    from numpy.core import multiarray  # pylint: disable=g-import-not-at-top
  return multiarray._reconstruct  # pylint: disable=protected-access


# The only globals a CIFAR python pickle needs: rebuilding numpy arrays. Everything else is refused.
ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only :data:`ALLOWED_GLOBALS`, so loading executes no code."""

  def find_class(self, module, name):
    resolve = ALLOWED_GLOBALS.get((module, name))
    if resolve is None:
      raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
    return resolve()

  def persistent_load(self, pid):
    raise pickle.UnpicklingError("refusing persistent ids")


def loads(buf: bytes, what: str):
  """Loads a pickle that may only contain builtin containers/scalars and numpy arrays.

  Python-2 strings load as bytes (``encoding="bytes"``), as the CIFAR python files need.

  Args:
    buf: the pickle bytes.
    what: the file's name, used in error messages.

  Returns:
    The unpickled object.

  Raises:
    ValueError: the pickle is corrupt or references anything beyond the allowed numpy names (nothing
      it references is ever called).
  """
  try:
    return _RestrictedUnpickler(io.BytesIO(buf), encoding="bytes").load()
  except Exception as e:  # pylint: disable=broad-except  # any failure means a bad file
    raise ValueError(f"{what}: not a valid CIFAR python pickle ({type(e).__name__}: {e})") from e


__all__ = ["ALLOWED_GLOBALS", "loads"]
