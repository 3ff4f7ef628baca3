"""Train state, the jitted data-parallel train step and the epoch loop.

Data parallelism uses ``jax.jit`` with a one-axis :class:`jax.sharding.Mesh` over all devices (of every
process in a multi-host job, :mod:`enquant.distributed`): the batch is sharded along ``"data"``, the state is
replicated, and XLA inserts the gradient all-reduce. Unlike ``pmap`` this keeps *global* semantics:
BatchNorm statistics and EnResNet's noise std are computed over the whole batch exactly as on one device (so
the 2-device step equals the 1-device step, and 2 processes equal 1 process with 2 devices), the same code
runs on 1 or N devices (CPU, GPU, TPU) without ``pmean`` plumbing, and the state needs no per-device copies.
Every process computes the same batch indices; each one gathers only the rows its own devices hold
(:func:`process_rows`, :func:`put_batch`).
"""

from collections.abc import Callable
import functools
import time
from typing import Any, NamedTuple

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from enquant import data as data_lib
from enquant import quant
from enquant import sparsity
from enquant.config import QuantConfig, TrainConfig
from enquant.models.ensemble import EnResNet


class TrainState(NamedTuple):
  """Everything a step needs; one pytree (checkpointed whole).

  Attributes:
    step: number of optimizer steps done (int32).
    params: the weights the model runs with (the relaxed weights u under Binary-Relax).
    batch_stats: BatchNorm running statistics.
    opt_state: optimizer state (holds the float weights w under Binary-Relax).
    key: the run's root PRNG key; step ``t`` uses ``fold_in(key, t)``.
  """

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  key: jax.Array


def learning_rate_schedule(cfg: TrainConfig, steps_per_epoch: int) -> optax.Schedule:
  total = cfg.epochs * steps_per_epoch
  if cfg.lr_schedule == "cosine":
    return optax.cosine_decay_schedule(cfg.lr, total)
  if cfg.lr_schedule == "constant":
    return optax.constant_schedule(cfg.lr)
  # Fractions of all steps: epochs 80/120/160 of 200 exactly, and still inside a 1-epoch run.
  boundaries = {int(round(m * cfg.epochs * steps_per_epoch)): cfg.lr_decay for m in cfg.milestones}
  return optax.piecewise_constant_schedule(cfg.lr, boundaries)


def projection_for(qcfg: QuantConfig) -> Callable:
  """Per-member projection onto the quantized set (stacked ensemble parameters)."""
  return quant.per_member(quant.make_projection(qcfg.bits, ternary_method=qcfg.ternary_method,
                                                mbit_method=qcfg.mbit_method))


def make_optimizer(cfg: TrainConfig, qcfg: QuantConfig, steps_per_epoch: int):
  """SGD (Nesterov) + weight decay, wrapped by Binary-Relax / Binary-Connect when quantizing.

  Returns:
    ``(tx, schedule)``.
  """
  schedule = learning_rate_schedule(cfg, steps_per_epoch)
  inner = optax.chain(
      optax.add_decayed_weights(cfg.weight_decay),
      optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.momentum > 0),
  )
  if not qcfg.enabled:
    return inner, schedule
  projection = projection_for(qcfg)
  if qcfg.mode == "bc":
    return quant.binary_connect(inner, projection), schedule
  relax_steps = int(round(qcfg.relax_fraction * cfg.epochs * steps_per_epoch))
  growth_every = max(1, int(round(qcfg.growth_every_epochs * steps_per_epoch)))
  tx = quant.binary_relax(inner, projection, lambda0=qcfg.lambda0, growth=qcfg.growth,
                          growth_every=growth_every, relax_steps=relax_steps)
  return tx, schedule


def create_train_state(model: EnResNet, tx: optax.GradientTransformation, key: jax.Array,
                       sample_x: jax.Array) -> TrainState:
  init_key, run_key = jax.random.split(key)
  variables = model.init(init_key, sample_x)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables["batch_stats"], opt_state=tx.init(params), key=run_key)


