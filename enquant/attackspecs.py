"""Attack settings as data: :class:`AttackSpec`, the paper's presets and the short-name grammar.

What :func:`enquant.evaluate.evaluate` runs (and re-exports): an attack spec names a kind, its
constants (eps, step size, kappa) and its structure (steps, random start, restarts, EOT samples).
"""

import dataclasses
import re
from typing import Any, Sequence

import numpy as np

from enquant.attacks import core

KINDS = ("none", "fgsm", "pgd", "cw", "cw-l2", "apgd-ce", "apgd-dlr")

# The paper's CIFAR-10 setting (docs/DESIGN.md §5): eps 0.031 (~8/255), IFGSM step 0.003, 20 steps.
PAPER_EPS = core.PAPER_EPS
PAPER_STEP = 0.003
PAPER_PGD_STEPS = 20
CW_STEPS = 50
CW_KAPPA = 50.0
APGD_STEPS = 100
RESERVED_NAMES = ("natural", "n")  # keys of the results that are not attacks


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """One attack configuration of an evaluation.

  Attributes:
    name: key of its accuracy in the results (unique within an evaluation).
    kind: one of ``"none"`` (the clean images, one more noise draw), ``"fgsm"``, ``"pgd"`` (IFGSM, CE),
      ``"cw"`` (CW margin under l_inf PGD), ``"cw-l2"`` (the EnResNet code's C&W: L2, Adam, rescaled to
      eps; :func:`enquant.attacks.cw_l2_rescaled`), ``"apgd-ce"``, ``"apgd-dlr"``.
    eps: l_inf radius.
    step_size: sign-gradient step (pgd, cw; unused by the others).
    steps: iterations (pgd, cw, cw-l2, apgd).
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
    if self.name in RESERVED_NAMES:
      raise ValueError(f"AttackSpec name {self.name!r} is reserved (results hold {RESERVED_NAMES})")
    if self.kind not in KINDS:
      raise ValueError(f"AttackSpec {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
    if not self.eps >= 0:
      raise ValueError(f"AttackSpec {self.name!r}: eps must be >= 0, got {self.eps}")
    if self.kind in ("pgd", "cw") and not self.step_size > 0:
      raise ValueError(f"AttackSpec {self.name!r}: step_size must be > 0, got {self.step_size}")
    if self.kind in ("pgd", "cw", "cw-l2", "apgd-ce", "apgd-dlr") and not (
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
  randomized models whose prediction is re-drawn at evaluation). The EnResNet code's own "C&W", an L2
  Adam attack rescaled to eps (docs/DESIGN.md §5), is the attack ``cwl2`` (:func:`parse_attacks`).

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
    r"^(?P<base>none|fgsm|pgd(?P<pgd>\d+)|cwl2(?P<cwl2>\d+)?|cw(?P<cw>\d+)"
    r"|apgd-(?P<aloss>ce|dlr)(?P<asteps>\d+)?"
    r"|a(?P<preset>[123]))(?P<mods>(?:-(?:eot\d+|r\d+|rs))*)$")


def parse_attacks(names: str | Sequence[str], *, eps: float, step_size: float | None = None,
                  kappa: float = CW_KAPPA, apgd_steps: int = APGD_STEPS) -> tuple[AttackSpec, ...]:
  """Turns short attack names into specs.

  Grammar: ``BASE(-MOD)*``, comma separated, case-insensitive.
    BASE: ``none``; ``fgsm``; ``pgd<N>`` (IFGSM, N steps, no random start); ``cw<N>`` (CW-l_inf, N
      steps, confidence ``kappa``); ``cwl2[<N>]`` (the EnResNet code's C&W: N Adam steps on the L2
      objective, 50 by default, then rescaled to eps); ``apgd-ce[<N>]``, ``apgd-dlr[<N>]``
      (``apgd_steps`` by default, random start); ``a1``/``a2``/``a3`` (the paper's presets, :func:`paper_specs`).
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
          f"unknown attack {raw.strip()!r}: expected none, fgsm, pgd<N>, cw<N>, cwl2[<N>], "
          "apgd-ce[<N>], apgd-dlr[<N>] or a1/a2/a3, optionally followed by -eot<K>, -r<R>, -rs")
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
    elif base.startswith("cwl2"):
      steps = int(m.group("cwl2")) if m.group("cwl2") else CW_STEPS
      spec = AttackSpec(entry, "cw-l2", eps=eps, steps=steps, **options)
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


__all__ = ["APGD_STEPS", "AttackSpec", "CW_KAPPA", "CW_STEPS", "KINDS", "PAPER_EPS", "PAPER_PGD_STEPS",
           "PAPER_STEP", "RESERVED_NAMES", "paper_specs", "paper_step_size", "parse_attacks"]
