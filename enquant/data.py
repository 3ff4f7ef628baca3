"""Image-classification datasets as uint8 NHWC arrays, device-side augmentation and batching.

Five datasets are known (:data:`DATASETS`): ``mnist``, ``fmnist`` (Fashion-MNIST), ``cifar10``,
``cifar100`` and ``svhn`` (the cropped-digits version). :func:`load` returns a :class:`Dataset` with
uint8 images in NHWC layout and int32 labels from one of three sources:

* ``"local"``: the official distribution files in a data directory, parsed with numpy:

  - MNIST / Fashion-MNIST: the four IDX files (``train-images-idx3-ubyte.gz``, ...), gzip-compressed or
    not, in ``data_dir/<name folder>/`` (``mnist``; ``fashion-mnist``, ``fashion_mnist``, ``fmnist``)
    or in ``data_dir`` itself.
  - CIFAR-10: ``cifar-10-batches-bin/`` (binary version), ``cifar-10-batches-py/`` (python version) or
    the official archives ``cifar-10-binary.tar.gz`` / ``cifar-10-python.tar.gz`` (read in memory,
    never extracted to disk). CIFAR-100 likewise (``cifar-100-binary/``, ``cifar-100-python/``, their
    ``.tar.gz`` archives); fine labels are used.
  - SVHN: ``train_32x32.mat`` and ``test_32x32.mat`` (label 10 is the digit 0 and becomes 0).

  The readers live in :mod:`enquant.datafiles` (CIFAR's python pickles are read without running code).

* ``"tfds"``: TensorFlow Datasets (imported lazily), in TFDS's data directory: ``data_dir`` when given,
  else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets`` (:func:`tfds_data_dir`). With TensorFlow
  installed (``pip install 'enquant[tfds]'``), ``tfds.load`` downloads and prepares the dataset on first
  use (this needs a network connection). Without TensorFlow, a dataset already prepared in TFDS's
  ``array_record`` format (e.g. ``tfds build mnist --file_format=array_record`` on another machine, then
  copied) is read with ``tfds.data_source`` (numpy and PIL only); anything else fails at once with one
  line saying what to install or which flag to use.
* ``"embedded"``: a real 5000/1000-image MNIST sample shipped inside the package
  (``enquant/assets/mnist_sample.npz``, made by ``scripts/make_mnist_sample.py``), so demos and tests
  run anywhere offline.

``"auto"`` (the default) uses the local files when they are there and TFDS otherwise.

Images stay uint8 on the host; :func:`to_float` converts to float32 in [0, 1] (on device), and
:func:`augment` applies the CIFAR-style pad-4 random crop + horizontal flip on device as a jitted
function of a PRNG key. :func:`epoch_batches` gives the batch indices of an epoch as a pure function of
(seed, epoch), so a resumed run sees exactly the batches of an uninterrupted one. These live in
:mod:`enquant.preprocess` and are re-exported here.

This module knows nothing about models.

Example:
  >>> ds = load("mnist", source="embedded")
  >>> ds.train_images.shape, ds.train_images.dtype, ds.num_classes
  ((5000, 28, 28, 1), dtype('uint8'), 10)

References:
  LeCun, Bottou, Bengio, Haffner. "Gradient-based learning applied to document recognition." 1998
  (MNIST, IDX format: http://yann.lecun.com/exdb/mnist/).
  Xiao, Rasul, Vollgraf. "Fashion-MNIST." 2017. https://arxiv.org/abs/1708.07747
  Krizhevsky. "Learning multiple layers of features from tiny images." 2009 (CIFAR-10/100 and their
  file formats: https://www.cs.toronto.edu/~kriz/cifar.html).
  Netzer et al. "Reading digits in natural images with unsupervised feature learning." 2011 (SVHN:
  http://ufldl.stanford.edu/housenumbers/).
"""

import dataclasses
import importlib.resources
import importlib.util
import os
import pathlib
from typing import NamedTuple

import numpy as np

from enquant import datafiles
from enquant.preprocess import augment
from enquant.preprocess import class_counts
from enquant.preprocess import crop_flip
from enquant.preprocess import epoch_batches
from enquant.preprocess import to_float

