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
from enquant import data as data_lib
from enquant import files
from enquant import losses
from enquant import train as train_lib
from enquant.config import ExperimentConfig
from enquant.models.ensemble import count_params, EnResNet


class RunExistsError(RuntimeError):
  """The run directory already holds a finished run or one of another configuration."""


def software_versions() -> dict[str, str]:
  import flax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  return {"python": platform.python_version(), "jax": jax.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "numpy": np.__version__,
          "devices": f"{jax.device_count()}x {jax.devices()[0].device_kind}"}


def prepare_workdir(cfg: ExperimentConfig, workdir: str, *, overwrite: bool = False) -> None:
  """Creates/validates the run directory and writes ``config.json``."""
  os.makedirs(workdir, exist_ok=True)
  config_path = os.path.join(workdir, "config.json")
  results_path = os.path.join(workdir, "results.json")
  if os.path.exists(results_path) and not overwrite:
    raise RunExistsError(f"{workdir} already holds a finished run (results.json); pass --overwrite "
                         "to train it again or choose another --workdir")
  if os.path.exists(config_path):
    old = ExperimentConfig.from_dict(files.read_json(config_path))
    if old.fingerprint_dict() != cfg.fingerprint_dict():
      a, b = old.fingerprint_dict(), cfg.fingerprint_dict()
      diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
      if not overwrite:
        raise RunExistsError(f"{workdir} holds a run of another configuration (differs in "
                             f"{', '.join(diff)}); choose another --workdir or pass --overwrite")
  if overwrite:
    import shutil  # pylint: disable=g-import-not-at-top
    for name in ("checkpoints", "metrics.jsonl", "results.json", "results.md"):
      path = os.path.join(workdir, name)
      if os.path.isdir(path):
        shutil.rmtree(path)
      elif os.path.exists(path):
        os.remove(path)
  files.write_text_atomic(config_path, cfg.to_json() + "\n")


