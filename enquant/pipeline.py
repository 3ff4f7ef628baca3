"""``train_and_evaluate(config, workdir)``: the whole run, callable from a notebook or an entry point.

A run directory holds ``config.json``, ``metrics.jsonl`` (one row per epoch), ``checkpoints/`` (orbax, one per
epoch, resumable), and when finished ``results.json`` and ``results.md``. Re-running on a directory with an
unfinished run of the same configuration resumes it; another configuration is refused; a finished run is
never overwritten unless asked.
"""

import dataclasses
import os
import platform
import time
from typing import Any

import jax
import numpy as np

from enquant import checkpoint as ckpt_lib
from enquant import config as config_lib
from enquant import data as data_lib
from enquant import distributed
from enquant import files
from enquant import losses
from enquant import quant
from enquant import run_results
from enquant import sparsity
from enquant import tensorboard as tensorboard_lib
from enquant import train as train_lib
from enquant.config import ExperimentConfig
from enquant.models.ensemble import count_params, EnResNet


class RunExistsError(RuntimeError):
  """The run directory already holds a finished run or one of another configuration."""


class WorkdirError(ValueError):
  """The run directory cannot be used: it is a file, lies under a file, or is not writable."""


# What a run (and ``experiments.evaluate``) writes into its directory: ``--overwrite`` removes exactly these.
RUN_FILES = ("results.json", "results.md", "model_packed.npz", "metrics.jsonl", "checkpoints")
RUN_FILE_PATTERNS = ("evaluation*.json", "evaluation*.md", "*.png", ".tmp-*")


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


def _resume(ckpt: ckpt_lib.Checkpointer, state, fingerprint: str, log) -> tuple[int, Any]:
  """``(epochs done, state)`` from the newest checkpoint that passes verification (0 and ``state`` when
  there is none); newer checkpoints that failed are moved to ``checkpoints/rejected/``."""
  found = ckpt.restore_latest(state, expect_fingerprint=fingerprint, log=log)
  if found is None:
    return 0, state
  ckpt.set_aside([e for e in ckpt.epochs() if e > found.epoch])
  return found.epoch, found.state


