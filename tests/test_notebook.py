"""notebooks/quickstart.ipynb runs top to bottom (nbclient, a fresh kernel on this Python) and is stored
without outputs."""

import json
import os
import re
import sys

import jax
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def test_the_notebook_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)


def _kernel_env(tmp_path) -> dict:
  """A kernel spec for this interpreter (whatever ``python3`` means elsewhere on the machine), one CPU
  device (conftest gives this process 2), and the session's compilation cache."""
  spec = tmp_path / "jupyter" / "kernels" / "enquant-test"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "enquant test", "language": "python"}))
  env = dict(os.environ)
  env["JUPYTER_PATH"] = str(tmp_path / "jupyter")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "xla_force_host_platform_device_count" not in f)
  env["ENQUANT_JAX_CACHE"] = jax.config.jax_compilation_cache_dir or os.path.join(ROOT, ".jax_cache")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def test_the_quickstart_notebook_runs_top_to_bottom_on_the_cpu(tmp_path, monkeypatch):
  env = _kernel_env(tmp_path)
  monkeypatch.setenv("JUPYTER_PATH", env["JUPYTER_PATH"])  # where the client looks for the kernel spec
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=240, kernel_name="enquant-test",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute(env=env)
  text = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.outputs if out.get("output_type") == "stream")
  assert "on cpu: 1 x cpu" in text
  assert "same key, same logits: True" in text
  natural = float(re.search(r"natural accuracy ([0-9.]+)", text).group(1))
  # 64 steps of a tiny ternary En2ResNet8 beat chance (0.1; sd 0.013 on the 512 test images): 0.195 on stop
  # 10's AVX-512 CPU, 0.289 on 128 images on earlier machines (the run's float path depends on the CPU).
  assert natural > 0.15, text
  assert re.search(r"weight sparsity [1-9][0-9.]*%", text), text  # ternary weights have zeros
  assert "the reloaded model gives the evaluated model's logits" in text
