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
attack); ``robust_rescored`` re-scores the final ``x_adv`` (the adversarial point of a broken image, the
clean image otherwise) with one fresh draw, as :mod:`enquant.evaluate` scores attacks. For deterministic
models the two are equal.

Key schedule (``b`` the batch index; :func:`run` is batch 0): the clean pass uses
``fold_in(fold_in(key, 0), b)``, the re-scoring pass of the never-broken examples
``fold_in(fold_in(key, 1), b)``, and an attack ``split(fold_in(fold_in(key, stream(name)), b), 3)``
into its own key, its decision pass's and its re-scoring pass's (``stream`` a CRC of the name, so adding
an attack changes no other number).

Compared with the reference: FAB-T and Square are described in :mod:`enquant.fab` and
:mod:`enquant.square`; APGD is :func:`enquant.attacks.apgd`'s core (its differences are listed there).
APGD's candidate for an example it did not break is the clean image, as in the reference (matters only
for randomized models).

References:
  Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks", ICML 2020.
  Croce, Andriushchenko, Sehwag, Debenedetti, Flammarion, Chiang, Mittal & Hein, "RobustBench: a
  standardized adversarial robustness benchmark", NeurIPS 2021 Datasets and Benchmarks.
"""

import dataclasses
import functools
import math
import numbers
import zlib
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm.auto

from enquant import attacks as attacks_lib
from enquant import fab
from enquant import square

LogitsFn = Callable[[jax.Array, Any], jax.Array]

# enquant-internal pieces shared with the other attack modules.
_apgd_run = attacks_lib._apgd_run  # pylint: disable=protected-access
_check_common = attacks_lib._check_common  # pylint: disable=protected-access
_project = attacks_lib._project  # pylint: disable=protected-access
_nth_largest_class = fab._nth_largest_class  # pylint: disable=protected-access
_fab_t = fab._fab_t  # pylint: disable=protected-access
_square_attack = square._square_attack  # pylint: disable=protected-access

ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
VERSIONS = ("standard", "rand", "custom")
STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
RAND = ("apgd-ce", "apgd-dlr")
RAND_EOT_SAMPLES = 20
_RESERVED = ("clean", "robust", "robust_rescored", "autoattack", "autoattack_rescored", "n")


# ----------------------------------------------------------------------------------------------------
# APGD-T
# ----------------------------------------------------------------------------------------------------


def targeted_dlr_loss(logits: jax.Array, y: jax.Array, target: jax.Array) -> jax.Array:
  """Targeted DLR loss ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)`` per example.

  ``z_pi1 >= z_pi2 >= ...`` are the sorted logits. Shift- and scale-invariant in the logits.

  Args:
    logits: ``(batch, classes)`` logits, at least 4 classes.
    y: ``(batch,)`` true labels.
    target: ``(batch,)`` target classes.

  Returns:
    ``(batch,)`` losses (maximised by the attack).

  Raises:
    ValueError: with fewer than 4 classes (``z_pi4`` does not exist).

  References:
    Croce & Hein, ICML 2020, Section 4 (targeted DLR); AutoAttack's ``dlr_loss_targeted``.
  """
  if logits.ndim != 2 or logits.shape[-1] < 4:
    raise ValueError(
        f"the targeted DLR loss needs at least 4 classes, got logits of shape {logits.shape}")
  rows = jnp.arange(logits.shape[0])
  z_sorted = jnp.sort(logits, axis=-1)
  return -(logits[rows, y] - logits[rows, target]) / (
      z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12)


def _expand(mask, x):
  return mask.reshape((-1,) + (1,) * (x.ndim - 1))


def _apgd_attack(logits_fn, x, y, active, *, eps, key, loss, steps, restarts, eot_samples, rho):
  """APGD-CE/-DLR with sequential restarts on the examples still unbroken; ``(x_adv, found)``."""

  def cond(state):
    r, _, found = state
    return (r < restarts) & jnp.any(active & ~found)

  def body(state):
    r, x_out, found = state
    s = _apgd_run(logits_fn, x, y, eps=eps, steps=steps, key=jax.random.fold_in(key, r), loss=loss,
                  eot_samples=eot_samples, rho=rho, random_start=True, unroll=False)
    success = active & ~found & s.found
    return r + 1, jnp.where(_expand(success, x), s.x_adv, x_out), found | success

  init = (jnp.asarray(0, jnp.int32), x, jnp.zeros(x.shape[:1], bool))
  _, x_out, found = jax.lax.while_loop(cond, body, init)
  return x_out, found


def _num_classes(logits_fn, x, key) -> int:
  return jax.eval_shape(logits_fn, x, key).shape[-1]


def _apgd_t(logits_fn, x, y, active, *, eps, key, steps, n_target_classes, eot_samples, rho):
  """AutoAttack's APGD-T on the ``active`` examples; ``(x_adv, found)``, ``x`` where not found."""
  num_classes = _num_classes(logits_fn, x, key)
  if num_classes < 4:
    raise ValueError(f"apgd-t needs at least 4 classes (targeted DLR), got {num_classes}")
  targets = min(n_target_classes, num_classes - 1)

  def cond(state):
    t, _, found = state
    return (t < targets) & jnp.any(active & ~found)

  def body(state):
    t, x_out, found = state
    clean_key, run_key = jax.random.split(jax.random.fold_in(key, t))
    target = _nth_largest_class(logits_fn(x, clean_key), t + 2)
    s = _apgd_run(logits_fn, x, y, eps=eps, steps=steps, key=run_key, loss="dlr",
                  eot_samples=eot_samples, rho=rho, random_start=True, unroll=False,
                  loss_fn=functools.partial(targeted_dlr_loss, target=target))
    success = active & ~found & s.found
    return t + 1, jnp.where(_expand(success, x), s.x_adv, x_out), found | success

  init = (jnp.asarray(0, jnp.int32), x, jnp.zeros(x.shape[:1], bool))
  _, x_out, found = jax.lax.while_loop(cond, body, init)
  return x_out, found


