"""``--data_source=tfds`` for real: a TFDS ``mnist`` prepared in a temporary data directory (TFDS's own
builder and writer, ``array_record`` format, no TensorFlow) is read back exactly and trains through the
pipeline (with its TensorBoard summaries); an unprepared one fails at once with one line naming what to install and which flags to use."""

import io
import os

import numpy as np
import pytest

from enquant import config as config_lib
from enquant import data
from enquant import files
from enquant import pipeline
from enquant import tensorboard
from enquant.models import ModelConfig

tfds = pytest.importorskip("tensorflow_datasets")
PIL_Image = pytest.importorskip("PIL.Image")

N_TRAIN, N_TEST = 192, 64


def _examples(n: int, seed: int):
  """``n`` random 28x28 images, each with a label that it also carries in its first pixel (to match
  images and labels after TFDS's deterministic shuffle)."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
  labels = rng.integers(0, 10, n).astype(np.int64)
  images[:, 0, 0, 0] = np.arange(n)  # a unique id per image
  return images, labels


class _LocalMnist(tfds.image_classification.MNIST, skip_registration=True):
  """TFDS's MNIST builder (same name, version and features) generating our examples instead of
  downloading; images are passed PNG-encoded (by PIL), so preparing needs no TensorFlow."""

  name = "mnist"

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(*_examples(N_TRAIN, 0)),
            "test": self._generate_examples(*_examples(N_TEST, 1))}

  def _generate_examples(self, images, labels):  # pylint: disable=arguments-differ
    for i, (image, label) in enumerate(zip(images, labels)):
      buf = io.BytesIO()
      PIL_Image.fromarray(image[..., 0]).save(buf, format="PNG")
      yield i, {"image": buf.getvalue(), "label": int(label)}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("tensorflow_datasets")
  tfds.disable_progress_bar()
  _LocalMnist(data_dir=str(root), file_format="array_record").download_and_prepare()
  return root


@pytest.fixture
def no_tensorflow(monkeypatch):
  monkeypatch.setattr(data, "_tensorflow_available", lambda: False)


def _by_id(images, labels):
  order = np.argsort(images[:, 0, 0, 0], kind="stable")
  return images[order], labels[order]


def test_a_prepared_tfds_dataset_reads_back_exactly_without_tensorflow(tfds_dir, no_tensorflow):
  ds = data.load("mnist", tfds_dir, source="tfds")
  assert ds.source == "tfds" and ds.num_train == N_TRAIN and ds.num_test == N_TEST
  for split, seed in (("train", 0), ("test", 1)):
    want = _examples(N_TRAIN if split == "train" else N_TEST, seed)
    got = _by_id(getattr(ds, f"{split}_images"), getattr(ds, f"{split}_labels"))
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
  # max_train / max_test slice TFDS's splits ("train[:N]"): the first N records of its order.
  small = data.load("mnist", tfds_dir, source="tfds", max_train=10, max_test=5)
  np.testing.assert_array_equal(small.train_images, ds.train_images[:10])
  np.testing.assert_array_equal(small.test_labels, ds.test_labels[:5])
  # TFDS's own data directory variable is honoured when no --data_dir is given.
  with pytest.MonkeyPatch.context() as patch:
    patch.setenv("TFDS_DATA_DIR", str(tfds_dir))
    np.testing.assert_array_equal(data.load("mnist", source="tfds").train_images, ds.train_images)


class _RelabelledSource:
  """A TFDS data source whose first example carries ``label`` instead of its own."""

  def __init__(self, source, label):
    self.source, self.label = source, label

  def __len__(self):
    return len(self.source)

  def __getitems__(self, indices):
    examples = [dict(e) for e in self.source.__getitems__(indices)]
    if examples:
      examples[0]["label"] = self.label
    return examples


@pytest.mark.parametrize("label,message", [(1.7, r"label 1\.7 is not an integer"),
                                           ("7", "labels must be integers"),
                                           (float("nan"), "label nan is not an integer")])
def test_tfds_labels_that_are_not_integers_are_refused_naming_the_folder(
    tfds_dir, no_tensorflow, monkeypatch, label, message):
  as_data_source = tfds.core.DatasetBuilder.as_data_source
  monkeypatch.setattr(tfds.core.DatasetBuilder, "as_data_source",
                      lambda self, **kw: _RelabelledSource(as_data_source(self, **kw), label))
  with pytest.raises(ValueError, match=message) as info:
    data.load("mnist", tfds_dir, source="tfds", max_train=4, max_test=2)
  assert f"{tfds_dir / 'mnist'} (train)" in str(info.value) and "\n" not in str(info.value)


def test_the_pipeline_trains_on_tfds_data(tfds_dir, no_tensorflow, tmp_path):
  # tests/test_faults.py's configuration (its compilations are in the shared cache), TFDS data.
  cfg = config_lib.ExperimentConfig(
      dataset="mnist", data_source="tfds", data_dir=str(tfds_dir), max_train=N_TRAIN, max_test=N_TEST,
      model=ModelConfig(num_classes=10, depth=8, widths=(4, 4, 4), noise_coef=0.1, ensembles=2),
      train=config_lib.TrainConfig(epochs=3, batch_size=32, lr=0.1, lr_schedule="cosine"),
      quant=config_lib.QuantConfig(mode="br", bits=1, growth=1.5, relax_fraction=0.5),
      eval=config_lib.EvalConfig(attacks="", max_examples=32, eot_samples=0, batch_size=32),
  )
  workdir = str(tmp_path / "run")
  assert pipeline.train_and_evaluate(cfg, workdir, progress=False, log=lambda *_: None,
                                     stop_after_epochs=1) is None
  rows = files.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [r["epoch"] for r in rows] == [1] and rows[0]["step"] == N_TRAIN // 32
  assert files.read_json(os.path.join(workdir, "config.json"))["data_source"] == "tfds"
  # The epoch's TensorBoard summaries sit next to metrics.jsonl and hold the same numbers.
  scalars = tensorboard.read_scalars(os.path.join(workdir, tensorboard.DIRNAME))
  for key in ("test_acc", "train_nat_acc", "m_bound", "m_bound_3x3", "weight_sparsity", "channel_sparsity"):
    assert scalars[tensorboard.TAGS[key]] == [(1, pytest.approx(rows[0][key], rel=1e-6, abs=1e-7))], key
  assert scalars["binary_relax/lambda"][0][0] == 1 and scalars["binary_relax/lambda"][0][1] > 1


@pytest.mark.parametrize("name,flag", [("mnist", "--data_source=embedded"), ("cifar10", "--data_dir=DIR")])
def test_an_unprepared_dataset_without_tensorflow_is_one_line_naming_the_install_and_flags(
    tmp_path, no_tensorflow, name, flag):
  with pytest.raises(RuntimeError) as info:
    data.load(name, tmp_path, source="tfds")
  message = str(info.value)
  assert "\n" not in message and "TensorFlow is not installed" in message
  assert "pip install 'enquant[tfds]'" in message and flag in message and str(tmp_path) in message
