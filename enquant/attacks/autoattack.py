"""AutoAttack in JAX: APGD-CE, APGD-T, FAB-T and Square run in sequence, per-image worst case.

An example counts as robust only if it survives every attack of the list. As in the reference
(``autoattack.py``), the attacks run in order, each only on the examples that are still robust: an
example first has to be classified correctly (one forward pass), then each attack returns, per example,
either an adversarial candidate or the clean image, and one more forward pass on that point decides
whether the example is broken; a broken example keeps that point in ``x_adv`` and is not attacked again.

Versions (the reference's ``set_version``):
  - ``"standard"``: APGD-CE (100 steps, 1 restart), APGD-T (targeted DLR towards each of the 9 classes
    with the largest logits after the top one, 100 steps each), FAB-T (9 targets, 100 iterations),
    Square (5000 queries, ``p_init = 0.8``). For deterministic models.
  - ``"rand"``: APGD-CE and APGD-DLR with EOT over 20 noise draws (for randomized defences).
  - ``"custom"``: the ``attacks`` given, by name (:data:`ATTACKS`) or as ``(name, fn)`` pairs with
    ``fn(logits_fn, x, y, *, eps, key) -> x_adv`` (the result is projected onto the eps-ball and [0, 1]).

Two entry points, one semantics, the same compiled code (one jitted step per attack, settings and
batch shape):
  - :func:`run`: one fixed-shape batch. Every attack runs on the whole batch and only the examples that
    are still robust take its result; the attacks with inner loops over targets or restarts, and
    Square, stop as soon as no still-robust example is left, so a broken batch costs nothing more.
    ``run`` is jittable and vmappable as a whole (eps may be traced).
  - :func:`evaluate`: a dataset. Between attacks the still-robust examples are gathered on the host, as
    the reference does, and attacked in fixed-size batches (the last one padded to a power of two), so
    the work of each attack is proportional to what is left. Gathering cannot happen inside a jitted
    function (data-dependent shapes); on the host it is what makes a whole test set affordable.

Randomized models are counted two ways (both reported): ``robust`` is AutoAttack's own count, where an
image is lost as soon as one noise draw misclassifies it (the clean pass, or the decision pass after any
attack), so an image misclassified on the clean pass is never robust; ``robust_rescored`` re-scores the
final ``x_adv`` (the adversarial point of a broken image, the clean image otherwise) with one fresh draw,
as :mod:`enquant.evaluate` scores each attack (a per-draw count: an image the clean pass misclassified
may be correct on the fresh draw). For deterministic models the two are equal.

Progress: :func:`evaluate` shows a tqdm bar (images per pass, robust accuracy so far) and calls an
optional ``callback`` with a :class:`Progress` after every chunk of the clean pass and of each attack;
:func:`run` calls its ``progress`` callback after the clean pass and after each attack.

Key schedule (``b`` the batch index; :func:`run` is batch 0): the clean pass uses
``fold_in(fold_in(key, 0), b)``, the re-scoring pass of the never-broken examples
``fold_in(fold_in(key, 1), b)``, and an attack ``split(fold_in(fold_in(key, stream(name)), b), 3)``
into its own key, its decision pass's and its re-scoring pass's (``stream`` a CRC of the name, so adding
an attack changes no other number).

Compared with the reference: FAB-T and Square are described in :mod:`enquant.attacks.fab` and
:mod:`enquant.attacks.square`; APGD and APGD-T are :mod:`enquant.attacks.autopgd` (its differences
are listed there).
APGD's candidate for an example it did not break is the clean image, as in the reference (matters only
for randomized models).

References:
  Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks", ICML 2020.
  Croce, Andriushchenko, Sehwag, Debenedetti, Flammarion, Chiang, Mittal & Hein, "RobustBench: a
  standardized adversarial robustness benchmark", NeurIPS 2021 Datasets and Benchmarks.
"""

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm.auto

