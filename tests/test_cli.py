"""The command line explains itself: ``--help`` lists each experiment's flags by topic, the README's smoke
command needs no data on a fresh machine, and every data or flag error is one line naming the flag to use."""

import os
import subprocess
import sys

from absl import flags
import pytest

from enquant import data as data_lib
from enquant import pipeline
from experiments import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY_POINTS = ("mnist", "fmnist", "cifar10", "cifar100", "svhn", "demo")


def test_every_common_flag_is_in_exactly_one_help_group():
  defined = {f.name for f in flags.FLAGS.get_flags_for_module(common)}
  grouped = [name for _, names in common.HELP_GROUPS for name in names]
  assert len(grouped) == len(set(grouped)) and set(grouped) == defined


def test_help_lists_each_experiments_flags_grouped_by_topic():
  for name in ENTRY_POINTS:  # every entry point parses with the grouped --help (three are run below)
    source = open(os.path.join(ROOT, "experiments", f"{name}.py")).read()
    assert "flags_parser=common.parse_flags" in source and "adopt_module_key_flags(common)" in source
  procs = {name: subprocess.Popen([sys.executable, "-m", f"experiments.{name}", "--help"], cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for name in ("mnist", "cifar100", "demo")}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    assert f"usage: python -m experiments.{name}" in out
    positions = [out.index(f"\n{title}:\n") for title, _ in common.HELP_GROUPS]
    assert positions == sorted(positions), name  # every topic, in order
    for _, names in common.HELP_GROUPS:
      for flag in names:
        assert f"\n  --{flag}" in out, (name, flag)
  # The entry point's own defaults are shown: the paper's protocol, or the demo's.
  assert "\n  --epochs=3\n" in out and "\n  --data_source=embedded\n" in out




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
    ("cifar10", ["--data_source=tfds"], ["TensorFlow is not installed", "--data_dir=DIR"]),
    ("fmnist", ["--data_source=embedded"], ["--data_source=embedded", "only for 'mnist'",
                                            "--data_dir=DIR"]),
    ("mnist", ["--process_id=1"], ["--process_id needs --distributed"]),
    ("mnist", ["--distributed", "--num_processes=2", "--process_id=5"],
     ["--process_id must be in 0..1"]),
])
def test_data_and_flag_errors_name_the_flag_to_use(fresh_machine, capsys, dataset, argv, expected):
  flags.FLAGS(["experiments", f"--workdir={fresh_machine / 'run'}"] + argv)
  try:
    with pytest.raises(SystemExit) as info:
      common.run(dataset)
  finally:
    flags.FLAGS.unparse_flags()
  err = capsys.readouterr().err
  assert info.value.code == 2 and err.startswith("error: ") and "Traceback" not in err, err
  for text in expected:
    assert text in err, (text, err)
  assert not os.path.exists(fresh_machine / "run")  # nothing was written
