"""scripts/a3_variants.py on hand-made evaluation files: rows, the paper's pattern, McNemar, bad input."""

import itertools
import json
import os
import shutil
import sys

import numpy as np
import pytest

from enquant import config as config_lib
from enquant import evalfiles
from experiments.paper import scales
from experiments.paper import tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import a3_variants  # pylint: disable=g-import-not-at-top,import-error,wrong-import-position

N = 40
I = np.arange(N)
# Table II's En1ResNet8 BR run: natural 90, A1 62.5, A2 50, A3 45, cwl2 70 (A2 < cwl2 < natural).
# cwl2 vs A3: 11 images only cwl2 keeps (17-27), 1 only A3 (30); cwl2 vs natural: 0 / 8 (28-35).
TABLE_MASKS = {"natural": I < 36, "A1": I < 25, "A2": I < 20, "A3": (I < 17) | (I == 30), "cwl2": I < 28}
TABLE_ROW = tables.TABLES["II"].rows[1]  # En1ResNet20 BR
TABLE_RUN = scales.run_name(scales.build_config(TABLE_ROW, "cpu"))


def _write_run(root, name, masks, *, config=None, keep_masks=True, tag="a3var", kept_model=None):
  run = root / name
  run.mkdir(parents=True)
  accuracy = {k: float(np.mean(v)) for k, v in masks.items()}
  evaluation = {"accuracy": dict(accuracy, n=N), "examples": N, "eps": 0.031,
                "run": str(kept_model or run), "kept_model": kept_model is not None,
                "attacks": [{"name": k, "eot_samples": 1} for k in masks if k != "natural"]}
  if keep_masks:
    evaluation["masks"] = {k: evalfiles.pack_mask(np.asarray(v, bool)) for k, v in masks.items()}
  (run / f"evaluation-{tag}.json").write_text(json.dumps(evaluation))
  if config is not None:
    (run / "config.json").write_text(json.dumps(config.to_dict()))
  return run


def _exact_mcnemar_by_enumeration(b, c):
  """Two-sided p by enumerating every outcome of b + c fair coins (no binomial formula)."""
  m, k = b + c, min(b, c)
  tail = sum(sum(flips) <= k for flips in itertools.product((0, 1), repeat=m)) / 2 ** m
  return min(1.0, 2 * tail)


@pytest.fixture
def built(tmp_path, capsys):
  runs = tmp_path / "runs"
  _write_run(runs, TABLE_RUN, TABLE_MASKS, config=scales.build_config(TABLE_ROW, "cpu"))
  # No per-image masks, cwl2 above natural (90 vs 92.5), no config.json: not a table row.
  weak = {"natural": I < 36, "A2": I < 20, "A3": I < 20, "cwl2": I < 37}
  _write_run(runs, "weak", weak, keep_masks=False, tag="a3_vs_cwl2")
  # cwl2 one image below natural: the pattern holds on the numbers, not distinguishable from natural.
  # (Evaluated from a kept model file, experiments.evaluate --run=<model>.npz: its command names the file.)
  _write_run(runs, "close", {"natural": I < 36, "A2": I < 20, "A3": I < 20, "cwl2": I < 35},
             kept_model=tmp_path / "results" / "runs" / "close.npz")
  (runs / "untouched").mkdir()  # a run directory without an evaluation
  out = tmp_path / "out"
  args = [f"--runs={runs / '*'}", f"--results={out}"]
  assert a3_variants.main(args) == 0
  printed = capsys.readouterr().out
  return json.loads((out / "a3_variants.json").read_text()), (out / "a3_variants.md").read_text(), \
      printed, args, out


def test_rows_hold_the_accuracies_the_pattern_and_the_paper_row(built):
  report, _, _, _, _ = built
  rows = {r["name"]: r for r in report["rows"]}
  assert sorted(rows) == sorted([TABLE_RUN, "weak", "close"])
  row = rows[TABLE_RUN]
  assert row["accuracy"] == {"natural": 0.9, "A1": 0.625, "A2": 0.5, "A3": 0.45, "cwl2": 0.7}
  assert (row["dataset"], row["images"], row["eps"]) == ("fmnist", N, 0.031)
  assert row["cwl2 > A2"] and row["A2 < cwl2 < natural"]
  paper = dict(TABLE_ROW.paper)
  assert row["paper"]["table"] == "II" and row["paper"]["A3"] == paper["A3"] == 58.79
  assert [row["paper"][k] for k in ("N", "A1", "A2")] == [paper["N"], paper["A1"], paper["A2"]]
  weak = rows["weak"]
  assert weak["cwl2 > A2"] and not weak["A2 < cwl2 < natural"]  # 92.5 is not below 90
  assert weak["paper"] is None and weak["cwl2 vs A3"] is None and not weak["masks"]
  assert "--attacks=a1,a2,a3,cwl2 --eot_samples=0 --max_examples=40 --tag=a3var" in row["command"]
  assert row["command"].startswith(f"python -m experiments.evaluate --run={os.path.relpath(row['run'])} ")
  assert rows["close"]["command"].startswith("python -m experiments.evaluate --run="
                                             f"{os.path.relpath(rows['close']['run'])} ")
  assert rows["close"]["run"].endswith(os.path.join("results", "runs", "close.npz"))  # the model file