from enquant.attacks import autoattack_settings as settings
from enquant.attacks import autopgd
from enquant.attacks import core
from enquant.attacks import fab
from enquant.attacks import square
from enquant.attacks.autoattack_settings import (ATTACKS, RAND, RAND_EOT_SAMPLES, STANDARD, VERSIONS,
                                                 AutoAttackConfig, attack_list, default_eot_samples,
                                                 describe)


class AutoAttackResult(NamedTuple):
  """Result of :func:`run` (per example unless noted).

  Attributes:
    x_adv: the point that broke each example (the clean image for examples still robust, and for those
      misclassified from the start).
    robust: AutoAttack's count: correct on the clean pass and on the decision pass after every attack.
    robust_rescored: correct on ``x_adv`` under one fresh noise draw (equals ``robust`` for
      deterministic models).
    clean: correct on the clean pass.
    accuracy: ``{"clean": acc, <attack>: robust accuracy after that attack (cumulative), ...}``.
  """

  x_adv: jax.Array
  robust: jax.Array
  robust_rescored: jax.Array
  clean: jax.Array
  accuracy: dict[str, jax.Array]


def _stream(name: str) -> int:
  """The key stream of an attack: ids 0 and 1 are the clean and re-scoring passes."""
  return core.stream_id(name, first=2, size=2**31 - 3)


def _candidate(attack, logits_fn, x, y, active, *, eps, key, config: AutoAttackConfig,
               eot_samples: int):
  """One attack on the batch: per example its adversarial candidate, or ``x`` (inactive / failed)."""
  if callable(attack):
    x_adv = attack(logits_fn, x, y, eps=eps, key=key)
    found = active
  elif attack in ("apgd-ce", "apgd-dlr"):
    x_adv, found = autopgd.apgd_restarts(
        logits_fn, x, y, active, eps=eps, key=key, loss=attack[5:], steps=config.apgd_steps,
        restarts=config.apgd_restarts, eot_samples=eot_samples, rho=config.rho)
  elif attack == "apgd-t":
    x_adv, found = autopgd.apgd_t_run(
        logits_fn, x, y, active, eps=eps, key=key, steps=config.apgd_steps,
        n_target_classes=config.n_target_classes, eot_samples=eot_samples, rho=config.rho)
  elif attack == "fab-t":
    x_adv, found = fab.fab_t_run(
        logits_fn, x, y, active, eps=eps, key=key, n_target_classes=config.n_target_classes,
        steps=config.fab_steps, alpha_max=config.fab_alpha_max, eta=config.fab_eta,
        beta=config.fab_beta)
  elif attack == "square":
    x_adv, found = square.square_attack_run(logits_fn, x, y, active, eps=eps, key=key,
                                            n_queries=config.square_queries,
                                            p_init=config.square_p_init)
  else:
    raise ValueError(f"unknown attack {attack!r}")
  x_adv = core.project_ball(x_adv, x, eps)
  return jax.lax.stop_gradient(jnp.where(core.expand(found, x), x_adv, x))


def _correct(logits_fn, x, y, key):
  return jnp.argmax(logits_fn(x, key), axis=-1) == y


_correct_jit = jax.jit(_correct)


@functools.partial(jax.jit, static_argnames=("attack", "config", "eot_samples"))
def _attack_step(logits_fn, x, y, active, eps, key, *, attack, config, eot_samples):
  """One attack on a batch: ``(candidates, correct on the decision pass, correct on a fresh re-scoring
  pass)``. Jitted once per attack, settings and shape, and shared by :func:`run` and :func:`evaluate`."""
  attack_key, eval_key, rescore_key = jax.random.split(key, 3)
  x_cand = _candidate(attack, logits_fn, x, y, active, eps=eps, key=attack_key, config=config,
                      eot_samples=eot_samples)
  return (x_cand, _correct(logits_fn, x_cand, y, eval_key),
          _correct(logits_fn, x_cand, y, rescore_key))


class Progress(NamedTuple):
  """What a progress callback receives after each chunk of work.

  Attributes:
    attack: ``"clean"`` for the clean pass, else the attack's name.
    done: images this pass has finished so far.
    total: images this pass works on (all images for the clean pass; those still robust for an attack).
    robust: images robust so far (correct on the clean pass and after every attack so far).
    n: images of the evaluation.
  """

  attack: str
  done: int
  total: int
  robust: int
  n: int


