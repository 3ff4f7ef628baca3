"""Orbax checkpoints of the train state, one per epoch, with the run's configuration beside them.

A checkpoint holds the whole :class:`enquant.train.TrainState` (parameters, BatchNorm statistics, optimizer
state including Binary-Relax's float weights, the step and the run's root key) and a small JSON record
(epoch, configuration fingerprint). Restoring into another configuration fails with a clear message instead
of a shape error from deep inside orbax.
"""

import hashlib
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def fingerprint(config: dict) -> str:
  """Stable hash of a JSON-able configuration."""
  return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


class Checkpointer:
  """Saves/restores train states under ``directory`` (keeps the newest ``max_to_keep``)."""

  def __init__(self, directory: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
    )

  def latest_epoch(self) -> int | None:
    """The newest saved epoch (number of finished epochs), or None."""
    return self._manager.latest_step()

  def save(self, epoch: int, state: Any, meta: dict) -> None:
    """Saves ``state`` after ``epoch`` finished epochs and waits until it is on disk."""
    self._manager.save(
        epoch,
        args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                meta=ocp.args.JsonSave(dict(meta, epoch=epoch))),
    )
    self._manager.wait_until_finished()

  def restore(self, epoch: int, target: Any, *, expect_fingerprint: str | None = None):
    """Restores the state saved at ``epoch`` into the structure/shapes/shardings of ``target``.

    Args:
      epoch: which checkpoint.
      target: a train state of the same configuration (its arrays give shapes, dtypes and shardings).
      expect_fingerprint: if given, the checkpoint's configuration fingerprint must match.

    Returns:
      ``(state, meta)``.

    Raises:
      ValueError: the checkpoint belongs to another configuration or does not fit ``target``.
    """
    meta = self._manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if expect_fingerprint is not None and meta.get("fingerprint") != expect_fingerprint:
      raise ValueError(
          f"checkpoint {self.directory}/{epoch} was written by another configuration "
          f"(fingerprint {meta.get('fingerprint')} != {expect_fingerprint}); use another --workdir")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      restored = self._manager.restore(
          epoch, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(
          f"checkpoint {self.directory}/{epoch} does not match this model/optimizer "
          f"configuration: {str(e).splitlines()[0][:300]}") from e
    return restored["state"], meta

  def close(self) -> None:
    self._manager.close()
