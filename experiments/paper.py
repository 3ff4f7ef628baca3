"""Reproduce a table of the paper: train what is missing, evaluate, rebuild the table.

    python -m experiments.paper --list                          # every table's runs and their state
    python -m experiments.paper --table=VIII --scale=cpu        # train/resume, evaluate, tabulate
    python -m experiments.paper --table=all --scale=cpu --max_runs=1
    python -m experiments.paper --table=I --scale=paper         # the paper's protocol (GPU/TPU)
    python -m experiments.paper --table=VIII --scale=gpu5       # the paper's protocol cut to 5 epochs
    python -m experiments.paper --table=all --tables_only       # rebuild tables/figures from finished runs
    python -m experiments.paper --table=V --workers=2           # two runs at once, one per core

Runs live in ``--runs_root/<scale>/<run name>`` (one directory per distinct configuration, shared by every
table that needs it; re-running resumes unfinished runs from their checkpoints and skips finished ones).
Tables go to ``--results_root/<scale>/table_<name>.md`` and ``.json``, each finished run's ``results.json``
to ``--results_root/<scale>/runs/<run name>.json``, figures beside the tables. A run whose results are there
(committed with the repository) but whose directory is not (a new machine) counts as finished: it is not
trained again and the tables are rebuilt from that file; only transfer rows and kernel figures, which need
the trained models, wait for the run directories.
"""

import os
import sys

from absl import app
from absl import flags

import experiments  # noqa: F401  (XLA flags before JAX)

flags.DEFINE_string("table", "all", "I..VIII, comma-separated, or all.")
flags.DEFINE_string("scale", "cpu", "cpu: the reduced protocol of the tables' headers; paper: the paper's "
                    "protocol; gpu<E> (e.g. gpu5): the paper's protocol cut to E epochs.")
flags.DEFINE_bool("list", False, "Print the runs of the tables and their state, then exit.")
flags.DEFINE_bool("tables_only", False, "Only rebuild tables and figures from finished runs.")
flags.DEFINE_bool("add_masks", False, "Re-evaluate finished runs of the tables' claim checks whose results "
                  "predate per-image masks, add the masks (the accuracies must come out identical), then "
                  "rebuild the tables.")
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
                    "results is trained again (e.g. to add per-image masks), and its accuracies are compared "
                    "with the committed ones.")
FLAGS = flags.FLAGS


def _tables():
  from enquant import paper  # pylint: disable=g-import-not-at-top
  if FLAGS.table.strip().lower() == "all":
    return list(paper.TABLES.values())
  return [paper.table(t.strip()) for t in FLAGS.table.split(",") if t.strip()]


def _committed(name: str) -> str:
  """Where a finished run's results are kept with the repository (``results/<scale>/runs/<name>.json``)."""
  return os.path.join(FLAGS.results_root, FLAGS.scale, "runs", name + ".json")


def _state(workdir: str) -> str:
  """``done`` (results in the run directory), ``committed`` (only the results kept under ``results/``: the
  run directory is on another machine), ``epoch <e>`` (resumable) or ``missing``."""
  from enquant import files  # pylint: disable=g-import-not-at-top
  if os.path.exists(os.path.join(workdir, "results.json")):
    return "done"
  if os.path.exists(_committed(os.path.basename(workdir))):
    return "committed"
  rows = files.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if os.path.isdir(workdir) else []
  return f"epoch {rows[-1]['epoch']}" if rows else "missing"


def _finished(state: str) -> bool:
  return state in ("done", "committed")


def _with_data_dir(cfg):
  import dataclasses  # pylint: disable=g-import-not-at-top
  return cfg if FLAGS.data_dir is None else dataclasses.replace(cfg, data_dir=FLAGS.data_dir)


def list_runs() -> None:
  from enquant import paper  # pylint: disable=g-import-not-at-top
  for tbl in _tables():
    print(f"Table {tbl.name}: {tbl.title}")
    for row, cfg in paper.runs_of(tbl, FLAGS.scale):
      name = paper.run_name(cfg)
      state = _state(os.path.join(FLAGS.runs_root, FLAGS.scale, name))
      stand_in = "" if cfg.model.name == row.net else f", for the paper's {row.net}"
      print(f"  {state:>9}  {name}  ({cfg.model.name} {row.quant_label} {row.loss_label}, {cfg.train.epochs} "
            f"epochs on {cfg.dataset}{stand_in})")


