"""Where the harness's runs and their committed results live, and how a run gets from one to the other.

A :class:`Store` joins a scale's run directories (``<runs_root>/<scale>/<run>``, on the machine that
trains) and its committed results (``<results_root>/<scale>/``, kept with the repository):

* ``runs/<run>.json``: the run's results, validated (:class:`enquant.results.RunResults`) before anything
  is copied, and ``runs/<run>.npz``: its model (packed for quantized runs, float32 for float runs);
* ``transfers/<target>--<oracle>.json``: transfer evaluations (Table III);
* ``reruns/<run>.json`` and ``reruns.md``: a committed run trained again that gives other accuracies (the
  tables keep the committed one);
* ``runs.jsonl``: one line per trained run (command, hardware, start, wall).

Runs are trained under a per-run lock, so that two queues on one table share its runs.
"""

import dataclasses
import datetime
import os
import platform
import shutil
import time
from typing import Any

from enquant import files
from enquant import results as results_lib

MODEL_FILES = ("model_packed.npz", "model_float32.npz")  # a quantized run's, a float run's


def finished(state: str) -> bool:
  return state in ("done", "committed")


def with_data_dir(cfg, data_dir: str | None):
  return cfg if data_dir is None else dataclasses.replace(cfg, data_dir=data_dir)


def hardware(cpuinfo: str = "/proc/cpuinfo") -> str:
  """The CPU model (family and model numbers, widest vector ISA) and CPU count, for the run log: runs
  are bitwise reproducible on one kind of processor, not across kinds."""
  model, extra = platform.processor() or platform.machine(), []
  try:
    with open(cpuinfo) as f:
      fields = {}
      for line in f:
        key, _, value = line.partition(":")
        if not line.strip():
          break  # the first processor's block
        fields.setdefault(key.strip(), value.strip())
  except OSError:
    fields = {}
  model = fields.get("model name", model)
  if "cpu family" in fields and "model" in fields:
    extra.append(f"family {fields['cpu family']}, model {fields['model']}")
  flags_ = set(fields.get("flags", "").split())
  isa = next((name for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX"))
              if flag in flags_), None)
  if isa:
    extra.append(isa)
  details = f" ({'; '.join(extra)})" if extra else ""
  return f"{model}{details}, {os.cpu_count()} CPUs"


