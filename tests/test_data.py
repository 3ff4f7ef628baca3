"""Tests for enquant.data: every official file format written here and read back, corrupt and missing
files, the real MNIST / Fashion-MNIST, the embedded sample, augmentation and batching."""

import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import sys
import tarfile
import tracemalloc
import types

import hypothesis
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.io

from enquant import data

# ----------------------------------------------------------------------------------------------------
# Writers of the official formats (independent of the loader: plain byte layouts from the specs).


def idx_bytes(arr: np.ndarray) -> bytes:
  """IDX file: 0x00 0x00 0x08 ndim, big-endian int32 dims, row-major unsigned bytes."""
  arr = np.asarray(arr, np.uint8)
  header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(struct.pack(">i", d) for d in arr.shape)
  return header + arr.tobytes(order="C")


def write_idx_set(folder, train_x, train_y, test_x, test_y, *, gz=True):
  folder.mkdir(parents=True, exist_ok=True)
  files = {"train-images-idx3-ubyte": train_x, "train-labels-idx1-ubyte": train_y,
           "t10k-images-idx3-ubyte": test_x, "t10k-labels-idx1-ubyte": test_y}
  for name, arr in files.items():
    raw = idx_bytes(arr)
    if gz:
      (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
    else:
      (folder / name).write_bytes(raw)


def cifar_record_pixels(image_hwc: np.ndarray) -> bytes:
  """CIFAR pixel layout: the 1024 red values, then green, then blue, each plane row by row."""
  return b"".join(image_hwc[:, :, c].tobytes(order="C") for c in range(3))


def cifar_bin_bytes(images, labels, coarse=None) -> bytes:
  out = bytearray()
  for i, (img, lab) in enumerate(zip(images, labels)):
    if coarse is not None:
      out.append(int(coarse[i]))
    out.append(int(lab))
    out += cifar_record_pixels(img)
  return bytes(out)


class Py2Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Writes pickles the way Python 2's cPickle wrote the CIFAR files (protocol 2): every string as a
  byte string (SHORT_BINSTRING/BINSTRING opcodes) and numpy's old module name numpy.core.multiarray."""

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def save_py2_string(self, obj):
    if isinstance(obj, str):
      obj = obj.encode("latin1")
    if len(obj) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
    else:
      self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
    self.memoize(obj)

  def save_global_py2(self, obj, name=None):
    module = obj.__module__.replace("numpy._core", "numpy.core")
    self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
    self.memoize(obj)

  dispatch[bytes] = save_py2_string
  dispatch[str] = save_py2_string
  dispatch[type] = save_global_py2
  dispatch[types.BuiltinFunctionType] = save_global_py2


def py2_pickle(obj) -> bytes:
  f = io.BytesIO()
  Py2Pickler(f, protocol=2).dump(obj)
  return f.getvalue()


def cifar_py_bytes(images, labels, label_key=b"labels", extra=None) -> bytes:
  d = {b"batch_label": b"training batch 1 of 5",
       label_key: [int(v) for v in labels],
       b"data": np.stack([np.frombuffer(cifar_record_pixels(im), np.uint8) for im in images]),
       b"filenames": [f"img_{i}.png".encode() for i in range(len(images))]}
  d.update(extra or {})
  return py2_pickle(d)


def random_images(rng, n, shape):
  return rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)


def make_cifar(rng, num_classes, n_train_batches, per_batch, n_test):
  """Random CIFAR-shaped images with a marked pixel: image 0 has (R, G, B) = (11, 22, 33) at (1, 2)."""
  n = n_train_batches * per_batch
  train_x, test_x = random_images(rng, n, (32, 32, 3)), random_images(rng, n_test, (32, 32, 3))
  train_x[0, 1, 2] = (11, 22, 33)
  train_y = rng.integers(0, num_classes, n)
  train_y[:2] = (0, num_classes - 1)
  test_y = rng.integers(0, num_classes, n_test)
  return train_x, train_y, test_x, test_y


def cifar_files(name, fmt, train_x, train_y, test_x, test_y, coarse_train=None, coarse_test=None):
  """{member path: bytes} of the official layout for (cifar10|cifar100, bin|py)."""
  if name == "cifar10":
    folder = "cifar-10-batches-bin" if fmt == "bin" else "cifar-10-batches-py"
    suffix = ".bin" if fmt == "bin" else ""
    per = len(train_x) // 5
    batches = [(f"data_batch_{i + 1}{suffix}", slice(i * per, (i + 1) * per)) for i in range(5)]
    out = {}
    for fname, sl in batches:
      out[f"{folder}/{fname}"] = (cifar_bin_bytes(train_x[sl], train_y[sl]) if fmt == "bin"
                                  else cifar_py_bytes(train_x[sl], train_y[sl]))
    out[f"{folder}/test_batch{suffix}"] = (cifar_bin_bytes(test_x, test_y) if fmt == "bin"
                                           else cifar_py_bytes(test_x, test_y))
    return out
  folder = "cifar-100-binary" if fmt == "bin" else "cifar-100-python"
  if fmt == "bin":
    return {f"{folder}/train.bin": cifar_bin_bytes(train_x, train_y, coarse_train),
            f"{folder}/test.bin": cifar_bin_bytes(test_x, test_y, coarse_test)}
  return {
      f"{folder}/train": cifar_py_bytes(train_x, train_y, b"fine_labels",
                                        {b"coarse_labels": [int(v) for v in coarse_train]}),
      f"{folder}/test": cifar_py_bytes(test_x, test_y, b"fine_labels",
                                       {b"coarse_labels": [int(v) for v in coarse_test]}),
      f"{folder}/meta": py2_pickle({b"fine_label_names": [b"apple"] * 100}),
  }