def _missing() -> list[tuple[str, str]]:
  """``(table name, run directory)`` of every unfinished run of the selected tables, each run once, in order
  (``--run``: that run alone), at most ``--max_runs``."""
  from enquant import paper  # pylint: disable=g-import-not-at-top
  todo, seen = [], set()
  for tbl in _tables():
    for _, cfg in paper.runs_of(tbl, FLAGS.scale):
      name = paper.run_name(cfg)
      if name in seen or (FLAGS.run is not None and name != FLAGS.run):
        continue
      seen.add(name)
      workdir = os.path.join(FLAGS.runs_root, FLAGS.scale, name)
      state = _state(workdir)
      if not _finished(state) or (state == "committed" and FLAGS.run is not None):
        todo.append((tbl.name, workdir))
  if FLAGS.run is not None and not seen:
    raise ValueError(f"--run={FLAGS.run} is no run of table(s) {FLAGS.table} at --scale={FLAGS.scale} "
                     "(--list prints their names)")
  return todo[:FLAGS.max_runs] if FLAGS.max_runs else todo


def _worker_argv(workdir: str) -> tuple[str, ...]:
  argv = [sys.executable, "-m", "experiments.paper", f"--table={FLAGS.table}", f"--scale={FLAGS.scale}",
          f"--runs_root={FLAGS.runs_root}", f"--results_root={FLAGS.results_root}",
          f"--run={os.path.basename(workdir)}", "--progress=false"]
  return tuple(argv + ([f"--data_dir={FLAGS.data_dir}"] if FLAGS.data_dir else []))


def train_missing(log=print) -> bool:
  """Trains the missing runs (one after the other, or ``--workers`` at once); False if a worker failed."""
  from enquant import pipeline  # pylint: disable=g-import-not-at-top
  todo = _missing()
  if FLAGS.workers > 1 and len(todo) > 1:
    from experiments import pool  # pylint: disable=g-import-not-at-top
    jobs = [pool.Job(f"Table {t}: {os.path.basename(d)}", _worker_argv(d), d.rstrip("/") + ".log")
            for t, d in todo]
    # Tables are rebuilt as each run lands (transfer rows wait for the end), so finished results show early.
    codes = pool.run_pool(jobs, min(FLAGS.workers, len(jobs)), log=log,
                          on_done=lambda job, code: code == 0 and rebuild_tables(log=log, transfers=False))
    return all(code == 0 for code in codes.values())
  for tbl_name, workdir in todo:
    log(f"== Table {tbl_name}: {workdir}")
    pipeline.train_and_evaluate(_with_data_dir(_config_of(workdir)), workdir, progress=FLAGS.progress,
                                log=log)
    _compare_with_committed(workdir, log)
  return True


def _compare_with_committed(workdir: str, log=print) -> None:
  """After training a run whose results were committed before: are its accuracies the committed ones?"""
  from enquant import files, reports  # pylint: disable=g-import-not-at-top
  committed, path = _committed(os.path.basename(workdir)), os.path.join(workdir, "results.json")
  if os.path.exists(committed) and os.path.exists(path):
    log(reports.reproduction_report(os.path.basename(workdir), files.read_json(committed),
                                    files.read_json(path)))


def _config_of(workdir: str):
  from enquant import paper  # pylint: disable=g-import-not-at-top
  name = os.path.basename(workdir)
  return next(cfg for tbl in _tables() for _, cfg in paper.runs_of(tbl, FLAGS.scale)
              if paper.run_name(cfg) == name)


def _transfer(target_dir: str, oracle_dir: str, log=print) -> dict | None:
  """Transfer evaluation of a finished target run on a finished oracle's examples (cached as JSON)."""
  from enquant import data as data_lib, files, pipeline, reports, run_results  # pylint: disable=g-import-not-at-top
  path = os.path.join(target_dir, f"evaluation-transfer-{os.path.basename(oracle_dir)}.json")
  kept = _kept_transfer(os.path.basename(target_dir), os.path.basename(oracle_dir))
  if os.path.exists(path):
    result = files.read_json(path)
    files.write_json_atomic(kept, reports.portable(result))  # committed, like a run's results
    return result
  if os.path.exists(kept):  # the run directories are on another machine
    return files.read_json(kept)
  states = (_state(target_dir), _state(oracle_dir))
  if states != ("done", "done"):
    if all(_finished(st) for st in states):
      log(f"transfer {os.path.basename(oracle_dir)} -> {os.path.basename(target_dir)}: needs both trained "
          f"models, but only their committed results are here (states {states}); row left pending")
    return None
  cfg, model, variables, _ = pipeline.load_run(target_dir, data_dir=FLAGS.data_dir)
  _, omodel, ovars, _ = pipeline.load_run(oracle_dir, data_dir=FLAGS.data_dir)
  ds = data_lib.load(cfg.dataset, cfg.data_dir, source=cfg.data_source, max_train=1)
  n = min(len(ds.test_images), cfg.eval.max_examples or len(ds.test_images))
  log(f"transfer: {os.path.basename(oracle_dir)} -> {os.path.basename(target_dir)} on {n} images")
  result = run_results.robust_evaluation(cfg, model, variables, ds.test_images[:n], ds.test_labels[:n],
                                      progress=FLAGS.progress, oracle=(omodel, ovars),
                                      resume_path=path[:-5] + "-progress.json")
  result.update(oracle=os.path.abspath(oracle_dir))
  files.write_json_atomic(path, result)
  files.write_json_atomic(kept, reports.portable(result))
  files.remove_if_exists(path[:-5] + "-progress.json")
  return result


