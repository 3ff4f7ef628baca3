"""The command line is generated from the configuration tree: every setting is a flag (flat name and
``--config.<path>``), explicit flags win over ``--quick``, bad values and unknown flags are one line with exit
status 2, ``--help`` is grouped by topic, and the library's defaults are the paper's protocol."""

import dataclasses
import os
import re
import subprocess
import sys

from absl import flags
import pytest

from enquant import config as config_lib
from enquant import data as data_lib
from enquant import pipeline
from experiments import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One non-default value per setting, as a command line gives it, and the value the config must hold. A new
# setting in enquant/config.py fails test_the_generated_cli_accepts_every_setting until it is added here.
EVERY_SETTING = {
    "dataset": ("svhn", "svhn"), "data_dir": ("/tmp/d", "/tmp/d"), "data_source": ("tfds", "tfds"),
    "max_train": ("100", 100), "max_test": ("50", 50),
    "model.depth": ("32", 32), "model.stages": ("2,3,4", (2, 3, 4)), "model.widths": ("4,8,12", (4, 8, 12)),
    "model.noise_coef": ("0.2", 0.2), "model.ensembles": ("3", 3), "model.compute_dtype": ("bfloat16", "bfloat16"),
    "model.noise_rng": ("threefry", "threefry"),
    "train.epochs": ("7", 7), "train.batch_size": ("16", 16), "train.lr": ("0.05", 0.05),
    "train.lr_schedule": ("cosine", "cosine"), "train.milestones": ("0.5,0.75", (0.5, 0.75)),
    "train.lr_decay": ("0.2", 0.2), "train.momentum": ("0.8", 0.8), "train.weight_decay": ("0.001", 0.001),
    "train.augment": ("on", True), "train.flip": ("off", False), "train.seed": ("3", 3),
    "loss.kind": ("tradeoff", "tradeoff"), "loss.alpha": ("0.5", 0.5), "loss.beta": ("6", 6.0),
    "loss.eps": ("0.02", 0.02), "loss.step_size": ("0.005", 0.005), "loss.steps": ("4", 4),
    "loss.random_start": ("false", False), "loss.attack_bn": ("eval", "eval"),
    "quant.mode": ("br", "br"), "quant.bits": ("2", 2), "quant.ternary_method": ("twn", "twn"),
    "quant.mbit_method": ("lloyd", "lloyd"), "quant.lambda0": ("2", 2.0), "quant.growth": ("1.1", 1.1),
    "quant.growth_every_epochs": ("0.5", 0.5), "quant.relax_fraction": ("0.3", 0.3),
    "eval.attacks": ("fgsm,pgd7", "fgsm,pgd7"), "eval.eot_samples": ("3", 3), "eval.eps": ("0.05", 0.05),
    "eval.extra_eps": ("0.1,0.2", (0.1, 0.2)), "eval.max_examples": ("9", 9), "eval.batch_size": ("32", 32),
    "eval.seed": ("11", 11), "eval.max_unroll": ("5", 5),
}


def _config(argv, dataset="mnist", defaults=None):
  flags.FLAGS(["experiments"] + list(argv))
  try:
    return common.config_from_flags(dataset, defaults)
  finally:
    flags.FLAGS.unparse_flags()


def _get(cfg, path):
  for part in path.split("."):
    cfg = getattr(cfg, part)
  return cfg


@pytest.mark.parametrize("spelling", ["path", "flat"])
def test_the_generated_cli_accepts_every_setting(spelling):
  assert set(EVERY_SETTING) == {s.path for s in common.SETTINGS}
  argv = []
  for s in common.SETTINGS:
    text, _ = EVERY_SETTING[s.path]
    name = s.flag if spelling == "flat" and s.flag else common.PREFIX + s.path
    argv.append(f"--{name}={text}")
  cfg = _config(argv)
  for path, (_, expected) in EVERY_SETTING.items():
    assert _get(cfg, path) == expected, path
  assert cfg.model.num_classes == 10  # derived from --dataset=svhn


