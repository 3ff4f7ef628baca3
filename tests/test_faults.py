"""Fault injection (issue 9): corrupt checkpoints, divergence, --overwrite, run directories, packed models.

One tiny Binary-Relax run (En2ResNet8 widths 4/4/4, 3 epochs on 192 embedded MNIST images) is trained once;
each fault is injected into a copy of its directory.
"""

import dataclasses
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from enquant import checkpoint as ckpt_lib
from enquant import config as config_lib
from enquant import data as data_lib
from enquant import export
from enquant import files
from enquant import pipeline
from enquant import train as train_lib
from enquant.models import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUIET = dict(progress=False, log=lambda *_: None)


def tiny_config(**train) -> config_lib.ExperimentConfig:
  return config_lib.ExperimentConfig(
      dataset="mnist", data_source="embedded", max_train=192, max_test=64,
      model=ModelConfig(num_classes=10, depth=8, widths=(4, 4, 4), noise_coef=0.1, ensembles=2),
      train=config_lib.TrainConfig(**dict(dict(epochs=3, batch_size=32, lr=0.1, lr_schedule="cosine"),
                                          **train)),
      quant=config_lib.QuantConfig(mode="br", bits=1, growth=1.5, relax_fraction=0.5),
      eval=config_lib.EvalConfig(attacks="", max_examples=32, eot_samples=0, batch_size=32),
  )


def _fail_on_epoch_2_row(append):
  def append_or_fail(path, row):
    if row["epoch"] == 2:
      raise OSError("disk full (injected)")
    append(path, row)
  return append_or_fail


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """``(cfg, workdir, results)`` of the finished tiny run (never modified by the tests).

  It is trained as an unlucky run is: writing epoch 2's metrics row fails (a full disk, injected) and the
  command stops; the re-run resumes and finishes.
  """
  workdir = str(tmp_path_factory.mktemp("faults") / "run")
  cfg = tiny_config()
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(files, "append_jsonl", _fail_on_epoch_2_row(files.append_jsonl))
    with pytest.raises(OSError, match="injected"):
      pipeline.train_and_evaluate(cfg, workdir, **QUIET)
  results = pipeline.train_and_evaluate(cfg, workdir, **QUIET)
  return cfg, workdir, results


@pytest.fixture
def run_copy(finished, tmp_path):
  cfg, workdir, results = finished
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  return cfg, copy, results


def _largest_array_file(workdir: str, epoch: int) -> str:
  pattern = os.path.join(workdir, "checkpoints", str(epoch), "state", "**", "d", "*")
  return max((p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)), key=os.path.getsize)


def _snapshot(workdir: str) -> dict[str, str]:
  out = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      out[os.path.relpath(path, workdir)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return out


def _cli(*args, cwd=ROOT):
  return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=240)


def _last_line(stderr: str) -> str:
  lines = [l for l in stderr.strip().splitlines() if l.strip()]
  return lines[-1] if lines else ""


# ---------------------------------------------------------------------------------- 1, 2: checkpoints


def test_flipped_bytes_in_the_latest_checkpoint_are_detected_and_the_run_resumes_from_the_previous(
    run_copy):
  cfg, workdir, results = run_copy
  os.remove(os.path.join(workdir, "results.json"))  # as if stopped after epoch 3's checkpoint
  path = _largest_array_file(workdir, 3)
  raw = bytearray(open(path, "rb").read())
  for i in range(0, len(raw), 97):
    raw[i] ^= 0x5A
  open(path, "wb").write(bytes(raw))
  lines = []
  resumed = pipeline.train_and_evaluate(cfg, workdir, progress=False, log=lines.append)
  warnings = [l for l in lines if l.startswith("warning:")]
  assert len(warnings) == 1 and "checkpoints/3 failed verification" in warnings[0], lines
  assert any("resumed from" in l and "checkpoints/2" in l for l in lines), lines
  # Epoch 3 was redone from the good checkpoint 2: the same run, bitwise.
  assert resumed["natural_accuracy"] == results["natural_accuracy"]
  assert resumed["efficiency"]["packed"] == results["efficiency"]["packed"]
  assert os.listdir(os.path.join(workdir, "checkpoints", "rejected")) == ["3"]
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    assert ckpt.committed_epochs() == [2, 3]
    ckpt.verify(3)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _empty(path):
  open(path, "wb").close()