SOURCES = ("auto", "local", "tfds", "embedded")
ENV_DATA_DIR = datafiles.ENV_DATA_DIR
ENV_TFDS_DATA_DIR = "TFDS_DATA_DIR"
_TFDS_DEFAULT_DIR = pathlib.Path("~/tensorflow_datasets")
_TFDS_INSTALL = "pip install 'enquant[tfds]' (TensorFlow)"
# The shared data folder beside a source checkout: <repo>/../shared/data.
_SIBLING_DATA_DIR = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
_HOME_DATA_DIR = pathlib.Path("~/.enquant/data")
# The sample is package data of the ``enquant.assets`` (namespace) package, found by importlib.resources
# through that package's own import spec: never through the working directory, so a folder named
# ``enquant`` in the cwd (which can shadow the top-level package) does not hide it.
_EMBEDDED_PACKAGE = "enquant.assets"
_EMBEDDED_FILE = "mnist_sample.npz"


class DatasetInfo(NamedTuple):
  """Static facts about one dataset.

  Attributes:
    name: the name :func:`load` takes.
    tfds_name: the TensorFlow Datasets name.
    image_shape: ``(height, width, channels)``.
    num_classes: number of classes; labels are ``0 .. num_classes - 1``.
    num_train: size of the official train split.
    num_test: size of the official test split.
    subdirs: folders under ``data_dir`` that are searched (before ``data_dir`` itself) for local files.
  """

  name: str
  tfds_name: str
  image_shape: tuple[int, int, int]
  num_classes: int
  num_train: int
  num_test: int
  subdirs: tuple[str, ...]


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", "mnist", (28, 28, 1), 10, 60000, 10000, ("mnist", "MNIST")),
    "fmnist": DatasetInfo(
        "fmnist", "fashion_mnist", (28, 28, 1), 10, 60000, 10000,
        ("fashion-mnist", "fashion_mnist", "fmnist")),
    "cifar10": DatasetInfo(
        "cifar10", "cifar10", (32, 32, 3), 10, 50000, 10000, ("cifar10", "cifar-10")),
    "cifar100": DatasetInfo(
        "cifar100", "cifar100", (32, 32, 3), 100, 50000, 10000, ("cifar100", "cifar-100")),
    "svhn": DatasetInfo("svhn", "svhn_cropped", (32, 32, 3), 10, 73257, 26032, ("svhn", "SVHN")),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A train/test pair of image arrays with labels.

  Attributes:
    name: dataset name (a key of :data:`DATASETS`).
    train_images: uint8 ``(N, H, W, C)``.
    train_labels: int32 ``(N,)`` in ``[0, num_classes)``.
    test_images: uint8 ``(M, H, W, C)``.
    test_labels: int32 ``(M,)``.
    num_classes: number of classes.
    source: where the arrays came from: a folder or archive path, ``"tfds"`` or ``"embedded"``.
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  source: str

  def __post_init__(self):
    for split in ("train", "test"):
      images = getattr(self, f"{split}_images")
      labels = getattr(self, f"{split}_labels")
      if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"{split}_images must be uint8 NHWC, got dtype {images.dtype} and shape {images.shape}")
      if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
        raise ValueError(f"{split}_labels must be int32 of shape {images.shape[:1]}, got dtype "
                         f"{labels.dtype} and shape {labels.shape}")
    if self.train_images.shape[1:] != self.test_images.shape[1:]:
      raise ValueError(f"train and test image shapes differ: {self.train_images.shape[1:]} vs "
                       f"{self.test_images.shape[1:]}")

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(height, width, channels)``."""
    return tuple(self.train_images.shape[1:])

  @property
  def num_train(self) -> int:
    return int(self.train_images.shape[0])

  @property
  def num_test(self) -> int:
    return int(self.test_images.shape[0])

  def __repr__(self) -> str:
    return (f"Dataset(name={self.name!r}, train={self.num_train}, test={self.num_test}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes}, source={self.source!r})")


def default_data_dir() -> pathlib.Path:
  """Where local data files are looked for when ``load`` gets no ``data_dir``.

  Returns:
    ``$ENQUANT_DATA_DIR`` if set; else ``../shared/data`` beside the source checkout if that folder
    exists; else ``~/.enquant/data``.
  """
  env = os.environ.get(ENV_DATA_DIR)
  if env:
    return pathlib.Path(env).expanduser()
  if _SIBLING_DATA_DIR.is_dir():
    return _SIBLING_DATA_DIR
  return _HOME_DATA_DIR.expanduser()


def has_local_copy(name: str, data_dir: str | os.PathLike | None = None) -> bool:
  """Whether :func:`load` finds a complete set of official files for ``name`` (nothing is parsed).

  Args:
    name: one of :data:`DATASETS`.
    data_dir: as in :func:`load` (``None``: :func:`default_data_dir`).
  """
  root = pathlib.Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
  return datafiles.has_files(DATASETS[name], root)


# ----------------------------------------------------------------------------------------------------
# TFDS and the embedded sample.


def _tensorflow_available() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def tfds_data_dir(data_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """TFDS's data directory: ``data_dir`` if given, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets``."""
  if data_dir is not None:
    return pathlib.Path(data_dir).expanduser()
  env = os.environ.get(ENV_TFDS_DATA_DIR)
  return pathlib.Path(env).expanduser() if env else _TFDS_DEFAULT_DIR.expanduser()