def data_mesh(devices=None) -> Mesh:
  """A one-axis ("data") mesh over ``devices``.

  Args:
    devices: the devices to shard batches over; default every device of every process
      (``jax.devices()``; on one process these are the local devices). In a multi-process job the default
      is ordered by (process, id), so each process's devices hold consecutive rows of a batch.
  """
  if devices is None:
    devices = jax.devices()
    if jax.process_count() > 1:
      devices = sorted(devices, key=lambda d: (d.process_index, d.id))
  return Mesh(np.array(list(devices)), ("data",))


def shardings(mesh: Mesh) -> tuple[NamedSharding, NamedSharding]:
  """``(replicated, batch-sharded)`` shardings of ``mesh``."""
  return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


def check_batch(batch_size: int, mesh: Mesh) -> None:
  """Raises ValueError unless ``batch_size`` splits evenly over the mesh's devices (of all processes)."""
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"batch_size {batch_size} must be divisible by the number of devices ({n})")


def process_rows(mesh: Mesh, batch_size: int) -> slice:
  """The rows of a global batch of ``batch_size`` that this process's devices hold.

  ``slice(0, batch_size)`` on a single process; in a multi-process job, process p's consecutive share.

  Raises:
    ValueError: this process's devices do not hold consecutive rows (a mesh not built by
      :func:`data_mesh`).
  """
  _, batch = shardings(mesh)
  spans = sorted(index[0].indices(batch_size)[:2]
                 for index in batch.addressable_devices_indices_map((batch_size,)).values())
  lo, hi = spans[0][0], spans[-1][1]
  if sum(b - a for a, b in spans) != hi - lo:
    raise ValueError("this process's devices do not hold consecutive rows of the batch; build the mesh "
                     "with enquant.train.data_mesh()")
  return slice(lo, hi)


def put_batch(local: np.ndarray, sharding: NamedSharding, batch_size: int) -> jax.Array:
  """This process's rows of a global batch (:func:`process_rows`) as the global batch-sharded array.

  On a single process this is ``jax.device_put(local, sharding)``; in a multi-process job
  ``jax.make_array_from_process_local_data``: no process ever holds another process's rows.
  """
  if sharding.is_fully_addressable:
    return jax.device_put(local, sharding)
  return jax.make_array_from_process_local_data(sharding, local, (batch_size,) + local.shape[1:])


def put_replicated(tree, sharding: NamedSharding):
  """``tree`` (the same values on every process) replicated on the devices of ``sharding``.

  On a single process this is ``jax.device_put``. In a multi-process job each process places its own
  copy (``jax.make_array_from_process_local_data``): ``jax.device_put`` would first check, leaf by leaf,
  that all processes hold equal values, one cross-process all-gather (and one compilation) per shape.
  """
  if sharding.is_fully_addressable:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)),
                      jax.device_get(tree))


