"""Readers of the official distribution files: MNIST/Fashion-MNIST IDX, CIFAR-10/100, SVHN.

:func:`load_local` finds a dataset's files under a data directory (the layouts are listed in
:mod:`enquant.data`'s docstring), parses them with numpy and checks shapes and labels; every problem is a
one-line ``ValueError`` naming the file, and a missing or incomplete copy a :class:`LocalFilesMissing` that
lists what was expected and where it was looked for. The checks and the error live in
:mod:`enquant.datachecks` and are re-exported here.

The python versions of CIFAR are pickles, read with :func:`enquant.safepickle.loads` (which executes no
code: a malicious file raises instead of running anything).

This module knows nothing about models, TFDS or devices; :mod:`enquant.data` builds on it.
"""

import gzip
import math
import os
import pathlib
import tarfile
import zlib
from typing import Callable, NamedTuple

import numpy as np

from enquant import safepickle
from enquant.datachecks import check_labels
from enquant.datachecks import check_split
from enquant.datachecks import ENV_DATA_DIR
from enquant.datachecks import integer_labels
from enquant.datachecks import LocalFilesMissing
from enquant.datachecks import missing_error


# ----------------------------------------------------------------------------------------------------
# Where a dataset's files are looked for.


def _roots(info, data_dir: pathlib.Path) -> list[pathlib.Path]:
  return [data_dir / s for s in info.subdirs] + [data_dir]


# ----------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST: IDX files.

_IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_IDX_FILES = {  # role -> accepted file names, in order of preference
    "train_images": ("train-images-idx3-ubyte.gz", "train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    "train_labels": ("train-labels-idx1-ubyte.gz", "train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    "test_images": ("t10k-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}


_READ_CHUNK = 1 << 20


def _read_at_most(stream, nbytes: int) -> bytearray:
  """Up to ``nbytes`` bytes of ``stream``, read in chunks: memory grows with what is there, never with
  what a header claims."""
  buf = bytearray()
  while len(buf) < nbytes:
    chunk = stream.read(min(_READ_CHUNK, nbytes - len(buf)))
    if not chunk:
      break
    buf += chunk
  return buf


def _read_idx_stream(stream, what: str, magic: int, file_size: int | None) -> np.ndarray:
  """Parses an unsigned-byte IDX file from ``stream``, reading at most the header's size + 1 byte."""
  head = _read_at_most(stream, 4)
  if len(head) < 4:
    raise ValueError(f"{what}: {len(head)} bytes, too short for an IDX header")
  found = int.from_bytes(head, "big")
  if found != magic:
    raise ValueError(f"{what}: IDX magic number {found} (0x{found:08x}), expected {magic} "
                     f"(0x{magic:08x}); not an unsigned-byte IDX file of the right kind")
  ndim = head[3]
  header = 4 + 4 * ndim
  raw_dims = _read_at_most(stream, 4 * ndim)
  if len(raw_dims) < 4 * ndim:
    raise ValueError(f"{what}: truncated IDX header ({4 + len(raw_dims)} bytes)")
  dims = tuple(int.from_bytes(raw_dims[4 * i: 4 * i + 4], "big") for i in range(ndim))
  body = math.prod(dims)
  data = _read_at_most(stream, body + 1)  # one byte more than claimed tells a longer file
  if len(data) != body:
    if len(data) < body:
      got = f"{header + len(data)} bytes"
    elif file_size is not None:
      got = f"{file_size} bytes"
    else:  # the rest is never decompressed
      got = f"more than {header + body} bytes"
    raise ValueError(f"{what}: {got}, but the header's dimensions {dims} need {header + body} "
                     "(truncated or corrupt file)")
  return np.frombuffer(data, np.uint8).reshape(dims)


def _read_idx(path: pathlib.Path, magic: int) -> np.ndarray:
  """Reads an unsigned-byte IDX file (the MNIST format), gunzipped if it starts with the gzip magic.

  At most the header's size + 1 byte is ever decompressed or held, so a file far longer than its header
  says (a gzip bomb) is refused without being unpacked.

  Args:
    path: the file.
    magic: the expected magic number (2051 for 3-d images, 2049 for 1-d labels).

  Returns:
    The uint8 array with the dimensions from the header.

  Raises:
    ValueError: naming the file: wrong magic number, corrupt gzip data, or a size that does not match
      the header (truncated or padded).
  """
  with open(path, "rb") as f:
    if f.read(2) != b"\x1f\x8b":
      f.seek(0)
      return _read_idx_stream(f, str(path), magic, os.fstat(f.fileno()).st_size)
    f.seek(0)
    try:
      with gzip.GzipFile(fileobj=f) as stream:
        return _read_idx_stream(stream, str(path), magic, None)
    except (OSError, EOFError, zlib.error) as e:
      raise ValueError(f"{path}: corrupt or truncated gzip data ({e})") from None


def _find_idx(info, roots: list[pathlib.Path]):
  incomplete = []
  for root in roots:
    if not root.is_dir():
      continue
    found = {}
    for role, names in _IDX_FILES.items():
      path = next((root / n for n in names if (root / n).is_file()), None)
      if path is not None:
        found[role] = path
    if len(found) == len(_IDX_FILES):
      return found, []
    if found:
      missing = [_IDX_FILES[r][0] for r in _IDX_FILES if r not in found]
      incomplete.append(f"{root} lacks {', '.join(missing)}")
  return None, incomplete


def _load_idx(info, data_dir: pathlib.Path):
  roots = _roots(info, data_dir)
  found, incomplete = _find_idx(info, roots)
  if found is None:
    expected = [", ".join(names[0] for names in _IDX_FILES.values())
                + " (gzip-compressed or not)"]
    raise missing_error(info, roots, expected, incomplete)
  arrays = {}
  for role, path in found.items():
    magic = _IDX_IMAGES_MAGIC if role.endswith("images") else _IDX_LABELS_MAGIC
    arrays[role] = _read_idx(path, magic)
  splits = []
  for split in ("train", "test"):
    images = arrays[f"{split}_images"][..., None]  # (N, 28, 28) -> (N, 28, 28, 1)
    labels = arrays[f"{split}_labels"]
    check_split(images, labels, info, f"{found[f'{split}_images']} + {found[f'{split}_labels'].name}")
    splits += [images, labels]
  return (*splits, str(found["train_images"].parent))


# ----------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100: binary and python versions, in folders or the official .tar.gz archives.

_CIFAR_PIXELS = 32 * 32 * 3  # one record: 1024 red, 1024 green, 1024 blue bytes, each plane row-major


class _CifarLayout(NamedTuple):
  fmt: str  # "bin" or "py"
  folder: str
  archive: str
  train: tuple[str, ...]
  test: tuple[str, ...]


_CIFAR_LAYOUTS = {
    "cifar10": (
        _CifarLayout("bin", "cifar-10-batches-bin", "cifar-10-binary.tar.gz",
                     tuple(f"data_batch_{i}.bin" for i in range(1, 6)), ("test_batch.bin",)),
        _CifarLayout("py", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                     tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",)),
    ),
    "cifar100": (
        _CifarLayout("bin", "cifar-100-binary", "cifar-100-binary.tar.gz", ("train.bin",), ("test.bin",)),
        _CifarLayout("py", "cifar-100-python", "cifar-100-python.tar.gz", ("train",), ("test",)),
    ),
}


def _cifar_images(flat: np.ndarray) -> np.ndarray:
  """(N, 3072) rows of R, G, B planes -> (N, 32, 32, 3) NHWC."""
  return flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def _parse_cifar_bin(buf: bytes, what: str, label_bytes: int):
  record = label_bytes + _CIFAR_PIXELS
  if not buf or len(buf) % record:
    raise ValueError(f"{what}: {len(buf)} bytes is not a positive multiple of the {record}-byte "
                     "record (truncated or not a CIFAR binary file)")
  rows = np.frombuffer(buf, np.uint8).reshape(-1, record)
  if label_bytes == 2:  # CIFAR-100: coarse label, fine label
    check_labels(rows[:, 0], 0, 19, f"{what} (coarse labels)")
  return _cifar_images(rows[:, label_bytes:]), rows[:, label_bytes - 1].astype(np.int32)


def _parse_cifar_py(buf: bytes, what: str, label_key: str):
  obj = safepickle.loads(buf, what)
  if not isinstance(obj, dict):
    raise ValueError(f"{what}: expected a dict, found {type(obj).__name__}")
  d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
  for key in ("data", label_key):
    if key not in d:
      raise ValueError(f"{what}: no {key!r} entry (keys: {sorted(map(str, d))})")
  data = d["data"]
  if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
      or data.shape[1] != _CIFAR_PIXELS:
    desc = (f"dtype {data.dtype}, shape {data.shape}" if isinstance(data, np.ndarray)
            else type(data).__name__)
    raise ValueError(f"{what}: 'data' must be a uint8 array of shape (N, {_CIFAR_PIXELS}), got {desc}")
  try:
    labels = np.asarray(d[label_key])
  except (TypeError, ValueError, OverflowError) as e:
    raise ValueError(f"{what}: {label_key!r} is not a list of integers ({e})") from None
  if labels.shape != (data.shape[0],):
    raise ValueError(f"{what}: {data.shape[0]} images but {label_key!r} has shape {labels.shape}")
  return _cifar_images(data), integer_labels(labels, f"{what} ({label_key!r})")


# Above the largest official CIFAR file (cifar-100-python/train, about 155 MB).
_MAX_MEMBER_BYTES = 256 << 20


def _read_tar_members(path: pathlib.Path, names: list[str]) -> dict[str, bytes]:
  """Reads the named members of a .tar.gz into memory (one sequential pass, nothing extracted); a member
  whose header claims more than :data:`_MAX_MEMBER_BYTES` is refused before it is unpacked."""
  wanted, out = set(names), {}
  try:
    with tarfile.open(path, "r:*") as tar:
      for member in tar:
        name = member.name[2:] if member.name.startswith("./") else member.name
        if name in wanted and member.isfile():
          if member.size > _MAX_MEMBER_BYTES:  # refused before a byte of it is unpacked
            raise ValueError(f"{path}: {name} claims {member.size} bytes, more than any CIFAR file "
                             f"({_MAX_MEMBER_BYTES}); not a CIFAR archive")
          out[name] = tar.extractfile(member).read()
  except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
    raise ValueError(f"{path}: corrupt or truncated archive ({type(e).__name__}: {e})") from e
  missing = [n for n in names if n not in out]
  if missing:
    raise ValueError(f"{path}: archive lacks {', '.join(missing)}")
  return out


def _find_cifar(layouts, roots):
  incomplete = []
  for root in roots:
    for layout in layouts:
      folder = root / layout.folder
      if folder.is_dir():
        missing = [n for n in layout.train + layout.test if not (folder / n).is_file()]
        if not missing:
          return layout, folder, False, []
        incomplete.append(f"{folder} lacks {', '.join(missing)}")
    for layout in layouts:
      if (root / layout.archive).is_file():
        return layout, root / layout.archive, True, []
  return None, None, False, incomplete


def _load_cifar(info, data_dir: pathlib.Path):
  layouts = _CIFAR_LAYOUTS[info.name]
  roots = _roots(info, data_dir)
  layout, location, is_archive, incomplete = _find_cifar(layouts, roots)
  if layout is None:
    expected = []
    for lay in layouts:
      expected.append(f"{lay.folder}/{{{', '.join(lay.train + lay.test)}}}")
    expected += [lay.archive for lay in layouts]
    raise missing_error(info, roots, expected, incomplete)
  if is_archive:
    members = _read_tar_members(location, [f"{layout.folder}/{n}" for n in layout.train + layout.test])
    read = lambda n: members[f"{layout.folder}/{n}"]
  else:
    read = lambda n: (location / n).read_bytes()
  cifar100 = info.name == "cifar100"
  splits = []
  for names in (layout.train, layout.test):
    parts = []
    for n in names:
      what = f"{location}/{n}" if not is_archive else f"{location}:{layout.folder}/{n}"
      if layout.fmt == "bin":
        parts.append(_parse_cifar_bin(read(n), what, 2 if cifar100 else 1))
      else:
        parts.append(_parse_cifar_py(read(n), what, "fine_labels" if cifar100 else "labels"))
      check_split(*parts[-1], info, what)
    splits += [np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])]
  return (*splits, str(location))


# ----------------------------------------------------------------------------------------------------
# SVHN: MATLAB .mat files.

_SVHN_FILES = ("train_32x32.mat", "test_32x32.mat")


def _parse_svhn_mat(path: pathlib.Path):
  import scipy.io  # pylint: disable=g-import-not-at-top  # only SVHN needs scipy

  try:
    mat = scipy.io.loadmat(path)
  except Exception as e:  # pylint: disable=broad-except  # scipy raises many types for bad files
    raise ValueError(f"{path}: not a readable MATLAB file ({type(e).__name__}: {e})") from e
  if "X" not in mat or "y" not in mat:
    raise ValueError(f"{path}: expected variables 'X' and 'y', found "
                     f"{sorted(k for k in mat if not k.startswith('__'))}")
  x, y = mat["X"], mat["y"]
  if x.dtype != np.uint8 or x.ndim != 4 or x.shape[:3] != (32, 32, 3):
    raise ValueError(f"{path}: 'X' must be uint8 of shape (32, 32, 3, N), got dtype {x.dtype} and "
                     f"shape {x.shape}")
  y = np.asarray(y).reshape(-1)
  if y.shape[0] != x.shape[3]:
    raise ValueError(f"{path}: {x.shape[3]} images but {y.shape[0]} labels")
  y = integer_labels(y, str(path))
  check_labels(y, 1, 10, str(path))  # SVHN labels digits 1..9 as 1..9 and the digit 0 as 10
  return x.transpose(3, 0, 1, 2), y % 10


def _load_svhn(info, data_dir: pathlib.Path):
  roots = _roots(info, data_dir)
  incomplete = []
  for root in roots:
    present = [(root / n).is_file() for n in _SVHN_FILES]
    if all(present):
      splits = []
      for n in _SVHN_FILES:
        images, labels = _parse_svhn_mat(root / n)
        check_split(images, labels, info, str(root / n))
        splits += [images, labels]
      return (*splits, str(root))
    if any(present):
      incomplete.append(f"{root} lacks {_SVHN_FILES[present.index(False)]}")
  raise missing_error(info, roots, [", ".join(_SVHN_FILES)], incomplete)


_LOCAL_LOADERS: dict[str, Callable] = {
    "mnist": _load_idx, "fmnist": _load_idx, "cifar10": _load_cifar, "cifar100": _load_cifar,
    "svhn": _load_svhn,
}


def has_files(info, data_dir: pathlib.Path) -> bool:
  """Whether a complete set of official files for ``info`` lies under ``data_dir`` (nothing is parsed)."""
  roots = _roots(info, data_dir)
  if info.name in ("mnist", "fmnist"):
    return _find_idx(info, roots)[0] is not None
  if info.name in _CIFAR_LAYOUTS:
    return _find_cifar(_CIFAR_LAYOUTS[info.name], roots)[0] is not None
  return any(all((r / n).is_file() for n in _SVHN_FILES) for r in roots)


def load_local(info, data_dir: pathlib.Path):
  """``(train_images, train_labels, test_images, test_labels, where)`` from the official files.

  Raises:
    LocalFilesMissing: no complete copy under ``data_dir`` (the message lists files and folders).
    ValueError: a corrupt or truncated file (the message names it).
  """
  return _LOCAL_LOADERS[info.name](info, data_dir)


__all__ = ["ENV_DATA_DIR", "LocalFilesMissing", "check_labels", "check_split", "has_files", "integer_labels",
           "load_local"]
