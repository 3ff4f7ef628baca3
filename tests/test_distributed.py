"""Multi-host data parallelism: 2 JAX processes on this machine equal 1 process with 2 devices.

Two worker processes (this file run as a script: localhost coordinator, gloo CPU collectives, one CPU
device each) train through the library's multi-host path: ``distributed.initialize``, the global mesh
(``train.data_mesh``), each process gathering only its rows of every batch (``train.run_epochs``:
``process_rows`` / ``put_batch``), the replicated state (``train.put_replicated``), the real train step,
then an orbax multi-host checkpoint (integrity record by process 0, barriers) restored by both. The
reference is the same function in this pytest process on its 2 fake devices (``tests/conftest.py``),
computed while the workers run.

The whole pipeline in 2 processes (``train_and_evaluate``: process-0-only logs, metrics, TensorBoard and
results, the sharded test pass) takes minutes of compilation on 2 cores: ``ENQUANT_SLOW_TESTS=1``.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from enquant import checkpoint as ckpt_lib
from enquant import config as config_lib
from enquant import data as data_lib
from enquant import losses
from enquant import train as train_lib
from enquant.models import EnResNet, ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLOW = os.environ.get("ENQUANT_SLOW_TESTS") == "1"

# tests/test_train.py's two-device step (En2ResNet8 4/8/8, float SGD, natural loss, batch 8, 4 steps of 1
# epoch): this process's reference shares its compilations through the session's persistent cache.
TINY_MODEL = ModelConfig(num_classes=10, depth=8, widths=(4, 8, 8), noise_coef=0.1, ensembles=2)
TRAIN = config_lib.TrainConfig(epochs=1, batch_size=8, lr=0.1)


def _setup():
  model = EnResNet(TINY_MODEL)
  tx, _ = train_lib.make_optimizer(TRAIN, config_lib.QuantConfig(), steps_per_epoch=4)
  ds = data_lib.load("mnist", source="embedded", max_train=32, max_test=8)
  return model, tx, ds, data_lib.to_float(ds.train_images[:1])


def initial_state():
  """The initial train state (``create_train_state``), on the host."""
  model, tx, _, sample = _setup()
  return jax.device_get(train_lib.create_train_state(model, tx, jax.random.PRNGKey(0), sample))


def train_and_checkpoint(state, devices, checkpoint_dir: str):
  """Trains 4 steps from ``state`` on 32 embedded MNIST images over ``devices`` (None: every device of
  every process), then saves and restores a checkpoint.

  Returns:
    ``(state, restored, train metrics of the epoch, (first, last + 1) row of a batch this process fed)``.
  """
  model, tx, ds, _ = _setup()
  mesh = train_lib.data_mesh(devices)
  repl, _ = train_lib.shardings(mesh)
  state = train_lib.put_replicated(state, repl)
  step = train_lib.make_train_step(model, tx, losses.make_objective(losses.LossConfig(kind="natural")),
                                   augment=False, mesh=mesh)
  epochs = []
  state = train_lib.run_epochs(step, state, ds.train_images, ds.train_labels, cfg=TRAIN, mesh=mesh,
                               start_epoch=0, stop_epoch=1, progress=False,
                               on_epoch_end=lambda e, st, m: epochs.append(m))
  with ckpt_lib.Checkpointer(checkpoint_dir) as ckpt:
    ckpt.save(1, state, {"fingerprint": "tiny"})
    restored = ckpt.restore_latest(state, expect_fingerprint="tiny")
  rows = train_lib.process_rows(mesh, TRAIN.batch_size)
  return state, restored, epochs[0], (rows.start, rows.stop)


def _flat(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_leaves_with_path(jax.device_get(tree))}


def _unflat(flat, like):
  """The pytree of ``like`` (shapes only) with the arrays of ``flat`` (:func:`_flat`)."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(like)
  return jax.tree_util.tree_unflatten(treedef, [flat[jax.tree_util.keystr(p)] for p, _ in paths])


