"""Test-session setup: fast XLA:CPU flags, 2 fake host devices (data-parallel tests), compile cache."""

import os
import pathlib

from enquant import runtime

_ROOT = pathlib.Path(__file__).resolve().parents[1]
runtime.configure(
    host_devices=2,
    cache_dir=os.environ.get("ENQUANT_JAX_CACHE", str(_ROOT / ".jax_cache")),
)

import pytest  # noqa: E402  (after the XLA flags are set)

SHARED_DATA = _ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
  """The real MNIST / Fashion-MNIST folder beside the checkout; tests skip when it is absent."""
  if not (SHARED_DATA / "mnist").is_dir():
    pytest.skip(f"real data not found at {SHARED_DATA}")
  return SHARED_DATA
