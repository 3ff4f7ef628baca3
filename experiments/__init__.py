"""Runnable studies: ``python -m experiments.<name>``. Entry points set XLA flags before JAX loads."""

from enquant import runtime as _runtime

_runtime.configure()