def write_files(root, files: dict[str, bytes]):
  for rel, content in files.items():
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(content)


def write_tar_gz(path, files: dict[str, bytes]):
  with tarfile.open(path, "w:gz") as tar:
    for rel, content in files.items():
      info = tarfile.TarInfo(rel)
      info.size = len(content)
      tar.addfile(info, io.BytesIO(content))


ARCHIVES = {("cifar10", "bin"): "cifar-10-binary.tar.gz", ("cifar10", "py"): "cifar-10-python.tar.gz",
            ("cifar100", "bin"): "cifar-100-binary.tar.gz",
            ("cifar100", "py"): "cifar-100-python.tar.gz"}


def assert_dataset_equals(ds, name, train_x, train_y, test_x, test_y):
  assert ds.name == name
  assert ds.train_images.dtype == np.uint8 and ds.test_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
  np.testing.assert_array_equal(ds.train_images, train_x)
  np.testing.assert_array_equal(ds.train_labels, train_y)
  np.testing.assert_array_equal(ds.test_images, test_x)
  np.testing.assert_array_equal(ds.test_labels, test_y)
  assert ds.num_classes == data.DATASETS[name].num_classes


# ----------------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST IDX.


def make_mnist(rng, n_train=7, n_test=3):
  train_x = random_images(rng, n_train, (28, 28))
  test_x = random_images(rng, n_test, (28, 28))
  train_x[0, 1, 2], train_x[0, 2, 1] = 200, 100  # row 1, column 2 vs its transpose
  return train_x, rng.integers(0, 10, n_train), test_x, rng.integers(0, 10, n_test)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("subdir", ["mnist", ""], ids=["subdir", "top"])
def test_idx_files_read_back_pixel_exact(tmp_path, gz, subdir):
  train_x, train_y, test_x, test_y = make_mnist(np.random.default_rng(0))
  write_idx_set(tmp_path / subdir, train_x, train_y, test_x, test_y, gz=gz)
  ds = data.load("mnist", tmp_path, source="local")
  assert_dataset_equals(ds, "mnist", train_x[..., None], train_y, test_x[..., None], test_y)
  assert ds.train_images.shape == (7, 28, 28, 1)
  assert ds.train_images[0, 1, 2, 0] == 200 and ds.train_images[0, 2, 1, 0] == 100
  assert ds.source == str(tmp_path / subdir)
  assert data.load("mnist", tmp_path, source="auto").source == ds.source  # auto prefers local files


def test_mnist_and_fmnist_read_their_own_folders(tmp_path):
  rng = np.random.default_rng(1)
  mnist, fmnist = make_mnist(rng), make_mnist(rng, 5, 4)
  write_idx_set(tmp_path / "mnist", *mnist)
  write_idx_set(tmp_path / "fashion-mnist", *fmnist)
  np.testing.assert_array_equal(data.load("mnist", tmp_path).train_images[..., 0], mnist[0])
  ds = data.load("fmnist", tmp_path)
  assert_dataset_equals(ds, "fmnist", fmnist[0][..., None], fmnist[1], fmnist[2][..., None], fmnist[3])


def test_max_train_and_max_test_take_the_first_examples(tmp_path):
  train_x, train_y, test_x, test_y = make_mnist(np.random.default_rng(2))
  write_idx_set(tmp_path, train_x, train_y, test_x, test_y)
  ds = data.load("mnist", tmp_path, max_train=4, max_test=2)
  assert_dataset_equals(ds, "mnist", train_x[:4, ..., None], train_y[:4], test_x[:2, ..., None],
                        test_y[:2])
  assert data.load("mnist", tmp_path, max_train=100).num_train == 7  # more than there is: all


# ----------------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100, binary and python versions, folders and .tar.gz archives.


def _cifar_case(name, seed=3):
  rng = np.random.default_rng(seed)
  num_classes = data.DATASETS[name].num_classes
  train_x, train_y, test_x, test_y = make_cifar(rng, num_classes, 5, 2, 3)
  coarse = (rng.integers(0, 20, len(train_y)), rng.integers(0, 20, len(test_y)))
  return (train_x, train_y, test_x, test_y), coarse


