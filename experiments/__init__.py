"""Runnable studies: ``python -m experiments.<name>``. Entry points set XLA flags before JAX loads."""

from absl import flags as _flags
from absl import logging as _logging

from enquant import runtime as _runtime

_runtime.configure()
# Orbax logs every checkpoint step at INFO; keep the console to our own progress lines.
_flags.FLAGS.set_default("verbosity", _logging.WARNING)
