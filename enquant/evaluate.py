"""Natural and robust accuracy over a dataset for a list of attack specs; black-box transfer.

Works on any ``logits_fn(x, key) -> logits`` (the model in inference mode: BatchNorm with running
statistics). Attack settings are data (:class:`AttackSpec`), built from short names by
:func:`parse_attacks` or taken from the paper's presets (:func:`paper_specs`).

Reproducibility: batch ``b`` uses ``batch_key = fold_in(key, b)``; the natural pass uses
``fold_in(batch_key, 0)``; a spec uses ``spec_key = fold_in(batch_key, stream(spec.name))``, a stable
hash of its name (so adding or reordering specs changes no other number); restart ``r`` uses
``fold_in(spec_key, r)``, split into the attack's key and the key of the final forward pass. The same
``key`` gives the same numbers for randomized models (EnResNet's noise); record it next to the results.

Compilation: one compiled program per attack structure (:mod:`enquant.evalprograms`: kind, steps, random
start, EOT count, unrolling), shared by every spec of that structure: eps, step size, kappa and APGD's
loss are float32 data, so ``pgd20`` and ``A2``, one attack at several eps, or ``apgd-ce`` and
``apgd-dlr`` compile once; kind ``"none"`` runs the natural pass's program. Each is compiled once per
shape: the last partial batch is padded (by repeating its own examples, so batch-wide statistics such as
the noise's std stay close to those of real data) and the padding is masked out. With ``progress`` a
plain line announces each program's first compile. Attack loops of at most ``max_unroll`` steps are
unrolled (see :mod:`enquant.attacks` for the speed/compile-time trade-off). ``logits_fn`` is hashed by
identity; pass ``jax.tree_util.Partial(apply_fn, variables)`` to let the variables be traced arguments,
so evaluating new weights of the same model reuses the compiled functions.

Counting (:data:`COUNTING`): a spec's accuracy counts the images correct on its adversarial images, as
the paper's tables do; the per-image :func:`worst_case` and :func:`robustbench_entry` count an image
robust only if it is also correct on the clean image, as RobustBench and AutoAttack do.

Progress: the bar counts attacked images and moves inside each compiled call with the attack's steps
(only while JAX's persistent compilation cache is off: :func:`enquant.evalprograms.in_call_ticks`;
with it on, as the entry points set it, the bar moves after every call, so the programs are cached);
``progress_fn`` receives an :class:`EvalProgress` (images done, correct, robust so far) after every
finished (batch, attack) unit.

Resuming: with ``resume_path``, every finished (batch, attack) unit's per-image results are written
atomically to that JSON file, under a fingerprint of everything that sets a number (the images and
labels, the key, batch size, specs, loop settings, and the arrays held by the ``Partial`` logits
functions). A later call with the same fingerprint skips the finished units; keys are derived per unit,
so the resumed numbers equal those of an uninterrupted call. A file with another fingerprint is ignored
and overwritten.
"""

import sys
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm.auto

from enquant import attacks
from enquant.attacks import core
from enquant import evalfiles
from enquant import evalprograms as programs
# The specs live in enquant.attackspecs and are re-exported here.
from enquant.attackspecs import (  # pylint: disable=unused-import
    APGD_STEPS, AttackSpec, CW_KAPPA, CW_STEPS, KINDS, PAPER_EPS, PAPER_PGD_STEPS, PAPER_STEP,
    RESERVED_NAMES as _RESERVED, paper_specs, paper_step_size, parse_attacks)

LogitsFn = attacks.LogitsFn

# Attack loops up to this many steps are unrolled by evaluate; 0 (the default) rolls every loop. With
# enquant's layout-friendly convolution gradient (enquant.models.conv) rolled loops run as fast as
# unrolled ones on XLA:CPU and compile in seconds (BUILD_NOTES.md), so unrolling only costs compile time.
MAX_UNROLL = 0


def craft(spec: AttackSpec, logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key, *,
          max_unroll: int = MAX_UNROLL) -> jax.Array:
  """Runs the attack ``spec`` on ``logits_fn`` (jittable; returns ``x`` for kind ``"none"``).

  The attack loop is fully unrolled when ``spec.steps <= max_unroll`` (faster on XLA:CPU, compile time
  grows with the steps) and rolled otherwise; see :mod:`enquant.attacks`. The spec's eps, step size and
  kappa enter as float32 data (:mod:`enquant.evalprograms`): one compiled program serves every spec of
  the same structure.
  """
  if spec.kind == "apgd-dlr":
    programs.check_classes(spec, jax.eval_shape(logits_fn, x, key).shape[-1])
  return programs.craft_program(programs.program_of(spec, max_unroll), programs.constants_of(spec),
                                logits_fn, x, y, key)