@pytest.mark.parametrize("archive", [False, True], ids=["folder", "tar.gz"])
@pytest.mark.parametrize("fmt", ["bin", "py"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_files_read_back_pixel_exact(tmp_path, name, fmt, archive):
  arrays, coarse = _cifar_case(name)
  files = cifar_files(name, fmt, *arrays, *coarse)
  if archive:
    write_tar_gz(tmp_path / ARCHIVES[name, fmt], files)
  else:
    write_files(tmp_path, files)
  ds = data.load(name, tmp_path, source="local")
  assert_dataset_equals(ds, name, *arrays)  # for CIFAR-100: the fine labels, not the coarse ones
  np.testing.assert_array_equal(ds.train_images[0, 1, 2], [11, 22, 33])  # NHWC, channels R, G, B
  assert ds.source.endswith(ARCHIVES[name, fmt] if archive else next(iter(files)).split("/")[0])
  if archive:
    assert sorted(p.name for p in tmp_path.iterdir()) == [ARCHIVES[name, fmt]]  # nothing extracted


def test_cifar_archive_members_with_dot_slash_prefix(tmp_path):
  arrays, _ = _cifar_case("cifar10")
  files = cifar_files("cifar10", "bin", *arrays)
  write_tar_gz(tmp_path / "cifar-10-binary.tar.gz", {f"./{k}": v for k, v in files.items()})
  assert_dataset_equals(data.load("cifar10", tmp_path), "cifar10", *arrays)


def test_cifar_python_pickle_as_written_by_python2_is_what_we_parse():
  """The test writer really produces Python-2 style pickles (byte strings, numpy.core name)."""
  raw = cifar_py_bytes(np.zeros((1, 32, 32, 3), np.uint8), [3])
  assert raw.startswith(b"\x80\x02}q\x00(U\x0bbatch_label")
  assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"_codecs" not in raw
  loaded = pickle.loads(raw, encoding="bytes")  # how the CIFAR page says to read them
  assert loaded[b"labels"] == [3] and loaded[b"data"].dtype == np.uint8


def test_cifar_python_pickle_with_str_keys_from_python3(tmp_path):
  arrays, _ = _cifar_case("cifar10")
  train_x, train_y, test_x, test_y = arrays
  folder = tmp_path / "cifar-10-batches-py"
  folder.mkdir()

  def dump(x, y):
    flat = np.stack([np.frombuffer(cifar_record_pixels(im), np.uint8) for im in x])
    return pickle.dumps({"data": flat, "labels": [int(v) for v in y]}, protocol=4)

  for i in range(5):
    (folder / f"data_batch_{i + 1}").write_bytes(dump(train_x[2 * i:2 * i + 2], train_y[2 * i:2 * i + 2]))
  (folder / "test_batch").write_bytes(dump(test_x, test_y))
  assert b"numpy._core.multiarray" in (folder / "test_batch").read_bytes()
  assert_dataset_equals(data.load("cifar10", tmp_path), "cifar10", *arrays)


def _evil_pickle(module: str, name: str, arg: str) -> bytes:
  """Protocol-2 pickle that calls module.name(arg) when loaded by the standard unpickler."""
  return (b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X" + struct.pack("<I", len(arg))
          + arg.encode() + b"\x85R.")


@pytest.mark.parametrize("where", ["top", "inside_dict"])
def test_malicious_cifar_pickle_is_refused_and_nothing_runs(tmp_path, where):
  marker = tmp_path / "pwned"
  evil = _evil_pickle(os.system.__module__, "system", f"touch {marker}")
  pickle.loads(evil)  # positive control: the payload is live with the standard unpickler
  assert marker.exists()
  marker.unlink()
  arrays, _ = _cifar_case("cifar10")
  files = cifar_files("cifar10", "py", *arrays)
  if where == "top":
    files["cifar-10-batches-py/data_batch_3"] = evil
  else:  # a valid-looking batch whose labels entry carries the payload
    good = files["cifar-10-batches-py/data_batch_3"]
    assert good.endswith(b"u.")
    files["cifar-10-batches-py/data_batch_3"] = (
        good[:-2] + b"U\x04evil" + evil[2:-1] + b"u.")
    pickle.loads(files["cifar-10-batches-py/data_batch_3"], encoding="bytes")
    assert marker.exists()
    marker.unlink()
  write_files(tmp_path, files)
  with pytest.raises(ValueError, match=r"data_batch_3.*refusing to load global posix\.system"):
    data.load("cifar10", tmp_path, source="local")
  assert not marker.exists()


@pytest.mark.parametrize("module,name", [("builtins", "eval"), ("numpy", "load"),
                                         ("numpy.testing._private.utils", "runstring"),
                                         ("_codecs", "encode")])
def test_restricted_unpickler_refuses_other_globals(tmp_path, module, name):
  files = cifar_files("cifar10", "py", *_cifar_case("cifar10")[0])
  files["cifar-10-batches-py/test_batch"] = _evil_pickle(module, name, "1")
  write_files(tmp_path, files)
  with pytest.raises(ValueError, match=f"test_batch.*refusing to load global {module}.{name}"):
    data.load("cifar10", tmp_path)


# ----------------------------------------------------------------------------------------------------
# SVHN .mat.


def write_svhn(folder, rng, n_train=6, n_test=4):
  """MATLAB files as distributed: X is (32, 32, 3, N) uint8, y is (N, 1) with 10 for the digit 0."""
  folder.mkdir(parents=True, exist_ok=True)
  out = []
  for fname, n in (("train_32x32.mat", n_train), ("test_32x32.mat", n_test)):
    images = random_images(rng, n, (32, 32, 3))
    digits = rng.integers(0, 10, n)
    digits[:2] = (0, 9)
    images[0, 1, 2] = (11, 22, 33)
    x = np.ascontiguousarray(images.transpose(1, 2, 3, 0))  # HxWxCxN
    y = np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]
    scipy.io.savemat(folder / fname, {"X": x, "y": y})
    out += [images, digits]
  return out


def test_svhn_mat_files_read_back_with_label_10_as_digit_0(tmp_path):
  arrays = write_svhn(tmp_path / "svhn", np.random.default_rng(4))
  assert 10 in scipy.io.loadmat(tmp_path / "svhn" / "train_32x32.mat")["y"]
  ds = data.load("svhn", tmp_path, source="local")
  assert_dataset_equals(ds, "svhn", *arrays)
  assert ds.train_labels[0] == 0 and ds.train_labels[1] == 9
  np.testing.assert_array_equal(ds.train_images[0, 1, 2], [11, 22, 33])


# ----------------------------------------------------------------------------------------------------
# Corrupt, truncated, missing files; bad arguments.


def _truncate(path, keep):
  raw = path.read_bytes()
  path.write_bytes(raw[:keep if keep >= 0 else len(raw) + keep])


def test_corrupt_idx_files_raise_value_error_naming_the_file(tmp_path):
  train_x, train_y, test_x, test_y = make_mnist(np.random.default_rng(5))
  cases = {  # (writer kwargs, how to damage, expected message)
      "truncated_raw": (dict(gz=False), lambda d: _truncate(d / "train-images-idx3-ubyte", -1),
                        r"train-images-idx3-ubyte: 5503 bytes.*truncated"),
      "extra_byte_raw": (dict(gz=False), lambda d: (d / "t10k-labels-idx1-ubyte").write_bytes(
          idx_bytes(test_y) + b"\x00"), r"t10k-labels-idx1-ubyte: 12 bytes, but .* need 11"),
      "truncated_gz": (dict(gz=True), lambda d: _truncate(d / "t10k-images-idx3-ubyte.gz", 100),
                       r"t10k-images-idx3-ubyte\.gz: corrupt or truncated gzip"),
      "wrong_magic": (dict(gz=False), lambda d: (d / "train-labels-idx1-ubyte").write_bytes(
          idx_bytes(np.zeros((7, 1), np.uint8))), r"train-labels-idx1-ubyte: IDX magic number 2050"),
  }
  for case, (kwargs, damage, message) in cases.items():
    folder = tmp_path / case
    write_idx_set(folder, train_x, train_y, test_x, test_y, **kwargs)
    damage(folder)
    with pytest.raises(ValueError, match=message):
      data.load("mnist", folder, source="local")


def test_an_idx_gzip_bomb_is_refused_without_unpacking_it(tmp_path):
  train_x, train_y, test_x, test_y = make_mnist(np.random.default_rng(5))
  write_idx_set(tmp_path, train_x, train_y, test_x, test_y)
  bomb = idx_bytes(test_x) + bytes(24 << 20)  # the header claims 3 images, 24 MiB follow
  (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(bomb, compresslevel=9))
  assert (tmp_path / "t10k-images-idx3-ubyte.gz").stat().st_size < 200_000
  tracemalloc.start()
  try:
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz: more than 2368 bytes, but the "
                                         r"header's dimensions \(3, 28, 28\) need 2368"):
      data.load("mnist", tmp_path, source="local")
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  assert peak < 4 << 20, peak  # far below the 24 MiB a full decompression holds


