"""Reproduce a table of the paper: train what is missing, evaluate, rebuild the table.

    python -m experiments.paper --list                          # every table's runs and their state
    python -m experiments.paper --table=VIII --scale=cpu        # train/resume, evaluate, tabulate
    python -m experiments.paper --table=all --scale=cpu --max_runs=1
    python -m experiments.paper --table=I --scale=paper         # the paper's protocol (GPU/TPU)
    python -m experiments.paper --table=VIII --scale=gpu5       # the paper's protocol cut to 5 epochs
    python -m experiments.paper --table=all --tables_only       # rebuild tables/figures from finished runs
    python -m experiments.paper --table=V --workers=2           # two runs at once, one per core
    python -m experiments.paper --table=all --keep_models       # also retrain committed runs without a model

Runs live in ``--runs_root/<scale>/<run name>`` (one directory per distinct configuration, shared by every
table that needs it; re-running resumes unfinished runs from their checkpoints and skips finished ones).
Each run is trained under a lock (``<run name>.lock`` beside its directory): two commands on one table
share its runs, each skipping a run the other holds. Tables go to ``--results_root/<scale>/table_<name>.md``
and ``.json``; each finished run's results (validated, :class:`enquant.results.RunResults`) to
``--results_root/<scale>/runs/<run name>.json`` with its model beside them (``<run name>.npz``: the packed
model of a quantized run, the float32 model of a float run, both loadable by
:func:`enquant.export.load_model`), and a line per trained run to ``--results_root/<scale>/runs.jsonl``
(command, hardware, start, wall). A run whose results are there but whose directory is not counts as
finished: it is not trained again and the tables are rebuilt from that file; only transfer rows and kernel
figures, which need the run directories' checkpoints, wait for them.
"""

import os
import sys

from absl import app
from absl import flags

import experiments  # noqa: F401  (XLA flags before JAX)
from experiments.paper import committing

flags.DEFINE_string("table", "all", "I..VIII, comma-separated, or all.")
flags.DEFINE_string("scale", "cpu", "cpu: the reduced protocol of the tables' headers; paper: the paper's "
                    "protocol; gpu<E> (e.g. gpu5): the paper's protocol cut to E epochs.")
flags.DEFINE_bool("list", False, "Print the runs of the tables and their state, then exit.")
flags.DEFINE_bool("tables_only", False, "Only rebuild tables and figures from finished runs.")
flags.DEFINE_integer("max_runs", 0, "Train at most this many runs in this call (0: all missing).")
flags.DEFINE_string("runs_root", "runs/paper", "Where the run directories live.")
flags.DEFINE_string("results_root", "results", "Where tables, JSON rows and figures go.")
flags.DEFINE_string("data_dir", None, "Folder with the official dataset files.")
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.DEFINE_integer("workers", 1, "Train this many missing runs at once, each process pinned to its own "
                     "share of the CPUs (2 on a 2-core machine: 1.2-1.5x the throughput of one process); "
                     "each worker's output goes to <run directory>.log.")
flags.DEFINE_string("run", None, "Train only this run (a name --list prints), then exit without rebuilding "
                    "the tables (what each --workers process does). A run known here only by its committed "
                    "results is trained again, and its accuracies are compared with the committed ones.")
flags.DEFINE_bool("keep_models", False, "Also train again every committed run that keeps no model (neither "
                  "its own nor a rerun's), cheapest first by its committed wall time, so that every row can "
                  "be attacked again; a retrained run is compared with its committed results.")
FLAGS = flags.FLAGS


def _store() -> committing.Store:
  return committing.Store(os.path.join(FLAGS.runs_root, FLAGS.scale),
                          os.path.join(FLAGS.results_root, FLAGS.scale), FLAGS.scale, FLAGS.data_dir)


def _tables():
  from experiments.paper import scales  # pylint: disable=g-import-not-at-top
  if FLAGS.table.strip().lower() == "all":
    return list(scales.TABLES.values())
  return [scales.table(t.strip()) for t in FLAGS.table.split(",") if t.strip()]


def list_runs() -> None:
  from experiments.paper import scales  # pylint: disable=g-import-not-at-top
  store = _store()
  for tbl in _tables():
    print(f"Table {tbl.name}: {tbl.title}")
    for row, cfg in scales.runs_of(tbl, FLAGS.scale):
      name = scales.run_name(cfg)
      stand_in = "" if cfg.model.name == row.net else f", for the paper's {row.net}"
      print(f"  {store.state(name):>9}  {name}  ({cfg.model.name} {row.quant_label} {row.loss_label}, "
            f"{cfg.train.epochs} epochs on {cfg.dataset}{stand_in}; {store.model_state(name)})")


def _missing() -> list[tuple[str, str]]:
  """``(table name, run name)`` of every unfinished run of the selected tables, each run once, in order
  (``--run``: that run alone), then with ``--keep_models`` the committed runs without a model, at most
  ``--max_runs``."""
  from experiments.paper import scales  # pylint: disable=g-import-not-at-top
  store, todo, seen, retrain = _store(), [], set(), []
  for tbl in _tables():
    for _, cfg in scales.runs_of(tbl, FLAGS.scale):
      name = scales.run_name(cfg)
      if name in seen or (FLAGS.run is not None and name != FLAGS.run):
        continue
      seen.add(name)
      state = store.state(name)
      if not committing.finished(state) or (state == "committed" and FLAGS.run is not None):
        todo.append((tbl.name, name))
      elif FLAGS.keep_models:
        retrain.append((tbl.name, name))
  if FLAGS.run is not None and not seen:
    raise ValueError(f"--run={FLAGS.run} is no run of table(s) {FLAGS.table} at --scale={FLAGS.scale} "
                     "(--list prints their names)")
  table_of = dict((name, t) for t, name in retrain)
  todo += [(table_of[name], name) for name in store.without_model([name for _, name in retrain])]
  return todo[:FLAGS.max_runs] if FLAGS.max_runs else todo