@dataclasses.dataclass
class Store:
  """A scale's run directories and committed results (module docstring)."""

  runs_dir: str
  out_dir: str
  scale: str
  data_dir: str | None = None
  first_runs: set = dataclasses.field(default_factory=set)  # reruns whose committed results the tables keep

  def workdir(self, name: str) -> str:
    return os.path.join(self.runs_dir, name)

  def committed(self, name: str) -> str:
    return os.path.join(self.out_dir, "runs", name + ".json")

  def model(self, name: str) -> str:
    return os.path.join(self.out_dir, "runs", name + ".npz")

  def state(self, name: str) -> str:
    """``done`` (results in the run directory), ``committed`` (only the committed results: the run
    directory is on another machine), ``epoch <e>`` (resumable) or ``missing``."""
    workdir = self.workdir(name)
    if os.path.exists(os.path.join(workdir, "results.json")):
      return "done"
    if os.path.exists(self.committed(name)):
      return "committed"
    rows = files.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if os.path.isdir(workdir) else []
    return f"epoch {rows[-1].get('epoch', '?')}" if rows else "missing"

  def train(self, name: str, cfg, *, progress: bool, command: str, log, announce: str,
            retrain: bool = False) -> None:
    """Trains run ``name`` under its lock; a run another process holds, or one finished meanwhile, is
    skipped. ``retrain``: a run known only by its committed results is trained again and compared."""
    from enquant import pipeline  # pylint: disable=g-import-not-at-top
    os.makedirs(self.runs_dir, exist_ok=True)
    try:
      with files.hold_lock(self.workdir(name) + ".lock", f"run {name}"):
        state = self.state(name)
        if finished(state) and not (retrain and state == "committed"):
          log(f"skip {name}: {state} (finished by another process)")
          return
        log(announce)
        start, t0 = datetime.datetime.now(datetime.timezone.utc), time.time()
        pipeline.train_and_evaluate(with_data_dir(cfg, self.data_dir), self.workdir(name), progress=progress,
                                    log=log)
        self._log_run(name, command, start, time.time() - t0)
        self._compare_with_committed(name, log)
    except files.LockedError as e:
      log(f"skip {name}: {e}")

  def _log_run(self, name: str, command: str, start, wall: float) -> None:
    os.makedirs(self.out_dir, exist_ok=True)
    files.append_jsonl(os.path.join(self.out_dir, "runs.jsonl"), {
        "run": name, "command": command, "hardware": hardware(),
        "start": start.isoformat(timespec="seconds"), "wall_seconds": round(wall, 1)})

  def _compare_with_committed(self, name: str, log) -> None:
    """After training a run whose results were committed before: are its accuracies the committed ones?"""
    from experiments.paper import reports  # pylint: disable=g-import-not-at-top
    path = os.path.join(self.workdir(name), "results.json")
    if os.path.exists(self.committed(name)) and os.path.exists(path):
      log(reports.reproduction_report(name, results_lib.RunResults.from_json(self.committed(name)),
                                      results_lib.RunResults.from_json(path)))

  def results(self, name: str, log=print) -> results_lib.RunResults | None:
    """A finished run's results, committed (with its model) when they come from its run directory.

    Raises:
      ResultsError: a results file that cannot be true (one line naming it); nothing is copied.
    """
    from experiments.paper import reports  # pylint: disable=g-import-not-at-top
    path = os.path.join(self.workdir(name), "results.json")
    committed = (results_lib.RunResults.from_json(self.committed(name))
                 if os.path.exists(self.committed(name)) else None)
    if not os.path.exists(path):
      return committed  # the run directory is on another machine (or there is no run)
    res = results_lib.RunResults.from_json(path)
    if committed is not None and reports.rerun_differs(committed, res):
      # A rerun of a committed run: the table keeps the first run; the rerun is recorded beside it.
      rerun_path = os.path.join(self.out_dir, "reruns", name + ".json")
      if not os.path.exists(rerun_path):
        log(reports.reproduction_report(name, committed, res) + "; the tables keep the committed results, "
            f"the rerun goes to {rerun_path}")
      files.write_json_atomic(rerun_path, reports.portable(res.to_dict()))
      self.keep_model(name, float_run=res.config.get("quant", {}).get("mode") == "float", log=log,
                      dest=rerun_path[:-len(".json")] + ".npz")  # the rerun's model, beside the rerun
      self.first_runs.add(name)
      return committed
    files.write_json_atomic(self.committed(name), reports.portable(res.to_dict()))
    self.keep_model(name, float_run=res.config.get("quant", {}).get("mode") == "float", log=log)
    return res

  def keep_model(self, name: str, *, float_run: bool, log=print, dest: str | None = None) -> str | None:
    """Copies the run's model file beside its committed results (``runs/<run>.npz``, or ``dest``); a run
    without one (a float run trained before float models were written, or one stopped after its last
    epoch) gets an export of its newest checkpoint: float32 for a float run, packed for a quantized one.
    Returns the path, or None."""
    dest = dest or self.model(name)
    for fname in MODEL_FILES:
      src = os.path.join(self.workdir(name), fname)
      if os.path.exists(src):
        with open(src, "rb") as source:
          files.write_bytes_atomic(dest, lambda f, s=source: shutil.copyfileobj(s, f))
        return dest
    if os.path.exists(dest):
      return dest
    return self._export(name, dest, float_run, log)

  def _export(self, name: str, dest: str, float_run: bool, log) -> str | None:
    from enquant import data as data_lib, export, pipeline, run_results  # pylint: disable=g-import-not-at-top
    try:
      cfg, _, variables, _ = pipeline.load_run(self.workdir(name), data_dir=self.data_dir, log=lambda *_: None)
    except (FileNotFoundError, ValueError) as e:
      log(f"model of {name} not kept: {e}")
      return None
    shape = data_lib.DATASETS[cfg.dataset].image_shape
    if float_run:
      run_results.save_float_model(dest, cfg, variables, shape)
    else:
      packed = export.pack(variables["params"], cfg.quant.bits, cfg.quant.ternary_method)
      export.save(dest, packed, batch_stats=variables["batch_stats"], model_config=cfg.model, input_shape=shape)
    return dest

  def kept_model(self, name: str) -> tuple[str, bool] | None:
    """``(model file, retrained)`` of the committed run ``name``: its own model kept beside its results,
    else its retrained run's (``reruns/``, the retrained run moved); None when neither is kept."""
    if os.path.exists(self.model(name)):
      return self.model(name), False
    rerun = os.path.join(self.out_dir, "reruns", name + ".npz")
    return (rerun, True) if os.path.exists(rerun) else None

  def model_state(self, name: str) -> str:
    """``model`` (kept beside the committed results), ``rerun's model`` (only a retrained run's, in
    ``reruns/``) or ``no model``."""
    kept = self.kept_model(name)
    return "no model" if kept is None else "rerun's model" if kept[1] else "model"

  def without_model(self, names: list[str]) -> list[str]:
    """The runs of ``names`` known only by committed results that keep no model (neither their own nor a
    rerun's): what ``--keep_models`` trains again, cheapest first (committed seconds over every call:
    :attr:`enquant.results.RunResults.seconds`; a resumed run's wall seconds count only its last call)."""
    todo = [n for n in names if self.state(n) == "committed" and self.model_state(n) == "no model"]
    cost = lambda n: results_lib.RunResults.from_json(self.committed(n)).seconds or 0.0
    return sorted(todo, key=lambda n: (cost(n), n))

  def tables_run_here(self, name: str) -> bool:
    """Whether the run directory holds the run the tables use: finished there and not a rerun kept
    apart in ``reruns/`` (figures drawn from its weights then match the tables)."""
    return (self.state(name) == "done" and name not in self.first_runs
            and not os.path.exists(os.path.join(self.out_dir, "reruns", name + ".json")))

  def rerun(self, name: str) -> results_lib.RunResults | None:
    """The committed rerun of ``name`` (``reruns/<run>.json``: trained again, other accuracies), or None."""
    path = os.path.join(self.out_dir, "reruns", name + ".json")
    return results_lib.RunResults.from_json(path) if os.path.exists(path) else None

  def history(self, name: str, res: results_lib.RunResults | None) -> list[dict[str, Any]]:
    """The per-epoch metrics of a run: its run directory's when the run finished there (and is not a
    rerun kept apart) or has no results, else its results' (a committed run being trained again keeps
    its committed history in the figures, not the new run's first epochs)."""
    own = self.tables_run_here(name) or (res is None and name not in self.first_runs)
    rows = files.read_jsonl(os.path.join(self.workdir(name), "metrics.jsonl")) if own else []
    return rows or ([] if res is None else res.history)

  def write_reruns(self, log=print) -> None:
    """``reruns.md`` from every rerun kept under ``reruns/`` beside its committed results."""
    from experiments.paper import reports  # pylint: disable=g-import-not-at-top
    rerun_dir = os.path.join(self.out_dir, "reruns")
    names = (sorted(f[:-5] for f in os.listdir(rerun_dir) if f.endswith(".json"))
             if os.path.isdir(rerun_dir) else [])
    entries = [(n, results_lib.RunResults.from_json(self.committed(n)),
                results_lib.RunResults.from_json(os.path.join(rerun_dir, n + ".json")))
               for n in names if os.path.exists(self.committed(n))]
    if entries:
      files.write_text_atomic(os.path.join(self.out_dir, "reruns.md"), reports.reruns_markdown(self.scale, entries))
      log(f"{len(entries)} rerun(s) -> {self.out_dir}/reruns.md")

  def kept_transfer(self, target: str, oracle: str) -> str:
    return os.path.join(self.out_dir, "transfers", f"{target}--{oracle}.json")

  def transfers(self, tbl, log=print) -> dict[tuple[str, str], results_lib.Evaluation]:
    """The transfer evaluations of ``tbl``'s oracle rows that exist or can be computed now."""
    from experiments.paper import scales  # pylint: disable=g-import-not-at-top
    out = {}
    for row in tbl.rows:
      if row.oracle is not None:
        key = tuple(scales.run_name(scales.build_config(r, self.scale)) for r in (row, row.oracle))
        found = self.transfer(*key, log=log)
        if found is not None:
          out[key] = found
    return out

  def transfer(self, target: str, oracle: str, log=print) -> results_lib.Evaluation | None:
    """Transfer evaluation of a finished target run on a finished oracle's examples (cached as JSON, and
    kept with the results)."""
    from experiments.paper import reports  # pylint: disable=g-import-not-at-top
    path = os.path.join(self.workdir(target), f"evaluation-transfer-{oracle}.json")
    kept = self.kept_transfer(target, oracle)
    if os.path.exists(path):
      result = results_lib.read_evaluation(path)
      files.write_json_atomic(kept, reports.portable(result.to_dict()))
      return result
    if os.path.exists(kept):  # the run directories are on another machine
      return results_lib.read_evaluation(kept)
    states = (self.state(target), self.state(oracle))
    if states != ("done", "done"):
      if all(finished(st) for st in states):
        log(f"transfer {oracle} -> {target}: needs both trained models, but only their committed results "
            f"are here (states {states}); row left pending")
      return None
    return self._evaluate_transfer(target, oracle, path, kept, log)

  def _evaluate_transfer(self, target, oracle, path, kept, log) -> results_lib.Evaluation:
    from enquant import data as data_lib, pipeline, run_results  # pylint: disable=g-import-not-at-top
    from experiments.paper import reports  # pylint: disable=g-import-not-at-top
    cfg, model, variables, _ = pipeline.load_run(self.workdir(target), data_dir=self.data_dir)
    _, omodel, ovars, _ = pipeline.load_run(self.workdir(oracle), data_dir=self.data_dir)
    ds = data_lib.load(cfg.dataset, cfg.data_dir, source=cfg.data_source, max_train=1)
    n = min(len(ds.test_images), cfg.eval.max_examples or len(ds.test_images))
    log(f"transfer: {oracle} -> {target} on {n} images")
    result = run_results.robust_evaluation(cfg, model, variables, ds.test_images[:n], ds.test_labels[:n],
                                           progress=False, oracle=(omodel, ovars),
                                           resume_path=path[:-5] + "-progress.json")
    result.update(schema_version=results_lib.SCHEMA_VERSION,
                  oracle=os.path.abspath(self.workdir(oracle)))
    evaluation = results_lib.Evaluation.from_dict(result, where=path)
    files.write_json_atomic(path, result)
    files.write_json_atomic(kept, reports.portable(result))
    files.remove_if_exists(path[:-5] + "-progress.json")
    return evaluation


__all__ = ["MODEL_FILES", "Store", "finished", "hardware", "with_data_dir"]
