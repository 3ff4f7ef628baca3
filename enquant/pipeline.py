"""``train_and_evaluate(config, workdir)``: the whole run, callable from a notebook or an entry point.

A run directory holds ``config.json``, ``metrics.jsonl`` (one row per epoch), ``checkpoints/`` (orbax, one per
epoch, resumable), and when finished ``results.json`` and ``results.md``. Re-running on a directory with an
unfinished run of the same configuration resumes it; another configuration is refused; a finished run is
never overwritten unless asked.
"""

import contextlib
import dataclasses
import os
import platform
import shutil
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from enquant import checkpoint as ckpt_lib
from enquant import config as config_lib
from enquant import data as data_lib
from enquant import distributed
from enquant import files
from enquant import losses
from enquant import run_results
from enquant import tensorboard as tensorboard_lib
from enquant import train as train_lib
from enquant.config import ExperimentConfig
from enquant.models import cost
from enquant.models.ensemble import count_params, EnResNet


class RunExistsError(RuntimeError):
  """The run directory already holds a finished run or one of another configuration."""


class WorkdirError(ValueError):
  """The run directory cannot be used: it is a file, lies under a file, or is not writable."""


# What a run (and ``experiments.evaluate``) writes into its directory: ``--overwrite`` removes exactly these.
RUN_FILES = ("results.json", "results.md", "model_packed.npz", "metrics.jsonl", "checkpoints")
RUN_FILE_PATTERNS = ("evaluation*.json", "evaluation*.md", "*.png", ".tmp-*")
LOCK_FILE = ".lock"  # held by the one process writing the run directory (enquant.files.hold_lock)


def software_versions() -> dict[str, str]:
  import flax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "numpy": np.__version__,
          "devices": f"{jax.device_count()}x {jax.devices()[0].device_kind}"}


def _nearest_existing(path: str) -> str:
  while not os.path.lexists(path):
    parent = os.path.dirname(path)
    if parent == path:
      break
    path = parent
  return path


def check_workdir(cfg: ExperimentConfig, workdir: str, *, overwrite: bool = False) -> None:
  """Checks, changing nothing, that ``workdir`` can hold this run.

  Args:
    cfg: the experiment.
    workdir: run directory (it need not exist).
    overwrite: a finished run or one of another configuration may be replaced.

  Raises:
    WorkdirError: ``workdir`` is a file, lies under a file, or cannot be written.
    RunExistsError: it holds a finished run, or a run of another configuration (without ``overwrite``).
  """
  path = os.path.abspath(workdir)
  existing = _nearest_existing(path)
  if not os.path.isdir(existing):
    where = "is a file" if existing == path else f"cannot be created: {existing} is a file"
    raise WorkdirError(f"run directory {workdir} {where}, not a directory; choose another --workdir")
  for folder in (existing, os.path.join(path, "checkpoints")):
    if os.path.isdir(folder) and not os.access(folder, os.W_OK | os.X_OK):
      raise WorkdirError(f"run directory {workdir} is not writable ({folder}: permission denied)")
  if existing != path or overwrite:
    return
  if os.path.exists(os.path.join(path, "results.json")):
    raise RunExistsError(f"{workdir} already holds a finished run (results.json); pass --overwrite "
                         "to train it again or choose another --workdir")
  config_path = os.path.join(path, "config.json")
  if os.path.exists(config_path):
    try:
      a = ExperimentConfig.from_dict(files.read_json(config_path)).fingerprint_dict()
    except (OSError, ValueError, TypeError, AttributeError) as e:
      raise RunExistsError(f"{workdir} holds an unreadable config.json ({type(e).__name__}); choose "
                           "another --workdir or pass --overwrite") from None
    b = cfg.fingerprint_dict()
    if a != b:
      diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
      raise RunExistsError(f"{workdir} holds a run of another configuration (differs in "
                           f"{', '.join(diff)}); choose another --workdir or pass --overwrite")


