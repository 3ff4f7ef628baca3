"""scripts/fig1_natural.py: Fig. 1's natural float ResNet is the harness's cpu-scale run of that row."""

import dataclasses
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))

import fig1_natural  # noqa: E402  pylint: disable=g-import-not-at-top,import-error
from experiments.paper import scales  # noqa: E402  pylint: disable=g-import-not-at-top


def test_the_run_is_the_harness_row_with_the_c_and_w_variants():
  cfg = fig1_natural.config(6)
  harness = scales.build_config(fig1_natural.ROW, "cpu")
  assert dataclasses.replace(cfg, eval=harness.eval) == harness  # only the attack list differs
  assert cfg.eval.attacks == "a1,a2,a3,cwl2" and cfg.eval.max_examples == harness.eval.max_examples
  assert (cfg.dataset, cfg.model.depth, cfg.model.ensembles, cfg.model.noise_coef) == ("fmnist", 14, 1, 0.0)
  assert not cfg.quant.enabled and cfg.loss.kind == "natural" and cfg.train.epochs == 6
  assert fig1_natural.config(48).train.epochs == 48


def test_the_committed_report_holds_the_committed_run():
  path = os.path.join(ROOT, "results", "cpu", "fig1_natural.json")
  report = json.load(open(path))
  res = report["results"]
  md = open(path[:-len(".json")] + ".md").read()
  for key in ("natural", "A1", "A2", "A3", "cwl2"):
    assert f"{100 * res['robust']['accuracy'][key]:.2f}" in md
  assert report["paper"] == fig1_natural.PAPER and not os.path.isabs(res["workdir"])
