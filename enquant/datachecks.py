"""Checks of image/label arrays read from dataset files, and the error for a missing local copy.

:func:`integer_labels` and :func:`check_labels` refuse labels that are not whole numbers in range,
:func:`check_split` checks one split against a dataset's image shape and classes; every problem is a
one-line ``ValueError`` naming the file (or source). :class:`LocalFilesMissing` (built by
:func:`missing_error`) lists what was expected and where it was looked for.

Used by :mod:`enquant.datafiles` (which re-exports the public names), :mod:`enquant.data` and
:mod:`enquant.preprocess`. This module knows nothing about file formats, models or devices.
"""

import pathlib

import numpy as np

ENV_DATA_DIR = "ENQUANT_DATA_DIR"


class LocalFilesMissing(FileNotFoundError):
  """No complete set of local files: ``source="auto"`` may fall back to TFDS."""


def missing_error(info, roots: list[pathlib.Path], expected: list[str],
                  incomplete: list[str]) -> LocalFilesMissing:
  """The error for a dataset with no complete local copy: folders searched, files expected, what to do.

  Args:
    info: the dataset's :class:`enquant.data.DatasetInfo`.
    roots: the folders that were searched.
    expected: the accepted file sets, one line each.
    incomplete: the partial copies found, one line each (``"<folder> lacks <files>"``).

  Returns:
    A :class:`LocalFilesMissing` whose message lists all of the above.
  """
  lines = [f"no local copy of {info.name!r} found.",
           "  Looked in: " + ", ".join(str(r) for r in roots),
           "  Expected one of:"]
  lines += [f"    {e}" for e in expected]
  if incomplete:
    lines.append("  Incomplete copies:")
    lines += [f"    {i}" for i in incomplete]
  lines.append(f"  Pass --data_dir=DIR (Python: data_dir=DIR) or set ${ENV_DATA_DIR}, or use "
               "--data_source=tfds" + (" or --data_source=embedded (the bundled 5000/1000 MNIST sample)."
                                        if info.name == "mnist" else "."))
  return LocalFilesMissing("\n".join(lines))


_LARGEST_LABEL = 2 ** 53  # beyond it, float labels are no longer exact integers


def integer_labels(labels, what: str) -> np.ndarray:
  """``labels`` as int64, refusing anything that is not a whole number.

  Integer arrays pass as they are, float arrays only when every value is finite and integral (MATLAB
  files store labels as doubles); fractions, NaN, infinities, strings, booleans and objects raise.

  Args:
    labels: an array (or list) of labels.
    what: the file (or source) the labels came from, named in the error.

  Returns:
    An int64 array of ``labels``' shape.

  Raises:
    ValueError: naming ``what`` and the first offending label.
  """
  try:
    labels = np.asarray(labels)
  except (TypeError, ValueError, OverflowError) as e:  # ragged or unconvertible values
    raise ValueError(f"{what}: labels are not a list of integers ({e})") from None
  kind = labels.dtype.kind
  if kind not in "iuf" and labels.size:
    raise ValueError(f"{what}: labels must be integers, got {labels.dtype} values such as "
                     f"{labels.reshape(-1)[:1].tolist()[0]!r}")
  if kind == "f":
    bad = labels[~np.isfinite(labels) | (labels != np.round(labels))]
    if bad.size:
      raise ValueError(f"{what}: label {float(bad.flat[0])!r} is not an integer "
                       f"({bad.size} non-integer labels)")
  if kind in "uf":  # values beyond int64 would wrap around when cast
    huge = labels[np.abs(labels) > _LARGEST_LABEL]
    if huge.size:
      raise ValueError(f"{what}: label {huge.flat[0].item()!r} is not a class index")
  return labels.astype(np.int64) if labels.size else np.zeros(labels.shape, np.int64)


def check_labels(labels: np.ndarray, low: int, high: int, what: str) -> None:
  """Raises ValueError naming `what` unless every label is an integer in ``[low, high]``.

  Non-integer labels (see :func:`integer_labels`) are refused before the range is checked.
  """
  labels = integer_labels(labels, what)
  if labels.size:
    bad = labels[(labels < low) | (labels > high)]
    if bad.size:
      raise ValueError(f"{what}: label {int(bad[0])} is outside [{low}, {high}] "
                       f"({bad.size} bad labels)")


def check_split(images: np.ndarray, labels: np.ndarray, info, what: str) -> None:
  """Raises ValueError naming `what` unless the images have ``info``'s shape and one valid label each."""
  if images.shape[1:] != info.image_shape:
    raise ValueError(f"{what}: images have shape {images.shape[1:]}, expected {info.image_shape} "
                     f"for {info.name}")
  if images.shape[0] != labels.shape[0]:
    raise ValueError(f"{what}: {images.shape[0]} images but {labels.shape[0]} labels")
  check_labels(labels, 0, info.num_classes - 1, what)


__all__ = ["ENV_DATA_DIR", "LocalFilesMissing", "check_labels", "check_split", "integer_labels",
           "missing_error"]
