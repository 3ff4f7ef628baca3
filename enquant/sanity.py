"""Sanity checks of a robustness evaluation (Carlini et al., "On Evaluating Adversarial Robustness").

A report a user asks for (``python -m experiments.evaluate --sanity``) when a robust accuracy looks too
good. Each check runs attacks of :mod:`enquant.attacks.autoattack` (APGD-CE as the white-box attack,
Square as the black-box one) over the same images and compares numbers that must be ordered:

  ``eps0_equals_clean``        robust accuracy at eps = 0 equals the clean accuracy (the evaluation adds
                               nothing of its own);
  ``non_increasing_in_eps``    robust accuracy does not rise as eps grows;
  ``near_zero_at_large_eps``   it reaches ~0 at a large eps (default ``min(1, 8 eps)``): an attack that
                               cannot win an unbounded game is broken, not the model robust;
  ``more_steps_never_raise``   more steps and restarts never raise it;
  ``blackbox_not_stronger``    black-box Square is not stronger than white-box APGD (if it is, the
                               gradients are masked);
  ``eot_gap``                  for randomized models: EOT (gradients averaged over noise draws) is not
                               weaker than no EOT; the gap is how much the randomness alone hid.

Robust accuracies are AutoAttack's count (:func:`enquant.attacks.autoattack.evaluate` with one attack):
correct on the clean pass and on the decision pass. ``eps0_equals_clean`` compares the one-draw re-score
at eps 0 with the clean pass (both single draws). Differences within ``tolerance`` pass: one image for
deterministic models; for randomized ones three binomial standard deviations of a difference of two
accuracies (``3 sqrt(2 * 0.25 / n)``) plus one image, since two evaluations of a randomized model differ
by noise alone. Every check keeps its numbers; ``passed`` is ``None`` for a check that does not apply.

References:
  Carlini, Athalye, Papernot, Brendel, Rauber, Tsipras, Goodfellow, Madry & Kurakin, "On evaluating
  adversarial robustness", arXiv:1902.06705, 2019 (Sections 4-5 and the checklist).
  Athalye, Carlini & Wagner, "Obfuscated gradients give a false sense of security", ICML 2018 (EOT).
  Croce & Hein, ICML 2020 (APGD); Andriushchenko et al., ECCV 2020 (Square).
"""

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from enquant.attacks import autoattack
from enquant.attacks import core


@dataclasses.dataclass(frozen=True)
class SanityConfig:
  """Settings of :func:`sanity_checks`.

  Attributes:
    steps: APGD-CE iterations of the eps sweep and the baseline white-box attack.
    strong_steps: iterations of the stronger APGD-CE.
    restarts: restarts of the stronger APGD-CE.
    square_queries: Square's query budget (5000 in AutoAttack; fewer is a weaker black-box attack, so a
      failure of ``blackbox_not_stronger`` with fewer queries is all the more telling).
    eot_samples: EOT samples of the ``eot_gap`` check (randomized models only).
    eps_fractions: the eps sweep, as fractions of ``eps``.
    large_eps: the large radius (default ``min(1, 8 eps)``).
    large_eps_max_accuracy: robust accuracy allowed at ``large_eps``.
    blackbox_margin: how much lower Square's robust accuracy may be than the white-box one.
    tolerance: allowed noise in every comparison (default: module docstring).
  """

  steps: int = 20
  strong_steps: int = 100
  restarts: int = 2
  square_queries: int = 1000
  eot_samples: int = 10
  eps_fractions: tuple[float, ...] = (0.0, 0.25, 0.5, 1.0, 2.0)
  large_eps: float | None = None
  large_eps_max_accuracy: float = 0.05
  blackbox_margin: float = 0.01
  tolerance: float | None = None

  def __post_init__(self):
    for name in ("steps", "strong_steps", "restarts", "square_queries", "eot_samples"):
      core.check_int(getattr(self, name), f"SanityConfig.{name}")
    if not self.eps_fractions or any(not (f >= 0 and math.isfinite(f)) for f in self.eps_fractions):
      raise ValueError(f"SanityConfig.eps_fractions must be finite and >= 0, got {self.eps_fractions}")
    if self.large_eps is not None and not 0 < self.large_eps <= 1:
      raise ValueError(f"SanityConfig.large_eps must be in (0, 1], got {self.large_eps}")
    for name in ("large_eps_max_accuracy", "blackbox_margin"):
      if not 0 <= getattr(self, name) <= 1:
        raise ValueError(f"SanityConfig.{name} must be in [0, 1], got {getattr(self, name)}")
    if self.tolerance is not None and not 0 <= self.tolerance <= 1:
      raise ValueError(f"SanityConfig.tolerance must be in [0, 1], got {self.tolerance}")


