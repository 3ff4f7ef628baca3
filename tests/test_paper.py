"""The paper harness (experiments.paper): protocol and scales, table rebuild, claim checks, studies."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from enquant import evalfiles
from enquant import results as results_lib
from enquant import run_results
from enquant import sparsity
from enquant import train as train_lib
from experiments.paper import checks
from experiments.paper import committing
from experiments.paper import epochs
from experiments.paper import reports
from experiments.paper import scales as paper
from experiments.paper import seeds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(table, **match):
  return next(r for r in paper.table(table).rows
              if all(getattr(r, k) == v for k, v in match.items()) and r.oracle is None)


def test_paper_scale_is_the_papers_protocol():
  cfg = paper.build_config(_row("VIII", dataset="mnist", quant="br"), "paper")
  assert (cfg.dataset, cfg.model.name, cfg.model.noise_coef) == ("mnist", "En2ResNet20", 0.1)
  t, l, q, e = cfg.train, cfg.loss, cfg.quant, cfg.eval
  assert (t.epochs, t.batch_size, t.lr, t.momentum, t.weight_decay) == (200, 128, 0.1, 0.9, 5e-4)
  schedule = train_lib.learning_rate_schedule(t, 391)  # x0.1 after epochs 80, 120, 160
  lrs = [float(schedule(e * 391 - 1)) for e in (80, 81, 120, 121, 160, 161)]
  np.testing.assert_allclose(lrs, [0.1, 0.01, 0.01, 0.001, 0.001, 0.0001], rtol=1e-5)
  assert (l.kind, l.alpha, l.beta, l.eps, l.step_size, l.steps, l.attack_bn) == (
      "tradeoff", 1.0, 8.0, 0.031, 0.007, 10, "train")
  assert (q.mode, q.bits, q.ternary_method, q.mbit_method, q.growth, q.relax_fraction) == (
      "br", 1, "br", "bcgd", 1.05, 0.4)
  assert (e.attacks, e.eps, e.extra_eps, e.max_examples) == ("a1,a2,a3", 0.031, (0.1, 0.3), 0)
  table_i = paper.build_config(_row("I", ensembles=5, quant="bc"), "paper")
  assert (table_i.dataset, table_i.loss.kind, table_i.eval.extra_eps) == ("cifar10", "at", ())
  svhn = paper.build_config(_row("VIII", dataset="svhn", quant="br"), "paper")
  assert (svhn.model.name, svhn.quant.bits, svhn.train.flip) == ("En2ResNet56", 4, None)


def test_cpu_scale_substitutes_fashion_mnist_and_keeps_the_direct_rows():
  claim = paper.build_config(_row("VII", depth=56, noise=0.0, bits=4, loss="at"), "cpu")
  assert (claim.dataset, claim.model.name, claim.max_train, claim.loss.steps) == (
      "fmnist", "ResNet14", 10_000, 3)
  direct = paper.build_config(_row("VIII", dataset="fmnist", quant="float"), "cpu")
  assert (direct.dataset, direct.model.name, direct.eval.max_examples) == ("fmnist", "En2ResNet20", 1000)
  # Binary-Relax reaches the paper's lambda (1.05^80) when it switches to Binary-Connect.
  q = paper.build_config(_row("I", ensembles=1, quant="br"), "cpu").quant
  growths = q.relax_fraction * paper.CPU_CLAIM["epochs"] / q.growth_every_epochs
  np.testing.assert_allclose(q.growth ** growths, 1.05 ** 80, rtol=1e-4)
  # Identical configurations share a run directory; different ones never do.
  names = {paper.run_name(c) for t in paper.TABLES.values() for _, c in paper.runs_of(t, "cpu")}
  configs = {c.to_json() for t in paper.TABLES.values() for _, c in paper.runs_of(t, "cpu")}
  assert len(names) == len(configs)
  assert paper.run_name(paper.build_config(_row("II", ensembles=2, quant="br"), "cpu")) == \
      paper.run_name(paper.build_config(_row("I", ensembles=2, quant="br"), "cpu"))
  for bad in ("gpu", "gpu0", "tpu5"):
    with pytest.raises(ValueError, match="scale"):
      paper.build_config(_row("I", ensembles=1, quant="br"), bad)


def test_with_epochs_keeps_the_row_and_rescales_binary_relax():
  cfg = paper.build_config(_row("VII", depth=20, noise=0.0, bits=2, loss="natural"), "cpu")
  assert paper.with_epochs(cfg, cfg.train.epochs) == cfg
  longer = paper.with_epochs(cfg, 24)
  q = longer.quant
  np.testing.assert_allclose(q.growth ** (q.relax_fraction * 24 / q.growth_every_epochs), 1.05 ** 80,
                             rtol=1e-4)
  assert longer.train.epochs == 24 and q.growth < cfg.quant.growth
  assert dataclasses.replace(longer, train=cfg.train, quant=cfg.quant) == cfg
  assert paper.run_name(longer) != paper.run_name(cfg)
  for bad in (0, 2.5, True):
    with pytest.raises(ValueError, match="epochs"):
      paper.with_epochs(cfg, bad)


def test_gpu_scale_is_the_papers_protocol_cut_to_e_epochs():
  row = _row("VIII", dataset="mnist", quant="br")
  full, short = paper.build_config(row, "paper"), paper.build_config(row, "gpu5")
  assert (short.train.epochs, short.max_train, short.dataset, short.model) == (5, 0, "mnist", full.model)
  assert (short.loss, short.train.lr_schedule, short.train.milestones) == (
      full.loss, full.train.lr_schedule, full.train.milestones)
  e = short.eval
  assert (e.attacks, e.eps, e.extra_eps, e.max_examples, e.eot_samples) == (
      "a1,a2,a3,a2-eot5", 0.031, (), 0, 0)
  q = short.quant
  np.testing.assert_allclose(q.growth ** (q.relax_fraction * 5 / q.growth_every_epochs), 1.05 ** 80, rtol=1e-4)
  assert paper.run_name(short) != paper.run_name(paper.build_config(row, "gpu6"))
  assert "cut to 5 epochs" in reports.table_markdown(paper.table("VIII"), "gpu5", [])


def test_cli_defaults_train_table_one_en5_br_row():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from experiments import common  # pylint: disable=g-import-not-at-top
  fl = flags.FLAGS
  try:
    fl(["cifar10", "--ensembles=5", "--quant=br"])
    cfg = common.config_from_flags("cifar10")
  finally:
    fl.unparse_flags()
  assert cfg == paper.build_config(_row("I", ensembles=5, quant="br"), "paper")


def _fake_results(cfg, n_acc, a_acc):
  return {"schema_version": results_lib.SCHEMA_VERSION, "natural_accuracy": n_acc, "test_examples": 10_000,
          "model_name": cfg.model.name, "wall_seconds": 600.0, "m_bound": 0.25,
          "robust": {"examples": 1000, "accuracy_worst_case": a_acc - 0.01,
                     "accuracy": {"natural": n_acc, "A1": a_acc, "A2": a_acc - 0.005, "A3": a_acc,
                                  "A2-eot5": a_acc - 0.002, "n": 1000}},
          "efficiency": {"sparsity_paper_counting": {"total/in_channel_sparsity": 0.125}},
          "config": cfg.to_dict()}


def test_list_and_table_rebuild_from_finished_runs(tmp_path):
  runs, out = tmp_path / "runs", tmp_path / "results"
  tbl = paper.table("VIII")
  done = [r for r in tbl.rows if r.dataset == "mnist"]
  for i, row in enumerate(done):
    cfg = paper.build_config(row, "cpu")
    d = runs / "cpu" / paper.run_name(cfg)
    d.mkdir(parents=True)
    (d / "results.json").write_text(json.dumps(dict(_fake_results(cfg, 0.99 - 0.01 * i, 0.98),
                                                    workdir=str(d.resolve()))))
  resumable = runs / "cpu" / paper.run_name(paper.build_config(tbl.rows[2], "cpu"))
  resumable.mkdir(parents=True)
  (resumable / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": 0.5}\n{"epoch": 2, "test_a')  # killed write
  common = [sys.executable, "-m", "experiments.paper", "--table=VIII", "--scale=cpu",
            f"--runs_root={runs}", f"--results_root={out}"]
  listing = subprocess.run(common + ["--list"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert listing.returncode == 0, listing.stderr[-2000:]
  assert listing.stdout.count(" done  ") == 2 and f"epoch 1  {resumable.name}" in listing.stdout
  # cpu-scale stand-ins name the net they train and the paper's net they stand for
  assert ("(En2ResNet14 float (6) a=1 b=8, 6 epochs on fmnist, for the paper's En2ResNet56; no model)"
          in listing.stdout)
  assert "2 epochs on mnist; no model)" in listing.stdout  # the direct rows train the paper's own net
  # Both runs were committed before: the BR row without A2-eot5 (the run directory extends it: same
  # numbers), the float row with another N (the run directory is a rerun that differs).
  names = [paper.run_name(paper.build_config(row, "cpu")) for row in done]
  (out / "cpu" / "runs").mkdir(parents=True)
  first = _fake_results(paper.build_config(done[0], "cpu"), 0.99, 0.98)
  del first["robust"]["accuracy"]["A2-eot5"]
  (out / "cpu" / "runs" / (names[0] + ".json")).write_text(json.dumps(first))
  (out / "cpu" / "runs" / (names[1] + ".json")).write_text(json.dumps(
      _fake_results(paper.build_config(done[1], "cpu"), 0.985, 0.98)))
  rebuild = subprocess.run(common + ["--tables_only"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
  assert rebuild.returncode == 0, rebuild.stderr[-2000:]
  assert f"warning: {names[1]} differs from its committed results: N 0.985 -> 0.98 (-0.50)" in rebuild.stdout
  assert names[0] not in (out / "cpu" / "reruns.md").read_text()
  assert "| 98.50 -> 98.00 (-0.50) |" in (out / "cpu" / "reruns.md").read_text()
  assert json.loads((out / "cpu" / "reruns" / (names[1] + ".json")).read_text())["natural_accuracy"] == 0.98
  assert json.loads((out / "cpu" / "runs" / (names[1] + ".json")).read_text())["natural_accuracy"] == 0.985
  extended = json.loads((out / "cpu" / "runs" / (names[0] + ".json")).read_text())
  assert "A2-eot5" in extended["robust"]["accuracy"]
  md = (out / "cpu" / "table_VIII.md").read_text()
  assert "first 30,000 training images" in md  # the reduced protocol is stated in the header
  assert "Seeds: training 0 (" in md and "evaluation 1234; one training run per row." in md
  # MNIST BR: paper N 99.22, ours 99.00 -> diff -0.22; float: the committed 98.50 vs 99.21 -> -0.71.
  assert "| ours (mnist, En2ResNet20) | 12.50 | 99.00 | 98.00 |" in md
  assert "| paper (mnist, En2ResNet20) | - | 99.22 |" in md and "| diff | - | -0.22 |" in md
  assert "| ours (mnist, En2ResNet20) | 12.50 | 98.50 |" in md and "| diff | - | -0.71 |" in md
  assert md.count("pending") >= 5 * (len(tbl.rows) - 2)
  # Stand-in rows (Fashion-MNIST for CIFAR) show the paper's row beside ours, with no difference.
  assert md.count("| diff |") == 4 and "| paper (cifar100, En2ResNet56) | 43.94 | 52.24 |" in md
  assert max(len(line.split("|")) - 2 for line in md.splitlines() if line.startswith("| ")) <= 12
  rows = json.loads((out / "cpu" / "table_VIII.json").read_text())["rows"]
  assert [r["state"] for r in rows].count("done") == 2
  assert rows[0]["columns"]["A2"]["ours"] == pytest.approx(97.5)
  assert rows[0]["columns"]["channel_sparsity"]["ours"] == pytest.approx(12.5)
  copied = json.loads((out / "cpu" / "runs" / (rows[0]["run"] + ".json")).read_text())
  assert not os.path.isabs(copied["workdir"])  # committed files hold no machine's absolute paths
  assert os.path.samefile(os.path.join(ROOT, copied["workdir"]), runs / "cpu" / rows[0]["run"])
  if os.path.isdir(os.path.join(ROOT, "..", "shared", "data", "fashion-mnist")):
    assert (out / "cpu" / "fig7_fmnist_minibatch.png").stat().st_size > 1000


def test_committed_results_count_as_finished_without_their_run_directories(tmp_path):
  # A new machine: one run directory here, every other row of Table VIII only as its committed results.
  runs, out = tmp_path / "runs", tmp_path / "results"
  tbl = paper.table("VIII")
  names = []  # rows may share a run
  for row in tbl.rows:
    cfg = paper.build_config(row, "cpu")
    name = paper.run_name(cfg)
    if name not in names:
      names.append(name)
      results = _fake_results(cfg, 0.95 - 0.01 * names.index(name), 0.80)
      results["history"] = [{"epoch": e, "m_bound": 0.3 - 0.01 * e} for e in (1, 2)]
      results.update(train_seconds=3000.0, eval_seconds=600.0)  # wall_seconds (600) is the last call's
      target = (runs / "cpu" / name / "results.json" if len(names) == 1
                else out / "cpu" / "runs" / (name + ".json"))
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_text(json.dumps(results))
  common = [sys.executable, "-m", "experiments.paper", "--table=VIII", "--scale=cpu",
            f"--runs_root={runs}", f"--results_root={out}"]
  listing = subprocess.run(common + ["--list"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert listing.returncode == 0, listing.stderr[-2000:]
  lines = [line for line in listing.stdout.splitlines() if line.startswith("  ")]
  assert len(lines) == len(names)
  assert all(line.split()[0] == ("done" if line.split()[1] == names[0] else "committed") for line in lines)
  # --keep_models trains again the committed runs that keep no model, cheapest first.
  store = committing.Store(str(runs / "cpu"), str(out / "cpu"), "cpu")
  # Cost: training over every call + the evaluation; the last call's wall seconds order them the other
  # way (a resumed run's last call can be its shortest).
  walls = {n: 600.0 + 10 * ((7 * i) % len(names)) for i, n in enumerate(names)}
  for n in names[1:]:
    path = out / "cpu" / "runs" / (n + ".json")
    path.write_text(json.dumps(dict(json.loads(path.read_text()), train_seconds=walls[n],
                                    wall_seconds=5000.0 - walls[n])))
  (out / "cpu" / "runs" / (names[1] + ".npz")).write_bytes(b"kept")
  (out / "cpu" / "reruns").mkdir()
  (out / "cpu" / "reruns" / (names[2] + ".npz")).write_bytes(b"kept")
  assert [store.model_state(n) for n in names[:3]] == ["no model", "model", "rerun's model"]
  assert store.without_model(names) == sorted(names[3:], key=lambda n: (walls[n], n))  # names[0] is done
  # Not --tables_only: nothing may be trained again (training any row would take hours and need data).
  full = subprocess.run(common, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert full.returncode == 0, full.stderr[-2000:]
  assert "== Table" not in full.stdout
  rows = json.loads((out / "cpu" / "table_VIII.json").read_text())["rows"]
  assert len(rows) == len(tbl.rows) and all(r["state"] == "done" for r in rows)
  assert all(r["wall_seconds"] == (3600.0 if r["run"] == names[0] else walls[r["run"]] + 600.0)
             for r in rows)  # training over every call + the evaluation
  second = next(r for r in rows if r["run"] == names[1])
  assert second["columns"]["N"]["ours"] == pytest.approx(94.0)  # read from the committed file
  assert not (runs / "cpu" / names[1]).exists()  # and no run directory was made for it


def test_transfer_evaluations_are_kept_with_the_results_and_outlive_the_run_directories(tmp_path):
  runs, out = tmp_path / "runs", tmp_path / "results"
  t3 = paper.table("III")
  row = t3.rows[0]
  rng = np.random.default_rng(1)
  correct = {k: rng.random(50) < 0.7 for k in ("natural", "A1", "A2", "A3")}
  target, oracle = (paper.run_name(paper.build_config(r, "cpu")) for r in (row, row.oracle))
  for name, r in ((target, row), (oracle, row.oracle)):
    (runs / "cpu" / name).mkdir(parents=True)
    (runs / "cpu" / name / "results.json").write_text(json.dumps(
        _masked_results(paper.build_config(r, "cpu"), correct)))
  transfer = _masked_results(paper.build_config(row, "cpu"), correct)["robust"]
  transfer["oracle"] = str((runs / "cpu" / oracle).resolve())
  (runs / "cpu" / target / f"evaluation-transfer-{oracle}.json").write_text(json.dumps(transfer))
  common = [sys.executable, "-m", "experiments.paper", "--table=III", "--scale=cpu", "--tables_only",
            f"--runs_root={runs}", f"--results_root={out}"]
  first = subprocess.run(common, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert first.returncode == 0, first.stderr[-2000:]
  kept = json.loads((out / "cpu" / "transfers" / f"{target}--{oracle}.json").read_text())
  assert kept["masks"] == transfer["masks"] and not os.path.isabs(kept["oracle"])
  shutil.rmtree(runs)  # a new machine: only the committed files
  again = subprocess.run(common, cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert again.returncode == 0, again.stderr[-2000:]
  rows = json.loads((out / "cpu" / "table_III.json").read_text())["rows"]
  assert rows[0]["state"] == "done" and rows[0]["columns"]["A1"]["ours"] == pytest.approx(
      100 * correct["A1"].mean())


def test_paired_difference_matches_the_closed_form_and_reads_the_interval():
  # 100 images: 10 only the first model gets right, 4 only the second, 86 the same for both.
  first = np.zeros(100, bool)
  second = np.zeros(100, bool)
  first[:10] = True
  second[10:14] = True
  first[14:60] = second[14:60] = True
  b, c, n = 10, 4, 100
  mean = (b - c) / n
  se = np.sqrt((b + c - (b - c) ** 2 / n) / (n - 1) / n)  # McNemar's variance of the paired mean
  got = checks.paired_difference(first, second)
  assert (got["b"], got["c"], got["n"]) == (b, c, n)
  assert got["diff"] == pytest.approx(100 * mean)
  assert got["low"] == pytest.approx(100 * (mean - 1.959964 * se))
  assert got["high"] == pytest.approx(100 * (mean + 1.959964 * se))
  assert got["verdict"] == "inconclusive" and got["low"] < 0 < got["high"]
  first[60:80] = True  # 30 vs 4 disagreements: p far below 0.05
  assert checks.paired_difference(first, second)["verdict"] == "holds"
  assert checks.paired_difference(second, first)["verdict"] == "reversed"
  with pytest.raises(ValueError, match="same length"):
    checks.paired_difference(first, second[:50])


def test_reproduction_report_names_what_moved_in_points():
  cfg = paper.build_config(_row("I", ensembles=1, quant="br"), "cpu")
  committed = _fake_results(cfg, 0.8244, 0.76)
  committed["robust"]["accuracy"] = {"n": 1000, "natural": 0.83, "A1": 0.76, "A2": 0.758}
  typed = lambda d: results_lib.RunResults.from_dict(json.loads(json.dumps(d)))
  assert reports.reproduction_report("r", typed(committed), typed(committed)).startswith("reproduced: r ")
  rerun = json.loads(json.dumps(committed))
  rerun["natural_accuracy"], rerun["robust"]["accuracy"]["A1"] = 0.8262, 0.765
  rerun["robust"]["accuracy"]["n"] = rerun["robust"]["examples"] = 999  # counts are not accuracies
  line = reports.reproduction_report("r", typed(committed), typed(rerun))
  assert line == ("warning: r differs from its committed results: A1 0.76 -> 0.765 (+0.50), "
                  "N 0.8244 -> 0.8262 (+0.18)")
  del rerun["robust"]["accuracy"]["A2"]  # an attack the rerun lacks is named too
  assert "A2 0.758 -> None" in reports.reproduction_report("r", typed(committed), typed(rerun))


def test_masks_are_packed_compactly_and_unpacked_exactly():
  mask = np.random.default_rng(0).random(1001) < 0.7
  packed = evalfiles.pack_mask(mask)
  assert len(packed) == 2 * 126  # hex of ceil(1001 / 8) bytes
  np.testing.assert_array_equal(evalfiles.unpack_mask(packed, 1001), mask)
  with pytest.raises(ValueError, match="cannot hold"):
    evalfiles.unpack_mask(packed, 2000)


def _masked_results(cfg, correct: dict[str, np.ndarray]):
  n = len(correct["natural"])
  res = _fake_results(cfg, float(correct["natural"].mean()), float(correct["A1"].mean()))
  res["robust"]["accuracy"] = {**{k: float(v.mean()) for k, v in correct.items()}, "n": n}
  res["robust"]["masks"] = {k: evalfiles.pack_mask(v) for k, v in correct.items()}
  res["robust"]["examples"] = n
  res["robust"]["accuracy_worst_case"] = float(np.logical_and.reduce(list(correct.values())).mean())
  return res


def _typed(results: dict) -> dict:
  """Run results by name as the harness reads them (validated)."""
  return {k: results_lib.RunResults.from_dict(json.loads(json.dumps(v))) for k, v in results.items()}


def _evaluation(d: dict) -> results_lib.Evaluation:
  return results_lib.Evaluation.from_dict(json.loads(json.dumps(d)), "transfer")


def test_table_viii_checks_pair_each_quantized_row_with_its_float_row():
  checks = paper.table("VIII").checks
  quantized = [r for r in paper.table("VIII").rows if r.quant != "float"]
  assert [c.worse for c in checks] == quantized
  for c in checks:
    assert c.better.quant == "float" and c.columns == ("N", "A1", "A2", "A3")
    assert dataclasses.replace(c.better, quant=c.worse.quant, bits=c.worse.bits, paper=()) == \
        dataclasses.replace(c.worse, paper=())  # the same dataset, net, loss: only the weights differ


def test_claim_checks_compare_two_runs_on_the_same_images():
  rng = np.random.default_rng(0)
  base = {k: rng.random(1000) < 0.7 for k in ("natural", "A1", "A2", "A3")}
  better = {k: v | (rng.random(1000) < 0.2) for k, v in base.items()}  # right wherever base is, and more
  name = lambda row: paper.run_name(paper.build_config(row, "cpu"))
  tbl = paper.table("I")
  br1, bc1 = tbl.checks[0].better, tbl.checks[0].worse
  br2 = tbl.checks[1].better
  results = _typed({name(br1): _masked_results(paper.build_config(br1, "cpu"), better),
                    name(bc1): _masked_results(paper.build_config(bc1, "cpu"), base),
                    name(br2): _fake_results(paper.build_config(br2, "cpu"), 0.8, 0.7)})  # no masks
  got = checks.check_rows(tbl, "cpu", results, {})
  assert [c["state"] for c in got][0] == "done" and got[0]["verdict"] == "holds"
  a2 = got[0]["columns"]["A2"]
  assert a2["diff"] == pytest.approx(100 * (better["A2"].mean() - base["A2"].mean()))
  assert (a2["b"], a2["c"]) == (int(np.sum(better["A2"] & ~base["A2"])), 0)
  assert got[1]["state"] == "pending"  # En2 BC has no run
  md = reports.table_markdown(tbl, "cpu", reports.table_rows(tbl, "cpu", results, {}), got)
  assert "## Claim check on our runs" in md and "exact McNemar" in md
  assert f"| BR beats BC, En1ResNet20 | {got[0]['columns']['N']['diff']:+.2f} [" in md
  # Table III: the same target under its oracle's (transferred) examples vs white-box
  t3 = paper.table("III")
  check = t3.checks[0]
  target, oracle = name(check.worse), name(check.better.oracle)
  transfer = _masked_results(paper.build_config(check.worse, "cpu"), better)["robust"]
  raw = {target: _masked_results(paper.build_config(check.worse, "cpu"), base),
         oracle: _fake_results(paper.build_config(check.better.oracle, "cpu"), 0.8, 0.7)}
  got = checks.check_rows(t3, "cpu", _typed(raw), {(target, oracle): _evaluation(transfer)})[0]
  assert got["verdict"] == "holds" and set(got["columns"]) == {"A1", "A2", "A3"}
  # The transfer row shows the transfer's worst case and other attacks, not the white-box ones.
  raw[target]["robust"]["accuracy"]["A2-eot5"] = 0.2
  transfer["accuracy"]["A2-eot5"] = 0.65
  row = reports.table_rows(t3, "cpu", _typed(raw), {(target, oracle): _evaluation(transfer)})[0]
  assert row["state"] == "done" and row["worst_case"] == pytest.approx(100 * transfer["accuracy_worst_case"])
  assert row["extra_attacks"] == {"A2-eot5": pytest.approx(65.0)}
  del raw[target]["robust"]["masks"]
  got = checks.check_rows(t3, "cpu", _typed(raw), {(target, oracle): _evaluation(transfer)})[0]
  assert got["state"].startswith("no per-image masks")
  # A transfer kept without masks carries its check's discordant counts; the McNemar test decides it.
  earlier = checks.check_rows(t3, "cpu", _typed({target: _masked_results(paper.build_config(check.worse, "cpu"),
                                                                          base)}),
                              {(target, oracle): _evaluation(transfer)})[0]
  kept = {k: v for k, v in transfer.items() if k != "masks"}
  kept.update(check=earlier, reconstructed_from="an older table")
  got = checks.check_rows(t3, "cpu", _typed(raw), {(target, oracle): _evaluation(kept)})[0]
  assert got["columns"] == earlier["columns"] and got["verdict"] == "holds (from an older table)"
  kept["check"]["columns"]["A1"].update(b=5, c=1)  # 5 vs 1: p = 0.22, not a verdict
  got = checks.check_rows(t3, "cpu", _typed(raw), {(target, oracle): _evaluation(kept)})[0]
  assert got["columns"]["A1"]["verdict"] == "inconclusive" and got["verdict"].startswith("2 holds, 1 inconclusive")


def test_a_check_without_committed_masks_is_decided_on_the_retrained_runs():
  rng = np.random.default_rng(1)
  base = {k: rng.random(400) < 0.7 for k in ("natural", "A1", "A2", "A3")}
  better = {k: v | (rng.random(400) < 0.2) for k, v in base.items()}
  name = lambda row: paper.run_name(paper.build_config(row, "cpu"))
  check = paper.table("I").checks[0]
  tbl = dataclasses.replace(paper.table("I"), checks=(check,))
  cfgs = [paper.build_config(r, "cpu") for r in (check.better, check.worse)]
  committed = _typed({name(check.better): _fake_results(cfgs[0], 0.8, 0.7),  # masks not kept
                      name(check.worse): _fake_results(cfgs[1], 0.8, 0.7)})
  reruns = _typed({name(check.better): _masked_results(cfgs[0], better)})
  got = checks.check_rows(tbl, "cpu", committed, {}, reruns)[0]
  assert got["state"] == "no per-image masks" and "verdict" not in got  # one side still has none
  reruns.update(_typed({name(check.worse): _masked_results(cfgs[1], base)}))
  got = checks.check_rows(tbl, "cpu", committed, {}, reruns)[0]
  assert got["verdict"] == "holds (on the retrained runs)"
  assert got["retrained"] == [name(check.better), name(check.worse)]
  a2 = got["columns"]["A2"]
  assert (a2["b"], a2["c"]) == (int(np.sum(better["A2"] & ~base["A2"])), 0)
  assert checks.check_rows(tbl, "cpu", committed, {})[0]["state"] == "no per-image masks"


def test_trends_compare_one_number_of_two_runs_beside_the_papers_difference():
  name = lambda row: paper.run_name(paper.build_config(row, "cpu"))
  t7 = paper.table("VII")
  trend = t7.trends[0]  # ResNet20 tnn: natural more channel-sparse than PGD-AT (paper 11.16 - 2.55)
  assert (trend.larger.loss, trend.smaller.loss, trend.column) == ("natural", "at", "channel_sparsity")
  results = {}
  for row, value in ((trend.larger, 0.10), (trend.smaller, 0.025)):
    res = _fake_results(paper.build_config(row, "cpu"), 0.9, 0.5)
    res["efficiency"]["sparsity_paper_counting"]["total/in_channel_sparsity"] = value
    results[name(row)] = res
  got = checks.trend_rows(t7, "cpu", reports.table_rows(t7, "cpu", _typed(results), {}))
  assert len(got) == len(t7.trends) == 22 + 12
  assert got[0]["paper"] == pytest.approx(11.16 - 2.55) and got[0]["ours"] == pytest.approx(7.5)
  assert got[0]["verdict"] == "holds" and all(t["state"] == "pending" for t in got[1:])
  # The same two runs on the graded structure index, which the paper does not report.
  twin = next(i for i, t in enumerate(t7.trends) if t.column == "zero_dispersion")
  assert (t7.trends[twin].larger, t7.trends[twin].smaller) == (trend.larger, trend.smaller)
  for row, d in ((trend.larger, 1.5), (trend.smaller, 2.25)):
    results[name(row)]["efficiency"]["sparsity_paper_counting"]["total/zero_dispersion"] = d
  rows = reports.table_rows(t7, "cpu", _typed(results), {})
  assert rows[0]["columns"]["zero_dispersion"] == {"paper": None, "ours": 1.5, "diff": None}
  got = checks.trend_rows(t7, "cpu", rows)
  assert got[twin]["paper"] is None and got[twin]["ours"] == pytest.approx(-0.75)
  assert got[twin]["verdict"] == "reversed"
  md = reports.table_markdown(t7, "cpu", rows, [], got)
  assert f"| {t7.trends[twin].label} | - | -0.75 | reversed |" in md
  # With the channel counts known, a difference within chance (2 sqrt(2/177 + 2/177) = 0.30) is a tie.
  for row in (trend.larger, trend.smaller):
    results[name(row)]["efficiency"]["sparsity_paper_counting"]["total/dispersion_channels"] = 177
  results[name(trend.smaller)]["efficiency"]["sparsity_paper_counting"]["total/zero_dispersion"] = 1.75
  got = checks.trend_rows(t7, "cpu", reports.table_rows(t7, "cpu", _typed(results), {}))
  assert got[twin]["verdict"] == "tie" and got[twin]["chance"] == pytest.approx(0.3007, abs=1e-4)
  results[name(trend.smaller)]["efficiency"]["sparsity_paper_counting"]["total/zero_dispersion"] = 1.1
  got = checks.trend_rows(t7, "cpu", reports.table_rows(t7, "cpu", _typed(results), {}))
  assert got[twin]["verdict"] == "holds" and "chance" not in got[0]
  for row in (trend.larger, trend.smaller):  # fewer channels averaged: a wider chance band
    results[name(row)]["efficiency"]["sparsity_paper_counting"]["total/dispersion_channels"] = 40
  got = checks.trend_rows(t7, "cpu", reports.table_rows(t7, "cpu", _typed(results), {}))
  assert got[twin]["verdict"] == "tie" and got[twin]["chance"] == pytest.approx(2 * np.sqrt(4 / 40))
  t4 = paper.table("IV")  # M decreases with n: En1 above En2 (paper 0.2762 - 0.2399); ours reversed
  results = {}
  for row, m in zip(t4.rows[:2], (0.20, 0.25)):
    results[name(row)] = dict(_fake_results(paper.build_config(row, "cpu"), 0.9, 0.5), m_bound=m)
  rows = reports.table_rows(t4, "cpu", _typed(results), {})
  got = checks.trend_rows(t4, "cpu", rows)
  assert got[0]["verdict"] == "reversed" and got[0]["ours"] == pytest.approx(-0.05)
  md = reports.table_markdown(t4, "cpu", rows, [], got)
  assert "| M of En1ResNet20 above En2ResNet20 | +0.0363 | -0.0500 | reversed |" in md


def test_results_md_counts_channels_as_the_paper():
  # The paper counts zero *input* channels of the 3x3 convs (its ResNet20 has 627); 1x1 shortcuts are out.
  k1 = np.ones((1, 3, 3, 2, 4), np.float32)
  k1[..., 1, :] = 0  # input channel 1 of the stem-like conv is zero
  k2 = np.ones((1, 3, 3, 4, 4), np.float32)
  k2[..., [0, 3], :] = 0
  params = {"stem": {"kernel": k1}, "block": {"conv1": {"kernel": k2},
                                              "shortcut": {"kernel": np.zeros((1, 1, 1, 4, 4))}},
            "fc": {"kernel": np.ones((1, 4, 10)), "bias": np.zeros((1, 10))}}
  report = sparsity.weight_report(params, sparsity.spatial_conv_mask)
  assert (report["total/zero_in_channels"], report["total/in_channels"]) == (3, 6)
  results = {"config": paper.protocol("mnist").to_dict(), "model_name": "ResNet8",
             "natural_accuracy": 0.9, "m_bound": 0.3, "m_bound_3x3": 0.2,
             "efficiency": {"sparsity_paper_counting": {k: v for k, v in report.items()
                                                        if k.startswith("total/")}}}
  md = run_results.markdown_row(results)
  assert "channel sparsity (paper)" in md and "50.00% (3/6)" in md and "0.3000 / 0.2000" in md


def test_svhn_trains_without_flips_and_digits_without_crops():
  from enquant import config as config_lib  # pylint: disable=g-import-not-at-top
  assert config_lib.augmentation(paper.protocol("svhn"), 32) == (True, False)
  assert config_lib.augmentation(paper.protocol("cifar10"), 32) == (True, True)
  assert config_lib.augmentation(paper.protocol("mnist"), 28) == (False, False)
  forced = paper.protocol("svhn")
  forced = forced.__class__(**{**forced.__dict__, "train": forced.train.__class__(
      **{**forced.train.__dict__, "flip": True})})
  assert config_lib.augmentation(forced, 32) == (True, True)


def test_fig1_shows_fgsm_and_falls_back_to_the_first_attack():
  cfg = paper.build_config(_row("VII", depth=56, noise=0.0, bits=2, loss="natural"), "cpu")
  spec = run_results.example_spec(cfg, "fgsm")
  assert (spec.kind, spec.eps, spec.eot_samples) == ("fgsm", 0.031, 1)
  assert run_results.example_spec(cfg).kind == "pgd"  # the per-run picture: IFGSM
  only_cw = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, attacks="a3"))
  assert run_results.example_spec(only_cw, "fgsm").kind == "cw"
  none = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, attacks="none"))
  assert run_results.example_spec(none, "fgsm") is None


def test_kernel_figures_pick_a_stage_one_block_that_exists():
  deep = {"stem": {}, "stage1_block1": {}, "stage1_block2": {}, "stage1_block3": {}, "stage2_block1": {}}
  assert paper.kernel_layer(deep) == ("stage1_block2", "conv1")
  shallow = {"stem": {}, "stage1_block1": {}, "stage2_block1": {}}  # ResNet8 at cpu scale
  assert paper.kernel_layer(shallow) == ("stage1_block1", "conv1")
  with pytest.raises(ValueError, match="no stage-1 block"):
    paper.kernel_layer({"stem": {}})


def test_epochs_study_rows_use_the_papers_counting_in_percent():
  results = json.load(open(os.path.join(ROOT, "results", "cpu", "runs",
                                        "fmnist-ResNet8-br2b-natural-141eb115.json")))
  counted = results["efficiency"]["sparsity_paper_counting"]
  counted.update({"total/channel_sparsity": 0.25, "total/in_channel_sparsity": 0.125})
  results["efficiency"]["sparsity"]["total/channel_sparsity"] = 0.5  # not the paper's counting: ignored
  row = epochs.study_row(results_lib.RunResults.from_dict(results))
  assert row["epochs"] == 6 and row["channel sparsity"] == 25.0 and row["in-channel sparsity"] == 12.5
  np.testing.assert_allclose([row["N"], row["A1"], row["weight sparsity"], row["train min"]],
                             [84.92, 55.5, 100 * counted["total/weight_sparsity"],
                              results["train_seconds"] / 60])
  md = epochs.study_markdown("r", [row, dict(row, epochs=24, A3=None)])
  lines = md.splitlines()
  assert lines[-2].startswith("| 6 | 84.92 | 55.50 |") and "| 25.00 | 12.50 |" in lines[-2]
  assert lines[-1].startswith("| 24 |") and "| - |" in lines[-1]
  assert reports.portable({"workdir": "/abs/x", "n": 1})["workdir"] == os.path.relpath("/abs/x")


def test_epochs_study_refuses_bad_flags_in_one_line():
  from absl import app  # pylint: disable=g-import-not-at-top
  assert epochs._parse_epochs(["24", " 60"]) == [24, 60]  # pylint: disable=protected-access
  with pytest.raises(app.UsageError, match="positive integers"):
    epochs._parse_epochs(["24", "0"])  # pylint: disable=protected-access
  got = subprocess.run([sys.executable, "-m", "experiments.epochs_study", "--run=fmnist-ResNet8-nope-00000000"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert got.returncode != 0 and "is no run of the paper's tables" in got.stderr, got.stderr[-1000:]
  assert "Traceback" not in got.stderr


def test_across_seeds_is_the_student_t_interval_of_the_mean():
  got = checks.across_seeds([1.0, 2.0, 3.0])
  half = 4.302653 * 1.0 / np.sqrt(3)  # t(0.975, df 2), sd 1
  np.testing.assert_allclose([got["mean"], got["sd"], got["low"], got["high"]], [2, 1, 2 - half, 2 + half],
                             rtol=1e-6)
  assert got["verdict"] == "inconclusive" and got["seeds"] == 3
  assert checks.across_seeds([3.0, 4.0, 5.0])["verdict"] == "holds"
  assert checks.across_seeds([-3.0, -4.0, -5.0])["verdict"] == "reversed"
  with pytest.raises(ValueError, match=">= 2 values"):
    checks.across_seeds([1.0])


def test_seeds_study_compares_two_runs_per_seed_and_across_seeds():
  def results(nat, _, mask):
    n = len(mask)
    packed = evalfiles.pack_mask(np.asarray(mask, bool))
    return results_lib.RunResults.from_dict({
        "schema_version": 2, "natural_accuracy": nat, "test_examples": 10_000, "model_name": "m",
        "config": {"dataset": "fmnist"}, "train_seconds": 120.0,
        "robust": {"accuracy": {"natural": float(np.mean(mask)), "A1": float(np.mean(mask)), "n": n},
                   "masks": {"natural": packed, "A1": packed}}})
  a = [seeds.seed_row(results(0.80, 0.75, [1, 1, 1, 0]), 0), seeds.seed_row(results(0.82, 0.70, [1, 1, 0, 0]), 1)]
  b = [seeds.seed_row(results(0.78, 0.74, [1, 0, 0, 0]), 0), seeds.seed_row(results(0.81, 0.72, [1, 1, 0, 0]), 1)]
  assert a[0]["train min"] == 2.0 and a[0]["A2"] is None
  text, summary = seeds.seeds_markdown(["a", "b"], {"a": a, "b": b})
  np.testing.assert_allclose(summary["difference"]["per_seed"]["N"], [2.0, 1.0])
  np.testing.assert_allclose(summary["difference"]["per_seed"]["A1"], [50.0, 0.0])  # A1 = its mask's mean
  over = summary["difference"]["across_seeds"]
  assert over["N"]["mean"] == pytest.approx(1.5) and over["A2"] is None
  assert summary["spread"]["a"]["N"] == pytest.approx(np.std([80, 82], ddof=1))
  lines = text.splitlines()
  # Seed 0's A1, paired on the 4 images: masks differ on 2 of them (+50 points).
  seed0 = next(l for l in lines if l.startswith("| 0 |"))
  assert "+50.00 [" in seed0 and "(all images +2.00)" in seed0
  assert any(l.startswith("| across seeds | +1.50 (sd 0.71)") for l in lines)


def test_seed_variants_keep_the_evaluation_and_refuse_bad_flags():
  _, cfg = paper.find_run("fmnist-En1ResNet8-br1b-at-4e0638c4", "cpu")
  again = paper.with_seed(cfg, 3)
  assert again.train.seed == 3 and again.eval == cfg.eval and again.model == cfg.model
  assert dataclasses.replace(again, train=cfg.train) == cfg
  assert paper.run_name(again) != paper.run_name(cfg)
  with pytest.raises(ValueError, match="is no run of the paper's tables"):
    paper.find_run("fmnist-En1ResNet8-nope-00000000", "cpu")
  assert seeds.parse_seeds(["1", "3"]) == [1, 3]
  for bad in (["1", "0"], ["2", "2"], ["x"]):
    with pytest.raises(ValueError, match="distinct positive integers"):
      seeds.parse_seeds(bad)
  got = subprocess.run([sys.executable, "-m", "experiments.seeds_study", "--runs=fmnist-En1ResNet8-br1b-at-4e0638c4",
                        "--seeds=1", "--runs_root=/nonexistent", "--results_root=/nonexistent"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert got.returncode == 2 and got.stderr.strip().splitlines()[-1].startswith("error: "), got.stderr
  assert "has no results yet" in got.stderr and "Traceback" not in got.stderr


def test_mcnemar_p_is_the_exact_two_sided_binomial_test_on_hand_made_masks():
  from scipy import stats  # pylint: disable=g-import-not-at-top
  # 1000 images: 36 only the first run gets right, 21 only the second, 643 both.
  first, second = np.zeros(1000, bool), np.zeros(1000, bool)
  first[:36] = True
  second[36:57] = True
  first[57:700] = second[57:700] = True
  got = checks.paired_difference(first, second)
  assert (got["b"], got["c"], got["n"]) == (36, 21, 1000)
  direct = min(1.0, 2 * sum(math.comb(57, k) for k in range(22)) / 2 ** 57)  # P[X <= 21], X ~ Bin(57, 1/2)
  assert got["p"] == pytest.approx(direct, rel=1e-12)
  assert got["p"] == pytest.approx(stats.binomtest(36, 57, 0.5).pvalue, rel=1e-9)
  assert got["low"] > 0 and got["verdict"] == "inconclusive"  # the normal interval alone would say holds
  assert checks.paired_difference(second, first)["p"] == got["p"]  # two-sided: symmetric
  assert checks.mcnemar_p(0, 0) == 1.0 and checks.mcnemar_p(5, 5) == 1.0
  assert checks.mcnemar_p(6, 0) == pytest.approx(2 / 64)  # both tails of 6 coin flips all alike
  with pytest.raises(ValueError, match="discordant count b"):
    checks.mcnemar_p(-1, 3)


def _one_line_error(fn, match):
  with pytest.raises(results_lib.ResultsError, match=match) as e:
    fn()
  assert "\n" not in str(e.value)
  return str(e.value)


def test_results_files_refuse_what_cannot_be_true(tmp_path):
  cfg = paper.build_config(_row("I", ensembles=1, quant="br"), "cpu")
  rng = np.random.default_rng(0)
  natural = rng.random(64) < 0.5
  good = _masked_results(cfg, {"natural": natural, "A1": natural & (rng.random(64) < 0.8),
                               "A2": rng.random(64) < 0.4, "A3": natural & (rng.random(64) < 0.7)})
  good["robust"]["robustbench"] = {"attacks": ["A1", "A2", "A3"], "clean_acc": good["robust"]["accuracy"]["natural"],
                                   "robust_acc": good["robust"]["accuracy_worst_case"], "eps": 0.031}
  path = tmp_path / "results.json"
  results_lib.RunResults.from_dict(good).to_json(str(path))
  loaded = results_lib.RunResults.from_json(str(path))
  assert loaded.to_dict() == json.loads(json.dumps(good))
  assert loaded.robust.mask("A2").tolist() == good_mask(good, "A2")
  def crafted(edit):
    bad = json.loads(json.dumps(good))
    edit(bad)
    path.write_text(json.dumps(bad))
    return lambda: results_lib.RunResults.from_json(str(path))
  acc = lambda d: d["robust"]["accuracy"]
  message = _one_line_error(crafted(lambda d: acc(d).update(A1=7.5)), r"accuracy.A1 must be an accuracy in \[0, 1\]")
  assert message.startswith(str(path))
  _one_line_error(crafted(lambda d: acc(d).update(A2=0.999)), "per-image mask gives")
  _one_line_error(crafted(lambda d: acc(d).update(A3="0.9")), "got '0.9'")
  _one_line_error(crafted(lambda d: d.update(natural_accuracy=True)), "natural_accuracy")
  _one_line_error(crafted(lambda d: d["robust"].update(accuracy_worst_case=acc(d)["natural"] + 0.1)),
                  "exceeds accuracy.natural")
  # 20 images survive every attack, 10 of them misclassified clean: the worst case is 10 of 64, not 20.
  clean, survive = np.arange(64) < 40, (np.arange(64) >= 30) & (np.arange(64) < 50)
  old_count = _masked_results(cfg, {"natural": clean, "A1": survive, "A2": survive, "A3": survive})
  old_count["robust"]["accuracy_worst_case"] = 20 / 64
  old_count["robust"]["robustbench"] = dict(good["robust"]["robustbench"], clean_acc=40 / 64, robust_acc=20 / 64)
  _one_line_error(lambda: results_lib.RunResults.from_dict(old_count, "old.json"), "robust AND clean-correct 0.1562")
  _one_line_error(crafted(lambda d: d["robust"]["robustbench"].update(robust_acc=1.0)), "exceeds its clean_acc")
  _one_line_error(crafted(lambda d: d.update(schema_version=1)), "convert_results.py")
  path.write_text('{"natural_accuracy": 0.9')
  _one_line_error(lambda: results_lib.RunResults.from_json(str(path)), "not a readable JSON")


def good_mask(results, name):
  return evalfiles.unpack_mask(results["robust"]["masks"][name], results["robust"]["examples"]).tolist()


def test_every_committed_results_file_loads_as_typed_results():
  import glob  # pylint: disable=g-import-not-at-top
  runs = [p for kind in ("runs", "seeds_runs", "epochs_runs", "reruns")
          for p in glob.glob(os.path.join(ROOT, "results", "*", kind, "*.json"))]
  assert len(runs) >= 89
  for path in runs:
    res = results_lib.RunResults.from_json(path)
    if res.robust is not None and res.robust.worst_case is not None and res.robust.masks:
      both = np.logical_and.reduce([res.robust.mask(k) for k in ("natural",) + res.robust.worst_case_attacks])
      assert res.robust.worst_case == pytest.approx(both.mean())  # robust AND clean-correct
  for path in glob.glob(os.path.join(ROOT, "results", "*", "transfers", "*.json")):
    results_lib.read_evaluation(path)


def test_crafted_results_are_refused_and_nothing_is_copied(tmp_path):
  runs, out = tmp_path / "runs", tmp_path / "results"
  crafted_cfg = paper.build_config(paper.table("VIII").rows[0], "cpu")
  crafted = runs / "cpu" / paper.run_name(crafted_cfg)
  crafted.mkdir(parents=True)
  bad = _fake_results(crafted_cfg, 0.5, 0.4)
  bad["robust"]["accuracy"]["A1"] = 7.5
  (crafted / "results.json").write_text(json.dumps(bad))
  common = [sys.executable, "-m", "experiments.paper", "--table=VIII", "--scale=cpu",
            f"--runs_root={runs}", f"--results_root={out}"]
  rebuild = subprocess.run(common + ["--tables_only"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert rebuild.returncode == 2 and "Traceback" not in rebuild.stderr
  assert rebuild.stderr.strip().splitlines()[-1] == (
      f"error: {crafted / 'results.json'}: accuracy.A1 must be an accuracy in [0, 1], got 7.5")
  assert not (out / "cpu" / "runs" / (crafted.name + ".json")).exists()  # nothing copied
  assert not (out / "cpu" / "table_VIII.md").exists()


def test_two_queues_share_a_table_run_by_run(tmp_path, monkeypatch):
  from enquant import files, pipeline  # pylint: disable=g-import-not-at-top
  from experiments.paper import committing  # pylint: disable=g-import-not-at-top
  store = committing.Store(str(tmp_path / "runs"), str(tmp_path / "results"), "cpu")
  trained = []
  def fake_train(cfg, workdir, **_):
    trained.append(os.path.basename(workdir))
    os.makedirs(workdir, exist_ok=True)
    files.write_json_atomic(os.path.join(workdir, "results.json"), _fake_results(cfg, 0.9, 0.8))
  monkeypatch.setattr(pipeline, "train_and_evaluate", fake_train)
  rows = paper.table("VIII").rows
  (a, cfg_a), (b, cfg_b) = ((paper.run_name(c), c) for c in (paper.build_config(r, "cpu") for r in rows[:2]))
  logged = []
  kw = dict(progress=False, command="python -m experiments.paper --table=VIII", log=logged.append, announce="go")
  os.makedirs(store.runs_dir)
  with files.hold_lock(store.workdir(a) + ".lock", "the other queue"):  # another queue trains run a
    store.train(a, cfg_a, **kw)
    store.train(b, cfg_b, **kw)
  assert trained == [b] and any(line.startswith(f"skip {a}: run {a} is in use by pid ") for line in logged)
  store.train(b, cfg_b, **kw)  # finished meanwhile: skipped, not trained twice
  assert trained == [b] and logged[-1] == f"skip {b}: done (finished by another process)"
  log = files.read_jsonl(os.path.join(store.out_dir, "runs.jsonl"))
  assert [(r["run"], r["command"]) for r in log] == [(b, kw["command"])]
  assert set(log[0]) == {"run", "command", "hardware", "start", "wall_seconds"}


def test_models_are_kept_beside_committed_results_and_float_models_load(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  from enquant import export  # pylint: disable=g-import-not-at-top
  from enquant.config import ExperimentConfig  # pylint: disable=g-import-not-at-top
  from enquant.models import EnResNet, ModelConfig  # pylint: disable=g-import-not-at-top
  from experiments.paper import committing  # pylint: disable=g-import-not-at-top
  store = committing.Store(str(tmp_path / "runs"), str(tmp_path / "results"), "cpu")
  rows = paper.table("VIII").rows  # BR and float MNIST rows
  for row, model_file in ((rows[0], "model_packed.npz"), (rows[1], "model_float32.npz")):
    cfg = paper.build_config(row, "cpu")
    workdir = store.workdir(paper.run_name(cfg))
    os.makedirs(workdir)
    with open(os.path.join(workdir, "results.json"), "w") as f:
      json.dump(_fake_results(cfg, 0.9, 0.8), f)
    with open(os.path.join(workdir, model_file), "wb") as f:
      f.write(model_file.encode())
    assert store.results(paper.run_name(cfg)) is not None
    with open(store.model(paper.run_name(cfg)), "rb") as f:
      assert f.read() == model_file.encode()
  # A rerun that differs from the committed results keeps its model beside the rerun, not the committed row.
  cfg = paper.build_config(rows[0], "cpu")
  name = paper.run_name(cfg)
  with open(os.path.join(store.workdir(name), "results.json"), "w") as f:
    json.dump(_fake_results(cfg, 0.85, 0.75), f)
  with open(os.path.join(store.workdir(name), "model_packed.npz"), "wb") as f:
    f.write(b"rerun")
  assert store.results(name).natural_accuracy == 0.9  # the table keeps the first run
  assert open(store.model(name), "rb").read() == b"model_packed.npz"
  assert open(os.path.join(str(tmp_path / "results"), "reruns", name + ".npz"), "rb").read() == b"rerun"
  cfg = ExperimentConfig(model=ModelConfig(depth=8, ensembles=1, noise_coef=0.1, num_classes=10))
  model = EnResNet(cfg.model)
  x = np.random.default_rng(0).random((2, 28, 28, 1), np.float32)
  variables = model.init(jax.random.PRNGKey(0), x)
  run_results.save_float_model(str(tmp_path / "float.npz"), cfg, variables, (28, 28, 1))
  loaded, loaded_vars = export.load_model(str(tmp_path / "float.npz"))
  key = jax.random.PRNGKey(3)
  np.testing.assert_array_equal(loaded.apply_eval(loaded_vars, x, key), model.apply_eval(variables, x, key))


def test_a_committed_model_reproduces_its_committed_per_image_results(shared_data_dir):
  """Every ``results/<scale>/runs/<run>.npz`` is the model its committed results came from: the first test
  images' clean predictions equal the committed per-image mask (deterministic nets: exactly)."""
  import glob  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from enquant import data, export  # pylint: disable=g-import-not-at-top
  models = sorted(glob.glob(os.path.join(ROOT, "results", "*", "runs", "*.npz")))
  assert models, "no committed model"
  for path in models:
    res = results_lib.RunResults.from_json(path[:-len(".npz")] + ".json")
    model, variables = export.load_model(path)
    if model.config.noise_coef > 0:
      continue  # a randomized model's clean pass is one noise draw: not reproducible image by image
    ds = data.load(res.config["dataset"], str(shared_data_dir), source="local", max_test=128, max_train=1)
    logits = model.apply_eval(variables, data.to_float(ds.test_images), jax.random.PRNGKey(0))
    correct = np.asarray(logits).argmax(-1) == ds.test_labels
    np.testing.assert_array_equal(correct, res.robust.mask("natural")[:128], err_msg=path)