def _check_int(value, name, minimum=1) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
    raise ValueError(f"{name} must be a Python int >= {minimum}, got {value!r}")


def _check_eps(eps, name) -> None:
  if isinstance(eps, numbers.Real) and not (eps >= 0 and math.isfinite(eps)):
    raise ValueError(f"{name}: eps must be finite and >= 0, got {eps}")


def apgd_t(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, *, eps, key, steps: int = 100,
           n_target_classes: int = 9, eot_samples: int = 1, rho: float = 0.75) -> jax.Array:
  """APGD-T as in AutoAttack: APGD on the targeted DLR loss towards each of the ``n_target_classes``
  classes with the largest clean logits after the top one (one run each, random start), keeping the
  first misclassified point found.

  Examples misclassified at ``x`` are left alone. Targets: ``min(n_target_classes, classes - 1)``.

  Args:
    logits_fn: ``logits_fn(x, key) -> (batch, classes)`` logits (>= 4 classes), inference mode.
    x: images in [0, 1] with a leading batch axis.
    y: ``(batch,)`` int labels.
    eps: l_inf radius (may be traced).
    key: PRNG key (required: random starts).
    steps: APGD iterations per target (100).
    n_target_classes: number of targets (9).
    eot_samples: noise draws each gradient is averaged over (EOT).
    rho: APGD's step-size condition threshold.

  Returns:
    The adversarial images (``x`` where the attack failed), gradient stopped.

  References:
    Croce & Hein, ICML 2020 (APGD-T).
  """
  _check_common(x, y, eps, key, eot_samples, True, name="apgd_t")
  _check_int(steps, "apgd_t: steps")
  _check_int(n_target_classes, "apgd_t: n_target_classes")
  clean_key, run_key = jax.random.split(key)
  active = jnp.argmax(logits_fn(x, clean_key), axis=-1) == y
  x_adv, _ = _apgd_t(logits_fn, x, y, active, eps=eps, key=run_key, steps=steps,
                     n_target_classes=n_target_classes, eot_samples=eot_samples, rho=rho)
  return jax.lax.stop_gradient(x_adv)


