"""Natural and robust accuracy over a dataset for a list of attack specs; black-box transfer.

Works on any ``logits_fn(x, key) -> logits`` (the model in inference mode: BatchNorm with running
statistics). Attack settings are data (:class:`AttackSpec`), built from short names by
:func:`parse_attacks` or taken from the paper's presets (:func:`paper_specs`).

Reproducibility: batch ``b`` uses ``batch_key = fold_in(key, b)``; the natural pass uses
``fold_in(batch_key, 0)``; a spec uses ``spec_key = fold_in(batch_key, stream(spec.name))``, a stable
hash of its name (so adding or reordering specs changes no other number); restart ``r`` uses
``fold_in(spec_key, r)``, split into the attack's key and the key of the final forward pass. The same
``key`` gives the same numbers for randomized models (EnResNet's noise); record it next to the results.

Compilation: one jitted function per spec (and one for the natural pass), compiled once per shape: the
last partial batch is padded (by repeating its own examples, so batch-wide statistics such as the
noise's std stay close to those of real data) and the padding is masked out. Attack loops of at most
``max_unroll`` steps are unrolled (see :mod:`enquant.attacks` for the speed/compile-time trade-off).
``logits_fn`` is hashed by identity; pass ``jax.tree_util.Partial(apply_fn, variables)`` to let the
variables be traced arguments, so evaluating new weights of the same model reuses the compiled
functions.

Resuming: with ``resume_path``, every finished (batch, attack) unit's per-image results are written
atomically to that JSON file, under a fingerprint of everything that sets a number (the images and
labels, the key, batch size, specs, loop settings, and the arrays held by the ``Partial`` logits
functions). A later call with the same fingerprint skips the finished units; keys are derived per unit,
so the resumed numbers equal those of an uninterrupted call. A file with another fingerprint is ignored
and overwritten.
"""

import dataclasses
import functools
import re
import zlib
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm.auto

from enquant import attacks, evalfiles

LogitsFn = attacks.LogitsFn

KINDS = ("none", "fgsm", "pgd", "cw", "apgd-ce", "apgd-dlr")

# The paper's CIFAR-10 setting (docs/DESIGN.md §3): eps 0.031 (~8/255), IFGSM step 0.003, 20 steps.
PAPER_EPS = attacks.PAPER_EPS
PAPER_STEP = 0.003
PAPER_PGD_STEPS = 20
CW_STEPS = 50
CW_KAPPA = 50.0
APGD_STEPS = 100
# Attack loops up to this many steps are unrolled by evaluate; 0 (the default) rolls every loop. With
# enquant's layout-friendly convolution gradient (enquant.models.conv) rolled loops run as fast as
# unrolled ones on XLA:CPU and compile in seconds (BUILD_NOTES.md), so unrolling only costs compile time.
MAX_UNROLL = 0

