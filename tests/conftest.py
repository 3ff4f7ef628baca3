"""Test setup: fast XLA:CPU flags, 2 fake host devices (data-parallel tests), compile cache."""

import os
import pathlib

from enquant import runtime

_ROOT = pathlib.Path(__file__).resolve().parents[1]
# Tests compile hundreds of small programs and run each a few times: XLA's backend optimisations cost more
# compile time than they save (a cold suite ~30 % faster; results equal within the tests' tolerances). The
# cache and the flag go into the environment so the experiments and notebooks that tests start share them.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("ENQUANT_JAX_CACHE", str(_ROOT / ".jax_cache"))
runtime.configure(host_devices=2, cache_dir=os.environ["ENQUANT_JAX_CACHE"])

import pytest  # noqa: E402  (after the XLA flags are set)

SHARED_DATA = _ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
  """The real MNIST / Fashion-MNIST folder beside the checkout; tests skip when it is absent."""
  if not (SHARED_DATA / "mnist").is_dir():
    pytest.skip(f"real data not found at {SHARED_DATA}")
  return SHARED_DATA
