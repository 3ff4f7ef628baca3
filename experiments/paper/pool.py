"""Run commands side by side, each process pinned to its own share of the CPUs.

On a 2-core CPU one process per core trains more images per second in all than one process on
both cores: 1.20x for the PGD-3 adversarial train step of the cpu-scale En1ResNet8 and 1.35x x 2 / 2 = 1.5x
for attack input gradients (BUILD_NOTES.md, "One process per core"). XLA:CPU's intra-op parallelism of these
small convolutions scales poorly, and compiles are single-threaded. ``experiments.paper --workers=N`` uses
this pool to train N missing runs at once.
"""

import dataclasses
import os
import subprocess
import time
from typing import Callable, Sequence


def cpu_shares(workers: int, cpus: Sequence[int] | None = None) -> list[tuple[int, ...]]:
  """``cpus`` (default: the CPUs this process may run on) split into ``workers`` contiguous, disjoint shares
  whose sizes differ by at most one."""
  cpus = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
  if workers < 1 or workers > len(cpus):
    raise ValueError(f"--workers must be between 1 and the {len(cpus)} CPUs this process may use, got "
                     f"{workers}")
  size, extra = divmod(len(cpus), workers)
  shares, start = [], 0
  for i in range(workers):
    end = start + size + (i < extra)
    shares.append(tuple(cpus[start:end]))
    start = end
  return shares


@dataclasses.dataclass(frozen=True)
class Job:
  """One command: its name (for the log lines), its argv, and the file that gets its stdout and stderr."""

  name: str
  argv: tuple[str, ...]
  log_path: str


def _pin(pid: int, share) -> None:
  """Pins a started process to ``share`` (it inherits nothing from a fork hook: see :func:`run_pool`)."""
  try:
    os.sched_setaffinity(pid, share)
  except ProcessLookupError:  # it already ended
    pass


def run_pool(jobs: Sequence[Job], workers: int, *, cpus: Sequence[int] | None = None,
             log: Callable[[str], None] = print, on_done: Callable[[Job, int], None] | None = None,
             poll_seconds: float = 0.5) -> dict[str, int]:
  """Runs ``jobs`` in order, at most ``workers`` at a time, worker slot i pinned to ``cpu_shares(...)[i]``.

  Returns every job's exit code by name. A failed job is logged (with its log file) and the others go on.
  ``on_done(job, code)`` is called in this process as each job ends. On an exception here (e.g. Ctrl-C) the
  running jobs are terminated (a training run resumes from its last checkpoint when run again).
  """
  shares = cpu_shares(workers, cpus)
  pending, running, codes = list(jobs), {}, {}
  try:
    while pending or running:
      for slot, share in enumerate(shares):
        if slot not in running and pending:
          job = pending.pop(0)
          os.makedirs(os.path.dirname(os.path.abspath(job.log_path)), exist_ok=True)
          out = open(job.log_path, "a")  # pylint: disable=consider-using-with
          # Pinned after the start, not in preexec_fn: a fork hook in a process running JAX warns of deadlocks.
          proc = subprocess.Popen(job.argv, stdout=out, stderr=subprocess.STDOUT)  # pylint: disable=consider-using-with
          _pin(proc.pid, share)
          running[slot] = (job, proc, out, time.time())
          log(f"[worker {slot}] start {job.name} on CPU {','.join(map(str, share))} (log: {job.log_path})")
      for slot, (job, proc, out, t0) in list(running.items()):
        code = proc.poll()
        if code is None:
          continue
        out.close()
        del running[slot]
        codes[job.name] = code
        state = "done" if code == 0 else f"FAILED (exit {code}; see {job.log_path})"
        log(f"[worker {slot}] {state}: {job.name} after {(time.time() - t0) / 60:.1f} min")
        if on_done is not None:
          on_done(job, code)
      time.sleep(poll_seconds)
  finally:
    for job, proc, out, _ in running.values():
      proc.terminate()
      proc.wait()
      out.close()
  return codes


__all__ = ["Job", "cpu_shares", "run_pool"]