ProgressFn = Callable[[Progress], None]


def _check_shape(x, seq, name) -> None:
  if any(attack == "square" for _, attack in seq):
    core.check_images(x, name, " for Square (NHWC)")


def run(logits_fn: core.LogitsFn, x: jax.Array, y: jax.Array, *, eps, key, version: str = "standard",
        attacks: Sequence | None = None, eot_samples: int | None = None,
        config: AutoAttackConfig | None = None, progress: ProgressFn | None = None
        ) -> AutoAttackResult:
  """AutoAttack on one batch (fixed shapes; jittable): the attacks in order, per-image worst case.

  An example is robust only if it is classified correctly on the clean pass *and* survives every attack
  (AutoAttack's count): an example misclassified on the clean pass is never robust.

  Args:
    logits_fn: ``logits_fn(x, key) -> (batch, classes)`` logits, the model in inference mode (pass a
      ``jax.tree_util.Partial`` to reuse compilations across weights).
    x: images in [0, 1] with a leading batch axis (``(N, H, W, C)`` when Square runs).
    y: ``(batch,)`` int labels.
    eps: l_inf radius (may be traced).
    key: PRNG key (module docstring); required.
    version: ``"standard"``, ``"rand"`` or ``"custom"``.
    attacks: for ``"custom"``: names from :data:`ATTACKS` and/or ``(name, fn)`` pairs.
    eot_samples: EOT samples of the gradient attacks (APGD-*); default 20 for ``"rand"``, else 1.
      FAB and Square never average (the reference has no EOT for them).
    config: attack settings (default: the reference's).
    progress: called with a :class:`Progress` after the clean pass and after each attack (host-side:
      leave it ``None`` when ``run`` is traced under ``jit`` or ``vmap``).

  Returns:
    An :class:`AutoAttackResult`.

  Raises:
    ValueError: for bad arguments (one line), e.g. non-image inputs when Square runs.

  References:
    Croce & Hein, ICML 2020 (AutoAttack).
  """
  seq, eot, config = settings.resolve(version, attacks, eot_samples, config)
  core.check_inputs(x, y, eps, key, eot, name="autoattack.run")
  if key is None:
    raise ValueError("autoattack.run needs a PRNG key")
  _check_shape(x, seq, "autoattack.run")
  fn = core.as_partial(logits_fn)
  eps = jnp.asarray(eps, jnp.float32)  # one compilation for Python and array radii
  n = x.shape[0]
  clean = _correct_jit(fn, x, y, jax.random.fold_in(jax.random.fold_in(key, 0), 0))
  if progress is not None:
    progress(Progress("clean", n, n, int(jnp.sum(clean)), n))
  robust, x_adv = clean, x
  rescored = broken_any = jnp.zeros(x.shape[:1], bool)
  accuracy = {"clean": jnp.mean(clean)}
  for name, attack in seq:
    step_key = jax.random.fold_in(jax.random.fold_in(key, _stream(name)), 0)
    todo = n if progress is None else int(jnp.sum(robust))
    x_cand, ok, ok_rescore = _attack_step(fn, x, y, robust, eps, step_key, attack=attack,
                                          config=config, eot_samples=eot)
    broken = robust & ~ok
    x_adv = jnp.where(core.expand(broken, x), x_cand, x_adv)
    rescored = jnp.where(broken, ok_rescore, rescored)
    broken_any = broken_any | broken
    robust = robust & ~broken
    accuracy[name] = jnp.mean(robust)
    if progress is not None:
      progress(Progress(name, todo, todo, int(jnp.sum(robust)), n))
  fresh = _correct_jit(fn, x, y, jax.random.fold_in(jax.random.fold_in(key, 1), 0))
  rescored = jnp.where(broken_any, rescored, fresh)
  return AutoAttackResult(x_adv, robust, rescored, clean, accuracy)