def test_kernel_figures_draw_from_kept_models_without_run_directories(tmp_path, monkeypatch):
  """Figs. 4 and 6 from committed model files alone: a run's own model, else its retrained run's (the panel
  says so); each panel is an output channel of the model's kernel; a figure whose model is absent is skipped."""
  from enquant import export, plots  # pylint: disable=g-import-not-at-top
  from experiments.paper import figures  # pylint: disable=g-import-not-at-top
  fig4, at = "fmnist-ResNet8-br2b-at-ad18541e", "fmnist-En1ResNet8-br2b-at-97f7098a"
  tradeoff = "fmnist-En1ResNet8-br2b-tradeoff-a1b8-5609afdd"  # moved when retrained: only the rerun's model
  out = tmp_path / "results"
  for name, sub in ((fig4, "runs"), (at, "runs"), (tradeoff, "reruns")):
    os.makedirs(out / sub, exist_ok=True)
    for ext in (".npz", ".json"):
      shutil.copy(os.path.join(ROOT, "results", "cpu", sub, name + ext), out / sub)
  drawn = {}
  monkeypatch.setattr(plots, "kernels", lambda path, panels, title: drawn.update({os.path.basename(path): panels}))
  store = committing.Store(str(tmp_path / "runs"), str(out), "cpu")
  figures.draw(store.runs_dir, store.out_dir, "cpu", None, lambda d: False, log=lambda *_: None,
               kept_model=store.kept_model)
  assert sorted(drawn) == ["fig4_ternary_channels_at.png", "fig6_ternary_channels_at_vs_tradeoff.png"]
  assert list(drawn["fig6_ternary_channels_at_vs_tradeoff.png"]) == [
      "En1ResNet20 tnn AT", "En1ResNet20 tnn (6) a=1 b=8\n(retrained run)"]
  _, variables = export.load_model(out / "runs" / (fig4 + ".npz"))
  block, conv = paper.kernel_layer(variables["params"])
  kernel = np.asarray(variables["params"][block][conv]["kernel"][0])  # (3, 3, I, O)
  columns = [kernel[..., o].reshape(9, -1).T for o in range(kernel.shape[-1])]
  (panels,) = drawn["fig4_ternary_channels_at.png"].values()
  assert len(panels) == 4 and all(any(np.array_equal(p, c) for c in columns) for p in panels)
  assert len(np.unique(np.abs(panels[panels != 0]))) == 1 and (panels == 0).any()  # ternary: one scale, zeros