def _kept_transfer(target: str, oracle: str) -> str:
  """Where a transfer evaluation is kept with the repository (``results/<scale>/transfers/``)."""
  return os.path.join(FLAGS.results_root, FLAGS.scale, "transfers", f"{target}--{oracle}.json")


def add_masks(log=print) -> None:
  """Per-image masks for finished runs of the claim checks whose ``results.json`` predates them: the same
  robust evaluation again (same key, so the same numbers, verified) with its masks kept."""
  from enquant import data as data_lib, files, paper, pipeline, run_results  # pylint: disable=g-import-not-at-top
  names = {paper.run_name(paper.build_config(row, FLAGS.scale)) for tbl in _tables() for check in tbl.checks
           for row in (check.better, check.worse)}
  for name in sorted(names):
    workdir = os.path.join(FLAGS.runs_root, FLAGS.scale, name)
    path = os.path.join(workdir, "results.json")
    if not os.path.exists(path):
      continue
    results = files.read_json(path)
    robust = results.get("robust")
    if robust is None or "masks" in robust:
      continue
    cfg, model, variables, _ = pipeline.load_run(workdir, data_dir=FLAGS.data_dir, log=log)
    ds = data_lib.load(cfg.dataset, cfg.data_dir, source=cfg.data_source, max_train=1)
    n = int(robust["examples"])
    log(f"masks: re-evaluating {name} on {n} images")
    progress_path = os.path.join(workdir, "evaluation_progress.json")
    again = run_results.robust_evaluation(cfg, model, variables, ds.test_images[:n], ds.test_labels[:n],
                                       progress=FLAGS.progress, resume_path=progress_path)
    if again["accuracy"] != robust["accuracy"]:
      raise ValueError(f"{name}: the re-evaluation gives {again['accuracy']}, results.json holds "
                       f"{robust['accuracy']}; masks not added")
    robust["masks"] = again["masks"]
    files.write_json_atomic(path, results)
    files.remove_if_exists(progress_path)


def _add_structure(workdir: str, results: dict, log=print) -> dict:
  """``results`` with ``total/zero_dispersion`` in its paper-counted sparsity, computed from the run's model
  (and written back to its ``results.json``) when it was trained before the index existed."""
  from enquant import files, pipeline, sparsity  # pylint: disable=g-import-not-at-top
  counted = results.get("efficiency", {}).get("sparsity_paper_counting")
  if counted is None or "total/zero_dispersion" in counted:
    return results
  try:
    _, _, variables, _ = pipeline.load_run(workdir, data_dir=FLAGS.data_dir, log=lambda *_: None)
  except (FileNotFoundError, ValueError) as e:  # no usable checkpoint: the column stays empty for this run
    log(f"zero dispersion of {os.path.basename(workdir)} not added: {e}")
    return results
  counted["total/zero_dispersion"] = sparsity.zero_dispersion(variables["params"], sparsity.spatial_conv_mask)
  files.write_json_atomic(os.path.join(workdir, "results.json"), results)
  log(f"zero dispersion of {os.path.basename(workdir)}: {counted['total/zero_dispersion']:.2f} (added)")
  return results


def results_history(path: str) -> list[dict]:
  """The per-epoch metrics rows a run's results file keeps (``history``; [] if absent)."""
  from enquant import files  # pylint: disable=g-import-not-at-top
  return files.read_json(path).get("history", []) if os.path.exists(path) else []