def test_idx_label_out_of_range_and_count_mismatch(tmp_path):
  train_x, train_y, test_x, test_y = make_mnist(np.random.default_rng(6))
  bad_y = train_y.copy()
  bad_y[3] = 10
  write_idx_set(tmp_path / "a", train_x, bad_y, test_x, test_y)
  with pytest.raises(ValueError, match=r"label 10 is outside \[0, 9\]"):
    data.load("mnist", tmp_path / "a")
  write_idx_set(tmp_path / "b", train_x, train_y[:6], test_x, test_y)
  with pytest.raises(ValueError, match="7 images but 6 labels"):
    data.load("mnist", tmp_path / "b")


def test_corrupt_cifar_and_svhn_files_raise_value_error_naming_the_file(tmp_path):
  arrays, coarse = _cifar_case("cifar100")
  bin_files = cifar_files("cifar10", "bin", *_cifar_case("cifar10")[0])
  py_files = cifar_files("cifar10", "py", *_cifar_case("cifar10")[0])

  def expect(name, root, message):
    with pytest.raises(ValueError, match=message):
      data.load(name, root, source="local")

  root = tmp_path / "bin_truncated"
  write_files(root, bin_files)
  _truncate(root / "cifar-10-batches-bin/data_batch_2.bin", -5)
  expect("cifar10", root, r"data_batch_2\.bin: 6141 bytes is not a positive multiple of the 3073")

  root = tmp_path / "bin100_coarse"
  bad_coarse = coarse[0].copy()
  bad_coarse[1] = 20
  write_files(root, cifar_files("cifar100", "bin", *arrays, bad_coarse, coarse[1]))
  expect("cifar100", root, r"train\.bin \(coarse labels\): label 20")

  root = tmp_path / "py_truncated"
  write_files(root, py_files)
  _truncate(root / "cifar-10-batches-py/test_batch", 200)
  expect("cifar10", root, r"test_batch: not a valid CIFAR python pickle")

  root = tmp_path / "py_no_labels"
  write_files(root, py_files)
  flat = np.zeros((2, 3072), np.uint8)
  (root / "cifar-10-batches-py/data_batch_1").write_bytes(py2_pickle({b"data": flat}))
  expect("cifar10", root, r"data_batch_1: no 'labels' entry")

  root = tmp_path / "py_wrong_dtype"
  write_files(root, py_files)
  (root / "cifar-10-batches-py/data_batch_1").write_bytes(
      py2_pickle({b"data": flat.astype(np.float32), b"labels": [0, 1]}))
  expect("cifar10", root, r"data_batch_1: 'data' must be a uint8 array")

  root = tmp_path / "tar_truncated"
  root.mkdir()
  write_tar_gz(root / "cifar-10-binary.tar.gz", bin_files)
  _truncate(root / "cifar-10-binary.tar.gz", 1000)
  expect("cifar10", root, r"cifar-10-binary\.tar\.gz: corrupt or truncated archive")

  root = tmp_path / "tar_missing_member"
  root.mkdir()
  write_tar_gz(root / "cifar-10-binary.tar.gz",
               {k: v for k, v in bin_files.items() if not k.endswith("test_batch.bin")})
  expect("cifar10", root, r"cifar-10-binary\.tar\.gz: archive lacks cifar-10-batches-bin/test_batch\.bin")

  root = tmp_path / "tar_bomb"  # a member whose header claims 1 GiB: refused before it is unpacked
  root.mkdir()
  info = tarfile.TarInfo("cifar-10-batches-bin/data_batch_1.bin")
  info.size = 1 << 30
  (root / "cifar-10-binary.tar.gz").write_bytes(gzip.compress(info.tobuf() + bytes(1 << 16)))
  expect("cifar10", root, r"cifar-10-binary\.tar\.gz: cifar-10-batches-bin/data_batch_1\.bin claims "
         r"1073741824 bytes, more than any CIFAR file")

  root = tmp_path / "svhn_garbage"
  write_svhn(root, np.random.default_rng(7))
  (root / "test_32x32.mat").write_bytes(b"not a matlab file at all" * 10)
  expect("svhn", root, r"test_32x32\.mat: not a readable MATLAB file")

  root = tmp_path / "svhn_label0"
  write_svhn(root, np.random.default_rng(8))
  mat = scipy.io.loadmat(root / "train_32x32.mat")
  mat["y"][2, 0] = 0
  scipy.io.savemat(root / "train_32x32.mat", {"X": mat["X"], "y": mat["y"]})
  expect("svhn", root, r"train_32x32\.mat: label 0 is outside \[1, 10\]")