def train_and_evaluate(cfg: ExperimentConfig, workdir: str, *, progress: bool = True,
                       overwrite: bool = False, stop_after_epochs: int | None = None,
                       devices=None, log=print, tensorboard: bool = True) -> dict[str, Any] | None:
  """Trains (resuming if possible), evaluates, and writes the run directory.

  The directory is validated first, but changed (``overwrite`` clears it, ``config.json`` is written) only
  once the configuration is validated and the data are loaded. Each epoch writes its metrics row (and its
  TensorBoard summaries, :mod:`enquant.tensorboard`) and then commits its checkpoint
  (:mod:`enquant.checkpoint`: verified on resume, the newest good one is used).

  In a multi-process job (:mod:`enquant.distributed`) every process calls this with the same arguments:
  the mesh spans the devices of all processes, each process feeds its own rows of every batch, and
  process 0 alone logs and writes files (the others evaluate too, as the sharded test pass needs them,
  but into a scratch folder).

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
    enquant.train.NonFiniteError: training diverged (NaN/inf); no results are written and the last good
      checkpoint stays.
    enquant.checkpoint.CheckpointError: no usable checkpoint to resume from.
    ValueError, FileNotFoundError: bad configuration or data.
  """
  t_start = time.time()
  main = distributed.is_main_process()
  if not main:  # process 0 speaks and writes for the whole job
    log, progress = (lambda *_: None), False
  check_workdir(cfg, workdir, overwrite=overwrite)
  run_results.eval_specs(cfg)  # bad attack names fail now, not after training
  objective = losses.make_objective(cfg.loss)
  ds = data_lib.load(cfg.dataset, cfg.data_dir, source=cfg.data_source,
                     max_train=cfg.max_train or None, max_test=cfg.max_test or None)
  if ds.num_classes != cfg.model.num_classes:
    raise ValueError(f"model has {cfg.model.num_classes} classes but {cfg.dataset} has {ds.num_classes}")
  tcfg = cfg.train
  if tcfg.batch_size > len(ds.train_images):
    raise ValueError(f"batch_size {tcfg.batch_size} exceeds the {len(ds.train_images)} training images")
  steps_per_epoch = len(ds.train_images) // tcfg.batch_size
  augment, flip = config_lib.augmentation(cfg, ds.train_images.shape[1])
  mesh = train_lib.data_mesh(devices)
  train_lib.check_batch(tcfg.batch_size, mesh)
  repl, _ = train_lib.shardings(mesh)

  model = EnResNet(cfg.model)
  tx, schedule = train_lib.make_optimizer(tcfg, cfg.quant, steps_per_epoch)
  sample = data_lib.to_float(ds.train_images[:1])
  state = train_lib.create_train_state(model, tx, jax.random.PRNGKey(tcfg.seed), sample)
  if main:
    prepare_workdir(cfg, workdir, overwrite=overwrite)  # the run starts: only now the directory changes
  distributed.barrier("enquant-workdir-ready")
  n_params = count_params(state.params)
  processes = f" in {jax.process_count()} processes" if jax.process_count() > 1 else ""
  log(f"{cfg.model.name} on {ds.name} ({ds.source}): {n_params:,} parameters "
      f"({n_params / 1e6:.2f}M), {len(ds.train_images)} train / {len(ds.test_images)} test images, "
      f"{steps_per_epoch} steps/epoch on {mesh.devices.size} device(s){processes}")

  fingerprint = ckpt_lib.fingerprint(cfg.fingerprint_dict())
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  tb_dir = os.path.join(workdir, tensorboard_lib.DIRNAME)
  if jax.process_count() > 1:  # orbax restores multi-host into the target's (global) shardings
    state = train_lib.put_replicated(state, repl)

  def relax_lambda(st) -> float | None:  # Binary-Relax's lambda, for the summaries
    if not (cfg.quant.enabled and cfg.quant.mode == "br"):
      return None
    found = [s for s in jax.tree_util.tree_leaves(
        st.opt_state, is_leaf=lambda x: isinstance(x, quant.BinaryRelaxState))
             if isinstance(s, quant.BinaryRelaxState)]
    return float(jax.device_get(found[0].lam)) if found else None

  writer = None

  def summaries():  # the TensorBoard writer, opened at the first epoch written (process 0)
    nonlocal writer
    if writer is None and main and tensorboard:
      writer = tensorboard_lib.open_writer(tb_dir, purge_step=start_epoch + 1, log=log) or False
    return writer or None

  try:
    with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
      start_epoch, state = _resume(ckpt, state, fingerprint, log)
      if start_epoch:
        log(f"resumed from {workdir}/checkpoints/{start_epoch} (epoch {start_epoch}/{tcfg.epochs})")
      if main:
        # Rows past the checkpoint (an epoch logged, not checkpointed) are dropped: the resumed run redoes
        # them, and TensorBoard hides their events (purge_step).
        rows = [r for r in files.read_jsonl(metrics_path) if r["epoch"] <= start_epoch]
        files.write_text_atomic(metrics_path, "".join(files.json_line(r) for r in rows))
        if overwrite and os.path.isdir(tb_dir):
          import shutil  # pylint: disable=g-import-not-at-top
          shutil.rmtree(tb_dir)  # the summaries of the run --overwrite replaces
      state = jax.device_put(state, repl)

      train_step = train_lib.make_train_step(model, tx, objective, augment=augment, flip=flip, mesh=mesh)
      eval_step = train_lib.make_eval_step(model, mesh)
      eval_key = jax.random.PRNGKey(cfg.eval.seed)

      def on_epoch_end(epoch, st, train_metrics):
        variables = {"params": train_lib.eval_params(st, cfg.quant), "batch_stats": st.batch_stats}
        acc = train_lib.natural_accuracy(eval_step, variables, ds.test_images, ds.test_labels,
                                         batch_size=tcfg.batch_size, key=eval_key, mesh=mesh)
        row = {"epoch": epoch + 1, "step": int(st.step), "lr": float(schedule(int(st.step) - 1)),
               "test_acc": acc, **train_metrics, **epoch_extras(st, cfg)}
        bad = files.nonfinite_key(row)
        if bad is not None:
          raise train_lib.NonFiniteError(f"non-finite {bad} ({row[bad]}) after epoch {epoch + 1}: "
                                         "training stopped")
        if main:
          files.append_jsonl(metrics_path, row)  # the row first: no checkpoint is ever without its row
          if (tb := summaries()) is not None:
            tb.epoch(row, br_lambda=relax_lambda(st))
        ckpt.save(epoch + 1, st, {"fingerprint": fingerprint})  # every process: orbax saves collectively
        log(f"epoch {epoch + 1}/{tcfg.epochs}: " + ", ".join(
            f"{k}={v:.4g}" for k, v in row.items() if k in ("train_loss", "test_acc", "m_bound",
                                                            "weight_sparsity", "epoch_seconds")))

      stop = tcfg.epochs if stop_after_epochs is None else min(tcfg.epochs, stop_after_epochs)
      try:
        state = train_lib.run_epochs(train_step, state, ds.train_images, ds.train_labels, cfg=tcfg,
                                     mesh=mesh, start_epoch=start_epoch, stop_epoch=stop,
                                     on_epoch_end=on_epoch_end, progress=progress)
      except train_lib.NonFiniteError as e:
        last = ckpt.latest_epoch()
        kept = f"the last good checkpoint (epoch {last}) is kept" if last else "no checkpoint was written"
        raise train_lib.NonFiniteError(f"{e}; no results written, {kept}; lower --lr or check the data") \
            from None
    if stop < tcfg.epochs:
      return None

    if main:
      t_eval = time.time()
      results = run_results.final_results(cfg, model, state, ds, mesh=mesh, eval_step=eval_step,
                                          progress=progress, log=log, workdir=workdir)
      # wall_seconds: this call only; train_seconds: every epoch of every call (a resumed run's too).
      results.update(config=cfg.to_dict(), model_name=cfg.model.name, num_params=n_params,
                     dataset_source=ds.source, software=software_versions(),
                     wall_seconds=time.time() - t_start, eval_seconds=time.time() - t_eval,
                     train_seconds=sum(r.get("epoch_seconds", 0.0) for r in results.get("history", [])),
                     workdir=os.path.abspath(workdir))
      if (tb := summaries()) is not None:
        tb.final(tcfg.epochs, results)
      files.write_text_atomic(os.path.join(workdir, "results.md"), run_results.markdown_row(results))
      files.write_json_atomic(os.path.join(workdir, "results.json"), results)
      files.remove_if_exists(os.path.join(workdir, "evaluation_progress.json"))  # its results are in
    else:
      # The test-set pass is sharded over every process: join it (and compute what process 0 computes),
      # writing into a scratch folder that is thrown away.
      import tempfile  # pylint: disable=g-import-not-at-top
      with tempfile.TemporaryDirectory(prefix="enquant-process-") as scratch:
        results = run_results.final_results(cfg, model, state, ds, mesh=mesh, eval_step=eval_step,
                                            progress=False, log=log, workdir=scratch)
  finally:
    if writer:
      writer.close()
  distributed.barrier("enquant-results-written")
  return results


