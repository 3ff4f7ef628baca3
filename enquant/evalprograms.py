"""The compiled programs of :mod:`enquant.evaluate`: one per attack structure, shared between specs.

An attack spec splits into its structure (:class:`Program`: kind, steps, random start, EOT count,
unrolling: what shapes the compiled loop) and its constants (eps, step size, kappa and APGD's loss:
passed to the program as a float32 array, traced data). Specs that differ only in their constants, their
name or their restarts run one compiled program: ``pgd20`` and ``A2`` at the same settings, the same
attack at several eps, or APGD-CE and APGD-DLR (kind ``"apgd"``, the loss an index into
:data:`enquant.attacks.APGD_LOSSES`) compile once. Kind ``"none"`` runs the natural pass's program. The
arithmetic is the one of a spec's own program (a float32 constant and a float32 argument are the same
number), so the adversarial examples are equal (tested).

Progress inside a compiled call: with a :class:`Ticker` active, the crafting model calls
``jax.debug.callback`` once per forward pass of the attack (once per step: an EOT ``vmap`` over the
noise keys counts as one), so a long unit (EOT-10 APGD on a batch) reports its steps as they run.

JAX does not write programs holding host callbacks to its persistent compilation cache, so the ticks
would make every process compile the attack programs again: :func:`in_call_ticks` allows them only
while that cache is off (with it on, as the entry points set it, progress moves per call).

Compile notices: :func:`first_use` tells whether a program with these argument shapes runs for the
first time in this process (the caller prints one plain line: "compiling the PGD-20 program (first
use; cached afterwards)").
"""

import functools
import threading
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from enquant import attacks

LOOP_KINDS = ("pgd", "cw", "cw-l2", "apgd")
_LABELS = {"none": "natural", "fgsm": "FGSM", "pgd": "PGD", "cw": "CW", "cw-l2": "CW-L2",
           "apgd": "APGD (CE/DLR)"}
_APGD_KINDS = {"apgd-ce": "ce", "apgd-dlr": "dlr"}


class Program(NamedTuple):
  """The static structure of an attack (a jit static argument; hashable).

  Attributes:
    kind: ``"none"``, ``"fgsm"``, ``"pgd"``, ``"cw"``, ``"cw-l2"`` or ``"apgd"`` (the specs'
      ``"apgd-ce"`` and ``"apgd-dlr"``; the loss is data).
    steps: iterations (0 for none and fgsm).
    random_start: start from a random point of the ball (False for none and fgsm).
    eot_samples: noise keys per gradient (1 for none).
    unroll: the attack loop is unrolled.
  """

  kind: str
  steps: int = 0
  random_start: bool = False
  eot_samples: int = 1
  unroll: bool = False

  @property
  def label(self) -> str:
    """A short human name: ``"PGD-20 EOT-10"``, ``"APGD (CE/DLR)-100 EOT-10"``, ``"natural"``."""
    name = _LABELS[self.kind] + (f"-{self.steps}" if self.steps else "")
    return name + (f" EOT-{self.eot_samples}" if self.eot_samples > 1 else "")

  @property
  def expected_ticks(self) -> int:
    """Forward passes of the crafting model per call, as the attacks run them today (a first guess:
    :class:`Ticker` learns the real count from the first call)."""
    return {"none": 0, "fgsm": 1, "apgd": self.steps + 1}.get(self.kind, self.steps)


def program_of(spec, max_unroll: int) -> Program:
  """The :class:`Program` of an :class:`enquant.evaluate.AttackSpec` (fields its kind ignores zeroed)."""
  if spec.kind == "none":
    return Program("none")
  if spec.kind == "fgsm":
    return Program("fgsm", eot_samples=spec.eot_samples)
  return Program("apgd" if spec.kind in _APGD_KINDS else spec.kind, spec.steps,
                 bool(spec.random_start), spec.eot_samples, spec.steps <= max_unroll)


def constants_of(spec) -> np.ndarray:
  """``float32[4]``: the spec's eps, step size, kappa and APGD loss index (the traced data of its
  program; the index is 0 for every kind but ``"apgd-dlr"``)."""
  loss = attacks.APGD_LOSSES.index(_APGD_KINDS.get(spec.kind, "ce"))
  return np.array([spec.eps, spec.step_size, spec.kappa, loss], np.float32)


def check_classes(spec, num_classes: int) -> None:
  """Raises ValueError when ``spec`` cannot run on a model of ``num_classes`` classes (APGD-DLR: 3)."""
  if spec.kind in _APGD_KINDS:
    attacks.autopgd.check_loss_classes(_APGD_KINDS[spec.kind], num_classes)