@jax.jit
def _logits_twice(logits_fn, x, key):
  k1, k2 = jax.random.split(key)
  return logits_fn(x, k1), logits_fn(x, k2)


def is_deterministic(logits_fn: core.LogitsFn, x, key) -> bool:
  """Whether two noise keys give bitwise the same logits on ``x`` (a deterministic model)."""
  a, b = _logits_twice(core.as_partial(logits_fn), jnp.asarray(x), key)
  return bool(jnp.all(a == b))


def default_tolerance(n: int, deterministic: bool) -> float:
  """One image, plus three binomial standard deviations of a difference for randomized models."""
  return 1.0 / n + (0.0 if deterministic else 3.0 * math.sqrt(0.5 / n))


def _sweep_checks(attack, eps: float, large_eps: float, config: SanityConfig, tol: float
                  ) -> tuple[dict, tuple]:
  """The eps sweep: eps = 0 gives clean accuracy, accuracy never rises with eps, ~0 at a large eps.

  Returns the checks and the sweep's attack at ``eps`` (the weaker attack of :func:`_strength_checks`).
  """
  grid = sorted({f * eps for f in config.eps_fractions} | {0.0, eps, large_eps})
  sweep = {r: attack(1, r, apgd_steps=config.steps) for r in grid}
  clean = sweep[eps][0]["clean"]
  accs = [sweep[r][0]["autoattack"] for r in grid]
  eps0 = sweep[0.0][0]["autoattack_rescored"]
  return {
      "eps0_equals_clean": {"passed": abs(eps0 - clean) <= tol, "clean": clean, "eps0": eps0},
      "non_increasing_in_eps": {"passed": all(b <= a + tol for a, b in zip(accs, accs[1:])),
                                "eps": grid, "robust_accuracy": accs},
      "near_zero_at_large_eps": {
          "passed": sweep[large_eps][0]["autoattack"] <= config.large_eps_max_accuracy + tol,
          "eps": large_eps, "robust_accuracy": sweep[large_eps][0]["autoattack"],
          "threshold": config.large_eps_max_accuracy}}, sweep[eps]


def _strength_checks(attack, eps: float, weaker: tuple, config: SanityConfig, tol: float,
                     deterministic: bool) -> dict:
  """At eps: more steps never raise accuracy, black-box not stronger than white-box, EOT never weaker."""
  checks = {}
  weak_acc, weak = weaker
  strong_acc, strong = attack(2, eps, apgd_steps=config.strong_steps, apgd_restarts=config.restarts)
  checks["more_steps_never_raise"] = {
      "passed": strong_acc["autoattack"] <= weak_acc["autoattack"] + tol,
      f"apgd-ce {config.steps} steps": weak_acc["autoattack"],
      f"apgd-ce {config.strong_steps} steps x {config.restarts} restarts": strong_acc["autoattack"],
      "images_only_the_weaker_breaks": int(np.sum(strong["robust"] & ~weak["robust"]))}
  white = strong["robust"] & weak["robust"]
  square_acc, square = attack(3, eps, name="square", square_queries=config.square_queries)
  checks["blackbox_not_stronger"] = {
      "passed": square_acc["autoattack"] >= white.mean() - config.blackbox_margin - tol,
      "square": square_acc["autoattack"], "square_queries": config.square_queries,
      "white_box": float(white.mean()),
      "images_only_square_breaks": int(np.sum(white & ~square["robust"]))}
  if deterministic:
    checks["eot_gap"] = {"passed": None, "note": "deterministic model: EOT changes nothing"}
  else:
    eot_acc, _ = attack(1, eps, eot=config.eot_samples, apgd_steps=config.steps)
    checks["eot_gap"] = {
        "passed": eot_acc["autoattack"] <= weak_acc["autoattack"] + tol,
        "no_eot": weak_acc["autoattack"], "eot": eot_acc["autoattack"],
        "eot_samples": config.eot_samples, "gap": weak_acc["autoattack"] - eot_acc["autoattack"]}
  return checks


