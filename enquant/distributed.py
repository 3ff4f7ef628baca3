"""Multi-host data parallelism on JAX's own distributed runtime (TPU pod slices, multi-GPU clusters).

Every host (or every GPU, under SLURM) runs the same command as one JAX process. :func:`initialize` joins
them through JAX's coordination service; afterwards ``jax.devices()`` lists the devices of *all*
processes, and the library's one-axis ``"data"`` mesh (:func:`enquant.train.data_mesh`) spans them. Each
process gathers only its own rows of every global batch (:func:`enquant.train.process_rows`,
:func:`enquant.train.put_batch`, ``jax.make_array_from_process_local_data``), the state is replicated, and
XLA all-reduces the gradients across processes (gloo on CPU, NCCL on GPU, the ICI/DCN links on TPU). So
the program, and its numbers, are those of one process with all the devices (tested with 2 processes on
one machine against 1 process with 2 devices).

Process 0 writes every file (``config.json``, ``metrics.jsonl``, TensorBoard summaries, checkpoint
integrity records, results); orbax writes checkpoints collectively (every process calls
:meth:`enquant.checkpoint.Checkpointer.save`). The run directory must be on a filesystem every process
sees (NFS, GCS FUSE, Lustre), as orbax multi-host checkpoints require.

Example (two processes on one machine, CPU)::

    python -m experiments.mnist --distributed --coordinator_address=localhost:1234 \\
        --num_processes=2 --process_id=0 ... &
    python -m experiments.mnist --distributed --coordinator_address=localhost:1234 \\
        --num_processes=2 --process_id=1 ...

On a Cloud TPU pod slice or under SLURM (``srun``) ``--distributed`` alone suffices: JAX reads the
coordinator, the number of processes and this process's id from the environment.
"""

from collections.abc import Sequence
import secrets

import jax
import numpy as np


class DistributedError(RuntimeError):
  """The distributed runtime could not be started (one line: why, and which flags to give)."""


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, local_device_ids: Sequence[int] | None = None,
               timeout_s: int = 300) -> None:
  """Joins this process to a multi-process JAX job (``jax.distributed.initialize``).

  Call it once, before any JAX computation. Arguments left ``None`` are detected from the cluster
  environment (Cloud TPU, SLURM, Open MPI) or ``$JAX_COORDINATOR_ADDRESS``.

  Args:
    coordinator_address: ``host:port`` of process 0 (it listens there).
    num_processes: number of processes in the job.
    process_id: this process's index, ``0 .. num_processes - 1``.
    local_device_ids: restrict this process to these local devices (e.g. one GPU per process).
    timeout_s: how long to wait for every process to join.

  Raises:
    DistributedError: bad arguments, an environment that names no coordinator, JAX already running, or
      the job could not be joined in time; the message is one line.
  """
  if num_processes is not None and num_processes < 1:
    raise DistributedError(f"--num_processes must be >= 1, got {num_processes}")
  if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
    raise DistributedError(f"--process_id must be in 0..{num_processes - 1}, got {process_id}")
  try:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id, local_device_ids=local_device_ids,
                               initialization_timeout=timeout_s)
    # The first collective sets up the CPU (gloo) communicator, and gives up if the processes arrive more
    # than ~30 s apart, as they do when one compiles the first train step longer than the other: set it
    # up now, while they are in step. Later collectives wait as long as needed.
    barrier("enquant-distributed-initialize")
  except Exception as e:  # pylint: disable=broad-except  # JAX/XLA raise many types here
    reason = (str(e).strip().splitlines() or [""])[0][:300]
    raise DistributedError(
        f"--distributed: could not join the JAX job ({type(e).__name__}: {reason}); give "
        "--coordinator_address=HOST:PORT --num_processes=N --process_id=I, or run under SLURM or on a "
        "TPU pod slice, where JAX reads them from the environment") from None


def is_main_process() -> bool:
  """True on process 0, the one that writes files and logs (always true on a single process)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier ``name``; a no-op on a single process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def shared_token(nbytes: int = 4) -> str:
  """A random hex token, the same on every process (drawn by process 0 and broadcast)."""
  token = np.frombuffer(secrets.token_bytes(nbytes), np.uint8)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    token = np.asarray(multihost_utils.broadcast_one_to_all(token))
  return bytes(token.astype(np.uint8)).hex()


__all__ = ["DistributedError", "barrier", "initialize", "is_main_process", "shared_token"]
