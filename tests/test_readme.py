"""Every ```python block of README.md runs as written: in order, each in a fresh Python process, in one
scratch directory (a later block may read the files an earlier one wrote, as a reader's would), on the
MNIST sample shipped with the package. Bash blocks are not executed."""

import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def python_blocks(markdown: str) -> list[str]:
  """The contents of the ```python fenced blocks, in order."""
  return re.findall(r"^```python\n(.*?)^```\s*$", markdown, flags=re.DOTALL | re.MULTILINE)


def test_python_blocks_are_found_and_other_blocks_left_out():
  text = "```bash\nrm -rf /\n```\n```python\nprint(1)\n```\n```\nplain\n```\n```python\nx = 2\n```\n"
  assert python_blocks(text) == ["print(1)\n", "x = 2\n"]


def _env() -> dict:
  """One CPU device, as a reader's machine (conftest fakes 2 for this process); the suite's compile cache."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "xla_force_host_platform_device_count" not in f)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _run_blocks(tmp_path) -> list[str]:
  with open(README, encoding="utf-8") as f:
    blocks = python_blocks(f.read())
  outputs = []
  for i, block in enumerate(blocks):
    ast.parse(block)  # a syntax error names the block here, not deep in a subprocess
    done = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=_env(), capture_output=True,
                          text=True, timeout=600, check=False)
    assert done.returncode == 0, f"README python block {i + 1} failed:\n{block}\n{done.stderr[-3000:]}"
    outputs.append(done.stdout)
  return outputs


def test_every_python_block_of_the_readme_runs_as_written(tmp_path):
  with open(README, encoding="utf-8") as f:
    blocks = python_blocks(f.read())
  # The three things a researcher does in a notebook, one block each.
  assert len(blocks) == 3
  assert "quant.binary_relax(optax." in blocks[0] and "PRNGKey(step)" in blocks[0]
  assert "pipeline.load_run(" in blocks[1]
  assert "autoattack.run(" in blocks[2]
  compose, restore, attack = _run_blocks(tmp_path)

  # Compose: P(w) of a ternary kernel holds exactly {-a, 0, +a}.
  values = [float(v) for v in compose.split("holds")[1].strip().strip("[]").split()]
  assert len(values) == 3 and values[1] == 0.0 and values[0] == pytest.approx(-values[2]), compose
  # Restore: the run of 1536 images at batch 32, one epoch, comes back at its last step.
  assert "En2ResNet8 restored at step 48" in restore, restore
  # AutoAttack: robust accuracy after each attack never exceeds the previous one (per-image worst case).
  acc = ast.literal_eval(attack.strip().splitlines()[-1])
  assert list(acc) == ["clean", "apgd-ce", "square"], attack
  assert acc["clean"] >= acc["apgd-ce"] >= acc["square"] >= 0.0, attack
  assert os.path.exists(tmp_path / "runs" / "readme" / "results.json")
