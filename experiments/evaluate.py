"""Evaluate a finished (or checkpointed) run, white-box or black-box.

    python -m experiments.evaluate --run=runs/demo
    python -m experiments.evaluate --run=runs/demo --attacks=a2,apgd-ce,apgd-dlr --eot_samples=10
    python -m experiments.evaluate --run=runs/target --oracle=runs/oracle     # transfer (Table III)

Writes ``evaluation[-<tag>].json`` and ``.md`` into the run directory (never overwriting an existing file
unless --overwrite). With --oracle, adversarial examples are crafted on the oracle run's model (its P(w) for
quantized runs) and the target's accuracy on them is reported.
"""

import dataclasses
import os
import sys

from absl import app
from absl import flags

import experiments  # noqa: F401  (XLA flags before JAX)

flags.DEFINE_string("run", None, "Run directory to evaluate.", required=True)
flags.DEFINE_string("oracle", None, "Run directory of the oracle model (black-box transfer).")
flags.DEFINE_string("attacks", None, "Attacks (default: the run's own evaluation attacks).")
flags.DEFINE_float("eps", None, "l_inf radius (default: the run's).")
flags.DEFINE_integer("eot_samples", None, "EOT samples for randomized models (default: the run's).")
flags.DEFINE_integer("max_examples", None, "First N test images (0: all; default: the run's).")
flags.DEFINE_integer("seed", None, "Evaluation key (default: the run's).")
flags.DEFINE_string("data_dir", None, "Override the run's data directory.")
flags.DEFINE_string("tag", None, "Suffix of the output files.")
flags.DEFINE_bool("overwrite", False, "Replace an existing evaluation file.")
flags.DEFINE_bool("progress", True, "Show progress bars.")
FLAGS = flags.FLAGS


def evaluate_run() -> dict:
  from enquant import data as data_lib  # pylint: disable=g-import-not-at-top
  from enquant import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from enquant import files  # pylint: disable=g-import-not-at-top
  from enquant import pipeline  # pylint: disable=g-import-not-at-top

  cfg, model, variables, _ = pipeline.load_run(FLAGS.run, data_dir=FLAGS.data_dir)
  overrides = {k: v for k, v in dict(attacks=FLAGS.attacks, eps=FLAGS.eps, eot_samples=FLAGS.eot_samples,
                                     max_examples=FLAGS.max_examples, seed=FLAGS.seed).items()
               if v is not None}
  cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **overrides))
  evaluate_lib.parse_attacks(cfg.eval.attacks, eps=cfg.eval.eps)
  oracle = None
  if FLAGS.oracle:
    ocfg, omodel, ovars, _ = pipeline.load_run(FLAGS.oracle, data_dir=FLAGS.data_dir)
    if ocfg.dataset != cfg.dataset:
      raise ValueError(f"oracle was trained on {ocfg.dataset}, target on {cfg.dataset}")
    oracle = (omodel, ovars)
  tag = FLAGS.tag or ("transfer" if FLAGS.oracle else "")
  out = os.path.join(FLAGS.run, f"evaluation{'-' + tag if tag else ''}.json")
  if os.path.exists(out) and not FLAGS.overwrite:
    raise ValueError(f"{out} exists; pass --overwrite or --tag=NAME")
  ds = data_lib.load(cfg.dataset, cfg.data_dir, source=cfg.data_source,
                     max_test=cfg.max_test or None, max_train=1)
  n = min(len(ds.test_images), cfg.eval.max_examples or len(ds.test_images))
  result = pipeline.robust_evaluation(cfg, model, variables, ds.test_images[:n], ds.test_labels[:n],
                                      progress=FLAGS.progress, oracle=oracle)
  result.update(run=os.path.abspath(FLAGS.run), eps=cfg.eval.eps,
                oracle=os.path.abspath(FLAGS.oracle) if FLAGS.oracle else None,
                software=pipeline.software_versions())
  files.write_json_atomic(out, result)
  acc = result["accuracy"]
  table = ("| " + " | ".join(k for k in acc if k != "n") + " |\n|" + "---|" * (len(acc) - 1) + "\n| "
           + " | ".join(f"{100 * v:.2f}%" for k, v in acc.items() if k != "n") + " |\n")
  files.write_text_atomic(out[:-5] + ".md", table)
  print(table)
  print(f"written to {out}")
  return result


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  experiments.quiet_logs()
  try:
    evaluate_run()
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