# ----------------------------------------------------------------------------------------------------
# The ensemble
# ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AutoAttackConfig:
  """Settings of the attacks (defaults: the reference's standard version).

  Attributes:
    apgd_steps: APGD iterations (APGD-CE, APGD-DLR, and per target of APGD-T).
    apgd_restarts: sequential restarts of APGD-CE/-DLR on the examples still unbroken (1 in the
      standard and rand versions; APGD-T runs once per target, as in the reference).
    rho: APGD's step-size condition threshold.
    n_target_classes: targets of APGD-T and FAB-T.
    fab_steps: FAB iterations per target.
    fab_alpha_max, fab_eta, fab_beta: FAB's step parameters.
    square_queries: Square's query budget (after the first query).
    square_p_init: Square's initial window fraction.
  """

  apgd_steps: int = 100
  apgd_restarts: int = 1
  rho: float = 0.75
  n_target_classes: int = 9
  fab_steps: int = fab.STEPS
  fab_alpha_max: float = fab.ALPHA_MAX
  fab_eta: float = fab.ETA
  fab_beta: float = fab.BETA
  square_queries: int = square.N_QUERIES
  square_p_init: float = square.P_INIT

  def __post_init__(self):
    for name in ("apgd_steps", "apgd_restarts", "n_target_classes", "fab_steps"):
      _check_int(getattr(self, name), f"AutoAttackConfig.{name}")
    _check_int(self.square_queries, "AutoAttackConfig.square_queries", minimum=0)
    if not 0.0 < self.rho <= 1.0:
      raise ValueError(f"AutoAttackConfig.rho must be in (0, 1], got {self.rho}")
    if not 0.0 < self.square_p_init <= 1.0:
      raise ValueError(f"AutoAttackConfig.square_p_init must be in (0, 1], got {self.square_p_init}")
    if not (0.0 <= self.fab_alpha_max <= 1.0 and 0.0 <= self.fab_beta <= 1.0 and self.fab_eta >= 1.0):
      raise ValueError("AutoAttackConfig: need 0 <= fab_alpha_max <= 1, 0 <= fab_beta <= 1, "
                       f"fab_eta >= 1; got {self.fab_alpha_max}, {self.fab_beta}, {self.fab_eta}")

  def to_dict(self) -> dict[str, Any]:
    """The settings as a JSON-ready dict."""
    return dataclasses.asdict(self)


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


def attack_list(version: str = "standard", attacks: Sequence | None = None
                ) -> tuple[tuple[str, str | Callable], ...]:
  """The attacks of a version, as ``((name, kind_or_fn), ...)`` in order.

  Args:
    version: ``"standard"``, ``"rand"`` or ``"custom"``.
    attacks: for ``"custom"`` only: names from :data:`ATTACKS` and/or ``(name, fn)`` pairs.

  Raises:
    ValueError: for an unknown version or attack, duplicates, or ``attacks`` with another version
      (as the reference, which would silently override them).
  """
  if version not in VERSIONS:
    raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
  if version != "custom":
    if attacks is not None:
      raise ValueError(f"attacks are set by version={version!r}; use version='custom' to choose them")
    return tuple((n, n) for n in (STANDARD if version == "standard" else RAND))
  if attacks is None or isinstance(attacks, str) or len(attacks) == 0:
    raise ValueError(f"version='custom' needs a non-empty sequence of attacks, got {attacks!r}")
  out = []
  for entry in attacks:
    if isinstance(entry, str):
      if entry not in ATTACKS:
        raise ValueError(f"unknown attack {entry!r}; expected one of {ATTACKS} or a (name, fn) pair")
      out.append((entry, entry))
    elif (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], str) and entry[0]
          and callable(entry[1])):
      out.append(entry)
    else:
      raise ValueError(f"an attack is a name from {ATTACKS} or a (name, fn) pair, got {entry!r}")
  names = [n for n, _ in out]
  bad = sorted({n for n in names if names.count(n) > 1 or n in _RESERVED})
  if bad:
    raise ValueError(f"attack names must be unique and not one of {_RESERVED}: {bad}")
  return tuple(out)


