"""Checkpoints of the train state, one per epoch, each committed with an integrity record.

A checkpoint ``<directory>/<epoch>/`` holds the whole :class:`enquant.train.TrainState` (parameters,
BatchNorm statistics, optimizer state including Binary-Relax's float weights, the step and the run's root
key) as an orbax ``state/`` item, and ``integrity.json``: the configuration fingerprint, the caller's
metadata, the path, shape, dtype and SHA-256 of every array, and the size and SHA-256 of every file orbax
wrote.

Commit protocol: the state is written into a staging folder, the record is computed from what was written
and saved last, and only then is the folder renamed to ``<epoch>`` (an atomic rename). So a checkpoint
folder without its record was never committed, and a committed one can be verified byte for byte.

Restoring verifies before it reads: the record's own checksum, the fingerprint, the target's structure
(paths, shapes and dtypes, so orbax never sees a mismatching target), every file's size and checksum, and
after reading, every array's checksum. A checkpoint that fails (flipped bytes, truncated, emptied or missing
files, no record) raises :class:`CorruptCheckpointError` with one line saying why; :meth:`Checkpointer.
restore_latest` then falls back to the newest checkpoint that passes. Only finite states are committed.

Retention (``keep``) deletes only this run's checkpoints: epoch folders whose own integrity record verifies
and names the fingerprint of the state being saved; never the checkpoint just committed. Anything else in
the folder (an epoch folder without a valid record or of another configuration, a staging folder this
process did not create, any other file) is left alone and named in one warning.

Multi-host (:mod:`enquant.distributed`): every process calls :meth:`Checkpointer.save` (orbax writes the
arrays collectively), process 0 alone creates the staging folder, writes the record, renames and applies
retention, and every process waits at a barrier until the commit is done; every process verifies and
restores by itself (the folder must be on a filesystem all processes see). On a single process the
barriers are no-ops.
"""

import hashlib
import json
import os
import secrets
import shutil
from typing import Any, Callable, NamedTuple
import warnings

import jax
import numpy as np
import orbax.checkpoint as ocp

from enquant import distributed
from enquant import files

FORMAT = "enquant-checkpoint"
VERSION = 1
RECORD = "integrity.json"
REJECTED = "rejected"
_STATE = "state"
_STAGING_PREFIX = ".staging-"


class CheckpointError(ValueError):
  """A checkpoint cannot be used: another configuration, or a target it does not fit."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint failed verification (incomplete, truncated, altered or unreadable)."""


class NonFiniteStateError(CheckpointError):
  """Refused to commit a state with NaN or infinite values."""


class Restored(NamedTuple):
  """What :meth:`Checkpointer.restore_latest` found.

  Attributes:
    state: the restored state.
    meta: the checkpoint's metadata (``epoch``, ``fingerprint`` and what the caller saved).
    epoch: the epoch restored.
    rejected: ``(epoch, reason)`` of every newer checkpoint that failed verification.
  """

  state: Any
  meta: dict
  epoch: int
  rejected: list[tuple[int, str]]


