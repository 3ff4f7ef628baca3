"""Runnable studies: ``python -m experiments.<name>``. Entry points set XLA flags before JAX loads."""

from absl import logging as _logging

from enquant import runtime as _runtime

_runtime.configure()


def quiet_logs() -> None:
  """Orbax logs every checkpoint step at INFO; keep the console to our own progress lines."""
  import logging  # pylint: disable=g-import-not-at-top
  _logging.set_verbosity(_logging.WARNING)
  logging.getLogger().setLevel(logging.WARNING)