def sanity_checks(logits_fn: core.LogitsFn, images, labels, *, eps: float, key, batch_size: int = 256,
                  config: SanityConfig | None = None,
                  attack_config: autoattack.AutoAttackConfig | None = None,
                  progress: bool = True) -> dict[str, Any]:
  """Runs the sanity checks of the module docstring on ``images``.

  Args:
    logits_fn: ``logits_fn(x, key) -> logits``, inference mode (a ``jax.tree_util.Partial`` shares
      compilations).
    images: ``(N, H, W, C)`` uint8 or float images in [0, 1].
    labels: ``(N,)`` int labels.
    eps: the radius under evaluation.
    key: PRNG key (every eps of the sweep uses the same key: common random numbers).
    batch_size: examples per jitted call.
    config: the settings (:class:`SanityConfig`).
    attack_config: the attacks' other settings (default
      :class:`enquant.attacks.autoattack.AutoAttackConfig`); ``config`` overrides their steps, restarts
      and queries.
    progress: show progress bars.

  Returns:
    ``{"passed": bool, "checks": {name: {"passed": bool | None, ...numbers}}, "clean_accuracy",
    "deterministic", "tolerance", "n", "eps", "settings"}``.

  Raises:
    ValueError: for bad arguments.

  References:
    Carlini et al., arXiv:1902.06705, 2019.
  """
  config = SanityConfig() if config is None else config
  if not isinstance(config, SanityConfig):
    raise ValueError(f"config must be a SanityConfig, got {type(config).__name__}")
  if not (isinstance(eps, (int, float)) and 0 < eps <= 1):
    raise ValueError(f"sanity checks need a radius eps in (0, 1], got {eps!r}")
  if key is None:
    raise ValueError("sanity_checks needs an explicit PRNG key")
  fn = core.as_partial(logits_fn)
  images = np.asarray(images)
  core.check_images(images, "sanity_checks", " for Square (NHWC)")
  n = len(images)
  first = core.to_float(images[:min(batch_size, n)])
  deterministic = is_deterministic(fn, first, jax.random.fold_in(key, 7))
  tol = default_tolerance(n, deterministic) if config.tolerance is None else config.tolerance
  large_eps = min(1.0, 8.0 * eps) if config.large_eps is None else config.large_eps

  base = autoattack.AutoAttackConfig() if attack_config is None else attack_config

  def attack(index, radius, *, name="apgd-ce", eot=1, **settings):
    cfg = dataclasses.replace(base, **settings)
    return autoattack.evaluate(fn, images, labels, eps=float(radius), key=jax.random.fold_in(key, index),
                               version="custom", attacks=[name], eot_samples=eot, config=cfg,
                               batch_size=batch_size, progress=progress)

  checks, weaker = _sweep_checks(attack, eps, large_eps, config, tol)
  checks.update(_strength_checks(attack, eps, weaker, config, tol, deterministic))
  clean = checks["eps0_equals_clean"]["clean"]
  verdicts = [c["passed"] for c in checks.values() if c["passed"] is not None]
  return {"passed": all(verdicts), "checks": checks, "clean_accuracy": clean,
          "deterministic": deterministic, "tolerance": tol, "n": n, "eps": eps,
          "settings": dataclasses.asdict(config)}


def format_report(report: dict[str, Any]) -> str:
  """A Markdown table of :func:`sanity_checks`'s report."""
  lines = [f"Sanity checks (n = {report['n']}, eps = {report['eps']:.4g}, "
           f"{'deterministic' if report['deterministic'] else 'randomized'} model, tolerance "
           f"{report['tolerance']:.3f}): {'PASSED' if report['passed'] else 'FAILED'}", "",
           "| check | result | numbers |", "|---|---|---|"]
  for name, check in report["checks"].items():
    verdict = {True: "pass", False: "**FAIL**", None: "n/a"}[check["passed"]]
    numbers = ", ".join(f"{k}: {_fmt(v)}" for k, v in check.items() if k != "passed")
    lines.append(f"| {name} | {verdict} | {numbers} |")
  return "\n".join(lines) + "\n"


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  if isinstance(v, Sequence) and not isinstance(v, str):
    return "[" + ", ".join(_fmt(u) for u in v) + "]"
  return str(v)


__all__ = ["SanityConfig", "default_tolerance", "format_report", "is_deterministic", "sanity_checks"]