def _cifar_py_with_labels(root, name, labels):
  """The official python layout of ``name`` with ``labels`` as data_batch_1's (or train's) labels."""
  arrays, coarse = _cifar_case(name)
  files = cifar_files(name, "py", *arrays, *coarse)
  key, member = ((b"labels", "cifar-10-batches-py/data_batch_1") if name == "cifar10"
                 else (b"fine_labels", "cifar-100-python/train"))
  n = len(labels)
  files[member] = cifar_py_bytes(arrays[0][:n], [0] * n, key)
  d = pickle.loads(files[member], encoding="bytes")
  d[key] = labels
  files[member] = py2_pickle(d)
  write_files(root, files)
  return member


def _svhn_with_labels(root, y):
  write_svhn(root, np.random.default_rng(9))
  mat = scipy.io.loadmat(root / "train_32x32.mat")
  x = mat["X"][..., :len(y)]
  scipy.io.savemat(root / "train_32x32.mat", {"X": x, "y": np.asarray(y, np.float64)[:, None]})
  return "train_32x32.mat"


@pytest.mark.parametrize("name,labels,message", [
    ("cifar10", [0, 3.9], r"label 3\.9 is not an integer"),
    ("cifar10", [0, "7"], r"labels must be integers, got \S+ values such as"),
    ("cifar10", [0, b"7"], r"labels must be integers, got \S+ values such as"),
    ("cifar100", [1.7, 2], r"label 1\.7 is not an integer"),
    ("svhn", [1.7, 2.0], r"label 1\.7 is not an integer"),
    ("svhn", [np.nan, 2.0], r"label nan is not an integer"),
], ids=["cifar_3.9", "cifar_str7", "cifar_bytes7", "cifar100_1.7", "svhn_1.7", "svhn_nan"])
def test_labels_that_are_not_class_indices_are_refused_naming_the_file(tmp_path, name, labels, message):
  if name == "svhn":
    member = _svhn_with_labels(tmp_path, labels)
  else:
    member = _cifar_py_with_labels(tmp_path, name, labels)
  with pytest.raises(ValueError, match=message) as info:
    data.load(name, tmp_path, source="local")
  assert member in str(info.value) and "\n" not in str(info.value)


def test_the_embedded_sample_with_fractional_labels_is_refused_naming_the_file(tmp_path, monkeypatch):
  images = np.zeros((2, 28, 28, 1), np.uint8)
  np.savez(tmp_path / "mnist_sample.npz", train_images=images, train_labels=np.array([1.0, 2.5]),
           test_images=images, test_labels=np.array([1, 2]))
  monkeypatch.setattr(data.importlib.resources, "files", lambda package: tmp_path)
  with pytest.raises(ValueError, match=r"mnist_sample\.npz \(train_labels\): label 2\.5 is not an int"):
    data.load("mnist", source="embedded")


@pytest.mark.parametrize("name,expected", [
    ("mnist", "train-images-idx3-ubyte.gz"), ("fmnist", "t10k-labels-idx1-ubyte.gz"),
    ("cifar10", "cifar-10-batches-py/{data_batch_1"), ("cifar100", "cifar-100-python.tar.gz"),
    ("svhn", "train_32x32.mat, test_32x32.mat")])
def test_missing_files_give_one_clear_file_not_found_error(tmp_path, name, expected):
  with pytest.raises(FileNotFoundError) as info:
    data.load(name, tmp_path, source="local")
  message = str(info.value)
  assert f"no local copy of {name!r}" in message and expected in message
  assert f"Looked in: {tmp_path / data.DATASETS[name].subdirs[0]}" in message
  assert f", {tmp_path}\n" in message


