"""Sparsity and robustness against training length: one run of a paper table trained for more epochs.

    python -m experiments.paper.epochs --run=fmnist-ResNet8-br2b-natural-141eb115 --epochs=24,60

(``python -m experiments.epochs_study`` is the same command.) Table VII's channel claims (natural training
zeroes whole channels, PGD-AT does not) come from 200 epochs on CIFAR-10; at the cpu scale's 6 epochs no
channel is all-zero. This trains the same configuration (the run named by ``--run``, as
``experiments.paper --list`` prints it) for each of ``--epochs``, with the learning-rate milestones and
Binary-Relax's lambda schedule rescaled (:func:`experiments.paper.scales.with_epochs`), evaluates it as the
table row is evaluated, and writes ``--results_root/<scale>/epochs_<run>.md``, ``.json`` (one row per
length, the table's own run first when its results exist) and ``.png`` (accuracy, sparsity and zero
dispersion against epochs), and each run's results under ``--results_root/<scale>/epochs_runs/``. Runs
live in ``--runs_root/<scale>-epochs/<run name>`` and resume from their checkpoints when the command is
repeated; lengths already trained are read back, not trained again.
"""

import os
import sys
from typing import Any

from absl import app
from absl import flags

import experiments  # XLA flags before JAX

STUDY_COLUMNS = ("epochs", "N", "A1", "A2", "A3", "weight sparsity", "channel sparsity",
                 "in-channel sparsity", "zero dispersion", "M", "train min")
FLAGS = flags.FLAGS


def study_row(results) -> dict[str, Any]:
  """One row of a training-length study from a run's :class:`~enquant.results.RunResults`: accuracies and
  sparsities in % over the 3x3 convolutions (output filters and input channels), M, training minutes."""
  pct = lambda v: None if v is None else 100 * v
  acc = results.robust.accuracy if results.robust is not None else {}
  counted = lambda key: results.sparsity(key, paper_counting=True)
  return {"epochs": results.epochs, "N": pct(results.natural_accuracy),
          **{a: pct(acc.get(a)) for a in ("A1", "A2", "A3")},
          "weight sparsity": pct(counted("weight_sparsity")),
          "channel sparsity": pct(counted("channel_sparsity")),
          "in-channel sparsity": pct(counted("in_channel_sparsity")),
          "zero dispersion": counted("zero_dispersion"), "M": results.m_bound,
          "train min": results.train_seconds / 60}


def study_markdown(name: str, rows: list[dict[str, Any]]) -> str:
  """The training-length study of run ``name`` as Markdown (rows from :func:`study_row`)."""
  def fmt(column, v):
    if v is None:
      return "-"
    return str(v) if column == "epochs" else f"{v:.4f}" if column == "M" else f"{v:.2f}"
  lines = [f"# {name}, trained longer", "",
           f"`python -m experiments.epochs_study --run={name}`: the same configuration for more epochs "
           "(learning-rate milestones and Binary-Relax's lambda schedule rescaled). Accuracies and "
           "sparsities in %, over the 3x3 convolutions; channel sparsity counts all-zero output filters, in-channel "
           "sparsity all-zero input channels (the paper's counting); zero "
           "dispersion 1 = zeros scattered independently; M = max over epochs of max over conv layers of mean |w|.", "",
           "| " + " | ".join(STUDY_COLUMNS) + " |", "|" + "---|" * len(STUDY_COLUMNS)]
  lines += ["| " + " | ".join(fmt(c, r[c]) for c in STUDY_COLUMNS) + " |" for r in rows]
  return "\n".join(lines) + "\n"


def define_flags() -> None:
  flags.DEFINE_string("run", None, "The table run to lengthen (a name experiments.paper --list prints).")
  flags.DEFINE_list("epochs", ["24", "60"], "Training lengths, in epochs.")
  flags.DEFINE_string("scale", "cpu", "Scale of the table run (cpu, paper or gpu<E>).")
  flags.DEFINE_string("runs_root", "runs/paper", "Where the run directories live.")
  flags.DEFINE_string("results_root", "results", "Where the table and the runs' results go.")
  flags.DEFINE_bool("progress", True, "Show progress bars.")
  flags.mark_flag_as_required("run")


def _parse_epochs(values) -> list[int]:
  epochs = []
  for e in values:
    if not e.strip().isdigit() or int(e) < 1:
      raise app.UsageError(f"--epochs must be positive integers, got {e!r}")
    epochs.append(int(e))
  return epochs


def main(argv):
  try:
    _study(argv)
  except ValueError as e:  # a results file that cannot be true (ResultsError) names itself in one line
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _study(argv):
  del argv
  experiments.quiet_logs()
  from enquant import files, pipeline, plots, results as results_lib  # pylint: disable=g-import-not-at-top
  from experiments.paper import reports, scales  # pylint: disable=g-import-not-at-top
  epochs = _parse_epochs(FLAGS.epochs)
  try:
    _, cfg = scales.find_run(FLAGS.run, FLAGS.scale)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  out_dir = os.path.join(FLAGS.results_root, FLAGS.scale)
  rows = []
  for base in (os.path.join(FLAGS.runs_root, FLAGS.scale, FLAGS.run, "results.json"),
               os.path.join(out_dir, "runs", FLAGS.run + ".json")):
    if os.path.exists(base):
      rows.append(study_row(results_lib.RunResults.from_json(base)))
      break
  for e in epochs:
    longer = scales.with_epochs(cfg, e)
    name = scales.run_name(longer)
    workdir = os.path.join(FLAGS.runs_root, FLAGS.scale + "-epochs", name)
    path = os.path.join(workdir, "results.json")
    print(f"== {name}: {e} epochs ({workdir})", flush=True)
    if not os.path.exists(path):
      pipeline.train_and_evaluate(longer, workdir, progress=FLAGS.progress)
    results = results_lib.RunResults.from_json(path)
    files.write_json_atomic(os.path.join(out_dir, "epochs_runs", name + ".json"),
                            reports.portable(results.to_dict()))
    rows.append(study_row(results))
    rows.sort(key=lambda r: r["epochs"])
    stem = os.path.join(out_dir, f"epochs_{FLAGS.run}")
    files.write_json_atomic(stem + ".json", {"run": FLAGS.run, "rows": rows})
    files.write_text_atomic(stem + ".md", study_markdown(FLAGS.run, rows))
    plots.training_curves(stem + ".png", rows, keys=("N", "A2", "weight sparsity", "channel sparsity",
                                                      "zero dispersion"), x="epochs")
  print(study_markdown(FLAGS.run, rows))


def cli() -> None:
  """``python -m experiments.paper.epochs`` (and ``experiments.epochs_study``)."""
  define_flags()
  app.run(main)


if __name__ == "__main__":
  cli()