def _tfds_split(split: str, limit: int | None) -> str:
  return f"{split}[:{limit}]" if limit else split


def _load_tfds(info: DatasetInfo, max_train: int | None, max_test: int | None,
               data_dir: pathlib.Path | None = None):
  """Loads through TensorFlow Datasets; any failure becomes a RuntimeError with the reason in one line.

  With TensorFlow: ``tfds.load`` (downloads and prepares on first use). Without: the copy prepared in
  ``array_record`` format in :func:`tfds_data_dir`, read with ``tfds.data_source``.
  """
  if not _tensorflow_available():
    return _load_tfds_prepared(info, max_train, max_test, tfds_data_dir(data_dir))
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    splits = [_tfds_split("train", max_train), _tfds_split("test", max_test)]
    kwargs = {"data_dir": str(data_dir)} if data_dir is not None else {}
    loaded = tfds.load(info.tfds_name, split=splits, batch_size=-1, as_supervised=True, **kwargs)
    (train_x, train_y), (test_x, test_y) = tfds.as_numpy(loaded)
  except Exception as e:  # pylint: disable=broad-except  # TFDS/network raise many types
    raise RuntimeError(f"TFDS could not load {info.tfds_name!r} ({type(e).__name__}: "
                       f"{_first_line(e)}); use --data_dir=DIR with the official files instead") from e
  return (np.asarray(train_x), np.asarray(train_y), np.asarray(test_x), np.asarray(test_y), "tfds")


def _first_line(e: BaseException) -> str:
  return (str(e).strip().splitlines() or [""])[0][:300]


def _needs_tensorflow(info: DatasetInfo, why: str) -> RuntimeError:
  alternatives = "--data_source=local --data_dir=DIR (the official files)"
  if info.name == "mnist":
    alternatives += " or --data_source=embedded"
  return RuntimeError(f"TFDS cannot load {info.tfds_name!r}: {why}, and TensorFlow is not installed: "
                      f"{_TFDS_INSTALL}, or use {alternatives}")


def _load_tfds_prepared(info: DatasetInfo, max_train: int | None, max_test: int | None,
                        where: pathlib.Path):
  """Reads a TFDS dataset already prepared in ``array_record`` format, without TensorFlow."""
  folder = where / info.tfds_name
  if not any(folder.glob("**/dataset_info.json")):
    # Checked before importing TFDS: it would try to download, which ends in the same error.
    raise _needs_tensorflow(info, f"it is not prepared in {where} (--data_dir or ${ENV_TFDS_DATA_DIR}), "
                                  "downloading and preparing it needs TensorFlow")
  import logging  # pylint: disable=g-import-not-at-top
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)  # TFDS warns once that it decodes PNGs with PIL, not OpenCV
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    builder = tfds.builder(info.tfds_name, data_dir=str(where))
    if not builder.is_prepared():
      raise _needs_tensorflow(info, f"{folder} holds no prepared version {builder.version}, "
                                    "preparing it needs TensorFlow")
    file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if file_format != "array_record":
      raise _needs_tensorflow(info, f"its copy in {folder} is in {file_format} format, which only "
                                    "TensorFlow reads (array_record is read without it)")
    arrays = []
    for split, limit in (("train", max_train), ("test", max_test)):
      source = builder.as_data_source(split=_tfds_split(split, limit))
      examples = source.__getitems__(list(range(len(source))))
      keys = builder.info.supervised_keys or ("image", "label")
      arrays.append(np.stack([np.asarray(e[keys[0]]) for e in examples]) if examples
                    else np.zeros((0,) + info.image_shape, np.uint8))
      arrays.append([e[keys[1]] for e in examples])
  except RuntimeError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # TFDS/array_record/PIL raise many types
    raise RuntimeError(f"TFDS could not read {info.tfds_name!r} from {where} ({type(e).__name__}: "
                       f"{_first_line(e)})") from None
  finally:
    absl_logger.setLevel(level)
  for i, split in ((1, "train"), (3, "test")):
    arrays[i] = datafiles.integer_labels(arrays[i], f"{folder} ({split})")
  return (*arrays, "tfds")


