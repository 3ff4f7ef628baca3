"""Training noise: runs of a paper table trained again from other seeds, alone or compared pairwise.

    python -m experiments.paper.seeds --runs=fmnist-En1ResNet8-br1b-at-4e0638c4 --seeds=1,2
    python -m experiments.paper.seeds --runs=fmnist-En1ResNet8-br1b-at-4e0638c4,fmnist-En1ResNet8-bc1b-at-00690997 --seeds=1,2

(``python -m experiments.seeds_study`` is the same command.) The tables' paired tests cover the test sample
only: one training run per row. This trains each run of ``--runs`` (names as ``experiments.paper --list``
prints them) again for every seed of ``--seeds`` (:func:`experiments.paper.scales.with_seed`:
initialisation, batches, noise and training attacks; the evaluation images and keys stay), evaluates it as
the table row is evaluated, and writes ``--results_root/<scale>/seeds_<run>[_vs_<run>].md`` and ``.json``:
every seed's N and A1-A3, their sd over seeds and, for two runs, the difference per seed (paired on the
same images) and across seeds (a t interval over seeds, the interval that training noise leaves). Seed 0 is
the table's own run (its results must exist). Runs live in ``--runs_root/<scale>-seeds/<run name>`` and
resume from their checkpoints; each finished run's results go to ``--results_root/<scale>/seeds_runs/``.
Two commands, one run each, train side by side on two cores; a third with both names then only reads them
back.
"""

import os
import sys
from typing import Any

from absl import app
from absl import flags
import numpy as np

import experiments  # XLA flags before JAX
from experiments.paper import checks

SEED_COLUMNS = ("N", "A1", "A2", "A3")
FLAGS = flags.FLAGS


def seed_row(results, seed: int) -> dict[str, Any]:
  """One row of a seeds study from a run's :class:`~enquant.results.RunResults`: N on the whole test set,
  A1-A3 on the evaluated images (%), training minutes, and the per-image correctness for paired
  differences."""
  acc = results.robust.accuracy if results.robust is not None else {}
  masks = results.robust.unpacked_masks() if results.robust is not None else {}
  train = results.train_seconds
  return {"seed": seed, "N": 100 * results.natural_accuracy,
          **{a: None if a not in acc else 100 * acc[a] for a in SEED_COLUMNS[1:]},
          "train min": None if train is None else train / 60, "masks": masks}


def seeds_markdown(runs: list[str], rows: dict[str, list[dict[str, Any]]]) -> tuple[str, dict]:
  """The seeds study of one run (its spread over training seeds) or of two (``runs[0] - runs[1]`` per
  seed, on the same test images, and across seeds) as Markdown, with the numbers as a dict."""
  def fmt(v, spec=".2f"):
    return "-" if v is None else format(v, spec)
  lines = [f"# Training seeds: {' vs '.join(runs)}", "",
           f"`python -m experiments.seeds_study --runs={','.join(runs)}`: each configuration trained again "
           "from other seeds (initialisation, batches, noise, training attacks); seed 0 is the table's run. "
           "Evaluation images and attack keys are the same for every seed. N on the whole test set, A1-A3 "
           "on the evaluated images, in %.", "",
           "| run | seed | " + " | ".join(SEED_COLUMNS) + " | train min |",
           "|---|---|" + "---|" * (len(SEED_COLUMNS) + 1)]
  summary: dict[str, Any] = {"runs": runs, "spread": {}, "difference": None}
  for run in runs:
    for r in rows[run]:
      lines.append(f"| {run} | {r['seed']} | " + " | ".join(fmt(r[c]) for c in SEED_COLUMNS)
                   + f" | {fmt(r['train min'], '.1f')} |")
  lines += ["", "Spread over seeds (sample sd, points):", "", "| run | seeds | " + " | ".join(SEED_COLUMNS)
            + " |", "|---|---|" + "---|" * len(SEED_COLUMNS)]
  for run in runs:
    spread = {c: float(np.std([r[c] for r in rows[run]], ddof=1)) if len(rows[run]) > 1
              and all(r[c] is not None for r in rows[run]) else None for c in SEED_COLUMNS}
    summary["spread"][run] = spread
    lines.append(f"| {run} | {len(rows[run])} | " + " | ".join(fmt(spread[c]) for c in SEED_COLUMNS) + " |")
  if len(runs) == 2:
    a, b = ({r["seed"]: r for r in rows[run]} for run in runs)
    seeds = sorted(set(a) & set(b))
    lines += ["", f"{runs[0]} minus {runs[1]}, per seed (paired on the evaluated images, 95 % interval) and "
              "across seeds (mean, sd, 95 % t interval of the mean over seeds):", "",
              "| seed | " + " | ".join(SEED_COLUMNS) + " |", "|---|" + "---|" * len(SEED_COLUMNS)]
    per_seed = {c: [] for c in SEED_COLUMNS}
    for s in seeds:
      cells = []
      for c in SEED_COLUMNS:
        mask = "natural" if c == "N" else c
        d = a[s][c] - b[s][c] if a[s][c] is not None and b[s][c] is not None else None
        if d is not None:
          per_seed[c].append(d)
        if mask in a[s]["masks"] and mask in b[s]["masks"]:
          pd = checks.paired_difference(a[s]["masks"][mask], b[s]["masks"][mask])
          cells.append(f"{pd['diff']:+.2f} [{pd['low']:+.2f}, {pd['high']:+.2f}]" + (
              f" (all images {d:+.2f})" if c == "N" and d is not None else ""))
        else:
          cells.append("-" if d is None else f"{d:+.2f}")
      lines.append(f"| {s} | " + " | ".join(cells) + " |")
    over = {c: checks.across_seeds(v) if len(v) >= 2 else None for c, v in per_seed.items()}
    lines.append("| across seeds | " + " | ".join(
        "-" if o is None else f"{o['mean']:+.2f} (sd {o['sd']:.2f}) [{o['low']:+.2f}, {o['high']:+.2f}]: "
        f"{o['verdict']}" for o in over.values()) + " |")
    summary["difference"] = {"seeds": seeds, "per_seed": per_seed, "across_seeds": over}
  return "\n".join(lines) + "\n", summary