def fingerprint(config: dict) -> str:
  """Stable hash of a JSON-able configuration."""
  return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _host_leaves(tree) -> list[tuple[str, np.ndarray]]:
  """``(path, numpy array)`` of every leaf, in tree order."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
  return [(jax.tree_util.keystr(path), np.asarray(leaf)) for path, leaf in leaves]


def _array_entries(leaves) -> list[dict]:
  return [{"path": path, "shape": list(a.shape), "dtype": a.dtype.str,
           "sha256": _sha256_bytes(np.ascontiguousarray(a).tobytes())} for path, a in leaves]


def _layout(tree) -> list[tuple[str, tuple[int, ...], str]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return [(jax.tree_util.keystr(p), tuple(np.shape(x)), np.dtype(x.dtype).str) for p, x in leaves]


def first_nonfinite(leaves) -> str | None:
  """Path of the first float leaf holding NaN or infinity, or None."""
  for path, a in leaves:
    if np.issubdtype(a.dtype, np.inexact) and not np.all(np.isfinite(a)):
      return path
  return None


def _file_entries(directory: str) -> dict[str, dict]:
  out = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      out[os.path.relpath(path, directory)] = {"size": os.path.getsize(path), "sha256": _sha256_file(path)}
  return dict(sorted(out.items()))


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _seal(record: dict) -> dict:
  body = json.dumps(record, sort_keys=True).encode()
  return dict(record, checksum=_sha256_bytes(body))


class Checkpointer:
  """Saves, verifies and restores train states under ``directory``, one folder per epoch.

  Use as a context manager (or call :meth:`close`): the orbax checkpointer holds threads.

  Args:
    directory: the checkpoints folder (created on the first save, never by reading).
    keep: committed checkpoints kept; older ones are deleted after each commit (>= 1).

  Example::

      with Checkpointer(workdir + "/checkpoints") as ckpt:
        found = ckpt.restore_latest(state, expect_fingerprint=fp, log=print)
  """

  def __init__(self, directory: str, *, keep: int = 2):
    if keep < 1:
      raise ValueError(f"keep must be >= 1, got {keep}")
    self.directory = os.path.abspath(directory)
    self.keep = keep
    self._orbax = None
    self._warned: set[str] = set()  # foreign entries already named in a warning

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _handler(self) -> ocp.Checkpointer:
    if self._orbax is None:
      self._orbax = ocp.Checkpointer(ocp.StandardCheckpointHandler())
    return self._orbax

  def path(self, epoch: int) -> str:
    return os.path.join(self.directory, str(epoch))

  def epochs(self) -> list[int]:
    """Every epoch folder present, committed or not, oldest first."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(int(n) for n in os.listdir(self.directory)
                  if n.isdigit() and os.path.isdir(os.path.join(self.directory, n)))

  def committed_epochs(self) -> list[int]:
    """Epochs whose folder holds an integrity record (not yet verified), oldest first."""
    return [e for e in self.epochs() if os.path.isfile(os.path.join(self.path(e), RECORD))]

  def latest_epoch(self) -> int | None:
    """The newest committed epoch (number of finished epochs), or None."""
    committed = self.committed_epochs()
    return committed[-1] if committed else None

  # ------------------------------------------------------------------------------------------- save

  def save(self, epoch: int, state: Any, meta: dict) -> None:
    """Commits ``state`` as the checkpoint of ``epoch`` finished epochs, then applies retention.

    Args:
      epoch: the number of finished epochs.
      state: the train state (device or host arrays).
      meta: JSON-able metadata kept in the record (e.g. ``{"fingerprint": ...}``).

    Raises:
      NonFiniteStateError: a float leaf holds NaN or infinity (nothing is written).
      OSError: the folder cannot be written.
    """
    leaves = _host_leaves(state)
    bad = first_nonfinite(leaves)
    if bad is not None:
      raise NonFiniteStateError(f"refusing to checkpoint epoch {epoch}: {bad} holds NaN or infinity")
    main = distributed.is_main_process()
    if jax.process_count() == 1:
      token = secrets.token_hex(4)
    else:  # every process must name the same staging folder
      token = distributed.shared_token(4)
    staging = os.path.join(self.directory, f"{_STAGING_PREFIX}{epoch}-{token}")
    if main:
      os.makedirs(self.directory, exist_ok=True)
      os.makedirs(staging)
    distributed.barrier(f"enquant-checkpoint-staging-{epoch}")
    try:
      self._handler().save(os.path.join(staging, _STATE), args=ocp.args.StandardSave(state))
      if main:
        record = {"format": FORMAT, "version": VERSION, "epoch": epoch,
                  "meta": dict(meta, epoch=epoch), "arrays": _array_entries(leaves),
                  "files": _file_entries(staging)}
        files.write_json_atomic(os.path.join(staging, RECORD), _seal(record))
        if os.path.exists(self.path(epoch)):
          self._move_aside([epoch])
        os.rename(staging, self.path(epoch))
        _fsync_dir(self.directory)  # the commit survives a power cut
    finally:
      if main and os.path.exists(staging):
        shutil.rmtree(staging, ignore_errors=True)
    if main:
      self._retain(epoch, meta.get("fingerprint"))
    distributed.barrier(f"enquant-checkpoint-commit-{epoch}")

  def _owned(self, epoch: int, fingerprint: str | None) -> bool:
    """Whether ``epoch``'s folder holds its own valid record, written with ``fingerprint``."""
    try:
      record = self._record(epoch)
    except CorruptCheckpointError:
      return False
    return isinstance(record.get("meta"), dict) and record["meta"].get("fingerprint") == fingerprint

  def _retain(self, newest: int, fingerprint: str | None) -> None:
    """Deletes this run's checkpoints older than ``newest`` except the newest ``keep`` of them.

    A checkpoint is this run's when its folder holds its own valid integrity record naming
    ``fingerprint``. Everything else in the folder is left alone; what was not named before is named
    in one warning.
    """
    owned = [e for e in self.epochs() if self._owned(e, fingerprint)]
    keepers = set(owned[-self.keep:]) | {newest}
    for e in owned:
      if e < newest and e not in keepers:
        shutil.rmtree(self.path(e), ignore_errors=True)
    foreign = sorted(set(os.listdir(self.directory)) - {str(e) for e in owned} - {REJECTED}
                     - self._warned)
    if foreign:
      self._warned.update(foreign)
      warnings.warn(f"{self.directory}: left alone {len(foreign)} entr{'ies' if len(foreign) > 1 else 'y'} "
                    f"this run did not write: {', '.join(foreign)}", stacklevel=3)

  def set_aside(self, epochs) -> list[str]:
    """Moves the folders of ``epochs`` to ``<directory>/rejected/`` (kept for inspection, never used).

    Multi-host: every process calls it; process 0 moves the folders (and returns where to), the others
    return ``[]``; all return once the move is done.
    """
    moved = self._move_aside(epochs) if distributed.is_main_process() else []
    distributed.barrier("enquant-checkpoint-set-aside")
    return moved

  def _move_aside(self, epochs) -> list[str]:
    moved = []
    for e in epochs:
      src = self.path(e)
      if not os.path.exists(src):
        continue
      os.makedirs(os.path.join(self.directory, REJECTED), exist_ok=True)
      dst = os.path.join(self.directory, REJECTED, str(e))
      while os.path.exists(dst):
        dst = os.path.join(self.directory, REJECTED, f"{e}-{secrets.token_hex(2)}")
      os.rename(src, dst)
      moved.append(dst)
    return moved

  # ---------------------------------------------------------------------------------------- verify

  def _record(self, epoch: int) -> dict:
    path = os.path.join(self.path(epoch), RECORD)
    where = f"checkpoint {self.path(epoch)}"
    if not os.path.isfile(path):
      raise CorruptCheckpointError(f"{where} has no integrity record (its save was interrupted, or "
                                   "it was written by an older enquant)")
    try:
      record = files.read_json(path)
      body = {k: v for k, v in record.items() if k != "checksum"}
      ok = record.get("checksum") == _sha256_bytes(json.dumps(body, sort_keys=True).encode())
    except (OSError, ValueError, AttributeError) as e:
      raise CorruptCheckpointError(f"{where}: unreadable integrity record ({e})") from None
    if not ok or record.get("format") != FORMAT:
      raise CorruptCheckpointError(f"{where}: integrity record is corrupt (checksum mismatch)")
    if record.get("version") != VERSION or record.get("epoch") != epoch:
      raise CorruptCheckpointError(f"{where}: integrity record is of version {record.get('version')} "
                                   f"and epoch {record.get('epoch')}")
    return record

  def _check_files(self, epoch: int, record: dict) -> None:
    base = self.path(epoch)
    for rel, want in record["files"].items():
      path = os.path.join(base, rel)
      where = f"checkpoint {base} failed verification: {rel}"
      if not os.path.isfile(path):
        raise CorruptCheckpointError(f"{where} is missing")
      size = os.path.getsize(path)
      if size != want["size"]:
        raise CorruptCheckpointError(f"{where} has {size} bytes, {want['size']} were written")
      if _sha256_file(path) != want["sha256"]:
        raise CorruptCheckpointError(f"{where} was altered (checksum mismatch)")

  def _check_layout(self, epoch: int, record: dict, target: Any) -> None:
    stored = [(a["path"], tuple(a["shape"]), a["dtype"]) for a in record["arrays"]]
    wanted = _layout(target)
    if stored == wanted:
      return
    where = f"checkpoint {self.path(epoch)} does not match this model/optimizer configuration"
    stored_by_path = {p: (s, d) for p, s, d in stored}
    for p, s, d in wanted:
      if p not in stored_by_path:
        raise CheckpointError(f"{where}: it has no {p}")
      if stored_by_path[p] != (s, d):
        got = stored_by_path[p]
        raise CheckpointError(f"{where}: {p} is {got[0]} {np.dtype(got[1]).name} in the checkpoint, "
                              f"{s} {np.dtype(d).name} here")
    raise CheckpointError(f"{where}: it holds {len(stored)} arrays, this state {len(wanted)}")

  def verify(self, epoch: int, *, target: Any = None, expect_fingerprint: str | None = None) -> dict:
    """Checks a checkpoint without reading its arrays into memory; returns its record.

    Raises:
      CorruptCheckpointError: no or a corrupt record, or a file missing, resized or altered.
      CheckpointError: another configuration's fingerprint, or a structure that does not fit ``target``.
    """
    record = self._record(epoch)
    found = record["meta"].get("fingerprint")
    if expect_fingerprint is not None and found != expect_fingerprint:
      raise CheckpointError(f"checkpoint {self.path(epoch)} was written by another configuration "
                            f"(fingerprint {found} != {expect_fingerprint}); use another --workdir")
    if target is not None:
      self._check_layout(epoch, record, target)
    self._check_files(epoch, record)
    return record

  # --------------------------------------------------------------------------------------- restore

  def restore(self, epoch: int, target: Any, *, expect_fingerprint: str | None = None):
    """Verifies and restores the state saved at ``epoch`` into the structure/shardings of ``target``.

    Args:
      epoch: which checkpoint.
      target: a train state of the same configuration (its arrays give shapes, dtypes and shardings).
      expect_fingerprint: if given, the checkpoint's configuration fingerprint must match.

    Returns:
      ``(state, meta)``.

    Raises:
      CorruptCheckpointError: the checkpoint failed verification (see :meth:`verify`) or its arrays do
        not match their checksums once read.
      CheckpointError: another configuration, or a structure that does not fit ``target``.
    """
    record = self.verify(epoch, target=target, expect_fingerprint=expect_fingerprint)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      state = self._handler().restore(os.path.join(self.path(epoch), _STATE),
                                      args=ocp.args.StandardRestore(abstract))
    except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many types
      first = (str(e).splitlines() or [""])[0][:200]
      raise CorruptCheckpointError(f"checkpoint {self.path(epoch)} could not be read "
                                   f"({type(e).__name__}: {first})") from None
    for want, got in zip(record["arrays"], _array_entries(_host_leaves(state))):
      if want != got:
        raise CorruptCheckpointError(f"checkpoint {self.path(epoch)} failed verification: "
                                     f"{want['path']} does not match its checksum")
    return state, record["meta"]

  def restore_latest(self, target: Any, *, expect_fingerprint: str | None = None,
                     log: Callable[[str], None] | None = None) -> Restored | None:
    """Restores the newest checkpoint that passes verification.

    Args:
      target: as in :meth:`restore`.
      expect_fingerprint: as in :meth:`restore`.
      log: told, in one line, about the checkpoints skipped.

    Returns:
      A :class:`Restored`, or None when there is no checkpoint folder at all.

    Raises:
      CorruptCheckpointError: checkpoints exist but none passes verification.
      CheckpointError: the newest readable checkpoint is of another configuration or does not fit.
    """
    rejected = []
    for epoch in reversed(self.epochs()):
      try:
        state, meta = self.restore(epoch, target, expect_fingerprint=expect_fingerprint)
      except CorruptCheckpointError as e:
        rejected.append((epoch, str(e)))
        continue
      if rejected and log is not None:
        log(f"warning: {_describe(rejected)}; using checkpoint {self.path(epoch)} instead")
      return Restored(state, meta, epoch, rejected)
    if rejected:
      raise CorruptCheckpointError(f"no usable checkpoint in {self.directory}: {_describe(rejected)}; "
                                   "pass --overwrite to start again")
    return None

  def close(self) -> None:
    if self._orbax is not None:
      self._orbax.close()
      self._orbax = None


def _describe(rejected: list[tuple[int, str]]) -> str:
  """One line for the skipped checkpoints: the newest one's reason, and how many others."""
  _, reason = rejected[0]
  others = len(rejected) - 1
  return reason + (f" ({others} more checkpoint{'s' * (others > 1)} failed too)" if others else "")
