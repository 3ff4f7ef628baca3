"""Runnable studies: ``python -m experiments.<name>``. Entry points set XLA flags before JAX loads."""

import sys

from absl import flags as _flags
from absl import logging as _logging

from enquant import runtime as _runtime

_runtime.configure()

_flags.DEFINE_string("compilation_cache", None, "Folder of JAX's persistent compilation cache: a second "
                     f"run or evaluation of the same model compiles nothing (default "
                     f"{_runtime.DEFAULT_CACHE_DIR}; '' turns it off).")


def quiet_logs() -> None:
  """Orbax logs every checkpoint step at INFO; keep the console to our own progress lines."""
  import logging  # pylint: disable=g-import-not-at-top
  _logging.set_verbosity(_logging.WARNING)
  logging.getLogger().setLevel(logging.WARNING)


def start_compilation_cache() -> str | None:
  """Turns on the persistent compilation cache named by ``--compilation_cache`` (or the default)."""
  value = _flags.FLAGS.compilation_cache
  return _runtime.enable_compilation_cache(_runtime.DEFAULT_CACHE_DIR if value is None else value)


def parse_flags_strict(argv: list[str]) -> list[str]:
  """absl's flag parsing with every usage error (unknown flag, bad value) as one line and exit status 2."""
  try:
    return _flags.FLAGS(argv)
  except _flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