def test_autoattack_claim_checks_pair_the_kept_masks(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  import autoattack_checks  # pylint: disable=g-import-not-at-top,import-error
  _, _, better, other = autoattack_checks.PAIRS[0]
  masks = {better: np.array([1, 1, 1, 1, 0, 0, 1, 0] * 4, bool),
           other: np.array([1, 0, 0, 0, 0, 0, 1, 0] * 4, bool)}
  for name, mask in masks.items():
    os.makedirs(tmp_path / "runs" / name)
    evaluation = {"examples": mask.size, "masks": {"autoattack-rand": evalfiles.pack_mask(mask)},
                  "run": str(tmp_path / "runs" / name)}
    (tmp_path / "runs" / name / "evaluation-aa9.json").write_text(json.dumps(evaluation))
  os.makedirs(tmp_path / "out" / "reruns")
  (tmp_path / "out" / "reruns" / (better + ".npz")).write_bytes(b"model")  # `better` attacked as retrained
  autoattack_checks.main([f"--runs_root={tmp_path / 'runs'}", f"--results={tmp_path / 'out'}", "--tags=aa9"])
  rows = json.loads((tmp_path / "out" / "autoattack_checks.json").read_text())
  assert rows[0]["retrained"] == [True, False]
  assert f"{better} (autoattack-rand, retrained) | {other} (autoattack-rand) |" in (
      tmp_path / "out" / "autoattack_checks.md").read_text()
  assert len(rows) == 1 and (rows[0]["b"], rows[0]["c"]) == (12, 0)  # 3 of every 8 images only `better` keeps
  assert rows[0]["p"] == pytest.approx(2 * 0.5 ** 12) and rows[0]["verdict"] == "holds"
  kept = json.loads((tmp_path / "out" / "autoattack" / (better + ".json")).read_text())  # beside the results
  assert not os.path.isabs(kept["run"])  # no path of this machine
  assert "not evaluated yet" in (tmp_path / "out" / "autoattack_checks.md").read_text()  # the other pair


def test_retrained_checks_report_reproduction_and_decide_the_pair(tmp_path):
  sys.path.insert(0, os.path.join(ROOT, "scripts"))
  import retrained_checks  # pylint: disable=g-import-not-at-top,import-error
  from scipy import stats  # pylint: disable=g-import-not-at-top
  _, _, better, other = retrained_checks.PAIRS[0]
  rng = np.random.default_rng(3)
  base = {k: rng.random(200) < 0.6 for k in ("natural", "A1", "A2", "A3")}
  masks = {other: base, better: {k: v | (rng.random(200) < 0.1) for k, v in base.items()}}
  os.makedirs(tmp_path / "out" / "runs")
  for name, m in masks.items():
    os.makedirs(tmp_path / "runs" / name)
    acc = {k: float(v.mean()) for k, v in m.items()}
    evaluation = {"examples": 200, "accuracy": dict(acc, n=200), "run": str(tmp_path / "runs" / name),
                  "masks": {k: evalfiles.pack_mask(v) for k, v in m.items()}}
    (tmp_path / "runs" / name / "evaluation-a123.json").write_text(json.dumps(evaluation))
    (tmp_path / "runs" / name / "metrics.jsonl").write_text('{"epoch": 1, "test_acc": 0.5}\n'
                                                            '{"epoch": 2, "test_acc": 0.625}\n')
    if name == other:
      acc["A2"] += 0.01  # the committed run had another A2: `other` does not reproduce
    committed = {"natural_accuracy": 0.625, "robust": {"examples": 200, "accuracy": dict(acc, n=200)}}
    (tmp_path / "out" / "runs" / (name + ".json")).write_text(json.dumps(committed))
  retrained_checks.main([f"--runs_root={tmp_path / 'runs'}", f"--results={tmp_path / 'out'}"])
  out = json.loads((tmp_path / "out" / "retrained_checks.json").read_text())
  assert out["runs"][better]["reproduces"] and not out["runs"][other]["reproduces"]
  assert out["runs"][better]["columns"]["N full"] == {"committed": 62.5, "retrained": 62.5}  # last epoch's
  a2 = out["runs"][other]["columns"]["A2"]
  assert a2["committed"] - a2["retrained"] == pytest.approx(1.0)
  check = out["checks"][0]
  for col, key in (("N", "natural"), ("A3", "A3")):
    b = int(np.sum(masks[better][key] & ~base[key]))
    assert (check["columns"][col]["b"], check["columns"][col]["c"]) == (b, 0)
    assert check["columns"][col]["p"] == pytest.approx(stats.binomtest(0, b, 0.5).pvalue)
  md = (tmp_path / "out" / "retrained_checks.md").read_text()
  assert f"(committed {100 * (base['A2'].mean() + 0.01):.2f}) | " in md and "| no |" in md
  assert not os.path.isabs(json.loads((tmp_path / "out" / "retrained" / (better + ".json")).read_text())["run"])
  bad = json.loads((tmp_path / "out" / "runs" / (better + ".json")).read_text())
  bad["robust"]["examples"] = 1000  # other images than the evaluation's
  with pytest.raises(ValueError, match="not the same images"):
    retrained_checks.reproduction(json.loads((tmp_path / "runs" / better / "evaluation-a123.json").read_text()),
                                  bad)


def test_hardware_names_the_first_processors_model_family_and_vector_isa(tmp_path):
  info = tmp_path / "cpuinfo"
  block = "processor\t: {p}\ncpu family\t: {f}\nmodel\t\t: {m}\nmodel name\t: AMD EPYC\nflags\t\t: {flags}\n\n"
  info.write_text(block.format(p=0, f=23, m=1, flags="fpu sse2 avx avx2 fma")
                  + block.format(p=1, f=25, m=17, flags="avx2 avx512f"))
  assert committing.hardware(str(info)) == f"AMD EPYC (family 23, model 1; AVX2), {os.cpu_count()} CPUs"
  info.write_text(block.format(p=0, f=25, m=17, flags="avx avx2 avx512f avx512_bf16"))
  assert committing.hardware(str(info)) == f"AMD EPYC (family 25, model 17; AVX-512), {os.cpu_count()} CPUs"


def test_a_committed_run_trained_again_keeps_its_committed_history_until_it_finishes(tmp_path):
  runs, out = tmp_path / "runs", tmp_path / "results"
  store = committing.Store(str(runs), str(out), "cpu")
  name = "fmnist-ResNet8-br1b-at-0"
  committed = [{"epoch": e, "m_bound": 0.3 - 0.01 * e} for e in (1, 2)]
  res = results_lib.RunResults.from_dict(dict(_fake_results(
      paper.build_config(paper.table("VIII").rows[0], "cpu"), 0.9, 0.8), history=committed))
  (runs / name).mkdir(parents=True)
  (runs / name / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "m_bound": 0.5}) + "\n")
  assert store.history(name, res) == committed  # training again: one new epoch so far
  assert store.history(name, None) == [{"epoch": 1, "m_bound": 0.5}]  # a new run: its own progress
  (runs / name / "results.json").write_text("{}")
  assert store.history(name, res) == [{"epoch": 1, "m_bound": 0.5}]  # finished there: its own
  assert store.tables_run_here(name)  # figures may draw from its weights
  store.first_runs.add(name)
  assert store.history(name, res) == committed  # a rerun that differs: the tables keep the first
  assert not store.tables_run_here(name)
  store.first_runs.clear()
  (out / "reruns").mkdir(parents=True)
  (out / "reruns" / (name + ".json")).write_text("{}")  # kept apart by an earlier rebuild
  assert not store.tables_run_here(name)