def _spec_correct(craft_fn, eval_fn, x, y, key, constants, *, program: programs.Program):
  """One (batch, spec, restart) unit: the shared compiled program of ``program`` (kind none: the
  natural pass's program on the final pass's key)."""
  if program.kind == "none":
    return programs.natural_correct(eval_fn, x, y, jax.random.split(key)[1])
  return programs.attack_correct(craft_fn, eval_fn, x, y, key, constants, program=program)


def _check_data(images, labels) -> tuple[np.ndarray, np.ndarray]:
  images = np.asarray(images)
  labels = np.asarray(labels)
  if images.ndim < 2 or images.shape[0] == 0:
    raise ValueError(f"images must be a non-empty batch (N, ...), got shape {images.shape}")
  if labels.shape != images.shape[:1]:
    raise ValueError(f"labels must have shape ({images.shape[0]},), got {labels.shape}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  if images.dtype == np.uint8:
    return images, labels.astype(np.int32)
  if not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
  lo, hi = float(images.min()), float(images.max())
  if lo < 0.0 or hi > 1.0:
    raise ValueError(f"float images must lie in [0, 1], got range [{lo}, {hi}]")
  return images, labels.astype(np.int32)


def _check_run(specs, batch_size, key, max_unroll, progress_fn) -> tuple[AttackSpec, ...]:
  specs = tuple(specs)
  for spec in specs:
    if not isinstance(spec, AttackSpec):
      raise ValueError(f"specs must be AttackSpec instances (see parse_attacks), got {spec!r}")
  names = [spec.name for spec in specs]
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise ValueError(f"duplicate attack names {duplicates}")
  if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
    raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
  if key is None:
    raise ValueError("evaluate needs an explicit PRNG key (record it with the results)")
  if not isinstance(max_unroll, int) or isinstance(max_unroll, bool) or max_unroll < 0:
    raise ValueError(f"max_unroll must be an int >= 0, got {max_unroll!r}")
  if progress_fn is not None and not callable(progress_fn):
    raise ValueError(f"progress_fn must be callable, got {type(progress_fn).__name__}")
  return specs


class EvalProgress(NamedTuple):
  """What the ``progress_fn`` of :func:`evaluate` receives after every finished (batch, attack) unit.

  Attributes:
    attack: the spec's name, or ``"natural"`` for the clean pass.
    batch: index of the batch (chunk) just finished.
    batches: number of batches.
    images_done: images this attack has finished (every restart), of ``images`` in all.
    images: images of the evaluation.
    correct: images this attack left correctly classified so far (the paper's per-attack counting).
    robust: images so far correct on the clean image and under every attack finished on them (the
      worst-case counting, :data:`COUNTING`).
  """

  attack: str
  batch: int
  batches: int
  images_done: int
  images: int
  correct: int
  robust: int


class _Progress:
  """The tqdm bar (moving inside compiled calls with :class:`enquant.evalprograms.Ticker`), compile
  notices, and the ``progress_fn`` events with the per-image robust-so-far mask."""

  def __init__(self, masks, n_batches, total, *, desc, progress, ticks, progress_fn):
    self.masks, self.n_batches, self.progress_fn = masks, n_batches, progress_fn
    self.robust = masks["natural"].copy()  # filled by the natural pass first, then narrowed
    self.bar = tqdm.auto.tqdm(total=total, desc=desc, unit="img", disable=not progress,
                              dynamic_ncols=True)
    self.progress = progress
    self.ticker = programs.Ticker(self._move) if ticks else None
    self.base = self.size = 0

  def notice(self, sig: tuple, program: programs.Program) -> None:
    """One plain line before the first compile of a program (with the bar on)."""
    if programs.first_use(sig) and self.progress:
      self.bar.write(f"compiling the {program.label} program (first use; cached afterwards)",
                     file=sys.stderr)

  def _move(self, fraction: float) -> None:
    target = self.base + int(fraction * self.size)
    if target > self.bar.n:
      self.bar.update(target - self.bar.n)

  def run(self, unit_program: programs.Program, size: int, fn, *args, **kwargs) -> np.ndarray:
    """One compiled call over ``size`` real images; the bar moves with the crafting model's passes."""
    self.base, self.size = self.bar.n, size
    if self.ticker is not None:
      self.ticker.begin(unit_program)
    completed = False
    try:
      out = np.asarray(fn(*args, **kwargs))
      completed = True
    finally:
      if self.ticker is not None:
        self.ticker.end(unit_program, completed)
    self.bar.update(self.base + size - self.bar.n)
    return out

  def finished(self, name: str, b: int, start: int, valid: int) -> None:
    end = start + valid
    if name == "natural":
      self.robust[start:end] = self.masks["natural"][start:end]
    else:
      self.robust[start:end] &= self.masks[name][start:end]
    self.bar.set_postfix(robust=f"{self.robust[:end].sum()}/{end}", refresh=False)
    if self.progress_fn is not None:
      self.progress_fn(EvalProgress(name, b, self.n_batches, end, self.masks["natural"].shape[0],
                                    int(self.masks[name][:end].sum()), int(self.robust[:end].sum())))


def _unit(track, craft_fn, eval_fn, x, y, key, spec: AttackSpec, valid: int, max_unroll: int):
  """The mask of one (batch, spec, restart) unit, through :func:`_spec_correct`."""
  program = programs.program_of(spec, max_unroll)
  constants = programs.constants_of(spec)
  if program.kind == "none":
    track.notice(programs.signature(program, eval_fn, x, y, key), program)
  else:
    track.notice(programs.signature(program, (craft_fn, eval_fn), x, y, key, constants), program)
  ok = track.run(program, valid, _spec_correct, craft_fn, eval_fn, x, y, key, constants,
                 program=program)
  return ok[:valid]


def _check_classes(specs, logits_fn, x, key) -> None:
  """Refuses specs the model's class count cannot run (APGD-DLR needs 3), before any compile."""
  if any(spec.kind == "apgd-dlr" for spec in specs):
    num_classes = jax.eval_shape(logits_fn, x, key).shape[-1]
    for spec in specs:
      programs.check_classes(spec, num_classes)


def _fingerprint(images, labels, specs, key, craft_fn, eval_fn, **settings) -> str:
  """The resume file's key: everything that sets a number, the weights held by the Partials included."""
  settings.update(specs=[s.to_dict() for s in specs],
                  fns=[str(jax.tree_util.tree_structure(f)) for f in (craft_fn, eval_fn)])
  arrays = [images, labels, key, *jax.tree_util.tree_leaves((craft_fn, eval_fn))]
  return evalfiles.fingerprint(settings, arrays)


def _run(craft_fn, eval_fn, images, labels, specs, *, batch_size, key, progress, max_unroll, desc,
         resume_path=None, progress_fn=None):
  """The evaluation loop; returns ``(accuracies, per-example correctness)``."""
  images, labels = _check_data(images, labels)
  specs = _check_run(specs, batch_size, key, max_unroll, progress_fn)
  craft_fn, eval_fn = core.as_partial(craft_fn), core.as_partial(eval_fn)
  n = images.shape[0]
  batch = min(batch_size, n)
  n_batches = -(-n // batch)
  masks = {"natural": np.zeros(n, bool), **{spec.name: np.zeros(n, bool) for spec in specs}}
  fingerprint = "" if resume_path is None else _fingerprint(
      images, labels, specs, key, craft_fn, eval_fn, desc=desc, batch=batch, max_unroll=max_unroll)
  done_units = evalfiles.load_progress(resume_path, fingerprint, masks)

  def finished(unit):
    done_units.add(unit)
    if resume_path is not None:
      evalfiles.save_progress(resume_path, fingerprint, masks, done_units)
  # The bar counts attacked images (one unit per image, attack and restart) and moves inside every
  # compiled call with the attack's steps (evalprograms.Ticker) unless the persistent cache is on.
  ticks = progress and programs.in_call_ticks()
  track = _Progress(masks, n_batches, n * (1 + sum(spec.restarts for spec in specs)), desc=desc,
                    progress=progress, ticks=ticks, progress_fn=progress_fn)
  _check_classes(specs, craft_fn, jnp.asarray(core.to_float(images[:1])), key)
  crafting = programs.ticking(craft_fn) if ticks else craft_fn
  natural = programs.Program("none")
  try:
    for b in range(n_batches):
      start = b * batch
      valid = min(batch, n - start)
      idx = start + np.arange(batch) % valid  # pad the last batch with its own examples
      x = jnp.asarray(core.to_float(images[idx]))
      y = jnp.asarray(labels[idx])
      batch_key = jax.random.fold_in(key, b)
      if f"{b}/natural" not in done_units:
        natural_key = jax.random.fold_in(batch_key, 0)
        track.notice(programs.signature(natural, eval_fn, x, y, natural_key), natural)
        ok = track.run(natural, valid, programs.natural_correct, eval_fn, x, y, natural_key)
        masks["natural"][start:start + valid] = ok[:valid]
        finished(f"{b}/natural")
      else:
        track.bar.update(valid)
      track.finished("natural", b, start, valid)
      for spec in specs:
        if f"{b}/{spec.name}" in done_units:
          track.bar.update(valid * spec.restarts)
        else:
          spec_key = jax.random.fold_in(batch_key, core.stream_id(spec.name))
          robust = np.ones(valid, bool)
          for r in range(spec.restarts):
            track.bar.set_description(f"{desc} {spec.name}" + (
                f" r{r + 1}/{spec.restarts}" if spec.restarts > 1 else ""), refresh=False)
            robust &= _unit(track, crafting, eval_fn, x, y, jax.random.fold_in(spec_key, r), spec,
                            valid, max_unroll)
          masks[spec.name][start:start + valid] = robust
          finished(f"{b}/{spec.name}")
        track.finished(spec.name, b, start, valid)
  finally:
    track.bar.close()
  return {**{k: float(v.mean()) for k, v in masks.items()}, "n": n}, masks


# How each number of an evaluation counts an image (recorded next to the numbers).
COUNTING = {
    "natural": "correct on the clean image",
    "per_attack": "correct on the adversarial image of every restart, clean correctness not required "
                  "(the paper's counting)",
    "worst_case": "correct on the clean image and under every attack (RobustBench/AutoAttack counting)",
}


def worst_case(masks: Mapping[str, np.ndarray], names: Sequence[str] | None = None, *,
               clean: bool = True) -> np.ndarray:
  """Per-image worst case: an image is robust only if it is correct under every attack in ``names``
  (default: every attack of ``masks``, i.e. all keys but ``"natural"`` and ``"n"``) and, with ``clean``
  (the default, as RobustBench and AutoAttack count), also correct on the clean image
  (``masks["natural"]``); ``clean=False`` intersects the attacks only."""
  names = [k for k in masks if k not in _RESERVED] if names is None else list(names)
  if not names:
    raise ValueError("worst_case needs at least one attack")
  out = np.ones_like(np.asarray(masks[names[0]], bool))
  if clean:
    if "natural" not in masks:
      raise ValueError("worst_case(clean=True) needs masks['natural'] (the clean pass); "
                       "pass clean=False to intersect the attacks only")
    out &= np.asarray(masks["natural"], bool)
  for name in names:
    out &= np.asarray(masks[name], bool)
  return out


def evaluate(logits_fn: LogitsFn, images, labels, specs: Sequence[AttackSpec], *, batch_size: int,
             key, progress: bool = True, max_unroll: int = MAX_UNROLL, return_masks: bool = False,
             resume_path: str | None = None,
             progress_fn: Callable[[EvalProgress], Any] | None = None):
  """Natural accuracy and white-box robust accuracy of ``logits_fn`` for each spec, over a dataset.

  Robust accuracy of a spec is the fraction of examples classified correctly on the adversarial image
  of every restart (the final forward pass draws its own noise key). It is not intersected with
  natural correctness, as in the paper's tables (:data:`COUNTING` ``"per_attack"``); the per-image
  :func:`worst_case` is (``"worst_case"``).

  Args:
    logits_fn: ``logits_fn(x, key) -> logits`` in inference mode (a ``jax.tree_util.Partial`` avoids
      recompiling for new weights; see the module docstring).
    images: ``(N, ...)`` uint8 (scaled by 1/255) or float in [0, 1], numpy or jax.
    labels: ``(N,)`` int labels.
    specs: the attacks (:func:`parse_attacks`, :func:`paper_specs`); names must be unique.
    batch_size: examples per jitted call (the last batch is padded and masked).
    key: PRNG key of the whole evaluation (module docstring: derived per batch, spec and restart).
    progress: show a tqdm progress bar (moving with the attack steps inside every batch) and one line
      before each program's first compile.
    max_unroll: attacks with at most this many steps run fully unrolled (compile time grows with the
      steps), longer ones rolled; 0 (default) rolls every loop.
    return_masks: also return the per-example correctness (``{"natural": bool[N], <spec.name>:
      bool[N], ...}``), e.g. for the per-image worst case over attacks (:func:`worst_case`).
    resume_path: a JSON file that records finished (batch, attack) units and resumes from them
      (module docstring, "Resuming").
    progress_fn: called with an :class:`EvalProgress` after every finished (batch, attack) unit, the
      natural pass included (e.g. a notebook's own display).

  Returns:
    ``{"natural": acc, <spec.name>: acc, ..., "n": N}`` (and the masks when ``return_masks``).

  Raises:
    ValueError: for malformed data, specs, batch size or a missing key.
  """
  acc, masks = _run(logits_fn, logits_fn, images, labels, specs, batch_size=batch_size, key=key,
                     progress=progress, max_unroll=max_unroll, desc="evaluate", resume_path=resume_path,
                     progress_fn=progress_fn)
  return (acc, masks) if return_masks else acc


def transfer(oracle_logits_fn: LogitsFn, target_logits_fn: LogitsFn, images, labels,
             specs: Sequence[AttackSpec], *, batch_size: int, key, progress: bool = True,
             max_unroll: int = MAX_UNROLL, return_masks: bool = False, resume_path: str | None = None,
             progress_fn: Callable[[EvalProgress], Any] | None = None):
  """Black-box transfer: adversarial examples crafted on the oracle, accuracy of the target.

  The paper's Table III. Keys are derived exactly as in :func:`evaluate`, so with
  ``oracle == target`` the numbers equal the white-box evaluation.

  Returns:
    ``{"natural": target's clean accuracy, <spec.name>: target's accuracy on the oracle's adversarial
    examples, ..., "n": N}``.
  """
  acc, masks = _run(oracle_logits_fn, target_logits_fn, images, labels, specs, batch_size=batch_size,
                     key=key, progress=progress, max_unroll=max_unroll, desc="transfer",
                     resume_path=resume_path, progress_fn=progress_fn)
  return (acc, masks) if return_masks else acc


def robustbench_entry(result: Mapping[str, float], spec_name: str, *, threat_model: str = "Linf",
                      eps: float, masks: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
  """A RobustBench-style entry (``clean_acc``, ``robust_acc``, ``threat_model``, ``eps``, ``counting``).

  RobustBench counts an image robust only if it is correct on the clean image and under the attack.
  With ``masks`` (:func:`evaluate`'s ``return_masks``) ``robust_acc`` is counted so from them; without,
  ``result[spec_name]`` must already be counted so (e.g. the mean of :func:`worst_case`), and a value
  above ``clean_acc`` (the paper's per-attack counting) is refused.

  Args:
    result: the dict returned by :func:`evaluate` (plus e.g. ``worst_case``).
    spec_name: the attack whose accuracy is the robust accuracy (e.g. ``"worst_case"``).
    threat_model: ``"Linf"``, ``"L2"`` or ``"corruptions"``.
    eps: the perturbation radius of that attack.
    masks: per-image correctness holding ``"natural"`` and ``spec_name``.
  """
  if spec_name not in result or spec_name in _RESERVED:
    attacks_found = sorted(k for k in result if k not in _RESERVED)
    raise ValueError(f"no attack named {spec_name!r} in the result; it has {attacks_found}")
  if threat_model not in ("Linf", "L2", "corruptions"):
    raise ValueError(f"threat_model must be 'Linf', 'L2' or 'corruptions', got {threat_model!r}")
  clean = float(result["natural"])
  if masks is not None:
    robust = float(worst_case(masks, [spec_name]).mean())
  else:
    robust = float(result[spec_name])
    if robust > clean:
      raise ValueError(f"robust accuracy {robust} of {spec_name!r} exceeds the clean accuracy {clean}: "
                       "it counts images misclassified when clean; pass masks= (or the worst_case)")
  return {"clean_acc": clean, "robust_acc": robust, "threat_model": threat_model, "eps": float(eps),
          "counting": COUNTING["worst_case"]}


__all__ = [
    "AttackSpec", "COUNTING", "EvalProgress", "KINDS", "PAPER_EPS", "craft", "evaluate", "paper_specs",
    "paper_step_size", "parse_attacks", "robustbench_entry", "transfer", "worst_case",
]