def _worker(address: str, index: int, out: str) -> None:
  """One of the two processes: train from the test's initial state (so no worker compiles the model's
  initialisation), checkpoint, write its final state and a JSON report line."""
  from enquant import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(address, 2, index)
  with np.load(os.path.join(out, "initial_state.npz")) as f:
    model, tx, _, sample = _setup()
    shapes = jax.eval_shape(lambda: train_lib.create_train_state(model, tx, jax.random.PRNGKey(0), sample))
    state = _unflat(dict(f), shapes)
  state, restored, metrics, rows = train_and_checkpoint(state, None, os.path.join(out, "checkpoints"))
  state, restored = _flat(state), _flat(restored.state)
  np.savez(os.path.join(out, f"state{index}.npz"), **state)
  print(json.dumps({"rows": rows, "devices": jax.device_count(), "local": jax.local_device_count(),
                    "restored_equal": all(np.array_equal(state[k], restored[k]) for k in state),
                    "metrics": {k: float(v) for k, v in metrics.items()}}), flush=True)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _worker_env() -> dict:
  env = dict(os.environ)
  # One CPU device per process (conftest gives this process 2), the session's compilation cache.
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "xla_force_host_platform_device_count" not in f)
  env["ENQUANT_JAX_CACHE"] = jax.config.jax_compilation_cache_dir or os.path.join(ROOT, ".jax_cache")
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _start_workers(command: list[str], out: str) -> list[subprocess.Popen]:
  address = f"localhost:{_free_port()}"
  return [subprocess.Popen([sys.executable, *command, address, str(i), out], cwd=ROOT, env=_worker_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _wait(procs: list[subprocess.Popen]) -> list[str]:
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=300)[0])
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for proc, text in zip(procs, outputs):
    assert proc.returncode == 0, text[-3000:]
  return outputs


def test_two_processes_train_exactly_as_one_process_with_two_devices(tmp_path):
  state0 = initial_state()
  np.savez(tmp_path / "initial_state.npz", **_flat(state0))
  workers = _start_workers([__file__], str(tmp_path))  # they compile while this process does the same
  try:
    state, restored, metrics, rows = train_and_checkpoint(state0, jax.devices()[:2], str(tmp_path / "one"))
  finally:
    outputs = _wait(workers)
  assert rows == (0, 8)
  reports = [json.loads(text.strip().splitlines()[-1]) for text in outputs]
  # Each process held one device of the 2-device mesh and gathered only its half of every batch.
  assert [(r["devices"], r["local"], tuple(r["rows"])) for r in reports] == [(2, 1, (0, 4)),
                                                                            (2, 1, (4, 8))]
  assert all(r["restored_equal"] for r in reports)  # the multi-host checkpoint restores bitwise
  want = _flat(state)
  assert int(want[".step"]) == 4
  for index in range(2):  # both processes end with the state of the 2-device process
    with np.load(tmp_path / f"state{index}.npz") as got:
      assert sorted(got.files) == sorted(want)
      for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
  for key in ("train_loss", "train_nat_acc"):
    np.testing.assert_allclose(reports[0]["metrics"][key], metrics[key], rtol=1e-5, err_msg=key)
  # One committed checkpoint (process 0's record), no staging folder left, verified.
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1"]
  with ckpt_lib.Checkpointer(str(tmp_path / "checkpoints")) as ckpt:
    assert ckpt.verify(1, expect_fingerprint="tiny")["epoch"] == 1
  assert all(np.array_equal(a, _flat(restored.state)[k]) for k, a in want.items())


# ---------------------------------------------------------------------------------------------------
# The whole pipeline in 2 processes (ENQUANT_SLOW_TESTS=1).


def pipeline_config() -> config_lib.ExperimentConfig:
  """``tests/test_faults.py``'s run (En2ResNet8 4/4/4, Binary-Relax binary, 3 epochs of 6 steps)."""
  return config_lib.ExperimentConfig(
      dataset="mnist", data_source="embedded", max_train=192, max_test=64,
      model=ModelConfig(num_classes=10, depth=8, widths=(4, 4, 4), noise_coef=0.1, ensembles=2),
      train=config_lib.TrainConfig(epochs=3, batch_size=32, lr=0.1, lr_schedule="cosine"),
      quant=config_lib.QuantConfig(mode="br", bits=1, growth=1.5, relax_fraction=0.5),
      eval=config_lib.EvalConfig(attacks="", max_examples=32, eot_samples=0, batch_size=32),
  )


