"""TensorBoard summaries of a run, written next to ``metrics.jsonl`` (``<workdir>/tensorboard/``).

One scalar per metrics row and epoch (the x axis is the epoch): train/test accuracy, the training attack's
robust accuracy, losses, the learning rate, Binary-Relax's lambda, the M_t bound (all conv kernels and 3x3
only), weight/channel sparsity and speed; at the end of the run the final natural and robust accuracies
(A1-A3, ...) at the last epoch. ``tensorboard --logdir runs/`` shows every run side by side.

Written with `tensorboardX <https://github.com/lanpa/tensorboardX>`_: the event-file writer alone, with no
TensorFlow (``clu.metric_writers`` writes through ``tf.summary`` and so needs TensorFlow, 1 GB).

Example::

    writer = tensorboard.open_writer(workdir + "/tensorboard")
    writer.epoch(row, br_lambda=1.05)
    writer.close()
"""

import math
import os
import sys
from typing import Any, Callable, Mapping

DIRNAME = "tensorboard"

# metrics.jsonl keys -> TensorBoard tags (grouped by the part before the slash). Other numbers of a row go
# under "other/<key>".
TAGS = {
    "test_acc": "accuracy/test",
    "train_nat_acc": "accuracy/train",
    "train_adv_acc": "robust_accuracy/train_attack",
    "train_loss": "loss/train",
    "train_nat_loss": "loss/train_natural",
    "train_adv_loss": "loss/train_adversarial",
    "train_kl": "loss/train_kl",
    "lr": "optimizer/learning_rate",
    "br_lambda": "binary_relax/lambda",
    "m_bound": "M_t/all_conv",
    "m_bound_3x3": "M_t/conv_3x3",
    "weight_sparsity": "sparsity/weight",
    "channel_sparsity": "sparsity/channel",
    "epoch_seconds": "speed/epoch_seconds",
    "images_per_second": "speed/images_per_second",
}
_SKIP = ("epoch", "step")


def _number(value) -> float | None:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  value = float(value)
  return value if math.isfinite(value) else None


class Writer:
  """Scalar summaries of one run (a thin wrapper of ``tensorboardX.SummaryWriter``).

  Args:
    logdir: the event-file folder (created).
    purge_step: on resume, the first epoch written again: TensorBoard then hides the events of that
      epoch and later ones that an interrupted run had written.
  """

  def __init__(self, logdir: str, *, purge_step: int | None = None):
    SummaryWriter = _summary_writer_class()  # pylint: disable=invalid-name
    os.makedirs(logdir, exist_ok=True)
    self.logdir = logdir
    self._writer = SummaryWriter(logdir, purge_step=purge_step, flush_secs=30)

  def epoch(self, row: Mapping[str, Any], *, br_lambda: float | None = None) -> None:
    """Writes one metrics row (its ``epoch`` is the step) and Binary-Relax's lambda, then flushes."""
    step = int(row["epoch"])
    values = dict(row, **({"br_lambda": br_lambda} if br_lambda is not None else {}))
    for key, value in values.items():
      number = _number(value)
      if key not in _SKIP and number is not None:
        self._writer.add_scalar(TAGS.get(key, f"other/{key}"), number, step)
    self._writer.flush()

  def final(self, step: int, results: Mapping[str, Any]) -> None:
    """Writes the final natural accuracy, every robust accuracy and the worst case at ``step``."""
    scalars = {"final/natural_accuracy": _number(results.get("natural_accuracy"))}
    robust = results.get("robust", {})
    for name, value in robust.get("accuracy", {}).items():
      if name not in ("n", "natural"):
        scalars[f"final/robust_accuracy_{name}"] = _number(value)
    scalars["final/robust_accuracy_worst_case"] = _number(robust.get("accuracy_worst_case"))
    for tag, value in scalars.items():
      if value is not None:
        self._writer.add_scalar(tag, value, step)
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def _summary_writer_class():
  """``tensorboardX.SummaryWriter``, imported without PyTorch.

  tensorboardX imports torch whenever it is installed (4 s, e.g. with enquant's ``bench`` extra) only to
  accept torch tensors; scalars need none of it, so torch is hidden while tensorboardX loads.
  """
  hide_torch = "tensorboardX" not in sys.modules and "torch" not in sys.modules
  if hide_torch:
    sys.modules["torch"] = None  # ``import torch`` raises ImportError, which tensorboardX handles
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    if hide_torch:
      del sys.modules["torch"]
  return tensorboardX.SummaryWriter


def open_writer(logdir: str, *, purge_step: int | None = None,
                log: Callable[[str], None] = print) -> Writer | None:
  """A :class:`Writer`, or None (and one ``warning:`` line to ``log``) when tensorboardX is missing."""
  try:
    return Writer(logdir, purge_step=purge_step)
  except ImportError:
    log("warning: tensorboardX is not installed, no TensorBoard summaries (pip install tensorboardX)")
    return None


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """``{tag: [(step, value), ...]}`` of every event file in ``logdir`` (for tests and notebooks).

  Reads the TFRecord framing directly with tensorboardX's event protocol buffer: no TensorFlow.
  """
  import struct  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top

  out: dict[str, list[tuple[int, float]]] = {}
  for name in sorted(os.listdir(logdir)):
    if not name.startswith("events."):
      continue
    with open(os.path.join(logdir, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
  return out


__all__ = ["DIRNAME", "TAGS", "Writer", "open_writer", "read_scalars"]
