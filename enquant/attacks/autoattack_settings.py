"""AutoAttack's settings: the attacks of each version, their parameters, and the settings record.

References:
  Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
  parameter-free attacks", ICML 2020 (the reference's ``set_version``).
"""

import dataclasses
from typing import Any, Callable, Sequence

from enquant.attacks import core
from enquant.attacks import fab
from enquant.attacks import square

ATTACKS = ("apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "square")
VERSIONS = ("standard", "rand", "custom")
STANDARD = ("apgd-ce", "apgd-t", "fab-t", "square")
RAND = ("apgd-ce", "apgd-dlr")
RAND_EOT_SAMPLES = 20
_RESERVED = ("clean", "robust", "robust_rescored", "autoattack", "autoattack_rescored", "n")


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
      core.check_int(getattr(self, name), f"AutoAttackConfig.{name}")
    core.check_int(self.square_queries, "AutoAttackConfig.square_queries", minimum=0)
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


def resolve(version: str, attacks: Sequence | None, eot_samples: int | None,
            config: AutoAttackConfig | None):
  """``(attacks, eot_samples, config)`` of a run, checked, with the version's defaults filled in."""
  seq = attack_list(version, attacks)
  eot = default_eot_samples(version) if eot_samples is None else eot_samples
  core.check_int(eot, "eot_samples")
  config = AutoAttackConfig() if config is None else config
  if not isinstance(config, AutoAttackConfig):
    raise ValueError(f"config must be an AutoAttackConfig, got {type(config).__name__}")
  return seq, eot, config


def describe(version: str = "standard", attacks: Sequence | None = None,
             eot_samples: int | None = None, config: AutoAttackConfig | None = None
             ) -> dict[str, Any]:
  """The settings of a run as a JSON-ready dict (for results files)."""
  seq, eot, config = resolve(version, attacks, eot_samples, config)
  return {"version": version, "attacks": [name for name, _ in seq], "eot_samples": eot,
          "config": config.to_dict()}


__all__ = ["ATTACKS", "AutoAttackConfig", "RAND", "RAND_EOT_SAMPLES", "STANDARD", "VERSIONS",
           "attack_list", "default_eot_samples", "describe", "resolve"]
