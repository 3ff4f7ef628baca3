"""Process-level JAX settings for entry points (experiments, benchmarks, tests).

Call :func:`configure` *before* ``import jax`` anywhere in the process: XLA reads ``XLA_FLAGS`` and its
log level once. The library modules never call it themselves, so importing ``enquant`` has no hidden
global effects.
"""

import os

# The YNN fusion pass slows convolution training 1.8-2.2x on XLA:CPU (measured on AMD EPYC CPUs).
# Disabling it changes speed only, never results. ENQUANT_XLA_CPU_FLAGS=0 leaves it out (e.g. for a jaxlib
# that no longer knows the flag: XLA aborts on unknown flags).
CPU_FAST_FLAGS = "--xla_cpu_experimental_ynn_fusion_type="
# XLA's C++ log level for entry points: 3 keeps its error-level lines (such as the "slow_operation_alarm
# ... Very slow compile?" banner of a long first compile) off the console; every real failure still
# reaches Python as an exception. Set TF_CPP_MIN_LOG_LEVEL yourself to see them.
XLA_LOG_LEVEL = "3"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "enquant", "jax")


def configure(*, host_devices: int | None = None, cache_dir: str | None = None) -> None:
  """Sets XLA flags (CPU speed, optional fake host devices), XLA's log level and the compilation cache.

  Args:
    host_devices: if set, ``--xla_force_host_platform_device_count`` (CPU data-parallel testing).
    cache_dir: directory for JAX's persistent compilation cache; ``None`` leaves it off unless the
      ``ENQUANT_JAX_CACHE`` environment variable names one.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  if "ynn_fusion_type" not in flags and os.environ.get("ENQUANT_XLA_CPU_FLAGS", "1") != "0":
    flags = f"{flags} {CPU_FAST_FLAGS}".strip()
  if host_devices and "xla_force_host_platform_device_count" not in flags:
    flags = f"{flags} --xla_force_host_platform_device_count={host_devices}"
  os.environ["XLA_FLAGS"] = flags
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", XLA_LOG_LEVEL)
  enable_compilation_cache(cache_dir or os.environ.get("ENQUANT_JAX_CACHE") or "")


def enable_compilation_cache(cache_dir: str) -> str | None:
  """Turns JAX's persistent compilation cache on in ``cache_dir`` (``""``: leaves it as it is).

  A program compiled once (the train step, each attack) is read back from disk by the next process, so a
  second evaluation of the same model compiles nothing. Call it before the first compile.

  Returns:
    The absolute cache folder, or None when ``cache_dir`` is empty.
  """
  if not cache_dir:
    return None
  import jax  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(os.path.expanduser(cache_dir))
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
