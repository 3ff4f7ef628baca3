"""Sparsity and robustness against training length: one run of a paper table trained for more epochs.

    python -m experiments.epochs_study --run=fmnist-ResNet8-br2b-natural-141eb115 --epochs=24,60

Table VII's channel claims (natural training zeroes whole channels, PGD-AT does not) come from 200 epochs on
CIFAR-10; at the cpu scale's 6 epochs no channel is all-zero. This trains the same configuration (the run
named by ``--run``, as ``experiments.paper --list`` prints it) for each of ``--epochs``, with the
learning-rate milestones and Binary-Relax's lambda schedule rescaled (``enquant.paper.with_epochs``),
evaluates it as the table row is evaluated, and writes ``--results_root/<scale>/epochs_<run>.md``, ``.json``
(one row per length, the table's own run first when its results exist) and ``.png`` (accuracy, sparsity and
zero dispersion against epochs), and each run's results under ``--results_root/<scale>/epochs_runs/``. Runs
live in ``--runs_root/<scale>-epochs/<run name>`` and resume from their checkpoints when the command is
repeated; lengths already trained are read back, not trained again.
"""

import os

from absl import app
from absl import flags

import experiments  # XLA flags before JAX

flags.DEFINE_string("run", None, "The table run to lengthen (a name experiments.paper --list prints).")
flags.DEFINE_list("epochs", ["24", "60"], "Training lengths, in epochs.")
flags.DEFINE_string("scale", "cpu", "Scale of the table run (cpu, paper or gpu<E>).")
flags.DEFINE_string("runs_root", "runs/paper", "Where the run directories live.")
flags.DEFINE_string("results_root", "results", "Where the table and the runs' results go.")
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.mark_flag_as_required("run")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  experiments.quiet_logs()
  from enquant import files, paper, pipeline, plots, reports  # pylint: disable=g-import-not-at-top
  epochs = []
  for e in FLAGS.epochs:
    if not e.strip().isdigit() or int(e) < 1:
      raise app.UsageError(f"--epochs must be positive integers, got {e!r}")
    epochs.append(int(e))
  try:
    _, cfg = paper.find_run(FLAGS.run, FLAGS.scale)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  out_dir = os.path.join(FLAGS.results_root, FLAGS.scale)
  rows = []
  for base in (os.path.join(FLAGS.runs_root, FLAGS.scale, FLAGS.run, "results.json"),
               os.path.join(out_dir, "runs", FLAGS.run + ".json")):
    if os.path.exists(base):
      rows.append(reports.study_row(files.read_json(base)))
      break
  for e in epochs:
    longer = paper.with_epochs(cfg, e)
    name = paper.run_name(longer)
    workdir = os.path.join(FLAGS.runs_root, FLAGS.scale + "-epochs", name)
    path = os.path.join(workdir, "results.json")
    print(f"== {name}: {e} epochs ({workdir})", flush=True)
    results = files.read_json(path) if os.path.exists(path) else pipeline.train_and_evaluate(
        longer, workdir, progress=FLAGS.progress)
    files.write_json_atomic(os.path.join(out_dir, "epochs_runs", name + ".json"),
                            reports.portable(results))
    rows.append(reports.study_row(results))
    rows.sort(key=lambda r: r["epochs"])
    stem = os.path.join(out_dir, f"epochs_{FLAGS.run}")
    files.write_json_atomic(stem + ".json", {"run": FLAGS.run, "rows": rows})
    files.write_text_atomic(stem + ".md", reports.study_markdown(FLAGS.run, rows))
    plots.training_curves(stem + ".png", rows, keys=("N", "A2", "weight sparsity", "channel sparsity",
                                                      "zero dispersion"), x="epochs")
  print(reports.study_markdown(FLAGS.run, rows))


if __name__ == "__main__":
  app.run(main)