def train_and_evaluate(cfg: ExperimentConfig, workdir: str, *, progress: bool = True,
                       overwrite: bool = False, stop_after_epochs: int | None = None,
                       devices=None, log=print) -> dict[str, Any] | None:
  """Trains (resuming if possible), evaluates, and writes the run directory.

  Args:
    cfg: the experiment.
    workdir: run directory.
    progress: tqdm bars.
    overwrite: allow replacing a finished run / one of another configuration.
    stop_after_epochs: stop (as if interrupted) once this many epochs are done; no results are written.
    devices: devices for data parallelism (default all local devices).
    log: where one-line progress messages go.

  Returns:
    The results dictionary (also in ``results.json``), or None when stopped early.
  """
  t_start = time.time()
  prepare_workdir(cfg, workdir, overwrite=overwrite)
  ds = data_lib.load(cfg.dataset, cfg.data_dir, source=cfg.data_source,
                     max_train=cfg.max_train or None, max_test=cfg.max_test or None)
  if ds.num_classes != cfg.model.num_classes:
    raise ValueError(f"model has {cfg.model.num_classes} classes but {cfg.dataset} has {ds.num_classes}")
  tcfg = cfg.train
  if tcfg.batch_size > len(ds.train_images):
    raise ValueError(f"batch_size {tcfg.batch_size} exceeds the {len(ds.train_images)} training images")
  steps_per_epoch = len(ds.train_images) // tcfg.batch_size
  augment = tcfg.augment if tcfg.augment is not None else ds.train_images.shape[1] == 32
  mesh = train_lib.data_mesh(devices)
  train_lib.check_batch(tcfg.batch_size, mesh)
  repl, _ = train_lib.shardings(mesh)

  model = EnResNet(cfg.model)
  tx, schedule = train_lib.make_optimizer(tcfg, cfg.quant, steps_per_epoch)
  sample = data_lib.to_float(ds.train_images[:1])
  state = train_lib.create_train_state(model, tx, jax.random.PRNGKey(tcfg.seed), sample)
  n_params = count_params(state.params)
  log(f"{cfg.model.name} on {ds.name} ({ds.source}): {n_params:,} parameters "
      f"({n_params / 1e6:.2f}M), {len(ds.train_images)} train / {len(ds.test_images)} test images, "
      f"{steps_per_epoch} steps/epoch on {mesh.devices.size} device(s)")

  fingerprint = ckpt_lib.fingerprint(cfg.fingerprint_dict())
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  start_epoch = ckpt.latest_epoch() or 0
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  if start_epoch:
    state, _ = ckpt.restore(start_epoch, state, expect_fingerprint=fingerprint)
    log(f"resumed from {workdir}/checkpoints/{start_epoch} (epoch {start_epoch}/{tcfg.epochs})")
  # Rows past the checkpoint (an epoch logged but not checkpointed) are dropped: the resumed run redoes them.
  rows = [r for r in files.read_jsonl(metrics_path) if r["epoch"] <= start_epoch]
  files.write_text_atomic(metrics_path, "".join(files.json_line(r) for r in rows))
  state = jax.device_put(state, repl)

  train_step = train_lib.make_train_step(model, tx, losses.make_objective(cfg.loss),
                                         augment=augment, mesh=mesh)
  eval_step = train_lib.make_eval_step(model, mesh)
  eval_key = jax.random.PRNGKey(cfg.eval.seed)

  def on_epoch_end(epoch, st, train_metrics):
    variables = {"params": train_lib.eval_params(st, cfg.quant), "batch_stats": st.batch_stats}
    acc = train_lib.natural_accuracy(eval_step, variables, ds.test_images, ds.test_labels,
                                     batch_size=tcfg.batch_size, key=eval_key, mesh=mesh)
    row = {"epoch": epoch + 1, "step": int(st.step), "lr": float(schedule(int(st.step) - 1)),
           "test_acc": acc, **train_metrics, **epoch_extras(st, cfg)}
    ckpt.save(epoch + 1, st, {"fingerprint": fingerprint})
    files.append_jsonl(metrics_path, row)
    log(f"epoch {epoch + 1}/{tcfg.epochs}: " + ", ".join(
        f"{k}={v:.4g}" for k, v in row.items() if k in ("train_loss", "test_acc", "m_bound",
                                                        "weight_sparsity", "epoch_seconds")))

  stop = tcfg.epochs if stop_after_epochs is None else min(tcfg.epochs, stop_after_epochs)
  state = train_lib.run_epochs(train_step, state, ds.train_images, ds.train_labels, cfg=tcfg,
                               mesh=mesh, start_epoch=start_epoch, stop_epoch=stop,
                               on_epoch_end=on_epoch_end, progress=progress)
  ckpt.close()
  if stop < tcfg.epochs:
    return None

  results = final_results(cfg, model, state, ds, mesh=mesh, eval_step=eval_step, progress=progress,
                          log=log)
  results.update(config=cfg.to_dict(), model_name=cfg.model.name, num_params=n_params,
                 dataset_source=ds.source, software=software_versions(),
                 wall_seconds=time.time() - t_start, workdir=os.path.abspath(workdir))
  files.write_json_atomic(os.path.join(workdir, "results.json"), results)
  return results


def epoch_extras(state, cfg: ExperimentConfig) -> dict[str, float]:
  """Per-epoch extra metrics (the M_t bound, sparsity) — filled in by the quantization layer."""
  del state, cfg
  return {}


def final_results(cfg, model, state, ds, *, mesh, eval_step, progress, log) -> dict[str, Any]:
  variables = {"params": train_lib.eval_params(state, cfg.quant), "batch_stats": state.batch_stats}
  acc = train_lib.natural_accuracy(eval_step, variables, ds.test_images, ds.test_labels,
                                   batch_size=cfg.train.batch_size,
                                   key=jax.random.PRNGKey(cfg.eval.seed), mesh=mesh)
  log(f"final natural test accuracy: {acc:.4f} on {len(ds.test_images)} images")
  return {"natural_accuracy": acc, "test_examples": len(ds.test_images)}