def test_mcnemar_of_a3_and_cwl2_equals_a_direct_binomial_count(built):
  report, _, _, _, _ = built
  row = next(r for r in report["rows"] if r["name"] == TABLE_RUN)
  test = row["cwl2 vs A3"]
  assert (test["b"], test["c"]) == (11, 1) and test["diff"] == pytest.approx(25.0)
  assert test["p"] == pytest.approx(_exact_mcnemar_by_enumeration(11, 1)) == pytest.approx(26 / 4096)
  natural = row["cwl2 vs natural"]
  assert (natural["b"], natural["c"]) == (0, 8)
  assert natural["p"] == pytest.approx(_exact_mcnemar_by_enumeration(0, 8))


def test_report_states_the_skips_the_verdict_and_absent_masks(built):
  report, md, printed, _, _ = built
  assert [line for line in printed.splitlines() if line.startswith("skipped")] == [
      f"skipped: {os.path.join(os.path.dirname(built[4]), 'runs', 'untouched')} has no "
      "evaluation-{a3_vs_cwl2,a3var}.json"]
  assert "cwl2 is above A2 on 3 of 3 models, between A2 and natural on the numbers on 2, and reproduces the " \
         "paper's pattern (A2 < A3 < N, A3 below N beyond the noise draws: exact McNemar p < 0.05) on 1 of 3: " \
         f"{TABLE_RUN}." in md  # close's 0 / 1 is within the noise draws; the table run's 0 / 8 is not
  assert md.count("not distinguishable from natural") == 1
  assert a3_variants.A3_COLUMN in md and report["a3_column"] == a3_variants.A3_COLUMN
  assert "| weak | no per-image masks | no per-image masks |" in md
  assert "11 images only cwl2 leaves correct, 1 only A3" in md and "70.00" in md


def test_kept_copies_are_portable_and_rebuild_the_report_without_runs(built, tmp_path):
  report, md, _, args, out = built
  kept = json.loads((out / "a3_variants" / f"{TABLE_RUN}.json").read_text())
  assert not os.path.isabs(kept["run"]) and kept["tag"] == "a3var" and kept["dataset"] == "fmnist"
  shutil.rmtree(tmp_path / "runs")
  assert a3_variants.main(args) == 0
  assert json.loads((out / "a3_variants.json").read_text()) == report
  assert (out / "a3_variants.md").read_text() == md


def test_nothing_found_is_one_line_and_exit_2(tmp_path, capsys):
  assert a3_variants.main([f"--runs={tmp_path / 'none'}", f"--results={tmp_path / 'out'}"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: no evaluation-") and err.count("\n") == 1
  assert not (tmp_path / "out" / "a3_variants.md").exists()


def test_an_evaluation_without_cwl2_is_one_line_naming_it(tmp_path, capsys):
  run = _write_run(tmp_path / "runs", "old", {"natural": I < 30, "A2": I < 20, "A3": I < 20},
                   config=config_lib.ExperimentConfig())
  assert a3_variants.main([f"--runs={run}", f"--results={tmp_path / 'out'}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "evaluation-a3var.json: no cwl2 accuracy" in err
  assert not (tmp_path / "out" / "a3_variants").exists()  # nothing kept from a bad evaluation


def test_a_kept_copy_without_cwl2_is_one_line_naming_it(tmp_path, capsys):
  kept = tmp_path / "out" / "a3_variants"
  kept.mkdir(parents=True)
  (kept / "old.json").write_text(json.dumps({"accuracy": {"natural": 0.5, "A2": 0.25, "A3": 0.25, "n": 4},
                                             "eps": 0.1}))
  assert a3_variants.main([f"--runs={tmp_path / 'none'}", f"--results={tmp_path / 'out'}"]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "old.json: no cwl2 accuracy" in err