def _clear_previous_run(workdir: str) -> None:
  """Removes what an earlier run wrote (results first, ``config.json`` last); other files stay."""
  import fnmatch  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  names = sorted(os.listdir(workdir))
  doomed = [n for n in RUN_FILES if n in names]
  doomed += [n for n in names if n not in doomed and any(fnmatch.fnmatch(n, p) for p in RUN_FILE_PATTERNS)]
  doomed += ["config.json"] if "config.json" in names else []
  for name in doomed:
    path = os.path.join(workdir, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.remove(path)


def prepare_workdir(cfg: ExperimentConfig, workdir: str, *, overwrite: bool = False) -> None:
  """Validates the run directory (:func:`check_workdir`), clears it if ``overwrite``, writes ``config.json``.

  Call it only once the run can really start (configuration validated, data loaded): with ``overwrite``
  everything the previous run wrote is removed.
  """
  check_workdir(cfg, workdir, overwrite=overwrite)
  os.makedirs(workdir, exist_ok=True)
  if overwrite:
    _clear_previous_run(workdir)
  files.write_text_atomic(os.path.join(workdir, "config.json"), cfg.to_json() + "\n")


class RunSetup(NamedTuple):
  """What a run is built from, before anything is written.

  Attributes:
    ds: the dataset.
    model: the EnResNet.
    tx: the optimizer (Binary-Relax around SGD for quantized runs).
    schedule: its learning-rate schedule.
    objective: ``(perturb, loss)`` of :func:`enquant.losses.make_objective`.
    mesh: the data-parallel mesh.
    state: the freshly initialised train state (replicated over the processes of a multi-process job).
    steps_per_epoch: optimizer steps per epoch.
    num_params: parameters of the model.
  """
  ds: Any
  model: EnResNet
  tx: Any
  schedule: Any
  objective: Any
  mesh: Any
  state: Any
  steps_per_epoch: int
  num_params: int


def setup(cfg: ExperimentConfig, *, devices=None) -> RunSetup:
  """Validates the configuration against its data and devices, and builds model, optimizer and state.

  Raises:
    ValueError, FileNotFoundError: bad configuration or data, or a model that cannot fit in memory.
  """
  cfg.eval.attack_specs(cfg.model.noise_coef > 0)  # bad attack names fail now, not after training
  objective = losses.make_objective(cfg.loss)
  ds = data_lib.load(cfg.dataset, cfg.data_dir, source=cfg.data_source,
                     max_train=cfg.max_train or None, max_test=cfg.max_test or None)
  if ds.num_classes != cfg.model.num_classes:
    raise ValueError(f"model has {cfg.model.num_classes} classes but {cfg.dataset} has {ds.num_classes}")
  tcfg = cfg.train
  if tcfg.batch_size > len(ds.train_images):
    raise ValueError(f"batch_size {tcfg.batch_size} exceeds the {len(ds.train_images)} training images")
  steps_per_epoch = len(ds.train_images) // tcfg.batch_size
  mesh = train_lib.data_mesh(devices)
  train_lib.check_batch(tcfg.batch_size, mesh)
  model = EnResNet(cfg.model)
  tx, schedule = train_lib.make_optimizer(tcfg, cfg.quant, steps_per_epoch)
  sample = data_lib.to_float(ds.train_images[:1])
  abstract = jax.eval_shape(lambda: train_lib.create_train_state(model, tx, jax.random.PRNGKey(0), sample))
  num_params = count_params(abstract.params)
  device = mesh.devices.flat[0]  # a CPU's fake devices share one host memory
  cost.check_train_memory(cfg.model, ds.train_images.shape[1:],
                          tcfg.batch_size // (1 if device.platform == "cpu" else mesh.devices.size),
                          device, num_params=num_params)
  state = train_lib.create_train_state(model, tx, jax.random.PRNGKey(tcfg.seed), sample)
  if jax.process_count() > 1:  # orbax restores multi-host into the target's (global) shardings
    state = train_lib.put_replicated(state, train_lib.shardings(mesh)[0])
  return RunSetup(ds, model, tx, schedule, objective, mesh, state, steps_per_epoch, num_params)


def _metrics_rows(metrics_path: str, last_epoch: int) -> list[dict]:
  """The rows of ``metrics.jsonl`` up to ``last_epoch`` (a truncated last line is dropped with a warning).

  Raises:
    ValueError: a row without an integer ``epoch``, naming the file and the row.
  """
  rows = files.read_jsonl(metrics_path)
  for number, row in enumerate(rows, start=1):
    if isinstance(row.get("epoch"), bool) or not isinstance(row.get("epoch"), int):
      raise ValueError(f"{metrics_path}: row {number} has no integer 'epoch'; fix or remove the file "
                       "to resume")
  return [r for r in rows if r["epoch"] <= last_epoch]


def resume(ckpt: ckpt_lib.Checkpointer, state, fingerprint: str, *, workdir: str, main: bool,
           log=None) -> tuple[int, Any]:
  """``(epochs done, state)`` from the newest checkpoint that passes verification (0 and ``state`` when
  there is none); newer checkpoints that failed are moved to ``checkpoints/rejected/``, and process 0
  rewrites ``metrics.jsonl`` without the rows past the checkpoint (epochs logged, not checkpointed: the
  resumed run redoes them; TensorBoard hides their events, ``purge_step``) or a truncated last line."""
  found = ckpt.restore_latest(state, expect_fingerprint=fingerprint, log=log)
  start_epoch = 0 if found is None else found.epoch
  if found is not None:
    ckpt.set_aside([e for e in ckpt.epochs() if e > found.epoch])
    state = found.state
  if main:
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    rows = _metrics_rows(metrics_path, start_epoch)
    files.write_text_atomic(metrics_path, "".join(files.json_line(r) for r in rows))
  return start_epoch, state


class EpochRecorder:
  """``on_epoch_end`` of :func:`enquant.train.run_epochs`: evaluates, writes the metrics row and the
  TensorBoard summaries (process 0), then commits the checkpoint (every process: orbax saves collectively).

  The row is written before the checkpoint, so no checkpoint is ever without its row. A non-finite value
  stops the run (:class:`enquant.train.NonFiniteError`) before anything of that epoch is written.
  """

  def __init__(self, cfg: ExperimentConfig, run: RunSetup, ckpt, *, workdir: str, fingerprint: str,
               start_epoch: int, main: bool, tensorboard: bool, log):
    self.cfg, self.run, self.ckpt, self.fingerprint, self.main, self.log = (
        cfg, run, ckpt, fingerprint, main, log)
    self.metrics_path = os.path.join(workdir, "metrics.jsonl")
    self.tb_dir = os.path.join(workdir, tensorboard_lib.DIRNAME)
    self.eval_step = train_lib.make_eval_step(run.model, run.mesh)
    self._writer = None if (main and tensorboard) else False
    self._purge_step = start_epoch + 1

  def summaries(self):
    """The TensorBoard writer, opened at the first epoch written (process 0; None when off)."""
    if self._writer is None:
      self._writer = tensorboard_lib.open_writer(self.tb_dir, purge_step=self._purge_step,
                                                 log=self.log) or False
    return self._writer or None

  def close(self) -> None:
    if self._writer:
      self._writer.close()

  def __call__(self, epoch: int, st, train_metrics: dict) -> None:
    cfg, ds = self.cfg, self.run.ds
    variables = {"params": train_lib.eval_params(st, cfg.quant), "batch_stats": st.batch_stats}
    acc = train_lib.natural_accuracy(self.eval_step, variables, ds.test_images, ds.test_labels,
                                     batch_size=cfg.train.batch_size, key=jax.random.PRNGKey(cfg.eval.seed),
                                     mesh=self.run.mesh)
    row = {"epoch": epoch + 1, "step": int(st.step), "lr": float(self.run.schedule(int(st.step) - 1)),
           "test_acc": acc, **train_metrics, **train_lib.epoch_extras(st, cfg.quant)}
    bad = files.nonfinite_key(row)
    if bad is not None:
      raise train_lib.NonFiniteError(f"non-finite {bad} ({row[bad]}) after epoch {epoch + 1}: "
                                     "training stopped")
    if self.main:
      files.append_jsonl(self.metrics_path, row)
      if (tb := self.summaries()) is not None:
        tb.epoch(row, br_lambda=train_lib.relax_lambda(st, cfg.quant))
    self.ckpt.save(epoch + 1, st, {"fingerprint": self.fingerprint})
    self.log(f"epoch {epoch + 1}/{cfg.train.epochs}: " + ", ".join(
        f"{k}={v:.4g}" for k, v in row.items() if k in ("train_loss", "test_acc", "m_bound",
                                                        "weight_sparsity", "epoch_seconds")))


def _train(run: RunSetup, cfg: ExperimentConfig, state, record: EpochRecorder, *, start_epoch: int,
           stop: int, progress: bool):
  """The epochs ``start_epoch .. stop - 1`` (:func:`enquant.train.run_epochs`), a divergence named with
  the checkpoint that is kept."""
  augment, flip = config_lib.augmentation(cfg, run.ds.train_images.shape[1])
  train_step = train_lib.make_train_step(run.model, run.tx, run.objective, augment=augment, flip=flip,
                                         mesh=run.mesh)
  try:
    return train_lib.run_epochs(train_step, state, run.ds.train_images, run.ds.train_labels, cfg=cfg.train,
                                mesh=run.mesh, start_epoch=start_epoch, stop_epoch=stop,
                                on_epoch_end=record, progress=progress)
  except train_lib.NonFiniteError as e:
    last = record.ckpt.latest_epoch()
    kept = f"the last good checkpoint (epoch {last}) is kept" if last else "no checkpoint was written"
    raise train_lib.NonFiniteError(f"{e}; no results written, {kept}; lower --lr or check the data") \
        from None


def _final_results(cfg: ExperimentConfig, run: RunSetup, state, record: EpochRecorder, *, workdir: str,
                   main: bool, progress: bool, log, t_start: float) -> dict[str, Any]:
  """Evaluates the trained model and (process 0) writes ``results.json`` and ``results.md``.

  The test-set pass is sharded over every process: the others join it (and compute what process 0
  computes), writing into a scratch folder that is thrown away.
  """
  import tempfile  # pylint: disable=g-import-not-at-top
  t_eval = time.time()
  with contextlib.ExitStack() as stack:
    where = workdir if main else stack.enter_context(tempfile.TemporaryDirectory(prefix="enquant-process-"))
    try:
      results = run_results.final_results(cfg, run.model, state, run.ds, mesh=run.mesh,
                                          eval_step=record.eval_step, progress=progress, log=log,
                                          workdir=where)
    except KeyboardInterrupt as e:
      if isinstance(e, train_lib.Interrupted):
        raise
      raise train_lib.Interrupted(f"in the final evaluation (all {cfg.train.epochs} epochs trained)") \
          from None
  if not main:
    return results
  # wall_seconds: this call only; train_seconds: every epoch of every call (a resumed run's too).
  results.update(config=cfg.to_dict(), model_name=cfg.model.name, num_params=run.num_params,
                 dataset_source=run.ds.source, software=software_versions(),
                 wall_seconds=time.time() - t_start, eval_seconds=time.time() - t_eval,
                 train_seconds=sum(r.get("epoch_seconds", 0.0) for r in results.get("history", [])),
                 workdir=os.path.abspath(workdir))
  if (tb := record.summaries()) is not None:
    tb.final(cfg.train.epochs, results)
  files.write_text_atomic(os.path.join(workdir, "results.md"), run_results.markdown_row(results))
  files.write_json_atomic(os.path.join(workdir, "results.json"), results)
  files.remove_if_exists(os.path.join(workdir, "evaluation_progress.json"))  # its results are in
  return results


def train_and_evaluate(cfg: ExperimentConfig, workdir: str, *, progress: bool = True,
                       overwrite: bool = False, stop_after_epochs: int | None = None,
                       devices=None, log=print, tensorboard: bool = True) -> dict[str, Any] | None:
  """Trains (resuming if possible), evaluates, and writes the run directory.

  The directory is validated first, but changed (``overwrite`` clears it, ``config.json`` is written) only
  once the configuration is validated and the data are loaded; from then on process 0 holds the run
  directory's lock (``<workdir>/.lock``) until the run ends, so a second process on the same directory is
  refused with one line naming the holder's pid. Each epoch writes its metrics row (and its TensorBoard
  summaries) and then commits its checkpoint (:class:`EpochRecorder`; verified on resume, the newest good
  one is used).

  In a multi-process job (:mod:`enquant.distributed`) every process calls this with the same arguments:
  the mesh spans the devices of all processes, each process feeds its own rows of every batch, and
  process 0 alone logs and writes files.

  Args:
    cfg: the experiment.
    workdir: run directory.
    progress: tqdm bars (process 0 only).
    overwrite: allow replacing a finished run / one of another configuration.
    stop_after_epochs: stop (as if interrupted) once this many epochs are done; no results are written.
    devices: devices for data parallelism (default all devices of all processes).
    log: where one-line progress messages go (process 0 only).
    tensorboard: write TensorBoard summaries to ``<workdir>/tensorboard/`` (needs tensorboardX).

  Returns:
    The results dictionary (also in ``results.json``), or None when stopped early.

  Raises:
    WorkdirError, RunExistsError: the run directory cannot hold this run.
    enquant.files.LockedError: another process holds the run directory.
    enquant.train.NonFiniteError: training diverged (NaN/inf); no results are written and the last good
      checkpoint stays.
    enquant.train.Interrupted: Ctrl-C (a KeyboardInterrupt saying where; the same call resumes).
    enquant.checkpoint.CheckpointError: no usable checkpoint to resume from.
    ValueError, FileNotFoundError: bad configuration or data.
  """
  t_start = time.time()
  main = distributed.is_main_process()
  if not main:  # process 0 speaks and writes for the whole job
    log, progress = (lambda *_: None), False
  check_workdir(cfg, workdir, overwrite=overwrite)
  run = setup(cfg, devices=devices)
  with contextlib.ExitStack() as stack:
    if main:
      os.makedirs(workdir, exist_ok=True)
      stack.enter_context(files.hold_lock(os.path.join(workdir, LOCK_FILE), f"run directory {workdir}"))
      prepare_workdir(cfg, workdir, overwrite=overwrite)  # the run starts: only now the directory changes
      if overwrite:
        shutil.rmtree(os.path.join(workdir, tensorboard_lib.DIRNAME), ignore_errors=True)
    distributed.barrier("enquant-workdir-ready")
    processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
    log(f"{cfg.model.name} on {run.ds.name} ({run.ds.source}): {run.num_params:,} parameters "
        f"({run.num_params / 1e6:.2f}M), {len(run.ds.train_images)} train / {len(run.ds.test_images)} test "
        f"images, {run.steps_per_epoch} steps/epoch on {run.mesh.devices.size} device(s){processes}")
    fingerprint = ckpt_lib.fingerprint(cfg.fingerprint_dict())
    with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
      start_epoch, state = resume(ckpt, run.state, fingerprint, workdir=workdir, main=main, log=log)
      if start_epoch:
        log(f"resumed from {workdir}/checkpoints/{start_epoch} (epoch {start_epoch}/{cfg.train.epochs})")
      state = jax.device_put(state, train_lib.shardings(run.mesh)[0])
      record = EpochRecorder(cfg, run, ckpt, workdir=workdir, fingerprint=fingerprint,
                             start_epoch=start_epoch, main=main, tensorboard=tensorboard, log=log)
      stack.callback(record.close)
      stop = cfg.train.epochs if stop_after_epochs is None else min(cfg.train.epochs, stop_after_epochs)
      state = _train(run, cfg, state, record, start_epoch=start_epoch, stop=stop, progress=progress)
    if stop < cfg.train.epochs:
      return None
    results = _final_results(cfg, run, state, record, workdir=workdir, main=main, progress=progress,
                             log=log, t_start=t_start)
  distributed.barrier("enquant-results-written")
  return results


def load_run(workdir: str, *, data_dir: str | None = None, log=print):
  """Restores a run directory's configuration, model and (evaluation) variables from its newest good
  checkpoint (checkpoints that fail verification are skipped, and ``log`` is told in one line).

  The restore target is built with ``jax.eval_shape`` (no initialisation is compiled or run).

  Returns:
    ``(cfg, model, variables, state)``; ``variables`` hold P(w) for quantized runs.

  Raises:
    FileNotFoundError: no run (config.json / checkpoints) in ``workdir``.
    ValueError: an unreadable config.json; :class:`enquant.checkpoint.CheckpointError` (a ValueError)
      when no checkpoint passes verification or they belong to another configuration.
  """
  config_path = os.path.join(workdir, "config.json")
  if not os.path.exists(config_path):
    raise FileNotFoundError(f"no run in {workdir}: config.json is missing")
  try:
    cfg = ExperimentConfig.from_dict(files.read_json(config_path))
  except (ValueError, TypeError, AttributeError) as e:
    raise ValueError(f"{config_path} is unreadable ({type(e).__name__}: {e})") from None
  if data_dir is not None:
    cfg = dataclasses.replace(cfg, data_dir=data_dir)
  model = EnResNet(cfg.model)
  steps_per_epoch = max(1, (cfg.max_train or data_lib.DATASETS[cfg.dataset].num_train)
                        // cfg.train.batch_size)
  tx, _ = train_lib.make_optimizer(cfg.train, cfg.quant, steps_per_epoch)
  shape = (1,) + tuple(data_lib.DATASETS[cfg.dataset].image_shape)
  # The restore target's shapes and dtypes only: traced, never compiled or run.
  target = jax.eval_shape(lambda: train_lib.create_train_state(model, tx, jax.random.PRNGKey(0),
                                                               jnp.zeros(shape, jnp.float32)))
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    found = ckpt.restore_latest(target, expect_fingerprint=ckpt_lib.fingerprint(cfg.fingerprint_dict()),
                                log=log)
  if found is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
  state = found.state
  variables = {"params": train_lib.eval_params(state, cfg.quant), "batch_stats": state.batch_stats}
  return cfg, model, variables, state


def load_kept(path: str, *, data_dir: str | None = None):
  """Restores a kept model (``results/<scale>/runs/<run>.npz`` or ``reruns/<run>.npz``: a run's model file
  copied beside its results) with the configuration of the results file beside it (``<run>.json``), so
  that a run is evaluated again without its run directory.

  Returns:
    ``(cfg, model, variables)`` as :func:`load_run`'s first three (P(w) for quantized runs).

  Raises:
    FileNotFoundError: the model file or its results file is missing.
    ValueError: an unreadable model or results file, or a model file of another model configuration than
      its results'.
  """
  from enquant import export  # pylint: disable=g-import-not-at-top
  from enquant import results as results_lib  # pylint: disable=g-import-not-at-top

  if not path.endswith(".npz"):
    raise ValueError(f"{path}: a kept model is a .npz file")
  results_path = path[:-len(".npz")] + ".json"
  for p, what in ((path, "kept model"), (results_path, "results file of the kept model")):
    if not os.path.isfile(p):
      raise FileNotFoundError(f"no {what} {p}")
  results = results_lib.RunResults.from_json(results_path)
  try:
    cfg = ExperimentConfig.from_dict(results.config)
  except (ValueError, TypeError, AttributeError) as e:
    raise ValueError(f"{results_path}: unreadable configuration ({type(e).__name__}: {e})") from None
  if data_dir is not None:
    cfg = dataclasses.replace(cfg, data_dir=data_dir)
  model, variables = export.load_model(path)
  if model.config != cfg.model:
    raise ValueError(f"{path} holds another model than its results {results_path} name")
  return cfg, model, variables


def load_trained(path: str, *, data_dir: str | None = None, log=print):
  """``(cfg, model, variables)`` of a run directory (:func:`load_run`) or of a kept model file (a path
  ending in ``.npz``, :func:`load_kept`)."""
  if path.endswith(".npz"):
    return load_kept(path, data_dir=data_dir)
  return load_run(path, data_dir=data_dir, log=log)[:3]