def default_eot_samples(version: str) -> int:
  """EOT samples of a version's gradient attacks: 20 for ``"rand"``, else 1."""
  return RAND_EOT_SAMPLES if version == "rand" else 1


def _stream(name: str) -> int:
  """A stable 31-bit id (>= 2) of an attack name: its key stream."""
  return zlib.crc32(name.encode()) % (2**31 - 3) + 2


def _candidate(attack, logits_fn, x, y, active, *, eps, key, config: AutoAttackConfig,
               eot_samples: int):
  """One attack on the batch: per example its adversarial candidate, or ``x`` (inactive / failed)."""
  if callable(attack):
    x_adv = attack(logits_fn, x, y, eps=eps, key=key)
    found = active
  elif attack in ("apgd-ce", "apgd-dlr"):
    x_adv, found = _apgd_attack(logits_fn, x, y, active, eps=eps, key=key, loss=attack[5:],
                                steps=config.apgd_steps, restarts=config.apgd_restarts,
                                eot_samples=eot_samples, rho=config.rho)
  elif attack == "apgd-t":
    x_adv, found = _apgd_t(logits_fn, x, y, active, eps=eps, key=key, steps=config.apgd_steps,
                           n_target_classes=config.n_target_classes, eot_samples=eot_samples,
                           rho=config.rho)
  elif attack == "fab-t":
    x_adv, found = _fab_t(logits_fn, x, y, active, eps=eps, key=key,
                          n_target_classes=config.n_target_classes, steps=config.fab_steps,
                          alpha_max=config.fab_alpha_max, eta=config.fab_eta, beta=config.fab_beta)
  elif attack == "square":
    x_adv, found = _square_attack(logits_fn, x, y, active, eps=eps, key=key,
                                  n_queries=config.square_queries, p_init=config.square_p_init)
  else:
    raise ValueError(f"unknown attack {attack!r}")
  x_adv = _project(x_adv, x, eps)
  return jax.lax.stop_gradient(jnp.where(_expand(found, x), x_adv, x))


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


def _as_partial(fn) -> jax.tree_util.Partial:
  if isinstance(fn, jax.tree_util.Partial):
    return fn
  if not callable(fn):
    raise ValueError(f"logits_fn must be callable, got {type(fn).__name__}")
  return jax.tree_util.Partial(fn)


def _resolve(version, attacks, eot_samples, config):
  seq = attack_list(version, attacks)
  eot = default_eot_samples(version) if eot_samples is None else eot_samples
  _check_int(eot, "eot_samples")
  config = AutoAttackConfig() if config is None else config
  if not isinstance(config, AutoAttackConfig):
    raise ValueError(f"config must be an AutoAttackConfig, got {type(config).__name__}")
  return seq, eot, config