def load_run(workdir: str, *, data_dir: str | None = None, log=print):
  """Restores a run directory's configuration, model and (evaluation) variables from its newest good
  checkpoint (checkpoints that fail verification are skipped, and ``log`` is told in one line).

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
  target = train_lib.create_train_state(model, tx, jax.random.PRNGKey(0), np.zeros(shape, np.float32))
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    found = ckpt.restore_latest(target, expect_fingerprint=ckpt_lib.fingerprint(cfg.fingerprint_dict()),
                                log=log)
  if found is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints")
  state = found.state
  variables = {"params": train_lib.eval_params(state, cfg.quant), "batch_stats": state.batch_stats}
  return cfg, model, variables, state


def epoch_extras(state, cfg: ExperimentConfig) -> dict[str, float]:
  """Per-epoch extras: the M_t bound (max over conv layers of mean|w|, float weights) over all conv kernels
  (``m_bound``) and over the 3x3 kernels only (``m_bound_3x3``: the 1x1 shortcuts left out), and, for
  quantized runs, the weight/channel sparsity of P(w)."""
  weights = jax.device_get(quant.float_weights(state.opt_state) if cfg.quant.enabled else state.params)
  extras = {"m_bound": sparsity.m_bound(weights),
            "m_bound_3x3": sparsity.m_bound(weights, sparsity.spatial_conv_mask)}
  if cfg.quant.enabled:
    report = sparsity.weight_report(jax.device_get(train_lib.eval_params(state, cfg.quant)))
    extras.update(weight_sparsity=report["total/weight_sparsity"],
                  channel_sparsity=report["total/channel_sparsity"])
  return extras