def rebuild_tables(log=print, transfers: bool = True) -> None:
  from enquant import files, paper, plots, reports  # pylint: disable=g-import-not-at-top
  runs_dir = os.path.join(FLAGS.runs_root, FLAGS.scale)
  out_dir = os.path.join(FLAGS.results_root, FLAGS.scale)
  os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
  first_runs = set()  # reruns whose committed (first) results the tables keep
  for tbl in _tables():
    results, found_transfers = {}, {}
    for row, cfg in paper.runs_of(tbl, FLAGS.scale):
      name = paper.run_name(cfg)
      path = os.path.join(runs_dir, name, "results.json")
      if os.path.exists(path):
        results[name] = files.read_json(path)
        if "zero_dispersion" in tbl.columns:
          results[name] = _add_structure(os.path.join(runs_dir, name), results[name], log=log)
        committed = files.read_json(_committed(name)) if os.path.exists(_committed(name)) else None
        if committed is not None and reports.rerun_differs(committed, results[name]):
          # A rerun of a committed run: the table keeps the first run; the rerun is recorded beside it.
          rerun_path = os.path.join(out_dir, "reruns", name + ".json")
          if not os.path.exists(rerun_path):
            log(reports.reproduction_report(name, committed, results[name]) + "; the tables keep the "
                f"committed results, the rerun goes to {rerun_path}")
          files.write_json_atomic(rerun_path, reports.portable(results[name]))
          results[name] = committed
          first_runs.add(name)
        else:
          files.write_json_atomic(_committed(name), reports.portable(results[name]))
      elif os.path.exists(_committed(name)):  # the run directory is on another machine
        results[name] = files.read_json(_committed(name))
    for row in tbl.rows:
      if row.oracle is not None and transfers:
        target = paper.run_name(paper.build_config(row, FLAGS.scale))
        oracle = paper.run_name(paper.build_config(row.oracle, FLAGS.scale))
        found = _transfer(os.path.join(runs_dir, target), os.path.join(runs_dir, oracle), log=log)
        if found is not None:
          found_transfers[(target, oracle)] = found
    rows = reports.table_rows(tbl, FLAGS.scale, results, found_transfers)
    checks = reports.check_rows(tbl, FLAGS.scale, results, found_transfers)
    trends = reports.trend_rows(tbl, FLAGS.scale, rows)
    files.write_text_atomic(os.path.join(out_dir, f"table_{tbl.name}.md"),
                            reports.table_markdown(tbl, FLAGS.scale, rows, checks, trends))
    files.write_json_atomic(os.path.join(out_dir, f"table_{tbl.name}.json"),
                            {"table": tbl.name, "scale": FLAGS.scale, "title": tbl.title,
                             "claim": tbl.claim, "rows": rows, "checks": checks, "trends": trends})
    done = sum(r["state"] == "done" for r in rows)
    log(f"Table {tbl.name}: {done}/{len(rows)} rows done -> {out_dir}/table_{tbl.name}.md")
    if tbl.name == "IV":  # Fig. 2: M_t against epochs for the Table IV runs
      curves = {}
      for row, cfg in paper.runs_of(tbl, FLAGS.scale):
        name = paper.run_name(cfg)
        metrics = ((name not in first_runs and files.read_jsonl(os.path.join(runs_dir, name, "metrics.jsonl")))
                   or results_history(_committed(name)))
        if metrics:
          curves[row.net] = ([m["epoch"] for m in metrics], [m["m_bound"] for m in metrics])
      if curves:
        plots.m_curves(os.path.join(out_dir, "fig2_m_bound.png"), curves)
  _write_reruns(out_dir, log)


def _write_reruns(out_dir: str, log=print) -> None:
  """``reruns.md`` from every rerun kept under ``<out_dir>/reruns`` beside its committed results."""
  from enquant import files, reports  # pylint: disable=g-import-not-at-top
  rerun_dir = os.path.join(out_dir, "reruns")
  names = (sorted(f[:-5] for f in os.listdir(rerun_dir) if f.endswith(".json"))
           if os.path.isdir(rerun_dir) else [])
  entries = [(n, files.read_json(_committed(n)), files.read_json(os.path.join(rerun_dir, n + ".json")))
             for n in names if os.path.exists(_committed(n))]
  if entries:
    files.write_text_atomic(os.path.join(out_dir, "reruns.md"),
                            reports.reruns_markdown(FLAGS.scale, entries))
    log(f"{len(entries)} rerun(s) -> {out_dir}/reruns.md")


