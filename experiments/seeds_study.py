"""Training noise: runs of a paper table trained again from other seeds, alone or compared pairwise.

    python -m experiments.seeds_study --runs=fmnist-En1ResNet8-br1b-at-4e0638c4 --seeds=1,2
    python -m experiments.seeds_study --runs=fmnist-En1ResNet8-br1b-at-4e0638c4,fmnist-En1ResNet8-bc1b-at-00690997 --seeds=1,2

The tables' paired intervals cover the test sample only: one training run per row. This trains each run
of ``--runs`` (names as ``experiments.paper --list`` prints them) again for every seed of ``--seeds``
(``enquant.paper.with_seed``: initialisation, batches, noise and training attacks; the evaluation images
and keys stay), evaluates it as the table row is evaluated, and writes
``--results_root/<scale>/seeds_<run>[_vs_<run>].md`` and ``.json``: every seed's N and A1-A3, their sd over
seeds and, for two runs, the difference per seed (paired on the same images) and across seeds (a t
interval over seeds, the interval that training noise leaves). Seed 0 is the table's own run (its results
must exist). Runs live in ``--runs_root/<scale>-seeds/<run name>`` and resume from their checkpoints; each
finished run's results go to ``--results_root/<scale>/seeds_runs/``. Two commands, one run each, train
side by side on two cores; a third with both names then only reads them back.
"""

import os
import sys

from absl import app
from absl import flags

import experiments  # XLA flags before JAX

flags.DEFINE_list("runs", None, "One or two table runs (names experiments.paper --list prints).")
flags.DEFINE_list("seeds", ["1", "2"], "Training seeds besides the table run's own 0.")
flags.DEFINE_string("scale", "cpu", "Scale of the table runs (cpu, paper or gpu<E>).")
flags.DEFINE_string("runs_root", "runs/paper", "Where the run directories live.")
flags.DEFINE_string("results_root", "results", "Where the study and the runs' results go.")
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.mark_flag_as_required("runs")
FLAGS = flags.FLAGS


def parse_seeds(values) -> list[int]:
  """``--seeds`` as distinct positive integers (0 is the table's own run)."""
  seeds = []
  for v in values:
    if not v.strip().isdigit() or int(v) < 1 or int(v) in seeds:
      raise ValueError(f"--seeds must be distinct positive integers (0 is the table run), got {values}")
    seeds.append(int(v))
  return seeds


def table_results(name: str) -> dict:
  """The finished table run's results: its run directory, else the committed copy."""
  from enquant import files  # pylint: disable=g-import-not-at-top
  for path in (os.path.join(FLAGS.runs_root, FLAGS.scale, name, "results.json"),
               os.path.join(FLAGS.results_root, FLAGS.scale, "runs", name + ".json")):
    if os.path.exists(path):
      return files.read_json(path)
  raise ValueError(f"run {name} has no results yet: python -m experiments.paper --scale={FLAGS.scale} "
                   f"--table=all --run={name}")


def main(argv):
  del argv
  experiments.quiet_logs()
  from enquant import files, paper, pipeline, reports  # pylint: disable=g-import-not-at-top
  try:
    seeds = parse_seeds(FLAGS.seeds)
    if not 1 <= len(FLAGS.runs) <= 2 or len(set(FLAGS.runs)) != len(FLAGS.runs):
      raise ValueError(f"--runs takes one or two distinct runs, got {FLAGS.runs}")
    configs = {name: paper.find_run(name, FLAGS.scale)[1] for name in FLAGS.runs}
    rows = {name: [reports.seed_row(table_results(name), 0)] for name in FLAGS.runs}
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  out_dir = os.path.join(FLAGS.results_root, FLAGS.scale)
  stem = os.path.join(out_dir, "seeds_" + "_vs_".join(FLAGS.runs))
  for seed in seeds:
    for name, cfg in configs.items():
      again = paper.with_seed(cfg, seed)
      workdir = os.path.join(FLAGS.runs_root, FLAGS.scale + "-seeds", paper.run_name(again))
      committed = os.path.join(out_dir, "seeds_runs", paper.run_name(again) + ".json")
      print(f"== {name}, seed {seed} ({workdir})", flush=True)
      path = next((p for p in (os.path.join(workdir, "results.json"), committed) if os.path.exists(p)), None)
      results = files.read_json(path) if path else pipeline.train_and_evaluate(
          again, workdir, progress=FLAGS.progress)
      files.write_json_atomic(committed, reports.portable(results))
      rows[name].append(reports.seed_row(results, seed))
      text, summary = reports.seeds_markdown(FLAGS.runs, rows)
      files.write_json_atomic(stem + ".json", dict(summary, rows={
          n: [{k: v for k, v in r.items() if k != "masks"} for r in rs] for n, rs in rows.items()}))
      files.write_text_atomic(stem + ".md", text)
  print(reports.seeds_markdown(FLAGS.runs, rows)[0])


if __name__ == "__main__":
  app.run(main)
