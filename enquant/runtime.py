"""Process-level JAX settings for entry points (experiments, benchmarks, tests).

Call :func:`configure` *before* ``import jax`` anywhere in the process: XLA reads ``XLA_FLAGS`` once. The
library modules never call it themselves, so importing ``enquant`` has no hidden global effects.
"""

import os

# Measured on this project's 2-core CPU machines (docs/DESIGN.md §6): the YNN fusion pass slows convolution
# training 1.8-2.2x on XLA:CPU. Disabling it changes speed only, never results. ENQUANT_XLA_CPU_FLAGS=0 leaves
# it out (e.g. for a jaxlib that no longer knows the flag: XLA aborts on unknown flags).
CPU_FAST_FLAGS = "--xla_cpu_experimental_ynn_fusion_type="


def configure(*, host_devices: int | None = None, cache_dir: str | None = None) -> None:
  """Sets XLA flags (CPU speed, optional fake host devices) and the persistent compilation cache.

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
  cache_dir = cache_dir or os.environ.get("ENQUANT_JAX_CACHE")
  if cache_dir:
    import jax  # pylint: disable=g-import-not-at-top

    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
