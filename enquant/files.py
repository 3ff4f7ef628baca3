"""Result files written atomically (never a half-written JSON after a crash), never holding NaN.

Temporary files are created with mode ``0o666`` minus the process umask (``0o644`` typically), as
``open(path, "w")`` would, and then renamed over the destination.
"""

import contextlib
import fcntl
import json
import math
import os
import secrets
import warnings
from typing import Any, Iterator


def create_temp(directory: str, suffix: str = "") -> tuple[int, str]:
  """Creates a new, empty, hidden temporary file in ``directory`` with the umask's permissions.

  Unlike ``tempfile.mkstemp`` (always ``0o600``), the file gets the mode any newly created file gets.

  Args:
    directory: where (must exist).
    suffix: end of the file name.

  Returns:
    ``(fd, path)``: an open write-only descriptor and the file's path.
  """
  while True:
    path = os.path.join(directory, f".tmp-{secrets.token_hex(6)}{suffix}")
    try:
      return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), path
    except FileExistsError:
      continue


def write_bytes_atomic(path: str, write) -> None:
  """Calls ``write(binary_file)`` on a temporary file beside ``path``, syncs it, renames it to ``path``.

  Args:
    path: destination.
    write: a function of the open binary file object.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = create_temp(directory, suffix="-" + os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text_atomic(path: str, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` through a temporary file and ``os.replace``."""
  write_bytes_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes ``obj`` as indented JSON, atomically.

  Raises:
    ValueError: ``obj`` holds NaN or infinity (named by its key path); nothing is written.
  """
  write_text_atomic(path, _dumps(obj, path, indent=2) + "\n")


def remove_if_exists(path: str) -> None:
  """Deletes ``path`` if it is there (a finished job's progress file)."""
  try:
    os.remove(path)
  except FileNotFoundError:
    pass


def read_jsonl(path: str) -> list[dict]:
  """The rows of a JSON Lines file (``[]`` if there is none).

  A last line without its newline that does not parse is a write cut short by a kill: it is dropped with
  a warning, so the run it belongs to can resume. Any other bad line raises ValueError naming the file
  and the line.
  """
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = f.read().split("\n")
  rows = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if number == len(lines):  # no newline after it: the last write was cut short
        warnings.warn(f"{path}: dropped a truncated last line ({e.msg})", stacklevel=2)
        break
      raise ValueError(f"{path}: line {number} is not JSON ({e.msg})") from None
    if not isinstance(row, dict):
      raise ValueError(f"{path}: line {number} is not a JSON object")
    rows.append(row)
  return rows


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def json_line(row: dict) -> str:
  """One JSON Lines row (raises ``ValueError`` for NaN or infinity, as :func:`write_json_atomic`)."""
  return _dumps(row, "a metrics row") + "\n"


def append_jsonl(path: str, row: dict) -> None:
  line = json_line(row)
  with open(path, "a") as f:
    f.write(line)
    f.flush()
    os.fsync(f.fileno())


def nonfinite_key(obj: Any, prefix: str = "") -> str | None:
  """The key path of the first NaN or infinite float in a JSON-able ``obj``, or None."""
  if isinstance(obj, float):
    return None if math.isfinite(obj) else (prefix or "<value>")
  if isinstance(obj, dict):
    items = obj.items()
  elif isinstance(obj, (list, tuple)):
    items = enumerate(obj)
  elif hasattr(obj, "tolist"):
    return nonfinite_key(obj.tolist(), prefix)
  else:
    return None
  for k, v in items:
    found = nonfinite_key(v, f"{prefix}.{k}" if prefix else str(k))
    if found is not None:
      return found
  return None


def _dumps(obj: Any, what: str, indent: int | None = None) -> str:
  try:
    return json.dumps(obj, indent=indent, sort_keys=True, default=_to_builtin, allow_nan=False)
  except ValueError:
    key = nonfinite_key(obj)
    if key is None:
      raise
    raise ValueError(f"refusing to write {what}: {key} is not a finite number") from None


def _to_builtin(x):
  if hasattr(x, "tolist"):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


class LockedError(RuntimeError):
  """Another live process holds the lock (the message names its pid)."""


@contextlib.contextmanager
def hold_lock(path: str, what: str) -> Iterator[None]:
  """Holds an exclusive OS lock on ``path`` (created if missing) for the ``with`` body.

  The lock is ``flock`` on an open file: the kernel releases it when the holder exits or is killed, so a
  lock left behind by a dead process is simply taken over. The holder's pid is written into the file for
  the error message.

  Args:
    path: the lock file (e.g. ``<workdir>/.lock``); its folder must exist.
    what: what the lock guards, for the message (``"run directory runs/demo"``).

  Raises:
    LockedError: a live process holds it: ``"<what> is in use by pid N; ..."``.
  """
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
      raise LockedError(f"{what} is in use by pid {holder} (lock {path}); wait for it to finish or "
                        "stop it first") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # releases the flock