# ----------------------------------------------------------------------------------------------------
# A dataset
# ----------------------------------------------------------------------------------------------------


def _check_data(images, labels) -> tuple[np.ndarray, np.ndarray]:
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim < 2 or images.shape[0] == 0:
    raise ValueError(f"images must be a non-empty batch (N, ...), got shape {images.shape}")
  if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be ({images.shape[0]},) integers, got {labels.shape} {labels.dtype}")
  if images.dtype != np.uint8:
    if not np.issubdtype(images.dtype, np.floating):
      raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
    if images.min() < 0.0 or images.max() > 1.0:
      raise ValueError("float images must lie in [0, 1]")
  return images, labels.astype(np.int32)


def _batches(indices: np.ndarray, batch_size: int):
  """``(b, idx_padded, valid)`` over ``indices``; the last batch is padded (repeating its own indices)
  to the next power of two (at most ``batch_size``), so each attack compiles for few shapes."""
  for b, start in enumerate(range(0, len(indices), batch_size)):
    chunk = indices[start:start + batch_size]
    valid = len(chunk)
    size = batch_size if valid == batch_size else min(batch_size, 1 << (valid - 1).bit_length())
    yield b, chunk[np.arange(size) % valid], valid


class _Tracker:
  """Per-example state of :func:`evaluate` on the host, and its progress reports (bar and callback)."""

  def __init__(self, images, labels, n, bar, callback):
    self.images, self.labels, self.n = images, labels, n
    self.clean = np.zeros(n, bool)
    self.robust = np.zeros(n, bool)
    self.rescored = np.zeros(n, bool)
    self.broken_any = np.zeros(n, bool)
    self.bar, self.callback = bar, callback

  def inputs(self, idx):
    return jnp.asarray(core.to_float(self.images[idx])), jnp.asarray(self.labels[idx])

  def report(self, attack, done, total, valid):
    self.bar.update(valid)
    self.bar.set_postfix({"robust": f"{self.robust.mean():.4f}"}, refresh=False)
    if self.callback is not None:
      self.callback(Progress(attack, done, total, int(self.robust.sum()), self.n))


def _clean_pass(t: _Tracker, fn, key, batch_size):
  done = 0
  for b, idx, valid in _batches(np.arange(t.n), batch_size):
    ok = _correct_jit(fn, *t.inputs(idx), jax.random.fold_in(key, b))
    t.clean[idx[:valid]] = np.asarray(ok)[:valid]
    t.robust[idx[:valid]] = t.clean[idx[:valid]]
    done += valid
    t.report("clean", done, t.n, valid)


_SEEN: set = set()  # (attack, config, eot_samples, batch shape) compiled in this process


def _announce_compile(t: _Tracker, name, attack, config, eot, shape) -> None:
  """One plain line before an attack program is first compiled in this process (it can take minutes)."""
  signature = (attack, config, eot, shape)
  if signature not in _SEEN:
    _SEEN.add(signature)
    if not t.bar.disable:
      t.bar.write(f"compiling the {name} program for batches of {shape[0]} (first use; cached "
                  "afterwards)")


def _attack_pass(t: _Tracker, fn, name, attack, *, key, eps, batch_size, config, eot):
  todo = np.flatnonzero(t.robust)
  t.bar.total += len(todo)
  t.bar.set_description(f"autoattack {name}", refresh=True)
  done = 0
  for b, idx, valid in _batches(todo, batch_size):
    x, y = t.inputs(idx)
    _announce_compile(t, name, attack, config, eot, x.shape)
    _, ok, ok_rescore = _attack_step(fn, x, y, jnp.ones(len(idx), bool), eps,
                                     jax.random.fold_in(key, b), attack=attack, config=config,
                                     eot_samples=eot)
    broken = ~np.asarray(ok)[:valid]
    hit = idx[:valid][broken]
    t.robust[hit] = False
    t.broken_any[hit] = True
    t.rescored[hit] = np.asarray(ok_rescore)[:valid][broken]
    done += valid
    t.report(name, done, len(todo), valid)