def test_incomplete_folder_names_the_missing_file(tmp_path):
  files = cifar_files("cifar10", "bin", *_cifar_case("cifar10")[0])
  write_files(tmp_path, {k: v for k, v in files.items() if "data_batch_4" not in k})
  with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-bin lacks data_batch_4\.bin"):
    data.load("cifar10", tmp_path, source="local")
  write_svhn(tmp_path / "svhn", np.random.default_rng(9))
  (tmp_path / "svhn" / "test_32x32.mat").unlink()
  with pytest.raises(FileNotFoundError, match=r"svhn lacks test_32x32\.mat"):
    data.load("svhn", tmp_path, source="local")


def test_bad_arguments_raise_value_error(tmp_path):
  with pytest.raises(ValueError, match="unknown dataset 'cifar1'; valid names: mnist, fmnist, "
                                       "cifar10, cifar100, svhn"):
    data.load("cifar1", tmp_path)
  with pytest.raises(ValueError, match="unknown source 'web'"):
    data.load("mnist", tmp_path, source="web")
  with pytest.raises(ValueError, match="only for 'mnist'"):
    data.load("cifar10", source="embedded")
  for bad in (0, -3, 2.5, True):
    with pytest.raises(ValueError, match="max_train must be a positive integer"):
      data.load("mnist", source="embedded", max_train=bad)
  with pytest.raises(ValueError, match="uint8 NHWC"):
    data.Dataset("x", np.zeros((2, 4, 4), np.uint8), np.zeros(2, np.int32),
                 np.zeros((1, 4, 4, 1), np.uint8), np.zeros(1, np.int32), 10, "test")


# ----------------------------------------------------------------------------------------------------
# TFDS glue (with a stand-in module: TFDS itself needs TensorFlow and a network here).


@pytest.fixture
def fake_tfds(monkeypatch):
  calls = []
  rng = np.random.default_rng(10)
  splits = {"train": (random_images(rng, 8, (32, 32, 3)), rng.integers(0, 10, 8)),
            "test": (random_images(rng, 5, (32, 32, 3)), rng.integers(0, 10, 5))}
  module = types.ModuleType("tensorflow_datasets")

  def load(name, *, split, batch_size, as_supervised, **kwargs):
    calls.append(dict(name=name, split=split, batch_size=batch_size, as_supervised=as_supervised,
                      **kwargs))
    if module.fail:
      raise ConnectionError("no network")
    out = []
    for s in split:
      base, _, rest = s.partition("[:")
      n = int(rest[:-1]) if rest else None
      out.append((splits[base][0][:n], splits[base][1][:n].astype(np.int64)))
    return out

  module.load, module.as_numpy, module.fail = load, lambda x: x, False
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", module)
  monkeypatch.setattr(data, "_tensorflow_available", lambda: True)
  return module, calls, splits


def test_tfds_source_maps_names_and_slices_splits(fake_tfds):
  _, calls, splits = fake_tfds
  ds = data.load("svhn", source="tfds", max_train=3)
  assert calls == [dict(name="svhn_cropped", split=["train[:3]", "test"], batch_size=-1,
                        as_supervised=True)]
  assert_dataset_equals(ds, "svhn", splits["train"][0][:3], splits["train"][1][:3], *splits["test"])
  assert ds.source == "tfds"


def test_auto_falls_back_to_tfds_and_reports_both_failures(tmp_path, fake_tfds):
  module, calls, _ = fake_tfds
  assert data.load("svhn", tmp_path, source="auto").source == "tfds"
  module.fail = True
  with pytest.raises(FileNotFoundError, match=r"(?s)no local copy of 'svhn'.*train_32x32\.mat.*"
                                              r"TFDS fallback failed too: .*ConnectionError"):
    data.load("svhn", tmp_path, source="auto")
  with pytest.raises(RuntimeError, match="TFDS could not load 'svhn_cropped'"):
    data.load("svhn", tmp_path, source="tfds")
  assert len(calls) == 3


def test_tfds_without_tensorflow_fails_fast_with_reason(tmp_path, monkeypatch):
  monkeypatch.setattr(data, "_tensorflow_available", lambda: False)
  with pytest.raises(FileNotFoundError, match="TensorFlow is not installed"):
    data.load("cifar100", tmp_path)


def test_default_data_dir(monkeypatch, tmp_path):
  monkeypatch.setenv("ENQUANT_DATA_DIR", str(tmp_path))
  assert data.default_data_dir() == tmp_path
  monkeypatch.delenv("ENQUANT_DATA_DIR")
  sibling = tmp_path / "shared" / "data"
  sibling.mkdir(parents=True)
  monkeypatch.setattr(data, "_SIBLING_DATA_DIR", sibling)
  assert data.default_data_dir() == sibling
  monkeypatch.setattr(data, "_SIBLING_DATA_DIR", tmp_path / "absent")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert data.default_data_dir() == tmp_path / "home" / ".enquant" / "data"


def test_sibling_data_dir_is_the_shared_folder_beside_the_repo():
  repo = os.path.dirname(os.path.dirname(os.path.abspath(data.__file__)))
  assert data._SIBLING_DATA_DIR == type(data._SIBLING_DATA_DIR)(repo).parent / "shared" / "data"


# ----------------------------------------------------------------------------------------------------
# Real MNIST / Fashion-MNIST and the embedded sample.

MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
# md5 of the decompressed official files (../shared/data/README.md): header + pixels / labels.
DECOMPRESSED_MD5 = {
    "mnist": ("6bbc9ace898e44ae57da46a324031adb", "a25bea736e30d166cdddb491f175f624",
              "2646ac647ad5339dbf082846283269ea", "27ae3e4e09519cfbb04c329615203637"),
    "fmnist": ("f4a8712d7a061bf5bd6d2ca38dc4d50a", "9018921c3c673c538a1fc5bad174d6f9",
               "8181f5470baa50b63fa0f6fddb340f0a", "15d484375f8d13e6eb1aabb0c3f46965"),
}


@pytest.fixture(scope="module")
def real_mnist(shared_data_dir):
  return data.load("mnist", shared_data_dir, source="local")


def _assert_official_bytes(ds):
  """Re-serialises the loaded arrays as IDX and compares with the official files' md5."""
  arrays = (ds.train_images[..., 0], ds.train_labels, ds.test_images[..., 0], ds.test_labels)
  got = tuple(hashlib.md5(idx_bytes(a)).hexdigest() for a in arrays)
  assert got == DECOMPRESSED_MD5[ds.name]


def test_real_mnist_has_the_known_class_counts(real_mnist, shared_data_dir):
  ds = real_mnist
  assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
  assert data.class_counts(ds.train_labels, 10).tolist() == MNIST_TRAIN_COUNTS
  assert data.class_counts(ds.test_labels, 10).tolist() == MNIST_TEST_COUNTS
  assert ds.train_labels[:5].tolist() == [5, 0, 4, 1, 9]
  assert ds.source == str(shared_data_dir / "mnist")
  _assert_official_bytes(ds)


def test_real_fashion_mnist_is_balanced(shared_data_dir):
  if not (shared_data_dir / "fashion-mnist").is_dir():
    pytest.skip(f"Fashion-MNIST not found in {shared_data_dir}")
  ds = data.load("fmnist", shared_data_dir, source="local")
  assert data.class_counts(ds.train_labels, 10).tolist() == [6000] * 10
  assert data.class_counts(ds.test_labels, 10).tolist() == [1000] * 10
  assert ds.train_labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
  _assert_official_bytes(ds)


def _embedded_npz_path():
  return os.path.join(os.path.dirname(data.__file__), "assets", "mnist_sample.npz")


def test_embedded_sample_loads_class_balanced():
  ds = data.load("mnist", source="embedded")
  assert ds.source == "embedded" and ds.num_classes == 10
  assert ds.train_images.shape == (5000, 28, 28, 1) and ds.test_images.shape == (1000, 28, 28, 1)
  assert data.class_counts(ds.train_labels, 10).tolist() == [500] * 10
  assert data.class_counts(ds.test_labels, 10).tolist() == [100] * 10
  assert 0 < ds.train_images.mean() < 255  # real digits, not blank
  assert os.path.getsize(_embedded_npz_path()) < 2.5e6
  small = data.load("mnist", source="embedded", max_train=10, max_test=5)
  np.testing.assert_array_equal(small.train_images, ds.train_images[:10])
  assert small.num_test == 5


def test_embedded_sample_equals_the_first_real_images_of_each_class(real_mnist):
  sample = data.load("mnist", source="embedded")
  with np.load(_embedded_npz_path()) as npz:
    train_idx, test_idx = npz["train_indices"], npz["test_indices"]
    provenance = json.loads(str(npz["provenance"]))
  for split, idx, per_class in (("train", train_idx, 500), ("test", test_idx, 100)):
    labels = getattr(real_mnist, f"{split}_labels")
    expected = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_array_equal(getattr(sample, f"{split}_images"),
                                  getattr(real_mnist, f"{split}_images")[idx])
    np.testing.assert_array_equal(getattr(sample, f"{split}_labels"), labels[idx])
  assert provenance["source_files_md5"]["train-images-idx3-ubyte.gz"] == \
      "f68b3c2dcbeaaa9fbdd348bbdeb94873"


# ----------------------------------------------------------------------------------------------------
# to_float, crop_flip, augment.


def test_to_float_divides_by_255_exactly():
  x = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  y = data.to_float(x)
  assert isinstance(y, jax.Array) and y.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(y), x.astype(np.float32) / np.float32(255))
  assert float(y.min()) == 0.0 and float(y.max()) == 1.0
  with pytest.raises(ValueError, match="expects uint8 images, got dtype float32"):
    data.to_float(np.zeros((1, 2, 2, 1), np.float32))


def np_crop_flip(image, dy, dx, flip, pad=4):
  h, w, _ = image.shape
  padded = np.zeros((h + 2 * pad, w + 2 * pad, image.shape[2]), image.dtype)
  padded[pad:pad + h, pad:pad + w] = image
  out = padded[dy:dy + h, dx:dx + w]
  return out[:, ::-1] if flip else out


def all_crops(image, pad=4):
  """Every (dy, dx, flip) candidate of np_crop_flip, stacked: (2 * (2 pad + 1)^2, H, W, C)."""
  combos = [(dy, dx, f) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1) for f in (0, 1)]
  return combos, np.stack([np_crop_flip(image, *c, pad=pad) for c in combos])


