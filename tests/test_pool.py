"""experiments.pool: CPU shares and the pinned process pool behind ``experiments.paper --workers``."""

import os
import subprocess
import sys

import pytest

from experiments.paper import pool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPUS = sorted(os.sched_getaffinity(0))


def test_cpu_shares_are_disjoint_contiguous_and_balanced():
  assert pool.cpu_shares(2, [0, 1]) == [(0,), (1,)]
  assert pool.cpu_shares(2, [4, 0, 1, 2, 3]) == [(0, 1, 2), (3, 4)]
  assert pool.cpu_shares(1, [0, 1]) == [(0, 1)]
  with pytest.raises(ValueError, match="between 1 and the 2 CPUs"):
    pool.cpu_shares(3, [0, 1])
  with pytest.raises(ValueError, match="between 1"):
    pool.cpu_shares(0, [0, 1])


def _job(tmp_path, name, code):
  return pool.Job(name, (sys.executable, "-c", code), str(tmp_path / "logs" / f"{name}.log"))


@pytest.mark.skipif(len(CPUS) < 2, reason="needs 2 CPUs")
def test_pool_runs_jobs_side_by_side_each_pinned_to_its_share(tmp_path):
  flag = tmp_path / "b-started"
  affinity = "import os; print(sorted(os.sched_getaffinity(0)))"
  # a only succeeds if b runs while a waits: one job at a time would fail it.
  wait = lambda tenths: (f"import os, sys, time\n{affinity}\nfor _ in range({tenths}):\n  if "
                         f"os.path.exists({str(flag)!r}): sys.exit(0)\n  time.sleep(0.1)\nsys.exit(4)")
  jobs = [_job(tmp_path, "a", wait(600)), _job(tmp_path, "b", f"{affinity}; open({str(flag)!r}, 'w').close()"),
          _job(tmp_path, "c", "import sys; sys.exit(3)"), _job(tmp_path, "d", affinity)]
  lines, done = [], []
  codes = pool.run_pool(jobs, 2, cpus=CPUS[:2], log=lines.append, on_done=lambda j, c: done.append(j.name),
                        poll_seconds=0.05)
  assert codes == {"a": 0, "b": 0, "c": 3, "d": 0}
  assert sorted(done) == ["a", "b", "c", "d"]  # each job ran once
  seen = {n: (tmp_path / "logs" / f"{n}.log").read_text().split("\n")[0] for n in "abd"}
  assert seen["a"] == f"[{CPUS[0]}]" and seen["b"] == f"[{CPUS[1]}]"  # slot 0 and slot 1
  assert seen["d"] in (f"[{CPUS[0]}]", f"[{CPUS[1]}]")
  assert any("FAILED (exit 3" in line and "c.log" in line for line in lines)
  # The same jobs one at a time: a waits for b, which has not started, and fails.
  flag.unlink(missing_ok=True)
  jobs[0] = _job(tmp_path, "a", wait(20))
  assert pool.run_pool(jobs[:2], 1, cpus=CPUS[:1], log=lambda _: None, poll_seconds=0.05)["a"] == 4


def test_paper_run_flag_names_an_existing_run():
  out = subprocess.run([sys.executable, "-m", "experiments.paper", "--table=VIII", "--run=no-such-run",
                        "--runs_root=/nonexistent"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert out.stderr.strip().splitlines() == [
      "error: --run=no-such-run is no run of table(s) VIII at --scale=cpu (--list prints their names)"]