@pytest.mark.parametrize("fault", ["truncated", "emptied", "missing", "no_record", "record_edited"])
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one_in_one_line(run_copy, fault, capsys):
  cfg, workdir, _ = run_copy
  latest = os.path.join(workdir, "checkpoints", "3")
  record = os.path.join(latest, "integrity.json")
  if fault == "truncated":
    _truncate(_largest_array_file(workdir, 3))
  elif fault == "emptied":
    for path in glob.glob(os.path.join(latest, "state", "**", "*"), recursive=True):
      if os.path.isfile(path):
        _empty(path)
  elif fault == "missing":
    os.remove(_largest_array_file(workdir, 3))
  elif fault == "no_record":  # a save interrupted before its commit
    os.remove(record)
  else:
    data = json.load(open(record))
    data["epoch"] = 4
    json.dump(data, open(record, "w"))
  capsys.readouterr()
  _, _, _, state = pipeline.load_run(workdir)  # logs to stdout
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 1 and lines[0].startswith("warning: checkpoint ") and "\n" not in lines[0]
  assert lines[0].endswith(f"using checkpoint {os.path.join(workdir, 'checkpoints', '2')} instead")
  assert int(state.step) == 2 * (cfg.max_train // cfg.train.batch_size)


def test_when_no_checkpoint_is_usable_the_run_stops_with_one_clear_line(run_copy):
  cfg, workdir, _ = run_copy
  os.remove(os.path.join(workdir, "results.json"))
  for epoch in (2, 3):
    _truncate(_largest_array_file(workdir, epoch))
  with pytest.raises(ckpt_lib.CorruptCheckpointError, match="no usable checkpoint") as info:
    pipeline.train_and_evaluate(cfg, workdir, **QUIET)
  assert "\n" not in str(info.value) and "--overwrite" in str(info.value)


def test_a_non_finite_state_is_never_committed_and_retention_keeps_the_newest_good(run_copy):
  _, workdir, _ = run_copy
  _, _, _, state = pipeline.load_run(workdir)
  bad = state._replace(params=jax.tree.map(lambda p: p * np.nan, state.params))
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    meta = {"fingerprint": ckpt.verify(3)["meta"]["fingerprint"]}
    with pytest.raises(ValueError, match="NaN"):  # a NonFiniteStateError
      ckpt.save(4, bad, meta)
    assert sorted(os.listdir(ckpt.directory)) == ["2", "3"]  # nothing written, nothing deleted
    ckpt.save(4, state, meta)
    assert ckpt.committed_epochs() == [3, 4]
  finally:
    ckpt.close()


def test_retention_deletes_only_this_runs_checkpoints_and_names_the_rest_in_one_warning(tmp_path):
  shared = tmp_path / "shared"
  for name in ("0", ".staging-keep"):
    os.makedirs(shared / name)
    (shared / name / "precious.txt").write_text("keep me")
  (shared / "notes.txt").write_text("keep me too")
  os.symlink(shared, tmp_path / "checkpoints")
  state = {"w": np.arange(3, dtype=np.float32)}
  with pytest.warns(UserWarning), ckpt_lib.Checkpointer(str(shared)) as other:
    other.save(5, state, {"fingerprint": "other"})  # another configuration's committed checkpoint
  with ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"), keep=1) as ckpt:
    with pytest.warns(UserWarning) as caught:
      for epoch in (1, 2, 3):
        ckpt.save(epoch, state, {"fingerprint": "run"})
  assert len(caught) == 1  # one warning, naming everything that is not this run's
  named = str(caught[0].message).split("did not write: ")[1].split(", ")
  assert sorted(named) == [".staging-keep", "0", "5", "notes.txt"]
  assert sorted(os.listdir(shared)) == [".staging-keep", "0", "3", "5", "notes.txt"]
  assert (shared / "0" / "precious.txt").read_text() == "keep me"
  assert (shared / ".staging-keep" / "precious.txt").read_text() == "keep me"


def test_failed_checkpoint_reads_print_no_stray_tracebacks(tmp_path):
  # Orbax used to leave unawaited coroutines (printed at exit) after a restore into a wrong shape.
  script = f"""
import jax.numpy as jnp
from enquant import checkpoint
ckpt = checkpoint.Checkpointer({str(tmp_path)!r})
ckpt.save(1, {{"a": jnp.ones((3, 4)), "b": jnp.arange(5.0)}}, {{}})
for _ in range(3):
  try:
    ckpt.restore(1, {{"a": jnp.ones((3, 5)), "b": jnp.arange(5.0)}})
  except ValueError:
    pass
ckpt.close()
print("ok")
"""
  proc = _cli("-c", script)
  assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr[-2000:]


# ----------------------------------------------------------------------------------- 3: divergence


def test_divergence_stops_training_at_once_and_keeps_the_last_good_checkpoint(run_copy):
  cfg, workdir, _ = run_copy
  os.remove(os.path.join(workdir, "results.json"))
  shutil.rmtree(os.path.join(workdir, "checkpoints", "3"))
  _, _, _, state = pipeline.load_run(workdir)
  # Epoch 2's state with exploded (still finite) weights: the next steps diverge.
  exploded = state._replace(params=jax.tree.map(lambda p: p * np.float32(1e30), state.params))
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  ckpt.save(2, exploded, {"fingerprint": ckpt_lib.fingerprint(cfg.fingerprint_dict())})
  ckpt.close()
  with pytest.raises(FloatingPointError) as info:  # a train.NonFiniteError
    pipeline.train_and_evaluate(cfg, workdir, **QUIET)
  message = str(info.value)
  assert message.startswith("non-finite ") and "at epoch 3, step " in message, message
  assert "the last good checkpoint (epoch 2) is kept" in message and "\n" not in message
  assert not os.path.exists(os.path.join(workdir, "results.json"))
  assert [r["epoch"] for r in files.read_jsonl(os.path.join(workdir, "metrics.jsonl"))] == [1, 2]
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    assert ckpt.committed_epochs() == [2]


def test_the_cli_exits_non_zero_with_one_line_when_training_diverges(monkeypatch, capsys, tmp_path):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from experiments import common  # pylint: disable=g-import-not-at-top

  def diverge(*args, **kwargs):
    raise train_lib.NonFiniteError("non-finite loss (nan) at epoch 1, step 2 of 2 (global step 2): "
                                   "training stopped; no results written, no checkpoint was written")

  monkeypatch.setattr(pipeline, "train_and_evaluate", diverge)
  flags.FLAGS(["mnist", f"--workdir={tmp_path}", "--data_source=embedded"])
  try:
    with pytest.raises(SystemExit) as exit_info:
      common.run("mnist")
  finally:
    flags.FLAGS.unparse_flags()
  assert exit_info.value.code == 3
  assert capsys.readouterr().err == "error: non-finite loss (nan) at epoch 1, step 2 of 2 (global " \
      "step 2): training stopped; no results written, no checkpoint was written\n"


def test_non_finite_metrics_are_never_written():
  with pytest.raises(ValueError, match="m_bound is not a finite number"):
    files.json_line({"epoch": 1, "m_bound": float("nan")})
  with pytest.raises(ValueError, match="accuracy.A1 is not a finite number"):
    files.write_json_atomic("/nonexistent/never.json", {"accuracy": {"A1": float("inf")}})


# ------------------------------------------------------------------------------ 4, 5: --overwrite


def test_overwrite_loads_the_data_before_it_touches_the_run_and_then_clears_everything(run_copy, tmp_path):
  cfg, workdir, _ = run_copy
  files.write_json_atomic(os.path.join(workdir, "evaluation-strong.json"), {"A1": 0.5})
  open(os.path.join(workdir, "notes.txt"), "w").write("mine")
  before = _snapshot(workdir)
  missing = dataclasses.replace(cfg, data_source="local", data_dir=str(tmp_path / "empty"),
                                train=dataclasses.replace(cfg.train, lr=0.05))
  with pytest.raises(FileNotFoundError):
    pipeline.train_and_evaluate(missing, workdir, overwrite=True, **QUIET)
  assert _snapshot(workdir) == before  # nothing deleted or changed
  new = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, lr=0.05))
  assert pipeline.train_and_evaluate(new, workdir, overwrite=True, stop_after_epochs=0, **QUIET) is None
  assert sorted(os.listdir(workdir)) == [".lock", "config.json", "metrics.jsonl", "notes.txt"]
  assert files.read_json(os.path.join(workdir, "config.json"))["train"]["lr"] == 0.05


