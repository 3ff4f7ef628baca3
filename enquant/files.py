"""Result files written atomically (never a half-written JSON after a crash)."""

import json
import os
import tempfile
from typing import Any


def write_text_atomic(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file and ``os.replace``."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json_atomic(path: str, obj: Any) -> None:
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=_to_builtin) + "\n")


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def json_line(row: dict) -> str:
  return json.dumps(row, sort_keys=True, default=_to_builtin) + "\n"


def append_jsonl(path: str, row: dict) -> None:
  with open(path, "a") as f:
    f.write(json_line(row))
    f.flush()
    os.fsync(f.fileno())


def _to_builtin(x):
  if hasattr(x, "tolist"):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")
