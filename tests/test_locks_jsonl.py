"""The run-directory lock and the JSON Lines reader that survives a cut-short last write."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from enquant import files


def test_second_holder_is_refused_with_the_holders_pid(tmp_path):
  lock = str(tmp_path / ".lock")
  with files.hold_lock(lock, "run directory X"):
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(f"""
            from enquant import files
            try:
              with files.hold_lock({lock!r}, "run directory X"):
                print("acquired")
            except files.LockedError as e:
              print("refused:", e)
            """)], capture_output=True, text=True, check=True)
  assert f"refused: run directory X is in use by pid {os.getpid()}" in child.stdout


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
  lock = str(tmp_path / ".lock")
  proc = subprocess.Popen(
      [sys.executable, "-c", f"from enquant import files\nimport time\n"
       f"with files.hold_lock({lock!r}, 'x'):\n  print('held', flush=True)\n  time.sleep(60)"],
      stdout=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held"
  with pytest.raises(files.LockedError):
    with files.hold_lock(lock, "x"):
      pass
  proc.kill()
  proc.wait()
  with files.hold_lock(lock, "x"):  # the dead holder's lock is free; its stale pid is replaced
    assert open(lock).read().strip() == str(os.getpid())


def test_truncated_last_jsonl_line_is_dropped_with_a_warning(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text(json.dumps({"epoch": 1}) + "\n" + '{"epoch": 2, "lo')
  with pytest.warns(UserWarning, match="truncated last line"):
    assert files.read_jsonl(str(path)) == [{"epoch": 1}]


def test_bad_middle_jsonl_line_names_file_and_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not JSON"):
    files.read_jsonl(str(path))