def _worker_argv(name: str) -> tuple[str, ...]:
  argv = [sys.executable, "-m", "experiments.paper", f"--table={FLAGS.table}", f"--scale={FLAGS.scale}",
          f"--runs_root={FLAGS.runs_root}", f"--results_root={FLAGS.results_root}", f"--run={name}",
          "--progress=false"]
  return tuple(argv + ([f"--data_dir={FLAGS.data_dir}"] if FLAGS.data_dir else []))


def train_missing(log=print) -> bool:
  """Trains the missing runs (one after the other, or ``--workers`` at once); False if a worker failed.
  A run another process holds is skipped (that process trains it)."""
  store, todo = _store(), _missing()
  if FLAGS.workers > 1 and len(todo) > 1:
    from experiments.paper import pool  # pylint: disable=g-import-not-at-top
    jobs = [pool.Job(f"Table {t}: {name}", _worker_argv(name), store.workdir(name) + ".log")
            for t, name in todo]
    # Tables are rebuilt as each run lands (transfer rows wait for the end), so finished results show early.
    codes = pool.run_pool(jobs, min(FLAGS.workers, len(jobs)), log=log,
                          on_done=lambda job, code: code == 0 and rebuild_tables(log=log, transfers=False))
    return all(code == 0 for code in codes.values())
  from experiments.paper import scales  # pylint: disable=g-import-not-at-top
  configs = {scales.run_name(cfg): cfg for tbl in _tables() for _, cfg in scales.runs_of(tbl, FLAGS.scale)}
  command = " ".join(["python -m experiments.paper"] + sys.argv[1:])
  for tbl_name, name in todo:
    store.train(name, configs[name], progress=FLAGS.progress, command=command, log=log,
                announce=f"== Table {tbl_name}: {store.workdir(name)}",
                retrain=FLAGS.run is not None or FLAGS.keep_models)
  return True


def rebuild_tables(log=print, transfers: bool = True) -> None:
  """Every selected table (Markdown and JSON) from the finished runs, and Fig. 2."""
  from enquant import files, plots  # pylint: disable=g-import-not-at-top
  from experiments.paper import checks, reports, scales  # pylint: disable=g-import-not-at-top
  store = _store()
  for tbl in _tables():
    results = {}
    for _, cfg in scales.runs_of(tbl, FLAGS.scale):
      found = store.results(scales.run_name(cfg), log=log)
      if found is not None:
        results[scales.run_name(cfg)] = found
    found_transfers = store.transfers(tbl, log=log) if transfers else {}
    rows = reports.table_rows(tbl, FLAGS.scale, results, found_transfers)
    reruns = {name: r for name in results if (r := store.rerun(name)) is not None}
    table_checks = checks.check_rows(tbl, FLAGS.scale, results, found_transfers, reruns)
    trends = checks.trend_rows(tbl, FLAGS.scale, rows)
    files.write_text_atomic(os.path.join(store.out_dir, f"table_{tbl.name}.md"),
                            reports.table_markdown(tbl, FLAGS.scale, rows, table_checks, trends))
    files.write_json_atomic(os.path.join(store.out_dir, f"table_{tbl.name}.json"),
                            {"table": tbl.name, "scale": FLAGS.scale, "title": tbl.title, "claim": tbl.claim,
                             "counting": reports.COUNTING, "rows": rows, "checks": table_checks,
                             "trends": trends})
    done = sum(r["state"] == "done" for r in rows)
    log(f"Table {tbl.name}: {done}/{len(rows)} rows done -> {store.out_dir}/table_{tbl.name}.md")
    if tbl.name == "IV":  # Fig. 2: M_t against epochs for the Table IV runs
      curves = {row.net: ([m["epoch"] for m in h], [m["m_bound"] for m in h])
                for row, cfg in scales.runs_of(tbl, FLAGS.scale)
                if (h := store.history(scales.run_name(cfg), results.get(scales.run_name(cfg))))}
      if curves:
        plots.m_curves(os.path.join(store.out_dir, "fig2_m_bound.png"), curves)
  store.write_reruns(log)


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  experiments.quiet_logs()
  from enquant import files, pipeline  # pylint: disable=g-import-not-at-top
  from experiments.paper import figures, scales  # pylint: disable=g-import-not-at-top
  try:
    scales.gpu_epochs(FLAGS.scale)  # --scale checked before anything runs
    _tables()
    if FLAGS.list:
      list_runs()
      return
    ok = True
    if not FLAGS.tables_only:
      ok = train_missing()
      if FLAGS.run is not None:
        return
    rebuild_tables()
    store = _store()
    figures.draw(store.runs_dir, store.out_dir, FLAGS.scale, FLAGS.data_dir,
                 lambda d: store.tables_run_here(os.path.basename(d)), kept_model=store.kept_model)
    if not ok:
      print("error: some runs failed (their logs are named above); the tables hold the runs that finished",
            file=sys.stderr)
      sys.exit(1)
  except (ValueError, FileNotFoundError, pipeline.RunExistsError, files.LockedError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