def _pipeline_worker(address: str, index: int, workdir: str) -> None:
  from enquant import distributed  # pylint: disable=g-import-not-at-top
  from enquant import pipeline  # pylint: disable=g-import-not-at-top
  distributed.initialize(address, 2, index)
  results = pipeline.train_and_evaluate(pipeline_config(), workdir, progress=False)
  print("natural_accuracy", results["natural_accuracy"], flush=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """``(one_process_dir, two_processes_dir, worker outputs)`` of the whole pipeline."""
  from enquant import pipeline  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.mktemp("distributed")
  single, multi = str(base / "one_process"), str(base / "two_processes")
  workers = _start_workers([__file__, "--pipeline"], multi)
  try:
    pipeline.train_and_evaluate(pipeline_config(), single, progress=False, log=lambda *_: None)
  finally:
    outputs = _wait(workers)
  return single, multi, outputs


@pytest.mark.skipif(not SLOW, reason="minutes of compilation on 2 cores: ENQUANT_SLOW_TESTS=1")
def test_the_whole_pipeline_in_two_processes_equals_one_process(runs):
  from enquant import files  # pylint: disable=g-import-not-at-top
  from enquant import pipeline  # pylint: disable=g-import-not-at-top
  single, multi, _ = runs
  _, _, _, state1 = pipeline.load_run(single)
  _, _, _, state2 = pipeline.load_run(multi)
  assert int(state1.step) == int(state2.step) == 18
  want, got = _flat(state1), _flat(state2)
  for name, value in want.items():
    np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-5, err_msg=name)
  rows1, rows2 = (files.read_jsonl(os.path.join(d, "metrics.jsonl")) for d in (single, multi))
  assert [r["epoch"] for r in rows2] == [1, 2, 3]  # one row per epoch: only process 0 writes
  for r1, r2 in zip(rows1, rows2):
    for key, value in r1.items():
      if key not in ("epoch_seconds", "images_per_second"):
        np.testing.assert_allclose(r2[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
  res1, res2 = (files.read_json(os.path.join(d, "results.json")) for d in (single, multi))
  assert res2["natural_accuracy"] == res1["natural_accuracy"]
  assert res2["efficiency"]["sparsity"] == res1["efficiency"]["sparsity"]


@pytest.mark.skipif(not SLOW, reason="minutes of compilation on 2 cores: ENQUANT_SLOW_TESTS=1")
def test_in_the_pipeline_process_zero_alone_logs_and_writes(runs):
  from enquant import tensorboard  # pylint: disable=g-import-not-at-top
  _, multi, (out0, out1) = runs
  assert "epoch 3/3" in out0 and "in 2 processes" in out0
  assert "epoch" not in out1 and "warning" not in out1.lower(), out1
  assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["2", "3"]  # keep=2, no staging
  for name in ("config.json", "results.json", "results.md", "model_packed.npz", "training_curves.png"):
    assert os.path.isfile(os.path.join(multi, name)), name
  scalars = tensorboard.read_scalars(os.path.join(multi, tensorboard.DIRNAME))
  assert [s for s, _ in scalars["accuracy/test"]] == [1, 2, 3]
  assert len(scalars["binary_relax/lambda"]) == 3


if __name__ == "__main__":  # a worker process: [--pipeline] ADDRESS INDEX OUT
  from enquant import runtime  # pylint: disable=g-import-not-at-top
  runtime.configure()
  args = sys.argv[1:]
  run_worker = _pipeline_worker if args[0] == "--pipeline" else _worker
  args = args[1:] if args[0] == "--pipeline" else args
  run_worker(args[0], int(args[1]), args[2])