_RESERVED = ("natural", "n")


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """One attack configuration of an evaluation.

  Attributes:
    name: key of its accuracy in the results (unique within an evaluation).
    kind: one of ``"none"`` (the clean images, one more noise draw), ``"fgsm"``, ``"pgd"`` (IFGSM, CE),
      ``"cw"`` (CW margin under l_inf PGD), ``"apgd-ce"``, ``"apgd-dlr"``.
    eps: l_inf radius.
    step_size: sign-gradient step (pgd, cw; unused by fgsm, apgd, none).
    steps: iterations (pgd, cw, apgd).
    random_start: start from a random point of the eps-ball.
    restarts: independent runs (fresh keys); an example is robust only if it survives all of them.
    eot_samples: noise keys each gradient is averaged over (EOT; 1 = none).
    kappa: CW confidence (cw only).
  """

  name: str
  kind: str
  eps: float = 0.0
  step_size: float = 0.0
  steps: int = 0
  random_start: bool = False
  restarts: int = 1
  eot_samples: int = 1
  kappa: float = 0.0

  def __post_init__(self):
    for field in ("eps", "step_size", "kappa"):  # plain floats: hashable (a jit static) and JSON-ready
      value = getattr(self, field)
      if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, bool):
        raise ValueError(f"AttackSpec {self.name!r}: {field} must be a number, got {value!r}")
      object.__setattr__(self, field, float(value))
    if not isinstance(self.name, str) or not self.name:
      raise ValueError(f"AttackSpec name must be a non-empty string, got {self.name!r}")
    if self.name in _RESERVED:
      raise ValueError(f"AttackSpec name {self.name!r} is reserved (results hold {_RESERVED})")
    if self.kind not in KINDS:
      raise ValueError(f"AttackSpec {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
    if not self.eps >= 0:
      raise ValueError(f"AttackSpec {self.name!r}: eps must be >= 0, got {self.eps}")
    if self.kind in ("pgd", "cw") and not self.step_size > 0:
      raise ValueError(f"AttackSpec {self.name!r}: step_size must be > 0, got {self.step_size}")
    if self.kind in ("pgd", "cw", "apgd-ce", "apgd-dlr") and not (
        isinstance(self.steps, int) and self.steps >= 1):
      raise ValueError(f"AttackSpec {self.name!r}: steps must be an int >= 1, got {self.steps!r}")
    if not (isinstance(self.restarts, int) and self.restarts >= 1):
      raise ValueError(
          f"AttackSpec {self.name!r}: restarts must be an int >= 1, got {self.restarts!r}")
    if not (isinstance(self.eot_samples, int) and self.eot_samples >= 1):
      raise ValueError(
          f"AttackSpec {self.name!r}: eot_samples must be an int >= 1, got {self.eot_samples!r}")
    if not self.kappa >= 0:
      raise ValueError(f"AttackSpec {self.name!r}: kappa must be >= 0, got {self.kappa}")

  def to_dict(self) -> dict[str, Any]:
    """The settings as a JSON-ready dict."""
    return dataclasses.asdict(self)


def paper_step_size(eps: float) -> float:
  """The paper's IFGSM step 0.003 at eps 0.031, scaled proportionally for another eps."""
  return eps * PAPER_STEP / PAPER_EPS


def paper_specs(eps: float = PAPER_EPS, *, eot_samples: int = 1,
                step_size: float | None = None) -> tuple[AttackSpec, AttackSpec, AttackSpec]:
  """The paper's attacks A1 (FGSM), A2 (IFGSM-20) and A3 (CW-l_inf, 50 steps) at ``eps``.

  A2: 20 steps of ``step_size`` (default :func:`paper_step_size`: 0.003 at eps 0.031), no random
  start, as in the EnResNet evaluation code. A3: the same step and no random start (so A2 and A3
  differ only in loss and step count; 50 x 0.003 covers the ball ~5 times), margin loss with
  kappa = 50 (Madry et al.'s CW-l_inf: keeps pushing past the decision boundary, which matters for
  randomized models whose prediction is re-drawn at evaluation). The EnResNet code's own "C&W" was an
  L2 Adam attack rescaled to eps, not a bounded l_inf attack (docs/DESIGN.md §3); this is the l_inf one.

  Args:
    eps: l_inf radius (0.031 ~ 8/255 for CIFAR/SVHN in the paper).
    eot_samples: EOT samples per gradient; > 1 appends ``-eot{K}`` to the names.
    step_size: overrides the scaled paper step for A2 and A3.

  Returns:
    The three specs, named ``A1``, ``A2``, ``A3`` (plus the EOT suffix).
  """
  step = paper_step_size(eps) if step_size is None else step_size
  suffix = f"-eot{eot_samples}" if eot_samples > 1 else ""
  return (
      AttackSpec(f"A1{suffix}", "fgsm", eps=eps, eot_samples=eot_samples),
      AttackSpec(f"A2{suffix}", "pgd", eps=eps, step_size=step, steps=PAPER_PGD_STEPS,
                 eot_samples=eot_samples),
      AttackSpec(f"A3{suffix}", "cw", eps=eps, step_size=step, steps=CW_STEPS, kappa=CW_KAPPA,
                 eot_samples=eot_samples),
  )


_NAME_RE = re.compile(
    r"^(?P<base>none|fgsm|pgd(?P<pgd>\d+)|cw(?P<cw>\d+)|apgd-(?P<aloss>ce|dlr)(?P<asteps>\d+)?"
    r"|a(?P<preset>[123]))(?P<mods>(?:-(?:eot\d+|r\d+|rs))*)$")


def parse_attacks(names: str | Sequence[str], *, eps: float, step_size: float | None = None,
                  kappa: float = CW_KAPPA, apgd_steps: int = APGD_STEPS) -> tuple[AttackSpec, ...]:
  """Turns short attack names into specs.

  Grammar: ``BASE(-MOD)*``, comma separated, case-insensitive.
    BASE: ``none``; ``fgsm``; ``pgd<N>`` (IFGSM, N steps, no random start); ``cw<N>`` (CW-l_inf, N
      steps, confidence ``kappa``); ``apgd-ce[<N>]``, ``apgd-dlr[<N>]`` (``apgd_steps`` by default,
      random start); ``a1``/``a2``/``a3`` (the paper's presets, :func:`paper_specs`).
    MOD: ``eot<K>`` (EOT over K noise keys), ``r<R>`` (R restarts, random start), ``rs`` (random
      start).
  Example: ``"fgsm,pgd20,cw50,pgd20-eot10,pgd100-r5,apgd-ce,apgd-dlr-eot20"``.

  Args:
    names: comma-separated names or a sequence of names.
    eps: l_inf radius of every attack.
    step_size: step of pgd/cw attacks; default :func:`paper_step_size` (eps * 0.003 / 0.031).
    kappa: CW confidence of ``cw<N>``.
    apgd_steps: iterations of ``apgd-*`` without an explicit count.

  Returns:
    The specs, in order; names are the lower-cased entries (presets upper-case: ``A2-eot10``).

  Raises:
    ValueError: naming an unknown or duplicated entry.
  """
  if isinstance(names, str):
    names = names.split(",")
  step = paper_step_size(eps) if step_size is None else step_size
  specs = []
  for raw in names:
    entry = raw.strip().lower()
    if not entry:
      continue
    m = _NAME_RE.match(entry)
    if m is None:
      raise ValueError(
          f"unknown attack {raw.strip()!r}: expected none, fgsm, pgd<N>, cw<N>, apgd-ce[<N>], "
          "apgd-dlr[<N>] or a1/a2/a3, optionally followed by -eot<K>, -r<R>, -rs")
    options: dict[str, Any] = {}
    for mod in m.group("mods").split("-")[1:]:
      if mod == "rs":
        options["random_start"] = True
      elif mod.startswith("eot"):
        options["eot_samples"] = int(mod[3:])
      else:
        options["restarts"] = int(mod[1:])
        options["random_start"] = True
    base = m.group("base")
    if m.group("preset"):
      preset = paper_specs(eps, step_size=step_size)[int(m.group("preset")) - 1]
      spec = dataclasses.replace(preset, name="A" + entry[1:], **options)
    elif base == "none":
      spec = AttackSpec(entry, "none", eps=eps, **options)
    elif base == "fgsm":
      spec = AttackSpec(entry, "fgsm", eps=eps, **options)
    elif m.group("pgd"):
      spec = AttackSpec(entry, "pgd", eps=eps, step_size=step, steps=int(m.group("pgd")), **options)
    elif m.group("cw"):
      spec = AttackSpec(entry, "cw", eps=eps, step_size=step, steps=int(m.group("cw")), kappa=kappa,
                        **options)
    else:
      steps = int(m.group("asteps")) if m.group("asteps") else apgd_steps
      options.setdefault("random_start", True)
      spec = AttackSpec(entry, "apgd-" + m.group("aloss"), eps=eps, steps=steps, **options)
    if any(s.name == spec.name for s in specs):
      raise ValueError(f"attack {raw.strip()!r} is listed twice")
    specs.append(spec)
  return tuple(specs)


def craft(spec: AttackSpec, logits_fn: LogitsFn, x: jax.Array, y: jax.Array, key, *,
          max_unroll: int = MAX_UNROLL) -> jax.Array:
  """Runs the attack ``spec`` on ``logits_fn`` (jittable; returns ``x`` for kind ``"none"``).

  The attack loop is fully unrolled when ``spec.steps <= max_unroll`` (faster on XLA:CPU, compile time
  grows with the steps) and rolled otherwise; see :mod:`enquant.attacks`.
  """
  common = dict(eps=spec.eps, key=key, eot_samples=spec.eot_samples,
                unroll=spec.steps <= max_unroll)
  if spec.kind == "none":
    return x
  if spec.kind == "fgsm":
    del common["unroll"]
    return attacks.fgsm(logits_fn, x, y, **common)
  if spec.kind == "pgd":
    return attacks.pgd(logits_fn, x, y, step_size=spec.step_size, steps=spec.steps,
                       random_start=spec.random_start, **common)
  if spec.kind == "cw":
    return attacks.cw_linf(logits_fn, x, y, step_size=spec.step_size, steps=spec.steps,
                           kappa=spec.kappa, random_start=spec.random_start, **common)
  return attacks.apgd(logits_fn, x, y, steps=spec.steps, loss=spec.kind[len("apgd-"):],
                      random_start=spec.random_start, **common)


@jax.jit
def _natural_correct(eval_fn, x, y, key):
  return jnp.argmax(eval_fn(x, key), axis=-1) == y


@functools.partial(jax.jit, static_argnames=("spec", "max_unroll"))
def _spec_correct(craft_fn, eval_fn, x, y, key, *, spec: AttackSpec, max_unroll: int):
  attack_key, eval_key = jax.random.split(key)
  x_adv = craft(spec, craft_fn, x, y, attack_key, max_unroll=max_unroll)
  return jnp.argmax(eval_fn(x_adv, eval_key), axis=-1) == y


def _as_partial(fn: LogitsFn) -> jax.tree_util.Partial:
  if isinstance(fn, jax.tree_util.Partial):
    return fn
  if not callable(fn):
    raise ValueError(f"logits_fn must be callable, got {type(fn).__name__}")
  return jax.tree_util.Partial(fn)


def _stream(name: str) -> int:
  """A stable nonzero 31-bit id of a spec name (its key stream)."""
  return zlib.crc32(name.encode()) % (2**31 - 1) + 1


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


def _to_float(batch: np.ndarray) -> np.ndarray:
  if batch.dtype == np.uint8:
    return batch.astype(np.float32) / np.float32(255.0)
  return batch.astype(np.float32)


def _run(craft_fn, eval_fn, images, labels, specs, *, batch_size, key, progress, max_unroll, desc,
         resume_path=None):
  """The evaluation loop; returns ``(accuracies, per-example correctness)``."""
  images, labels = _check_data(images, labels)
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
  craft_fn, eval_fn = _as_partial(craft_fn), _as_partial(eval_fn)

  n = images.shape[0]
  batch = min(batch_size, n)
  n_batches = -(-n // batch)
  masks = {"natural": np.zeros(n, bool), **{name: np.zeros(n, bool) for name in names}}
  fingerprint = ""
  if resume_path is not None:  # everything that sets a number, the weights held by the Partials included
    settings = {"desc": desc, "batch": batch, "max_unroll": max_unroll, "specs": [s.to_dict() for s in specs],
                "fns": [str(jax.tree_util.tree_structure(f)) for f in (craft_fn, eval_fn)]}
    fingerprint = evalfiles.fingerprint(
        settings, [images, labels, key, *jax.tree_util.tree_leaves((craft_fn, eval_fn))])
  done_units = evalfiles.load_progress(resume_path, fingerprint, masks)

  def finished(unit):
    done_units.add(unit)
    if resume_path is not None:
      evalfiles.save_progress(resume_path, fingerprint, masks, done_units)
  # The bar counts attacked images (one unit per image, attack and restart) and moves after every
  # compiled call, so long attacks show progress within a batch.
  total = n * (1 + sum(spec.restarts for spec in specs))
  bar = tqdm.auto.tqdm(total=total, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
  try:
    for b in range(n_batches):
      start = b * batch
      valid = min(batch, n - start)
      idx = start + np.arange(batch) % valid  # pad the last batch with its own examples
      x = jnp.asarray(_to_float(images[idx]))
      y = jnp.asarray(labels[idx])
      batch_key = jax.random.fold_in(key, b)
      if f"{b}/natural" not in done_units:
        ok = _natural_correct(eval_fn, x, y, jax.random.fold_in(batch_key, 0))
        masks["natural"][start:start + valid] = np.asarray(ok)[:valid]
        finished(f"{b}/natural")
      bar.update(valid)
      for spec in specs:
        if f"{b}/{spec.name}" in done_units:
          bar.update(valid * spec.restarts)
          continue
        spec_key = jax.random.fold_in(batch_key, _stream(spec.name))
        robust = np.ones(valid, bool)
        for r in range(spec.restarts):
          bar.set_description(f"{desc} {spec.name}" + (f" r{r + 1}/{spec.restarts}"
                                                       if spec.restarts > 1 else ""), refresh=False)
          ok = _spec_correct(craft_fn, eval_fn, x, y, jax.random.fold_in(spec_key, r), spec=spec,
                             max_unroll=max_unroll)
          robust &= np.asarray(ok)[:valid]
          bar.update(valid)
        masks[spec.name][start:start + valid] = robust
        finished(f"{b}/{spec.name}")
      done = start + valid
      bar.set_postfix({k: f"{v[:done].mean():.3f}" for k, v in masks.items()}, refresh=False)
  finally:
    bar.close()
  return {**{k: float(v.mean()) for k, v in masks.items()}, "n": n}, masks


def worst_case(masks: Mapping[str, np.ndarray], names: Sequence[str] | None = None) -> np.ndarray:
  """Per-image worst case: an image is robust only if it is correct under every attack in ``names``
  (default: every attack of ``masks``, i.e. all keys but ``"natural"``)."""
  names = [k for k in masks if k not in _RESERVED] if names is None else list(names)
  if not names:
    raise ValueError("worst_case needs at least one attack")
  out = np.ones_like(np.asarray(masks[names[0]], bool))
  for name in names:
    out &= np.asarray(masks[name], bool)
  return out


def evaluate(logits_fn: LogitsFn, images, labels, specs: Sequence[AttackSpec], *, batch_size: int,
             key, progress: bool = True, max_unroll: int = MAX_UNROLL, return_masks: bool = False,
             resume_path: str | None = None):
  """Natural accuracy and white-box robust accuracy of ``logits_fn`` for each spec, over a dataset.

  Robust accuracy of a spec is the fraction of examples classified correctly on the adversarial image
  of every restart (the final forward pass draws its own noise key). It is not intersected with
  natural correctness, as in the paper's tables.

  Args:
    logits_fn: ``logits_fn(x, key) -> logits`` in inference mode (a ``jax.tree_util.Partial`` avoids
      recompiling for new weights; see the module docstring).
    images: ``(N, ...)`` uint8 (scaled by 1/255) or float in [0, 1], numpy or jax.
    labels: ``(N,)`` int labels.
    specs: the attacks (:func:`parse_attacks`, :func:`paper_specs`); names must be unique.
    batch_size: examples per jitted call (the last batch is padded and masked).
    key: PRNG key of the whole evaluation (module docstring: derived per batch, spec and restart).
    progress: show a tqdm progress bar.
    max_unroll: attacks with at most this many steps run fully unrolled (compile time grows with the
      steps), longer ones rolled; 0 (default) rolls every loop.
    return_masks: also return the per-example correctness (``{"natural": bool[N], <spec.name>:
      bool[N], ...}``), e.g. for the per-image worst case over attacks (:func:`worst_case`).
    resume_path: a JSON file that records finished (batch, attack) units and resumes from them
      (module docstring, "Resuming").

  Returns:
    ``{"natural": acc, <spec.name>: acc, ..., "n": N}`` (and the masks when ``return_masks``).

  Raises:
    ValueError: for malformed data, specs, batch size or a missing key.
  """
  acc, masks = _run(logits_fn, logits_fn, images, labels, specs, batch_size=batch_size, key=key,
                     progress=progress, max_unroll=max_unroll, desc="evaluate", resume_path=resume_path)
  return (acc, masks) if return_masks else acc


def transfer(oracle_logits_fn: LogitsFn, target_logits_fn: LogitsFn, images, labels,
             specs: Sequence[AttackSpec], *, batch_size: int, key, progress: bool = True,
             max_unroll: int = MAX_UNROLL, return_masks: bool = False, resume_path: str | None = None):
  """Black-box transfer: adversarial examples crafted on the oracle, accuracy of the target.

  The paper's Table III. Keys are derived exactly as in :func:`evaluate`, so with
  ``oracle == target`` the numbers equal the white-box evaluation.

  Returns:
    ``{"natural": target's clean accuracy, <spec.name>: target's accuracy on the oracle's adversarial
    examples, ..., "n": N}``.
  """
  acc, masks = _run(oracle_logits_fn, target_logits_fn, images, labels, specs, batch_size=batch_size,
                     key=key, progress=progress, max_unroll=max_unroll, desc="transfer",
                     resume_path=resume_path)
  return (acc, masks) if return_masks else acc


def robustbench_entry(result: Mapping[str, float], spec_name: str, *, threat_model: str = "Linf",
                      eps: float) -> dict[str, Any]:
  """A RobustBench-style entry (``clean_acc``, ``robust_acc``, ``threat_model``, ``eps``) of a result.

  Args:
    result: the dict returned by :func:`evaluate`.
    spec_name: the attack whose accuracy is the robust accuracy (e.g. the strongest one).
    threat_model: ``"Linf"``, ``"L2"`` or ``"corruptions"``.
    eps: the perturbation radius of that attack.
  """
  if spec_name not in result or spec_name in _RESERVED:
    attacks_found = sorted(k for k in result if k not in _RESERVED)
    raise ValueError(f"no attack named {spec_name!r} in the result; it has {attacks_found}")
  if threat_model not in ("Linf", "L2", "corruptions"):
    raise ValueError(f"threat_model must be 'Linf', 'L2' or 'corruptions', got {threat_model!r}")
  return {"clean_acc": float(result["natural"]), "robust_acc": float(result[spec_name]),
          "threat_model": threat_model, "eps": float(eps)}


__all__ = [
    "AttackSpec", "KINDS", "PAPER_EPS", "craft", "evaluate", "paper_specs", "paper_step_size",
    "parse_attacks", "robustbench_entry", "transfer", "worst_case",
]