def run(logits_fn: LogitsFn, x: jax.Array, y: jax.Array, *, eps, key, version: str = "standard",
        attacks: Sequence | None = None, eot_samples: int | None = None,
        config: AutoAttackConfig | None = None) -> AutoAttackResult:
  """AutoAttack on one batch (fixed shapes; jittable): the attacks in order, per-image worst case.

  Args:
    logits_fn: ``logits_fn(x, key) -> (batch, classes)`` logits, the model in inference mode (pass a
      ``jax.tree_util.Partial`` to reuse compilations across weights).
    x: images in [0, 1] with a leading batch axis (NHWC for Square).
    y: ``(batch,)`` int labels.
    eps: l_inf radius (may be traced).
    key: PRNG key (module docstring); required.
    version: ``"standard"``, ``"rand"`` or ``"custom"``.
    attacks: for ``"custom"``: names from :data:`ATTACKS` and/or ``(name, fn)`` pairs.
    eot_samples: EOT samples of the gradient attacks (APGD-*); default 20 for ``"rand"``, else 1.
      FAB and Square never average (the reference has no EOT for them).
    config: attack settings (default: the reference's).

  Returns:
    An :class:`AutoAttackResult`.

  Raises:
    ValueError: for bad arguments.

  References:
    Croce & Hein, ICML 2020 (AutoAttack).
  """
  seq, eot, config = _resolve(version, attacks, eot_samples, config)
  _check_common(x, y, eps, key, eot, name="autoattack.run")
  if key is None:
    raise ValueError("autoattack.run needs a PRNG key")
  fn = _as_partial(logits_fn)
  eps = jnp.asarray(eps, jnp.float32)  # one compilation for Python and array radii
  clean = _correct_jit(fn, x, y, jax.random.fold_in(jax.random.fold_in(key, 0), 0))
  robust, x_adv = clean, x
  rescored = broken_any = jnp.zeros(x.shape[:1], bool)
  accuracy = {"clean": jnp.mean(clean)}
  for name, attack in seq:
    step_key = jax.random.fold_in(jax.random.fold_in(key, _stream(name)), 0)
    x_cand, ok, ok_rescore = _attack_step(fn, x, y, robust, eps, step_key, attack=attack,
                                          config=config, eot_samples=eot)
    broken = robust & ~ok
    x_adv = jnp.where(_expand(broken, x), x_cand, x_adv)
    rescored = jnp.where(broken, ok_rescore, rescored)
    broken_any = broken_any | broken
    robust = robust & ~broken
    accuracy[name] = jnp.mean(robust)
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


def _to_float(batch: np.ndarray) -> np.ndarray:
  if batch.dtype == np.uint8:
    return batch.astype(np.float32) / np.float32(255.0)
  return batch.astype(np.float32)


def _batches(indices: np.ndarray, batch_size: int):
  """``(b, idx_padded, valid)`` over ``indices``; the last batch is padded (repeating its own indices)
  to the next power of two (at most ``batch_size``), so each attack compiles for few shapes."""
  for b, start in enumerate(range(0, len(indices), batch_size)):
    chunk = indices[start:start + batch_size]
    valid = len(chunk)
    size = batch_size if valid == batch_size else min(batch_size, 1 << (valid - 1).bit_length())
    yield b, chunk[np.arange(size) % valid], valid