def make_train_step(model: EnResNet, tx: optax.GradientTransformation, objective, *,
                    augment: bool, mesh: Mesh, flip: bool = True):
  """The jitted data-parallel step ``(state, images_uint8, labels) -> (state, metrics)``.

  Args:
    model: the ensemble.
    tx: the optimizer (possibly Binary-Relax-wrapped: gradients are taken at the params u, the update moves
      the float weights w inside the optimizer state, and the params become exactly the new u).
    objective: ``(perturb, loss)`` from :func:`enquant.losses.make_objective`.
    augment: pad-4 random crop (+ horizontal flip when ``flip``) on the device.
    mesh: devices to shard the batch over.
    flip: random horizontal flips with the crop (off for SVHN's digits).
  """
  perturb, loss_fn = objective
  repl, batch = shardings(mesh)

  def step(state: TrainState, images, labels):
    key = jax.random.fold_in(state.key, state.step)
    k_aug, k_adv, k_fwd = jax.random.split(key, 3)
    x = data_lib.to_float(images)
    if augment:
      x = data_lib.augment(k_aug, x, flip=flip)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    x_adv, batch_stats = None, state.batch_stats
    if perturb is not None:  # BatchNorm statistics change only when the attack runs in train mode
      x_adv, batch_stats = perturb(model, variables, x, labels, k_adv)

    def objective_at(params):
      return loss_fn(model, params, batch_stats, x, x_adv, labels, k_fwd)

    (_, (batch_stats, metrics)), grads = jax.value_and_grad(objective_at, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = quant.snap_params(optax.apply_updates(state.params, updates), opt_state)
    new_state = TrainState(step=state.step + 1, params=params, batch_stats=batch_stats,
                           opt_state=opt_state, key=state.key)
    return new_state, dict(metrics, **finite_flags(new_state))

  return jax.jit(step, in_shardings=(repl, batch, batch), out_shardings=(repl, repl),
                 donate_argnums=(0,))


def eval_params(state: TrainState, qcfg: QuantConfig):
  """The weights to evaluate/export: P(w) of the float weights for quantized runs, else the params."""
  if not qcfg.enabled:
    return state.params
  return _quantized_params(state.opt_state, qcfg)


@functools.partial(jax.jit, static_argnames="qcfg")
def _quantized_params(opt_state, qcfg: QuantConfig):
  return quant.quantized(opt_state, projection_for(qcfg))


def make_eval_step(model: EnResNet, mesh: Mesh):
  """Jitted ``(variables, images_uint8, labels, mask, key) -> number correct`` (inference mode)."""
  repl, batch = shardings(mesh)

  def count(variables, images, labels, mask, key):
    logits = model.apply(variables, data_lib.to_float(images), key, train=False)
    return jnp.sum((jnp.argmax(logits, -1) == labels) * mask)

  return jax.jit(count, in_shardings=(repl, batch, batch, batch, repl), out_shardings=repl)


def natural_accuracy(eval_step, variables, images: np.ndarray, labels: np.ndarray, *,
                     batch_size: int, key: jax.Array, mesh: Mesh) -> float:
  """Accuracy over all of ``images`` (last batch padded and masked: one compilation)."""
  repl, batch = shardings(mesh)
  rows = process_rows(mesh, batch_size)
  key = key if repl.is_fully_addressable else put_replicated(key, repl)
  correct = 0
  n = len(images)
  for i, start in enumerate(range(0, n, batch_size)):
    idx = np.arange(start, start + batch_size)
    mask = idx < n
    idx = np.minimum(idx, n - 1)
    put = lambda a: put_batch(a[rows], batch, batch_size)
    correct += int(eval_step(variables, put(images[idx]), put(labels[idx]),
                             put(mask.astype(np.int32)), jax.random.fold_in(key, i)))
  return correct / n


FINITE_PREFIX = "finite/"
_FINITE_PARTS = {"params": "parameters", "batch_stats": "BatchNorm statistics",
                 "opt_state": "optimizer state"}


class Interrupted(KeyboardInterrupt):
  """Ctrl-C, saying where the run stood (``where``: "at epoch 2, step 11/40"); the same call resumes."""

  def __init__(self, where: str):
    super().__init__(where)
    self.where = where


class NonFiniteError(FloatingPointError):
  """Training produced NaN or infinity (a loss, a metric, the parameters or the optimizer state)."""


def finite_flags(state: TrainState) -> dict[str, jax.Array]:
  """``{"finite/<part>": bool}`` for the float leaves of the state's parameters, BN statistics and
  optimizer state; computed inside the jitted step so the check costs no extra device round trip."""
  flags = {}
  for part in _FINITE_PARTS:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(getattr(state, part))
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    flags[FINITE_PREFIX + part] = jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)
  return flags


def nonfinite_quantity(metrics: dict) -> str | None:
  """What is not finite in a step's host metrics (a loss or metric by name, or a state part), or None."""
  for k, v in metrics.items():
    if k.startswith(FINITE_PREFIX):
      if not bool(v):
        return _FINITE_PARTS.get(k[len(FINITE_PREFIX):], k)
    elif not np.all(np.isfinite(v)):
      return f"{k} ({float(np.ravel(v)[0])})"
  return None