def _kernel_panels(workdir: str, count: int = 4, channels: bool = False):
  """``count`` kernels (member 0) of :func:`enquant.paper.kernel_layer` of a finished run: 3x3 kernels at fixed random
  positions, or whole output channels reshaped to (in_channels, 9) (the paper's "reshaped channels")."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from enquant import paper, pipeline  # pylint: disable=g-import-not-at-top
  _, _, variables, _ = pipeline.load_run(workdir, data_dir=FLAGS.data_dir, log=lambda *_: None)
  block, conv = paper.kernel_layer(variables["params"])
  kernel = np.asarray(variables["params"][block][conv]["kernel"][0])  # (3, 3, I, O)
  rng = np.random.default_rng(0)
  if channels:
    outs = rng.choice(kernel.shape[-1], count, replace=False)
    return np.stack([kernel[..., o].reshape(9, -1).T for o in outs])
  idx = [(rng.integers(kernel.shape[2]), rng.integers(kernel.shape[3])) for _ in range(count)]
  return np.stack([kernel[:, :, i, o] for i, o in idx])


def figures(log=print) -> None:
  """Figs. 1 and 3-7 from finished runs (each drawn once its runs exist)."""
  from enquant import data as data_lib, paper, pipeline, plots, run_results  # pylint: disable=g-import-not-at-top
  runs_dir = os.path.join(FLAGS.runs_root, FLAGS.scale)
  out_dir = os.path.join(FLAGS.results_root, FLAGS.scale)

  def run_dir(table, **match):
    row = next(r for r in paper.table(table).rows
               if r.oracle is None and all(getattr(r, k) == v for k, v in match.items()))
    d = os.path.join(runs_dir, paper.run_name(paper.build_config(row, FLAGS.scale)))
    return d if _state(d) == "done" else None, row

  specs = [
      ("fig3_float_vs_binary_kernels.png", "Fig. 3: the same 3x3 kernels, binary (BR) and float (PGD-AT)",
       [("I", dict(ensembles=1, quant="br")), ("I", dict(ensembles=1, quant="float"))], False),
      ("fig4_ternary_channels_at.png", "Fig. 4: ternary channels under PGD-AT (zeros marked)",
       [("VII", dict(depth=20, noise=0.0, bits=2, loss="at"))], True),
      ("fig5_ternary_channels_natural.png", "Fig. 5: ternary channels under natural training",
       [("VII", dict(depth=56, noise=0.1, bits=2, loss="natural"))], True),
      ("fig6_ternary_channels_at_vs_tradeoff.png", "Fig. 6: ternary channels, PGD-AT vs loss (6)",
       [("VII", dict(depth=20, noise=0.1, bits=2, loss="at")),
        ("VII", dict(depth=20, noise=0.1, bits=2, loss="tradeoff"))], True),
  ]
  for name, title, sources, channels in specs:
    found = [run_dir(t, **m) for t, m in sources]
    if all(d is not None for d, _ in found):
      panels = {f"{r.net} {r.quant_label} {r.loss_label}": _kernel_panels(d, channels=channels)
                for d, r in found}
      plots.kernels(os.path.join(out_dir, name), panels, title=title + f" ({FLAGS.scale} scale)")
      log(f"figure -> {out_dir}/{name}")
  # Fig. 1: FGSM on the paper's naturally trained ResNet56 (here the nearest run: Table VII's ternary one).
  fig1, row = run_dir("VII", depth=56, noise=0.0, bits=2, loss="natural")
  if fig1 is not None:
    cfg, model, variables, _ = pipeline.load_run(fig1, data_dir=FLAGS.data_dir, log=lambda *_: None)
    ds = data_lib.load(cfg.dataset, cfg.data_dir, source=cfg.data_source, max_train=1)
    path = os.path.join(out_dir, "fig1_fgsm_examples.png")
    run_results.figure_examples(cfg, model, variables, ds, path, kind="fgsm")
    log(f"figure -> {path} ({row.net} {row.quant_label} {row.loss_label})")
  for dataset in ("fmnist", "svhn"):  # Fig. 7: a mini-batch of each dataset we can read
    try:
      ds = data_lib.load(dataset, FLAGS.data_dir, max_train=32, max_test=1)
    except (ValueError, FileNotFoundError):
      continue
    plots.minibatch(os.path.join(out_dir, f"fig7_{dataset}_minibatch.png"), ds.train_images[:32],
                    ds.train_labels[:32], title=f"Fig. 7: a mini-batch of {dataset}")


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  experiments.quiet_logs()
  from enquant import paper, pipeline  # pylint: disable=g-import-not-at-top
  try:
    paper.gpu_epochs(FLAGS.scale)  # --scale checked before anything runs
    _tables()
    if FLAGS.list:
      list_runs()
      return
    ok = True
    if FLAGS.add_masks:
      add_masks()
    elif not FLAGS.tables_only:
      ok = train_missing()
      if FLAGS.run is not None:
        return
    rebuild_tables()
    figures()
    if not ok:
      print("error: some runs failed (their logs are named above); the tables hold the runs that finished",
            file=sys.stderr)
      sys.exit(1)
  except (ValueError, FileNotFoundError, pipeline.RunExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