def define_flags() -> None:
  flags.DEFINE_list("runs", None, "One or two table runs (names experiments.paper --list prints).")
  flags.DEFINE_list("seeds", ["1", "2"], "Training seeds besides the table run's own 0.")
  flags.DEFINE_string("scale", "cpu", "Scale of the table runs (cpu, paper or gpu<E>).")
  flags.DEFINE_string("runs_root", "runs/paper", "Where the run directories live.")
  flags.DEFINE_string("results_root", "results", "Where the study and the runs' results go.")
  flags.DEFINE_bool("progress", True, "Show progress bars.")
  flags.mark_flag_as_required("runs")


def parse_seeds(values) -> list[int]:
  """``--seeds`` as distinct positive integers (0 is the table's own run)."""
  seeds = []
  for v in values:
    if not v.strip().isdigit() or int(v) < 1 or int(v) in seeds:
      raise ValueError(f"--seeds must be distinct positive integers (0 is the table run), got {values}")
    seeds.append(int(v))
  return seeds


def table_results(name: str):
  """The finished table run's results: its run directory, else the committed copy."""
  from enquant import results as results_lib  # pylint: disable=g-import-not-at-top
  for path in (os.path.join(FLAGS.runs_root, FLAGS.scale, name, "results.json"),
               os.path.join(FLAGS.results_root, FLAGS.scale, "runs", name + ".json")):
    if os.path.exists(path):
      return results_lib.RunResults.from_json(path)
  raise ValueError(f"run {name} has no results yet: python -m experiments.paper --scale={FLAGS.scale} "
                   f"--table=all --run={name}")


def _seed_results(cfg, seed: int, out_dir: str):
  """The results of ``cfg`` trained from ``seed``: its run directory, the committed copy, or a new run."""
  from enquant import files, pipeline, results as results_lib  # pylint: disable=g-import-not-at-top
  from experiments.paper import reports, scales  # pylint: disable=g-import-not-at-top
  again = scales.with_seed(cfg, seed)
  workdir = os.path.join(FLAGS.runs_root, FLAGS.scale + "-seeds", scales.run_name(again))
  committed = os.path.join(out_dir, "seeds_runs", scales.run_name(again) + ".json")
  print(f"== {scales.run_name(cfg)}, seed {seed} ({workdir})", flush=True)
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path) and not os.path.exists(committed):
    pipeline.train_and_evaluate(again, workdir, progress=FLAGS.progress)
  results = results_lib.RunResults.from_json(path if os.path.exists(path) else committed)
  files.write_json_atomic(committed, reports.portable(results.to_dict()))
  return results


def main(argv):
  del argv
  experiments.quiet_logs()
  from enquant import files  # pylint: disable=g-import-not-at-top
  from experiments.paper import scales  # pylint: disable=g-import-not-at-top
  try:
    seeds = parse_seeds(FLAGS.seeds)
    if not 1 <= len(FLAGS.runs) <= 2 or len(set(FLAGS.runs)) != len(FLAGS.runs):
      raise ValueError(f"--runs takes one or two distinct runs, got {FLAGS.runs}")
    configs = {name: scales.find_run(name, FLAGS.scale)[1] for name in FLAGS.runs}
    rows = {name: [seed_row(table_results(name), 0)] for name in FLAGS.runs}
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  out_dir = os.path.join(FLAGS.results_root, FLAGS.scale)
  stem = os.path.join(out_dir, "seeds_" + "_vs_".join(FLAGS.runs))
  for seed in seeds:
    for name, cfg in configs.items():
      rows[name].append(seed_row(_seed_results(cfg, seed, out_dir), seed))
      text, summary = seeds_markdown(FLAGS.runs, rows)
      files.write_json_atomic(stem + ".json", dict(summary, rows={
          n: [{k: v for k, v in r.items() if k != "masks"} for r in rs] for n, rs in rows.items()}))
      files.write_text_atomic(stem + ".md", text)
  print(seeds_markdown(FLAGS.runs, rows)[0])


def cli() -> None:
  """``python -m experiments.paper.seeds`` (and ``experiments.seeds_study``)."""
  define_flags()
  app.run(main)


if __name__ == "__main__":
  cli()