def craft_program(program: Program, constants, logits_fn, x, y, key) -> jax.Array:
  """Runs ``program`` with ``constants = (eps, step_size, kappa, apgd_loss)`` (jittable; ``x`` for
  kind none)."""
  eps, step_size, kappa = constants[0], constants[1], constants[2]
  common = dict(eps=eps, key=key, eot_samples=program.eot_samples)
  if program.kind == "none":
    return x
  if program.kind == "fgsm":
    return attacks.fgsm(logits_fn, x, y, **common)
  if program.kind == "cw-l2":  # Adam from x itself: no random start, a rolled loop
    return attacks.cw_l2_rescaled(logits_fn, x, y, steps=program.steps, **common)
  common.update(random_start=program.random_start, unroll=program.unroll)
  if program.kind == "pgd":
    return attacks.pgd(logits_fn, x, y, step_size=step_size, steps=program.steps, **common)
  if program.kind == "cw":
    return attacks.cw_linf(logits_fn, x, y, step_size=step_size, steps=program.steps, kappa=kappa,
                           **common)
  return attacks.apgd(logits_fn, x, y, steps=program.steps, loss=constants[3].astype(jnp.int32),
                      **common)


@jax.jit
def natural_correct(eval_fn, x, y, key):
  """``argmax(eval_fn(x, key)) == y``: the natural pass (and kind none's final pass)."""
  return jnp.argmax(eval_fn(x, key), axis=-1) == y


@functools.partial(jax.jit, static_argnames=("program",))
def attack_correct(craft_fn, eval_fn, x, y, key, constants, *, program: Program):
  """Correctness of ``eval_fn`` on the adversarial images of ``program`` (key split into the attack's
  key and the final pass's key)."""
  attack_key, eval_key = jax.random.split(key)
  x_adv = craft_program(program, constants, craft_fn, x, y, attack_key)
  return jnp.argmax(eval_fn(x_adv, eval_key), axis=-1) == y


# ----------------------------------------------------------------------------------------------------
# Compile notices and progress ticks
# ----------------------------------------------------------------------------------------------------

_SEEN: set = set()


def signature(program: Program, fns, *arrays) -> tuple:
  """What selects a compiled program: its structure, the functions' pytree structure and the shapes
  and dtypes of every traced argument."""
  leaves, treedef = jax.tree_util.tree_flatten((fns, arrays))
  return program, str(treedef), tuple((np.shape(a), str(getattr(a, "dtype", type(a))))
                                      for a in leaves)


def first_use(sig: tuple) -> bool:
  """True the first time ``sig`` (:func:`signature`) is seen in this process."""
  if sig in _SEEN:
    return False
  _SEEN.add(sig)
  return True


_LEARNED: dict[Program, int] = {}  # forward passes per call, counted on a program's first call


class Ticker:
  """Counts the crafting model's forward passes during one compiled call and reports the fraction done.

  ``ticker.begin(program)`` before the call, ``ticker.end(program)`` after it; in between every pass
  calls ``report(fraction)`` (kept below 1: the call's end reports the rest). The count of a program's
  first call becomes its expected count for later calls (:attr:`Program.expected_ticks` until then).
  Only one ticker is active at a time (evaluations run their calls one after the other).
  """

  active: "Ticker | None" = None

  def __init__(self, report: Callable[[float], Any]):
    self.report = report
    self.count = 0
    self.expected = 1
    self._lock = threading.Lock()

  def begin(self, program: Program) -> None:
    self.count = 0
    self.expected = max(1, _LEARNED.get(program, program.expected_ticks))
    Ticker.active = self

  def tick(self) -> None:
    with self._lock:
      self.count += 1
      fraction = min(self.count / self.expected, 0.99)
    self.report(fraction)

  def end(self, program: Program, completed: bool = True) -> None:
    Ticker.active = None
    if completed and self.count:
      _LEARNED.setdefault(program, self.count)


def in_call_ticks() -> bool:
  """Whether progress may tick inside compiled calls: only with JAX's persistent compilation cache off
  (a program with a host callback is never written to it)."""
  return not jax.config.jax_compilation_cache_dir


def _tick() -> None:
  ticker = Ticker.active
  if ticker is not None:
    ticker.tick()


def _ticking_apply(fn, x, key):
  jax.debug.callback(_tick)
  return fn(x, key)


def ticking(fn) -> jax.tree_util.Partial:
  """``fn`` (a ``Partial`` logits function) that ticks the active :class:`Ticker` at every call; the
  same function for every ``fn`` of one pytree structure, so compiled programs are reused."""
  return jax.tree_util.Partial(_ticking_apply, fn)


__all__ = ["Program", "Ticker", "attack_correct", "check_classes", "constants_of", "craft_program",
           "first_use", "in_call_ticks", "natural_correct", "program_of", "signature", "ticking"]