def evaluate(logits_fn: LogitsFn, images, labels, *, eps: float, key, version: str = "standard",
             attacks: Sequence | None = None, eot_samples: int | None = None,
             config: AutoAttackConfig | None = None, batch_size: int = 256, progress: bool = True
             ) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """AutoAttack over a dataset: robust accuracy after each attack and per-example masks.

  Between attacks the still-robust examples are gathered on the host and attacked in batches of
  ``batch_size`` (module docstring), like the reference's ``run_standard_evaluation``.

  Args:
    logits_fn: ``logits_fn(x, key) -> logits``, inference mode (a ``jax.tree_util.Partial`` reuses
      compilations across weights).
    images: ``(N, ...)`` uint8 (scaled by 1/255) or float in [0, 1].
    labels: ``(N,)`` int labels.
    eps: l_inf radius.
    key: PRNG key of the evaluation (record it with the results).
    version, attacks, eot_samples, config: as :func:`run`.
    batch_size: examples per jitted call.
    progress: show a tqdm bar (one unit per attacked image).

  Returns:
    ``(accuracy, masks)``: ``accuracy = {"clean": acc, <attack>: robust accuracy after it, ...,
    "autoattack": final robust accuracy (AutoAttack's count), "autoattack_rescored": one fresh draw
    on x_adv, "n": N}``; ``masks`` has the same keys as bool ``(N,)`` arrays, with ``"robust"`` and
    ``"robust_rescored"`` for the last two.

  Raises:
    ValueError: for bad arguments or data.
  """
  seq, eot, config = _resolve(version, attacks, eot_samples, config)
  images, labels = _check_data(images, labels)
  _check_int(batch_size, "batch_size")
  _check_eps(eps, "autoattack.evaluate")
  if key is None:
    raise ValueError("autoattack.evaluate needs an explicit PRNG key (record it with the results)")
  fn = _as_partial(logits_fn)
  eps = jnp.float32(eps)
  n = images.shape[0]
  clean = np.zeros(n, bool)
  rescored = np.zeros(n, bool)
  broken_any = np.zeros(n, bool)
  masks: dict[str, np.ndarray] = {}

  def inputs(idx):
    return jnp.asarray(_to_float(images[idx])), jnp.asarray(labels[idx])

  bar = tqdm.auto.tqdm(total=n, desc="autoattack clean", unit="img", disable=not progress,
                       dynamic_ncols=True)
  try:
    clean_key = jax.random.fold_in(key, 0)
    for b, idx, valid in _batches(np.arange(n), batch_size):
      ok = _correct_jit(fn, *inputs(idx), jax.random.fold_in(clean_key, b))
      clean[idx[:valid]] = np.asarray(ok)[:valid]
      bar.update(valid)
    masks["clean"] = clean.copy()
    robust = clean.copy()
    for name, attack in seq:
      todo = np.flatnonzero(robust)
      bar.total += len(todo)
      bar.set_description(f"autoattack {name}", refresh=True)
      stream_key = jax.random.fold_in(key, _stream(name))
      for b, idx, valid in _batches(todo, batch_size):
        x, y = inputs(idx)
        _, ok, ok_rescore = _attack_step(fn, x, y, jnp.ones(len(idx), bool), eps,
                                         jax.random.fold_in(stream_key, b), attack=attack,
                                         config=config, eot_samples=eot)
        broken = ~np.asarray(ok)[:valid]
        hit = idx[:valid][broken]
        robust[hit] = False
        broken_any[hit] = True
        rescored[hit] = np.asarray(ok_rescore)[:valid][broken]
        bar.update(valid)
        bar.set_postfix({"robust": f"{robust.mean():.4f}"}, refresh=False)
      masks[name] = robust.copy()
    rescore_key = jax.random.fold_in(key, 1)
    for b, idx, valid in _batches(np.flatnonzero(~broken_any), batch_size):
      ok = _correct_jit(fn, *inputs(idx), jax.random.fold_in(rescore_key, b))
      rescored[idx[:valid]] = np.asarray(ok)[:valid]
  finally:
    bar.close()
  masks["robust"] = robust
  masks["robust_rescored"] = rescored
  accuracy = {k: float(v.mean()) for k, v in masks.items() if k not in ("robust", "robust_rescored")}
  accuracy.update(autoattack=float(robust.mean()), autoattack_rescored=float(rescored.mean()), n=n)
  return accuracy, masks


def describe(version: str = "standard", attacks: Sequence | None = None,
             eot_samples: int | None = None, config: AutoAttackConfig | None = None
             ) -> dict[str, Any]:
  """The settings of a run as a JSON-ready dict (for results files)."""
  seq, eot, config = _resolve(version, attacks, eot_samples, config)
  return {"version": version, "attacks": [name for name, _ in seq], "eot_samples": eot,
          "config": config.to_dict()}


__all__ = [
    "ATTACKS", "AutoAttackConfig", "AutoAttackResult", "RAND", "STANDARD", "VERSIONS", "apgd_t",
    "attack_list", "default_eot_samples", "describe", "evaluate", "run", "targeted_dlr_loss",
]