@pytest.mark.parametrize("argv,message", [
    (["--epochs=0"], "epochs must be >= 1"),
    (["--config.eval.eps=2"], "eval eps must be in (0, 1]"),
    (["--eval_extra_eps=0.1,x"], "--eval_extra_eps must be comma-separated floats"),
    (["--eval_max=-5"], "eval max_examples must be >= 0"),
    (["--attacks=pgd20,foo"], "unknown attack 'foo'"),
    (["--bits=9"], "bits must be in 1..8"),
    (["--ensembles=0"], "ensembles must be >= 1"),
    (["--depth=21"], "depth must be 6n+2"),
    (["--beta=2", "--config.loss.beta=3"], "set the same setting"),
    (["--loss=trades", "--train_attack_bn=train"], "TRADES crafts its attack"),
    (["--config.train.milestones=0.5,1.5"], "milestones in (0, 1)"),
    (["--dataset=imagenet"], "unknown dataset 'imagenet'"),
])
def test_bad_values_are_refused_with_one_line(argv, message):
  with pytest.raises(ValueError) as info:
    _config(argv)
  assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_usage_errors_exit_2_with_one_line(tmp_path):
  procs = [subprocess.Popen([sys.executable, "-m", "experiments.mnist", *argv, f"--workdir={tmp_path}"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for argv in (["--no_such_flag=1"], ["--epochs=abc"])]
  for proc, text in zip(procs, ("Unknown command line flag 'no_such_flag'", "--epochs=abc")):
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and err.count("\n") == 1 and text in err, err
  assert not os.listdir(tmp_path)


def test_default_config_is_the_paper_protocol():
  cfg = config_lib.ExperimentConfig()
  q, t, l, e = cfg.quant, cfg.train, cfg.loss, cfg.eval
  assert (q.ternary_method, q.mbit_method, q.lambda0, q.growth, q.relax_fraction) == ("br", "bcgd", 1.0,
                                                                                       1.05, 80 / 200)
  assert config_lib.QuantConfig(mode="br", bits=2).ternary_method == "br"  # a notebook's words, the CLI's
  assert (t.epochs, t.batch_size, t.lr, t.lr_schedule, t.milestones, t.lr_decay, t.momentum,
          t.weight_decay) == (200, 128, 0.1, "multistep", (80 / 200, 120 / 200, 160 / 200), 0.1, 0.9, 5e-4)
  assert (l.eps, l.step_size, l.steps, l.random_start, l.attack_bn) == (0.031, 0.007, 10, True, "train")
  assert (e.attacks, e.eps, e.eot_samples, e.max_examples, e.extra_eps) == ("a1,a2,a3", 0.031, 5, 0, ())
  assert (cfg.model.depth, cfg.model.noise_coef, cfg.model.widths) == (20, 0.1, (16, 32, 64))
  kinds = {"cifar10": "at", "cifar100": "tradeoff", "svhn": "tradeoff", "mnist": "tradeoff",
           "fmnist": "tradeoff"}
  for dataset, kind in kinds.items():
    p = config_lib.preset(dataset)
    assert p.loss.kind == kind and p.model.num_classes == data_lib.DATASETS[dataset].num_classes
    assert p.eval.extra_eps == ((0.1, 0.3) if dataset in ("mnist", "fmnist") else ())
    assert dataclasses.replace(p, loss=cfg.loss, eval=cfg.eval, dataset="cifar10",
                               model=cfg.model) == cfg  # nothing else differs
  # The flags with nothing given are the preset, and the flat flags' values name the same settings.
  assert _config([], dataset="svhn") == config_lib.preset("svhn")


def test_the_flat_flags_of_the_readme_train_table_one_en5_br_row():
  cfg = _config(["--ensembles=5", "--quant=br"], dataset="cifar10")
  expected = config_lib.preset("cifar10")
  expected = dataclasses.replace(expected, model=dataclasses.replace(expected.model, ensembles=5),
                                 quant=dataclasses.replace(expected.quant, mode="br"))
  assert cfg == expected and cfg.loss.kind == "at" and cfg.quant.ternary_method == "br"


def test_explicit_flags_win_over_quick():
  cfg = _config(["--quick", "--epochs=5", "--depth=20", "--attacks=a1,a2,a3", "--batch_size=128"])
  assert (cfg.train.epochs, cfg.model.depth, cfg.eval.attacks, cfg.train.batch_size) == (5, 20, "a1,a2,a3",
                                                                                         128)
  assert cfg.model.widths == (8, 16, 32) and cfg.eval.max_examples == 200  # the rest is --quick's
  plain = config_lib.quick(config_lib.preset("mnist"))
  assert dataclasses.replace(_config(["--quick"]), data_source=plain.data_source) == plain
  summary = common.quick_summary(config_lib.preset("mnist"))
  assert "--epochs=2" in summary and "--config.model.widths=8,16,32" in summary and "--lr" not in summary


def test_help_is_grouped_by_topic_and_says_what_quick_sets():
  procs = {name: subprocess.Popen([sys.executable, "-m", f"experiments.{name}", "--help"], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for name in ("train", "demo")}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert f"usage: python -m experiments.{name}" in out
    positions = [out.index(f"\n{title}:\n") for _, title in common.SECTION_TITLES]
    assert positions == sorted(positions), name
    for s in common.SETTINGS:
      assert f"--{s.flag or common.PREFIX + s.path}" in out, (name, s.path)
    assert "It sets: --max_train=2000 --max_test=500" in " ".join(out.split())
  assert "\n  --epochs=3\n" in out and "\n  --data_source=embedded\n" in out  # the demo's own defaults
  for name in ("mnist", "fmnist", "cifar10", "cifar100", "svhn"):  # thin aliases of experiments.train
    source = open(os.path.join(ROOT, "experiments", f"{name}.py")).read()
    assert f'common.launch("{name}")' in source


def test_xla_error_level_lines_stay_off_the_console_of_an_entry_point():
  # The "slow_operation_alarm ... Very slow compile?" banner is an XLA LOG(ERROR) line; a failing dump
  # folder gives one of the same kind within a second.
  code = "import experiments, jax; print(jax.jit(lambda x: x + 1)(1.0))"
  env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
  env["XLA_FLAGS"] = "--xla_dump_to=/proc/no-such-folder"
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0 and proc.stdout.strip() == "2.0", proc.stderr[-2000:]
  # (With TF_CPP_MIN_LOG_LEVEL=0 the same program prints "E... dump.cc:118] Could not create directory".)
  assert "Could not create directory" not in proc.stderr and not re.search(r"^E\d{4} ", proc.stderr, re.M)


@pytest.fixture
def fresh_machine(tmp_path, monkeypatch):
  """No local data anywhere (the data folder variables point at empty folders), an empty home."""
  for var, sub in (("ENQUANT_DATA_DIR", "data"), ("TFDS_DATA_DIR", "tfds"), ("HOME", "home")):
    (tmp_path / sub).mkdir()
    monkeypatch.setenv(var, str(tmp_path / sub))
  monkeypatch.setattr(data_lib, "_tensorflow_available", lambda: False)
  return tmp_path


def test_the_readme_smoke_command_needs_no_data_dir_on_a_fresh_machine(fresh_machine, monkeypatch, capsys):
  assert "python -m experiments.mnist --quick" in open(os.path.join(ROOT, "README.md")).read()
  seen = {}

  def load_only(cfg, workdir, **kwargs):  # the run's own data loading; training is tested elsewhere
    seen["ds"] = data_lib.load(cfg.dataset, cfg.data_dir, source=cfg.data_source,
                               max_train=cfg.max_train or None, max_test=cfg.max_test or None)
    return {}

  monkeypatch.setattr(pipeline, "train_and_evaluate", load_only)
  flags.FLAGS(["mnist", "--quick", f"--workdir={fresh_machine / 'run'}"])
  try:
    common.run("mnist")
  finally:
    flags.FLAGS.unparse_flags()
  out = capsys.readouterr().out
  assert "note: no local MNIST files: --quick trains on the embedded" in out
  assert seen["ds"].source == "embedded" and seen["ds"].num_train == 2000


@pytest.mark.parametrize("dataset,argv,expected", [
    ("fmnist", [], ["no local copy of 'fmnist'", "--data_dir=DIR", "--data_source=tfds",
                    "pip install 'enquant[tfds]'"]),
    ("cifar10", [], ["no local copy of 'cifar10'", "--data_dir=DIR", "--data_source=tfds"]),
    ("cifar10", ["--data_source=tfds"], ["TensorFlow is not installed", "--data_dir=DIR"]),
    ("fmnist", ["--data_source=embedded"], ["--data_source=embedded", "only for 'mnist'",
                                            "--data_dir=DIR"]),
    ("mnist", ["--process_id=1"], ["--process_id needs --distributed"]),
    ("mnist", ["--distributed", "--num_processes=2", "--process_id=5"],
     ["--process_id must be in 0..1"]),
    ("mnist", ["--ensembles=1000", "--width=64", "--data_source=embedded"], ["needs at least", "GiB", "--ensembles"]),
])
def test_data_and_flag_errors_are_at_most_3_lines_naming_the_flag(fresh_machine, capsys, dataset, argv,
                                                                  expected):
  flags.FLAGS(["experiments", f"--workdir={fresh_machine / 'run'}"] + argv)
  try:
    with pytest.raises(SystemExit) as info:
      common.run(dataset)
  finally:
    flags.FLAGS.unparse_flags()
  out, err = capsys.readouterr()
  assert info.value.code == 2 and err.startswith("error: ") and "Traceback" not in err, err
  assert len((out + err).strip().splitlines()) <= 3, out + err
  for text in expected:
    assert text in err, (text, err)
  assert not os.path.exists(fresh_machine / "run")  # nothing was written