def _load_embedded(info: DatasetInfo):
  if info.name != "mnist":
    raise ValueError(f"--data_source=embedded (the bundled sample) exists only for 'mnist', not "
                     f"{info.name!r}; use --data_dir=DIR or --data_source=tfds")
  resource = importlib.resources.files(_EMBEDDED_PACKAGE) / _EMBEDDED_FILE
  if not resource.is_file():
    raise FileNotFoundError(f"the embedded MNIST sample {_EMBEDDED_FILE} is missing from the installed "
                            f"package {_EMBEDDED_PACKAGE} ({resource}); reinstall enquant")
  with resource.open("rb") as f, np.load(f, allow_pickle=False) as npz:
    arrays = [npz[k] for k in ("train_images", "train_labels", "test_images", "test_labels")]
  for i, split in ((1, "train"), (3, "test")):
    datafiles.check_labels(arrays[i], 0, info.num_classes - 1, f"{resource} ({split}_labels)")
  return (*arrays, "embedded")


def _check_max(value, what: str) -> None:
  if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))
                            or value < 1):
    raise ValueError(f"{what} must be a positive integer or None, got {value!r}")


def load(name: str, data_dir: str | os.PathLike | None = None, *, source: str = "auto",
         max_train: int | None = None, max_test: int | None = None) -> Dataset:
  """Loads a dataset as uint8 NHWC images and int32 labels.

  Args:
    name: one of :data:`DATASETS` (``mnist``, ``fmnist``, ``cifar10``, ``cifar100``, ``svhn``).
    data_dir: folder with the official files (see the module docstring for the layouts searched);
      ``None`` means :func:`default_data_dir`. For ``source="tfds"`` (and the TFDS fallback of
      ``"auto"``): TFDS's data directory (``None``: :func:`tfds_data_dir`).
    source: ``"local"``, ``"tfds"``, ``"embedded"`` (MNIST sample shipped in the package) or
      ``"auto"`` (local files when present, else TFDS).
    max_train: keep only the first ``max_train`` training examples (all when ``None`` or larger).
    max_test: keep only the first ``max_test`` test examples.

  Returns:
    A :class:`Dataset`.

  Raises:
    ValueError: unknown name or source, bad ``max_*``, or a corrupt/truncated file (the message names
      the file).
    FileNotFoundError: no local files (the message lists the files expected and the folders searched);
      for ``"auto"`` also when TFDS fails.
    RuntimeError: ``source="tfds"`` and TFDS fails.
  """
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
  if source not in SOURCES:
    raise ValueError(f"unknown source {source!r}; valid sources: {', '.join(SOURCES)}")
  _check_max(max_train, "max_train")
  _check_max(max_test, "max_test")
  info = DATASETS[name]
  given_dir = pathlib.Path(data_dir).expanduser() if data_dir is not None else None
  data_dir = given_dir if given_dir is not None else default_data_dir()

  if source == "embedded":
    arrays = _load_embedded(info)
  elif source == "tfds":
    arrays = _load_tfds(info, max_train, max_test, given_dir)
  elif source == "local":
    arrays = datafiles.load_local(info, data_dir)
  else:  # auto
    try:
      arrays = datafiles.load_local(info, data_dir)
    except datafiles.LocalFilesMissing as local_error:
      try:
        arrays = _load_tfds(info, max_train, max_test, given_dir)
      except RuntimeError as tfds_error:
        raise FileNotFoundError(f"{local_error}\n  TFDS fallback failed too: {tfds_error}") from None

  train_x, train_y, test_x, test_y, where = arrays
  train_x, train_y = train_x[:max_train], train_y[:max_train]
  test_x, test_y = test_x[:max_test], test_y[:max_test]
  for split, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
    datafiles.check_split(x, y, info, f"{where} ({split})")
  return Dataset(
      name=name,
      train_images=np.array(train_x, dtype=np.uint8, order="C"),
      train_labels=np.array(train_y, dtype=np.int32),
      test_images=np.array(test_x, dtype=np.uint8, order="C"),
      test_labels=np.array(test_y, dtype=np.int32),
      num_classes=info.num_classes,
      source=where,
  )


__all__ = ["DATASETS", "Dataset", "DatasetInfo", "ENV_DATA_DIR", "ENV_TFDS_DATA_DIR", "SOURCES", "augment",
           "class_counts", "crop_flip", "default_data_dir", "epoch_batches", "has_local_copy", "load",
           "tfds_data_dir", "to_float"]