def test_crop_flip_matches_numpy_reference_for_every_offset():
  image = np.random.default_rng(11).integers(1, 256, (32, 32, 3), dtype=np.uint8)
  combos, expected = all_crops(image)
  dy, dx, fl = (np.array(v) for v in zip(*combos))
  got = jax.jit(jax.vmap(data.crop_flip, in_axes=(None, 0, 0, 0)))(image, dy, dx, fl.astype(bool))
  np.testing.assert_array_equal(np.asarray(got), expected)
  np.testing.assert_array_equal(np.asarray(data.crop_flip(image, 4, 4, False)), image)  # identity
  assert np.asarray(data.crop_flip(image, 0, 8, True))[0, 0].tolist() == [0, 0, 0]  # zero padding


@pytest.fixture(scope="module")
def cifar_batch():
  return np.random.default_rng(12).integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def augmented(cifar_batch):
  return np.asarray(data.augment(jax.random.key(0), cifar_batch))


def _match(out_image, image):
  combos, candidates = all_crops(image)
  hits = np.flatnonzero((candidates == out_image[None]).all(axis=(1, 2, 3)))
  return [combos[h] for h in hits]


def test_augment_outputs_are_crops_of_the_padded_input(cifar_batch, augmented):
  assert augmented.shape == cifar_batch.shape and augmented.dtype == np.uint8
  found = []
  for out_image, image in zip(augmented, cifar_batch):
    hits = _match(out_image, image)
    assert len(hits) == 1, hits  # random content: exactly one (dy, dx, flip) reproduces it
    found.append(hits[0])
  dy, dx, flips = (np.array(v) for v in zip(*found))
  assert {0, 8} <= set(dy.tolist()) and {0, 8} <= set(dx.tolist())  # full offset range in use
  assert len(set(zip(dy.tolist(), dx.tolist()))) > 60  # of 81 offsets, with 256 draws
  assert 0.35 < flips.mean() < 0.65


def test_augment_is_reproducible_per_key_and_differs_across_keys(cifar_batch, augmented):
  np.testing.assert_array_equal(np.asarray(data.augment(jax.random.key(0), cifar_batch)), augmented)
  other = np.asarray(data.augment(jax.random.key(1), cifar_batch))
  assert (other != augmented).any(axis=(1, 2, 3)).mean() > 0.9


def test_augment_without_flip_keeps_float_dtype_and_orientation():
  images = np.random.default_rng(13).random((16, 28, 28, 1), dtype=np.float32) + 0.5
  out = np.asarray(data.augment(jax.random.key(2), images, flip=False))
  assert out.dtype == np.float32 and out.shape == images.shape
  for o, image in zip(out, images):
    hits = _match(o, image)
    assert hits and all(f == 0 for _, _, f in hits)
  with pytest.raises(ValueError, match="NHWC"):
    data.augment(jax.random.key(0), images[0])


# ----------------------------------------------------------------------------------------------------
# epoch_batches, class_counts.


def test_epoch_batches_is_deterministic_per_seed_and_epoch():
  b = data.epoch_batches(100, 16, seed=7, epoch=3)
  assert b.shape == (6, 16)
  np.testing.assert_array_equal(b, data.epoch_batches(100, 16, seed=7, epoch=3))
  np.testing.assert_array_equal(  # the documented contract: numpy's Generator seeded with (seed, epoch)
      b.reshape(-1), np.random.default_rng((7, 3)).permutation(100)[:96])
  assert len(set(b.reshape(-1).tolist())) == 96 and b.min() >= 0 and b.max() < 100
  assert not np.array_equal(b, data.epoch_batches(100, 16, seed=7, epoch=4))
  assert not np.array_equal(b, data.epoch_batches(100, 16, seed=8, epoch=3))
  np.testing.assert_array_equal(data.epoch_batches(10, 5, seed=0, epoch=0, shuffle=False),
                                np.arange(10).reshape(2, 5))


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(n=st.integers(1, 300), b=st.integers(1, 300), seed=st.integers(0, 2**32),
                  epoch=st.integers(0, 1000), drop=st.booleans())
def test_epoch_batches_is_a_permutation_without_repeats(n, b, seed, epoch, drop):
  hypothesis.assume(b <= n)
  batches = data.epoch_batches(n, b, seed=seed, epoch=epoch, drop_remainder=drop)
  flat = batches.reshape(-1)
  assert batches.shape[1] == b
  if drop:
    assert batches.shape[0] == n // b
    assert len(np.unique(flat)) == flat.size and flat.min() >= 0 and flat.max() < n
  else:
    assert batches.shape[0] == -(-n // b)
    assert sorted(flat[flat >= 0].tolist()) == list(range(n))  # every example exactly once
    assert (flat[n:] == -1).all()


def test_epoch_batches_rejects_bad_sizes():
  with pytest.raises(ValueError, match="batch_size 11 is larger than the 10 examples"):
    data.epoch_batches(10, 11, seed=0, epoch=0)
  for kwargs in (dict(batch_size=0), dict(seed=-1), dict(epoch=-2), dict(batch_size=2.0)):
    args = dict(batch_size=2, seed=0, epoch=0) | kwargs
    with pytest.raises(ValueError):
      data.epoch_batches(10, args.pop("batch_size"), **args)


def test_class_counts_matches_brute_force():
  labels = np.random.default_rng(14).integers(0, 7, 500)
  expected = [sum(1 for v in labels if v == c) for c in range(9)]
  assert data.class_counts(labels, 9).tolist() == expected
  with pytest.raises(ValueError, match=r"label 9 is outside \[0, 8\]"):
    data.class_counts(np.array([0, 9]), 9)
