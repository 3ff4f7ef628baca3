"""notebooks/quickstart.ipynb: stored without outputs, its install cell's messages, and a run top to bottom
(nbclient, a fresh kernel on this Python) whose model learned: natural accuracy above 90 %, robust accuracy
above the untrained model's and falling with eps."""

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
RESULTS_MARK = "NOTEBOOK-RESULTS "
# Appended by the test after the last cell: the notebook's own variables, read back as JSON.
RESULTS_CELL = f"""
import json
print({RESULTS_MARK!r} + json.dumps(dict(
    natural=float(acc["natural"]), fgsm=float(acc["A1"]), eps=np.asarray(EPS).tolist(),
    before=np.asarray(before).tolist(), after=np.asarray(after).tolist(),
    weight_sparsity=float(report["total/weight_sparsity"]))))
"""


def _install_cell() -> str:
  nb = nbformat.read(NOTEBOOK, as_version=4)
  return next(c.source for c in nb.cells if c.cell_type == "code" and "ENQUANT_SOURCE" in c.source)


def test_the_notebook_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)


def _run_install_cell(monkeypatch, source: str | None, jax_versions: list[str]):
  """Runs the install cell as a fresh runtime would meet it: enquant not importable, pip recorded."""
  calls = []
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "enquant" else real_find_spec(name, *a))
  monkeypatch.setattr(importlib.metadata, "version", lambda dist: jax_versions.pop(0))
  monkeypatch.setattr(subprocess, "check_call", calls.append)
  if source is None:
    monkeypatch.delenv("ENQUANT_SOURCE", raising=False)
  else:
    monkeypatch.setenv("ENQUANT_SOURCE", source)
  with pytest.raises(SystemExit) as stop:
    exec(_install_cell(), {"__name__": "__main__"})  # pylint: disable=exec-used
  return str(stop.value), calls


def test_the_install_cell_asks_for_the_repository_when_the_placeholder_is_unfilled(monkeypatch):
  message, calls = _run_install_cell(monkeypatch, None, ["0.4.33"])
  assert not calls
  assert "ENQUANT_SOURCE" in message and "<OWNER>" in message


def test_the_install_cell_installs_from_git_and_asks_for_a_restart_when_jax_changed(monkeypatch):
  message, calls = _run_install_cell(monkeypatch, "git+https://example.org/x/enquant.git",
                                     ["0.4.33", "0.10.2"])
  assert len(calls) == 1 and calls[0][1:4] == ["-m", "pip", "install"]
  assert calls[0][-1].startswith("enquant") and calls[0][-1].endswith("@ git+https://example.org/x/enquant.git")
  assert "0.4.33 -> 0.10.2" in message and "Restart the runtime" in message


def _kernel_env(tmp_path) -> dict:
  """A kernel spec for this interpreter (whatever ``python3`` means elsewhere on the machine), one CPU
  device (conftest gives this process 2), the suite's compilation cache, and XLA's default backend
  optimisation (conftest's ``--xla_backend_optimization_level=0`` speeds compiles but made the notebook's
  150 training steps ~1.7x slower in CPU time)."""
  spec = tmp_path / "jupyter" / "kernels" / "enquant-test"
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "enquant test", "language": "python"}))
  env = dict(os.environ)
  env["JUPYTER_PATH"] = str(tmp_path / "jupyter")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "xla_force_host_platform_device_count" not in f
                              and "xla_backend_optimization_level" not in f)
  env["ENQUANT_JAX_CACHE"] = jax.config.jax_compilation_cache_dir or os.path.join(ROOT, ".jax_cache")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def test_the_quickstart_notebook_trains_a_model_that_learned(tmp_path, monkeypatch):
  env = _kernel_env(tmp_path)
  monkeypatch.setenv("JUPYTER_PATH", env["JUPYTER_PATH"])  # where the client looks for the kernel spec
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb.cells.append(nbformat.v4.new_code_cell(RESULTS_CELL))
  client = nbclient.NotebookClient(nb, timeout=900, kernel_name="enquant-test",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute(env=env)
  text = "\n".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
                   for out in cell.outputs if out.get("output_type") == "stream")
  assert "enquant is importable: nothing to install" in text
  assert "on cpu: 1 x cpu" in text
  assert "same key, same logits: True" in text
  assert "the reloaded model gives the evaluated model's logits" in text
  r = json.loads(text.split(RESULTS_MARK)[1].splitlines()[0])
  # 150 steps of loss (6) with PGD-2 at eps 0.1 (ternary En2ResNet8 8/16/32), two runs on AMD EPYC, 2 cores:
  # natural 0.955-0.957, FGSM 0.882 on the 1000 test images; PGD-5 at eps 0.02, 0.05, 0.1, 0.2 on 256
  # images 0.98-0.99, 0.95-0.97, 0.91-0.94, 0.51-0.52; the untrained model 0.13-0.16 .. 0.00.
  assert r["natural"] > 0.90, text
  assert r["fgsm"] > 0.70, text
  before, after = r["before"], r["after"]
  assert r["eps"] == pytest.approx([0.02, 0.05, 0.1, 0.2])
  assert all(a > b + 0.3 for a, b in zip(after, before)), text     # robust where the untrained is not
  assert all(a >= b for a, b in zip(after, after[1:])), text        # falling with eps ...
  assert after[0] - after[-1] > 0.2, text                           # ... and clearly so beyond eps 0.1
  assert r["weight_sparsity"] > 0.05, text  # ternary weights have zeros