def run_epochs(train_step, state: TrainState, images: np.ndarray, labels: np.ndarray, *,
               cfg: TrainConfig, mesh: Mesh, start_epoch: int, stop_epoch: int,
               on_epoch_end: Callable[[int, TrainState, dict], None] | None = None,
               progress: bool = True) -> TrainState:
  """Trains epochs ``start_epoch .. stop_epoch - 1``.

  Batches come from :func:`enquant.data.epoch_batches` seeded by ``(cfg.seed, epoch)`` and the step keys from
  the state, so a run resumed from the checkpoint of epoch k continues exactly as if never stopped.
  ``on_epoch_end(epoch, state, train_metrics)`` runs after each epoch (evaluation, logging, checkpoint).

  Every process computes the same batch indices and gathers only its own rows (:func:`process_rows`).
  Every step's metrics (which come back to the host anyway) are checked, with the step's finiteness flags
  (:func:`finite_flags`): the first NaN or infinity stops training.

  Raises:
    Interrupted: Ctrl-C (KeyboardInterrupt) during an epoch, naming the epoch and the step.
    NonFiniteError: a loss/metric, the parameters, the BN statistics or the optimizer state became NaN or
      infinite; the message names the epoch, the step and the quantity. ``on_epoch_end`` is not called for
      that epoch.
  """
  check_batch(cfg.batch_size, mesh)
  _, batch = shardings(mesh)
  rows = process_rows(mesh, cfg.batch_size)  # all rows on one process; this process's share on many
  for epoch in range(start_epoch, stop_epoch):
    step = 0
    try:
      order = data_lib.epoch_batches(len(images), cfg.batch_size, seed=cfg.seed, epoch=epoch)
      sums: dict[str, float] = {}
      t0 = time.perf_counter()
      bar = tqdm.tqdm(order, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress,
                      leave=False, dynamic_ncols=True)
      for i, idx in enumerate(bar):
        step = i + 1
        mine = idx[rows]
        state, metrics = train_step(state, put_batch(images[mine], batch, cfg.batch_size),
                                    put_batch(labels[mine], batch, cfg.batch_size))
        metrics = jax.device_get(metrics)
        bad = nonfinite_quantity(metrics)
        if bad is not None:
          bar.close()
          raise NonFiniteError(f"non-finite {bad} at epoch {epoch + 1}, step {i + 1} of {len(order)} "
                               f"(global step {epoch * len(order) + i + 1}): training stopped")
        for k, v in metrics.items():
          if not k.startswith(FINITE_PREFIX):
            sums[k] = sums.get(k, 0.0) + float(v)
        if progress and (i % 10 == 0 or i == len(order) - 1):
          bar.set_postfix({k: f"{v / (i + 1):.3f}" for k, v in sums.items()
                           if k in ("loss", "nat_acc", "adv_acc")})
      bar.close()
      elapsed = time.perf_counter() - t0
      train_metrics = {f"train_{k}": v / len(order) for k, v in sums.items()}
      train_metrics.update(epoch_seconds=elapsed, images_per_second=len(order) * cfg.batch_size / elapsed)
      if on_epoch_end is not None:
        on_epoch_end(epoch, state, train_metrics)
    except KeyboardInterrupt as e:
      if isinstance(e, Interrupted):
        raise
      raise Interrupted(f"at epoch {epoch + 1}, step {step}") from None
  return state


def relax_lambda(state: TrainState, qcfg: QuantConfig) -> float | None:
  """Binary-Relax's lambda in ``state`` (None for other runs), for the summaries."""
  if not (qcfg.enabled and qcfg.mode == "br"):
    return None
  found = [s for s in jax.tree_util.tree_leaves(
      state.opt_state, is_leaf=lambda x: isinstance(x, quant.BinaryRelaxState))
           if isinstance(s, quant.BinaryRelaxState)]
  return float(jax.device_get(found[0].lam)) if found else None


def epoch_extras(state: TrainState, qcfg: QuantConfig) -> dict[str, float]:
  """Per-epoch extras: the M_t bound (max over conv layers of mean|w|, float weights) over all conv kernels
  (``m_bound``) and over the 3x3 kernels only (``m_bound_3x3``: the 1x1 shortcuts left out), and, for
  quantized runs, the weight/channel sparsity of P(w)."""
  weights = jax.device_get(quant.float_weights(state.opt_state) if qcfg.enabled else state.params)
  extras = {"m_bound": sparsity.m_bound(weights),
            "m_bound_3x3": sparsity.m_bound(weights, sparsity.spatial_conv_mask)}
  if qcfg.enabled:
    report = sparsity.weight_report(jax.device_get(eval_params(state, qcfg)))
    extras.update(weight_sparsity=report["total/weight_sparsity"],
                  channel_sparsity=report["total/channel_sparsity"])
  return extras
