"""Builds enquant/assets/mnist_sample.npz: a small, class-balanced sample of the real MNIST.

The sample holds the FIRST 500 images of each class of the official train split (5000 images) and the
first 100 of each class of the official test split (1000 images), kept in file order, with their
indices into the official files. The source files are checked against the official MD5 values before
anything is written, and the output is byte-reproducible (fixed zip timestamps), so running the script
again gives the identical file.

Usage (from the repository root; the default data folder is enquant.data.default_data_dir(), i.e.
``$ENQUANT_DATA_DIR`` or ``../shared/data`` beside the checkout):

  python scripts/make_mnist_sample.py [--data_dir ../shared/data] [--out enquant/assets/mnist_sample.npz]
"""

import argparse
import hashlib
import io
import json
import pathlib
import sys
import zipfile

import numpy as np

from enquant import data

TRAIN_PER_CLASS = 500
TEST_PER_CLASS = 100
# Official MD5s of the gzip-compressed IDX files (yann.lecun.com; the values torchvision checks).
OFFICIAL_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
_REPO = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = _REPO / "enquant" / "assets" / "mnist_sample.npz"


def first_per_class(labels: np.ndarray, per_class: int, num_classes: int = 10) -> np.ndarray:
  """Indices of the first `per_class` examples of every class, in increasing (file) order."""
  picked = [np.flatnonzero(labels == c)[:per_class] for c in range(num_classes)]
  for c, p in enumerate(picked):
    if p.size < per_class:
      raise ValueError(f"class {c} has only {p.size} examples, need {per_class}")
  return np.sort(np.concatenate(picked))


def write_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  """np.savez_compressed-compatible file with fixed timestamps (byte-reproducible)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(path, "w") as zf:
    for key, value in arrays.items():
      buf = io.BytesIO()
      np.lib.format.write_array(buf, np.asarray(value), allow_pickle=False)
      info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
      zf.writestr(info, buf.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data_dir", type=pathlib.Path, default=None,
                      help="folder holding mnist/ (default: enquant.data.default_data_dir())")
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
  args = parser.parse_args(argv)
  data_dir = args.data_dir if args.data_dir is not None else data.default_data_dir()

  ds = data.load("mnist", data_dir, source="local")
  folder = pathlib.Path(ds.source)
  md5 = {}
  for name, official in OFFICIAL_MD5.items():
    path = folder / name
    if not path.is_file():
      raise FileNotFoundError(f"{path} not found: the sample is made from the official .gz files")
    md5[name] = hashlib.md5(path.read_bytes()).hexdigest()
    if md5[name] != official:
      raise ValueError(f"{path}: md5 {md5[name]} differs from the official {official}")

  train_idx = first_per_class(ds.train_labels, TRAIN_PER_CLASS)
  test_idx = first_per_class(ds.test_labels, TEST_PER_CLASS)
  provenance = json.dumps({
      "dataset": "MNIST (LeCun, Cortes, Burges), official IDX files",
      "made_by": "scripts/make_mnist_sample.py",
      "selection": (f"first {TRAIN_PER_CLASS} examples of each class of the official train split and "
                    f"first {TEST_PER_CLASS} of each class of the official test split, in file order; "
                    "train_indices/test_indices index the official files"),
      "source_files_md5": md5,
  }, sort_keys=True)
  write_npz(args.out, {
      "train_images": ds.train_images[train_idx],
      "train_labels": ds.train_labels[train_idx],
      "test_images": ds.test_images[test_idx],
      "test_labels": ds.test_labels[test_idx],
      "train_indices": train_idx.astype(np.int32),
      "test_indices": test_idx.astype(np.int32),
      "provenance": np.array(provenance),
  })
  size = args.out.stat().st_size
  print(f"wrote {args.out}: {train_idx.size} train + {test_idx.size} test images, {size} bytes, "
        f"md5 {hashlib.md5(args.out.read_bytes()).hexdigest()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