def test_a_run_that_failed_on_its_data_leaves_nothing_that_blocks_the_corrected_command(tmp_path):
  workdir = str(tmp_path / "run")
  cfg = tiny_config()
  bad = dataclasses.replace(cfg, data_source="local", data_dir=str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError):
    pipeline.train_and_evaluate(bad, workdir, **QUIET)
  assert not os.path.exists(os.path.join(workdir, "config.json"))
  corrected = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=64))
  pipeline.train_and_evaluate(corrected, workdir, stop_after_epochs=0, **QUIET)
  assert files.read_json(os.path.join(workdir, "config.json"))["train"]["batch_size"] == 64


# --------------------------------------------------------------------------- 6: run directory errors


@pytest.mark.parametrize("where", ["a_file", "under_a_file"])
def test_an_unusable_run_directory_is_one_clear_cli_error(tmp_path, where):
  blocker = tmp_path / "blocker"
  blocker.write_text("not a directory")
  workdir = blocker if where == "a_file" else blocker / "run"
  proc = _cli("-m", "experiments.mnist", "--data_source=embedded", f"--workdir={workdir}")
  assert proc.returncode == 2
  assert _last_line(proc.stderr).startswith(f"error: run directory {workdir} "), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes anywhere")
def test_a_read_only_run_directory_is_refused_before_training(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  workdir.chmod(0o555)
  try:
    with pytest.raises(pipeline.WorkdirError, match="not writable"):
      pipeline.train_and_evaluate(tiny_config(), str(workdir), **QUIET)
  finally:
    workdir.chmod(0o755)


# --------------------------------------------------------------------------- 7: standalone packed model


def test_the_packed_file_alone_rebuilds_the_evaluated_model(finished):
  _, workdir, _ = finished
  _, model, variables, _ = pipeline.load_run(workdir, log=lambda *_: None)
  packed_model, packed_variables = export.load_model(os.path.join(workdir, "model_packed.npz"))
  assert packed_model.config == model.config
  chex.assert_trees_all_equal(jax.device_get(packed_variables), jax.device_get(variables))
  ds = data_lib.load("mnist", source="embedded", max_train=1, max_test=16)
  x = data_lib.to_float(ds.test_images)
  key = jax.random.PRNGKey(7)
  np.testing.assert_array_equal(np.asarray(packed_model.apply(packed_variables, x, key)),
                                np.asarray(model.apply(variables, x, key)))


# ----------------------------------------------------------------------- 8: metrics rows vs checkpoints


def test_a_checkpoint_is_never_committed_without_its_metrics_row(finished):
  # The fixture's first attempt failed writing epoch 2's row: checkpoint 2 was not committed (the row
  # comes first), so the re-run resumed from epoch 1, redid epoch 2, and the metrics have no gap.
  _, workdir, _ = finished
  assert [r["epoch"] for r in files.read_jsonl(os.path.join(workdir, "metrics.jsonl"))] == [1, 2, 3]


# ------------------------------------------------------------------------------ 9, 10: files, packaging


def test_the_embedded_data_is_found_from_a_folder_holding_a_directory_named_enquant(tmp_path):
  (tmp_path / "enquant" / "enquant").mkdir(parents=True)  # e.g. the folder that holds a clone
  proc = _cli("-c", "from enquant import data; "
              "print(data.load('mnist', source='embedded', max_train=8, max_test=8).train_images.shape)",
              cwd=tmp_path)
  assert proc.returncode == 0 and proc.stdout.strip() == "(8, 28, 28, 1)", proc.stderr[-2000:]


def test_result_files_get_the_permissions_of_ordinary_files(finished, tmp_path):
  umask = os.umask(0o022)
  try:
    files.write_json_atomic(str(tmp_path / "a.json"), {"x": 1})
    export.save(tmp_path / "b.npz", export.pack({"conv": {"kernel": np.ones((1, 3, 3, 1, 2), np.float32)}},
                                                1))
    assert {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {"a.json": 0o644,
                                                                               "b.npz": 0o644}
  finally:
    os.umask(umask)
  _, workdir, _ = finished  # trained under the umask the test found
  modes = {n: os.stat(os.path.join(workdir, n)).st_mode & 0o777 for n in os.listdir(workdir)
           if os.path.isfile(os.path.join(workdir, n))}
  assert {"results.json", "config.json", "model_packed.npz", "training_curves.png"} <= set(modes)
  assert set(modes.values()) == {0o666 & ~umask}, modes
