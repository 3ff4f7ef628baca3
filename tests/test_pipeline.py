"""End to end: a short Binary-Relax run writes a complete run directory; the CLI rejects bad flags."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from enquant import config as config_lib
from enquant import evaluate as evaluate_lib
from enquant import export
from enquant import files
from enquant import pipeline
from enquant import results as results_lib
from enquant import run_results
from enquant.models import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ternary_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("br_run"))
  cfg = config_lib.ExperimentConfig(
      dataset="mnist", data_source="embedded", max_train=1280, max_test=256,
      model=ModelConfig(num_classes=10, depth=8, widths=(8, 16, 16), noise_coef=0.1, ensembles=2),
      train=config_lib.TrainConfig(epochs=2, batch_size=32, lr=0.2, lr_schedule="cosine"),
      quant=config_lib.QuantConfig(mode="br", bits=2, growth=1.5, growth_every_epochs=0.2,
                                   relax_fraction=0.5),
      eval=config_lib.EvalConfig(attacks="a1", eps=0.1, max_examples=64, eot_samples=0, batch_size=64),
  )
  # Trained as an unlucky run is: the process dies in its robust evaluation, after the natural pass of the
  # first batch; the rerun resumes from the last checkpoint and that finished unit (the evaluation equals
  # an uninterrupted one: test_evaluation_of_a_randomized_model_is_reproducible_with_the_same_key).
  def killed(*args, **kwargs):
    raise KeyboardInterrupt("killed (injected)")
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(evaluate_lib, "_spec_correct", killed)
    with pytest.raises(KeyboardInterrupt):
      pipeline.train_and_evaluate(cfg, workdir, progress=False, log=lambda *_: None)
  progress = files.read_json(os.path.join(workdir, "evaluation_progress.json"))
  assert progress["done"] == ["0/natural"]
  lines = []
  results = pipeline.train_and_evaluate(cfg, workdir, progress=False, log=lines.append)
  assert any("resumed from" in line and "(epoch 2/2)" in line for line in lines), lines
  assert not any(line.startswith("epoch ") for line in lines)  # no epoch was trained again
  assert not os.path.exists(os.path.join(workdir, "evaluation_progress.json"))  # removed once written
  return cfg, workdir, results


def test_short_br_run_ends_exactly_in_the_quantized_set_and_beats_chance(ternary_run):
  cfg, workdir, results = ternary_run
  _, _, variables, state = pipeline.load_run(workdir)
  # After relax_steps the model's params are u = P(w) exactly: every conv kernel of every member takes
  # at most three values {-a, 0, a}, and equals the evaluated P(w) bitwise.
  for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
    name = jax.tree_util.keystr(path)
    if leaf.ndim == 5:
      for member in np.asarray(leaf):
        values = np.unique(np.abs(member))
        assert len(values[values > 0]) <= 1, (name, values[:5])
  np.testing.assert_array_equal(np.asarray(state.params["stage1_block1"]["conv1"]["kernel"]),
                                np.asarray(variables["params"]["stage1_block1"]["conv1"]["kernel"]))
  # Chance is 0.1 (this 2-epoch run's accuracy depends a little on the CPU's float kernels).
  assert results["natural_accuracy"] > 0.3, results["natural_accuracy"]


def test_run_directory_holds_results_tables_figures_and_a_packed_model(ternary_run):
  _, workdir, results = ternary_run
  for name in ("config.json", "metrics.jsonl", "results.json", "results.md", "model_packed.npz",
               "adversarial_examples.png", "training_curves.png"):
    assert os.path.exists(os.path.join(workdir, name)), name
  saved = json.load(open(os.path.join(workdir, "results.json")))
  eff = saved["efficiency"]
  assert 0 < eff["sparsity"]["total/weight_sparsity"] < 1  # ternary weights have exact zeros
  assert eff["packed"]["packed_bytes"] < eff["packed"]["float32_bytes"] / 4
  assert eff["pruning"]["params_after"] <= eff["pruning"]["params_before"]
  robust = saved["robust"]
  assert robust["examples"] == 64 and 0 <= robust["accuracy"]["A1"] <= 1
  # The RobustBench-style entry counts as the field does: robust AND correct on the clean image.
  typed = results_lib.RunResults.from_dict(saved).robust
  both = typed.mask("natural") & typed.mask("A1")
  assert robust["robustbench"]["robust_acc"] == pytest.approx(both.mean())
  assert robust["robustbench"]["robust_acc"] <= min(robust["accuracy"]["A1"], robust["accuracy"]["natural"])
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert all("m_bound" in r and "weight_sparsity" in r for r in rows)
  assert saved["history"] == rows  # the results file alone redraws the per-epoch curves
  assert saved["train_seconds"] == pytest.approx(sum(r["epoch_seconds"] for r in rows))
  assert 0 < saved["eval_seconds"] <= saved["wall_seconds"]
  table = open(os.path.join(workdir, "results.md")).read()
  assert "| N | A1 |" in table and f"{100 * results['natural_accuracy']:.2f}%" in table
  # The packed file restores exactly the evaluated P(w).
  _, _, variables, _ = pipeline.load_run(workdir)
  restored = export.unpack(export.load(os.path.join(workdir, "model_packed.npz")))
  restored = restored.get("params", restored)
  np.testing.assert_array_equal(np.asarray(restored["stem"]["kernel"]),
                                np.asarray(variables["params"]["stem"]["kernel"]))


def test_a_run_stopped_after_its_last_epoch_keeps_a_packed_model_from_its_checkpoint(ternary_run, tmp_path):
  from experiments.paper import committing  # pylint: disable=g-import-not-at-top
  _, workdir, _ = ternary_run
  store = committing.Store(str(tmp_path / "runs"), str(tmp_path / "results"), "cpu")
  copy = store.workdir("stopped")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns("model_packed.npz", "results.*", ".lock"))
  path = store.keep_model("stopped", float_run=False)
  assert path == store.model("stopped")
  ours, theirs = (export.unpack(export.load(p)) for p in (path, os.path.join(workdir, "model_packed.npz")))
  for (k, a), (k2, b) in zip(jax.tree_util.tree_leaves_with_path(ours), jax.tree_util.tree_leaves_with_path(theirs)):
    assert k == k2
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(k))
  assert len(jax.tree_util.tree_leaves(ours)) == len(jax.tree_util.tree_leaves(theirs)) > 10


def test_evaluation_of_a_randomized_model_is_reproducible_with_the_same_key(ternary_run):
  cfg, workdir, results = ternary_run
  _, model, variables, _ = pipeline.load_run(workdir)
  from enquant import data as data_lib  # pylint: disable=g-import-not-at-top
  ds = data_lib.load("mnist", source="embedded", max_test=64, max_train=1)
  again = run_results.robust_evaluation(cfg, model, variables, ds.test_images, ds.test_labels,
                                     progress=False)
  assert again["accuracy"] == results["robust"]["accuracy"]


def _cli(*args):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)


def test_transfer_from_the_model_itself_equals_white_box(ternary_run):
  cfg, workdir, results = ternary_run
  _, model, variables, _ = pipeline.load_run(workdir)
  from enquant import data as data_lib  # pylint: disable=g-import-not-at-top
  ds = data_lib.load("mnist", source="embedded", max_test=64, max_train=1)
  transferred = run_results.robust_evaluation(cfg, model, variables, ds.test_images, ds.test_labels,
                                           progress=False, oracle=(model, variables))
  assert transferred["accuracy"] == results["robust"]["accuracy"]


def test_evaluate_cli_refuses_bad_flags_and_a_missing_run_with_one_line(tmp_path):
  # (An unknown flag goes through the training CLI's parser: tests/test_cli.py.)
  cases = {"--eps=2": "eval eps must be in (0, 1]", "--max_examples=-5": "eval max_examples must be >= 0",
           "": f"no run in {tmp_path}"}
  procs = {flag: subprocess.Popen([sys.executable, "-m", "experiments.evaluate", f"--run={tmp_path}"]
                                  + [flag] * bool(flag), cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for flag in cases}
  for flag, proc in procs.items():
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.count("\n") == 1, (flag, err)
    assert err.startswith("error: ") and cases[flag] in err, (flag, err)
  # One writer per run directory: an evaluation waits for no one, it is refused naming the holder.
  with files.hold_lock(os.path.join(tmp_path, ".lock"), "x"):
    done = subprocess.run([sys.executable, "-m", "experiments.evaluate", f"--run={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
  assert done.returncode == 2 and done.stderr == (
      f"error: run directory {tmp_path} is in use by pid {os.getpid()} (lock {tmp_path}/.lock); wait for "
      "it to finish or stop it first\n"), done.stderr


KEPT = os.path.join(ROOT, "results", "cpu", "runs", "fmnist-ResNet8-br2b-natural-141eb115.npz")  # deterministic


def test_a_kept_model_is_evaluated_again_without_its_run_directory(shared_data_dir, tmp_path):
  """``--run=<kept model>.npz`` attacks a committed row from its model file and results alone; the first
  eval batch reproduces the committed per-image masks (natural exactly; FGSM up to 2 images that another
  processor's rounding may flip at the decision boundary)."""
  out = tmp_path / "kept"
  done = _cli("experiments.evaluate", f"--run={KEPT}", "--attacks=a1", "--max_examples=256", f"--out={out}",
              "--progress=false", "--compilation_cache=")
  assert done.returncode == 0, done.stderr[-2000:]
  committed = results_lib.RunResults.from_json(KEPT[:-len(".npz")] + ".json")
  evaluation = json.loads((out / "evaluation.json").read_text())
  assert evaluation["kept_model"] and evaluation["examples"] == 256
  from enquant import evalfiles  # pylint: disable=g-import-not-at-top
  masks = {k: evalfiles.unpack_mask(evaluation["masks"][k], 256) for k in ("natural", "A1")}
  np.testing.assert_array_equal(masks["natural"], committed.robust.mask("natural")[:256])
  assert (masks["A1"] != committed.robust.mask("A1")[:256]).sum() <= 2
  assert config_lib.ExperimentConfig.from_dict(json.loads((out / "config.json").read_text())) == (
      config_lib.ExperimentConfig.from_dict(committed.config))  # the run's configuration beside its evaluation
  # Bad input: one line each, before anything is computed or written.
  (tmp_path / "orphan.npz").write_bytes(b"x")
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "config.json").write_text(json.dumps(config_lib.ExperimentConfig().to_dict()))
  cases = {(f"--run={tmp_path / 'missing.npz'}",): f"no kept model {tmp_path / 'missing.npz'}",
           (f"--run={tmp_path / 'orphan.npz'}",): f"no results file of the kept model {tmp_path / 'orphan.json'}",
           (f"--run={tmp_path}", f"--out={out}"): "--out is for a kept model",
           (f"--run={KEPT}", f"--out={tmp_path / 'other'}"): "holds another run",
           (f"--run={KEPT}", "--attacks=a1", "--max_examples=256", f"--out={out}"): "exists; pass --overwrite"}
  procs = {args: subprocess.Popen([sys.executable, "-m", "experiments.evaluate", *args, "--compilation_cache="],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for args in cases}
  for args, proc in procs.items():
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.count("\n") == 1 and cases[args] in err, (args, err)
  assert sorted(os.listdir(tmp_path / "other")) == ["config.json"]


def test_evaluation_into_a_read_only_run_directory_fails_before_computing(ternary_run):
  _, workdir, _ = ternary_run
  # Its own process (experiments.evaluate's flags are not the training CLI's): every write into the run
  # directory is refused, as on a read-only mount, and computing would fail loudly.
  code = f"""
import sys, tempfile
from absl import flags
from enquant import pipeline
from experiments import evaluate

def read_only(*args, **kwargs):
  raise PermissionError(13, "Permission denied")

def computed(*args, **kwargs):
  raise AssertionError("the evaluation started computing")

tempfile.TemporaryFile = read_only
pipeline.load_run = computed
flags.FLAGS(["evaluate", "--run={workdir}", "--compilation_cache="])
evaluate.main(["evaluate"])
"""
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr == (f"error: run directory {workdir} is not writable (Permission denied): the evaluation "
                         "writes evaluation*.json there; copy the run elsewhere or fix it\n")


def test_train_memory_estimate_counts_activations_and_parameter_copies():
  from enquant.models import cost  # pylint: disable=g-import-not-at-top
  model = ModelConfig(num_classes=10, depth=8, widths=(4, 8, 8), ensembles=2)
  # Conv outputs per image and member: stem 28*28*4; block 1: two 28*28*4; blocks 2 and 3 (stride 2, with
  # projections): three 14*14*8 and three 7*7*8. Weights per member: 9*1*4, 9*(16+16), 9*(32+64)+32,
  # 9*(64+64)+64 and the dense 8*10.
  floats = 2 * (28 * 28 * 4 + 2 * 28 * 28 * 4 + 3 * 14 * 14 * 8 + 3 * 7 * 7 * 8)
  weights = 2 * (36 + 288 + 896 + 1216 + 80)
  assert cost.activation_floats(model, (28, 28, 1)) == floats
  assert cost.train_memory_bytes(model, (28, 28, 1), 32) == 4 * (2 * 32 * floats + 4 * weights)
  device = type("Device", (), {"platform": "gpu", "memory_stats": lambda self: {"bytes_limit": 10**6}})()
  cost.check_train_memory(model, (28, 28, 1), 1, device)  # ~0.3 MB: fits
  with pytest.raises(ValueError, match=r"needs at least .* GiB .* more than the 0.0 GiB of gpu memory"):
    cost.check_train_memory(model, (28, 28, 1), 32, device)


def test_one_writer_per_run_directory_and_ctrl_c_is_one_line_with_exit_130(tmp_path):
  workdir = tmp_path / "run"
  command = [sys.executable, "-u", "-m", "experiments.mnist", "--data_source=embedded", "--max_train=256",
             "--max_test=64", "--epochs=100000", "--batch_size=32", "--depth=8", "--width=4", "--loss=natural",
             "--attacks=", "--progress=false", "--tensorboard=false", "--compilation_cache=",
             f"--workdir={workdir}"]
  first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    for line in first.stdout:  # the first process trains
      if line.startswith("epoch 1/100000"):
        break
    second = _cli(*command[3:])
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip() == (f"error: run directory {workdir} is in use by pid {first.pid} (lock "
                                     f"{workdir}/.lock); wait for it to finish or stop it first")
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=120)
  finally:
    first.kill()
  assert first.returncode == 130, err[-2000:]
  assert re.fullmatch(r"interrupted at epoch \d+, step \d+; run the same command to resume\n", err), err
  epochs = [json.loads(l)["epoch"] for l in open(workdir / "metrics.jsonl")]
  assert epochs == list(range(1, len(epochs) + 1))  # one writer: no epoch twice


def test_results_md_footnote_describes_only_the_attacks_that_ran():
  results = {"config": {"dataset": "mnist", "quant": {"mode": "float", "bits": 1}, "loss": {"kind": "natural"},
                        "eval": {"eps": 0.1}},
             "model_name": "ResNet8", "natural_accuracy": 0.9, "test_examples": 1000,
             "robust": {"accuracy": {"natural": 0.9, "A1": 0.5, "A2": 0.4, "n": 200}}}
  quick = run_results.markdown_row(results)  # what mnist --quick runs: a1,a2
  assert "A1 FGSM, A2 IFGSM-20," in quick and "A3" not in quick and "-eotK" not in quick
  results["robust"]["accuracy"]["A3-eot5"] = 0.3
  assert "A3 CW-l_inf" in run_results.markdown_row(results) and "-eotK" in run_results.markdown_row(results)