def _rescore_pass(t: _Tracker, fn, key, batch_size):
  for b, idx, valid in _batches(np.flatnonzero(~t.broken_any), batch_size):
    ok = _correct_jit(fn, *t.inputs(idx), jax.random.fold_in(key, b))
    t.rescored[idx[:valid]] = np.asarray(ok)[:valid]


def evaluate(logits_fn: core.LogitsFn, images, labels, *, eps: float, key, version: str = "standard",
             attacks: Sequence | None = None, eot_samples: int | None = None,
             config: AutoAttackConfig | None = None, batch_size: int = 256, progress: bool = True,
             callback: ProgressFn | None = None
             ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """AutoAttack over a dataset: robust accuracy after each attack and per-example masks.

  Between attacks the still-robust examples are gathered on the host and attacked in batches of
  ``batch_size`` (module docstring), like the reference's ``run_standard_evaluation``. Robust means
  correct on the clean pass and after every attack (AutoAttack's count).

  Args:
    logits_fn: ``logits_fn(x, key) -> logits``, inference mode (a ``jax.tree_util.Partial`` reuses
      compilations across weights).
    images: ``(N, ...)`` uint8 (scaled by 1/255) or float in [0, 1]; ``(N, H, W, C)`` when Square runs.
    labels: ``(N,)`` int labels.
    eps: l_inf radius.
    key: PRNG key of the evaluation (record it with the results).
    version, attacks, eot_samples, config: as :func:`run`.
    batch_size: examples per jitted call.
    progress: show a tqdm bar (one unit per image of each pass, robust accuracy so far).
    callback: called with a :class:`Progress` after every chunk of the clean pass and of each attack.

  Returns:
    ``(accuracy, masks)``: ``accuracy = {"clean": acc, <attack>: robust accuracy after it, ...,
    "autoattack": final robust accuracy (AutoAttack's count), "autoattack_rescored": one fresh draw
    on x_adv, "n": N}``; ``masks`` has the same keys as bool ``(N,)`` arrays, with ``"robust"`` and
    ``"robust_rescored"`` for the last two.

  Raises:
    ValueError: for bad arguments or data (one line).
  """
  seq, eot, config = settings.resolve(version, attacks, eot_samples, config)
  images, labels = _check_data(images, labels)
  core.check_int(batch_size, "batch_size")
  core.check_eps(eps, "autoattack.evaluate")
  if key is None:
    raise ValueError("autoattack.evaluate needs an explicit PRNG key (record it with the results)")
  _check_shape(images, seq, "autoattack.evaluate")
  fn = core.as_partial(logits_fn)
  eps = jnp.float32(eps)
  n = images.shape[0]
  masks: dict[str, np.ndarray] = {}
  bar = tqdm.auto.tqdm(total=n, desc="autoattack clean", unit="img", disable=not progress,
                       dynamic_ncols=True)
  t = _Tracker(images, labels, n, bar, callback)
  try:
    _clean_pass(t, fn, jax.random.fold_in(key, 0), batch_size)
    masks["clean"] = t.clean.copy()
    for name, attack in seq:
      _attack_pass(t, fn, name, attack, key=jax.random.fold_in(key, _stream(name)), eps=eps,
                   batch_size=batch_size, config=config, eot=eot)
      masks[name] = t.robust.copy()
    _rescore_pass(t, fn, jax.random.fold_in(key, 1), batch_size)
  finally:
    bar.close()
  masks["robust"] = t.robust
  masks["robust_rescored"] = t.rescored
  accuracy = {k: float(v.mean()) for k, v in masks.items() if k not in ("robust", "robust_rescored")}
  accuracy.update(autoattack=float(t.robust.mean()), autoattack_rescored=float(t.rescored.mean()), n=n)
  return accuracy, masks


__all__ = [
    "ATTACKS", "AutoAttackConfig", "AutoAttackResult", "Progress", "RAND", "RAND_EOT_SAMPLES",
    "STANDARD", "VERSIONS", "attack_list", "default_eot_samples", "describe", "evaluate", "run",
]
