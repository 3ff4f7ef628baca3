"""White-box sign-gradient l_inf attacks: FGSM, PGD (IFGSM) and CW-l_inf.

Every attack works on images ``x`` in [0, 1] with a leading batch axis (NHWC or any other shape),
int labels ``y`` of shape ``(batch,)`` and any number of classes (read from the logits). It returns
``x_adv`` with ``|x_adv - x| <= eps`` elementwise (up to one float32 rounding of ``x + eps``) and
``0 <= x_adv <= 1``, gradient stopped. All attacks are pure functions of their inputs and an explicit
PRNG key, jittable (iteration counts are static Python ints, loops are ``lax.fori_loop``) and
composable with ``jax.vmap`` (``eps`` and ``step_size`` may be traced: one call over several eps).

The model function (:data:`enquant.attacks.core.LogitsFn`) must be the model in *inference* mode:
BatchNorm uses its running statistics while crafting. An attack only sees logits, so it cannot switch
the mode itself. With ``key=None`` the attacks pass ``None`` to ``logits_fn``, which is only right for
deterministic models; randomized models (EnResNet's noise) need a key.

Key schedule (fixed, so results are reproducible and tests can recompute them):
  ``start_key, loop_key = jax.random.split(key)``; the random start draws from ``start_key``; step
  ``i`` uses ``step_key = jax.random.split(loop_key, steps)[i]``. With ``eot_samples == 1`` the model
  gets ``step_key`` itself, otherwise ``jax.random.split(step_key, eot_samples)`` (one model key per
  sample; the gradient is that of the mean loss over the samples,
  :func:`enquant.attacks.core.eot_loss_grad`). FGSM uses ``key`` as its only step key.

Loops are rolled by default (``unroll=False``): one copy of the step in the compiled program, so compile
time does not grow with the number of steps. enquant's models take their input gradients as
forward-layout convolutions (:mod:`enquant.models.conv`), which XLA:CPU runs as fast inside a rolled
loop as unrolled. ``unroll=True`` is accepted.

References:
  Goodfellow et al., "Explaining and harnessing adversarial examples", 2015 (FGSM).
  Kurakin et al., "Adversarial examples in the physical world", 2017 (IFGSM).
  Madry et al., "Towards deep learning models resistant to adversarial attacks", 2018 (PGD).
  Carlini & Wagner, "Towards evaluating the robustness of neural networks", 2017 (margin loss).
  Athalye et al., "Obfuscated gradients give a false sense of security", 2018 (EOT).
"""

import jax
import jax.numpy as jnp

from enquant.attacks import core
from enquant.attacks import objectives

PGD_LOSSES = ("ce", "cw")


def fgsm(logits_fn: core.LogitsFn, x: jax.Array, y: jax.Array, *, eps, key=None, loss: str = "ce",
         eot_samples: int = 1) -> jax.Array:
  """Fast Gradient Sign Method: ``clip(x + eps * sign(grad_x loss), 0, 1)``.

  Args:
    logits_fn: ``logits_fn(x, key) -> (batch, classes)`` logits, the model in inference mode.
    x: images in [0, 1] with a leading batch axis.
    y: ``(batch,)`` int labels.
    eps: l_inf radius (may be traced).
    key: PRNG key passed to ``logits_fn`` (``None`` for deterministic models).
    loss: ``"ce"`` (cross-entropy) or ``"cw"`` (negative margin).
    eot_samples: number of noise keys the loss is averaged over (EOT).

  Returns:
    The adversarial images, gradient stopped.
  """
  core.check_inputs(x, y, eps, key, eot_samples, name="fgsm")
  if loss not in PGD_LOSSES:
    raise ValueError(f"fgsm: loss must be one of {PGD_LOSSES}, got {loss!r}")
  grad, _, _ = core.eot_loss_grad(logits_fn, objectives.LOSSES[loss], eot_samples)(x, y, key)
  return jax.lax.stop_gradient(jnp.clip(x + eps * jnp.sign(grad), 0.0, 1.0))


def sign_pgd(logits_fn: core.LogitsFn, x: jax.Array, y: jax.Array, *, eps, step_size, steps: int,
             key, random_start: bool, loss_fn, eot_samples: int = 1,
             unroll: bool | int = False) -> jax.Array:
  """The loop of :func:`pgd` and :func:`cw_linf` for any per-example ``loss_fn(logits, y)`` (no checks).

  ``x <- project_ball(x + step_size * sign(grad))`` for ``steps`` steps, keys as the module docstring.
  """
  grad_fn = core.eot_loss_grad(logits_fn, loss_fn, eot_samples)
  start_key, step_keys = core.key_schedule(key, steps)
  x_adv = core.uniform_start(x, eps, start_key) if random_start else x

  def body(i, x_adv):
    grad, _, _ = grad_fn(x_adv, y, core.step_key(step_keys, i))
    return core.project_ball(x_adv + step_size * jnp.sign(grad), x, eps)

  x_adv = jax.lax.fori_loop(0, steps, body, x_adv, unroll=unroll)
  return jax.lax.stop_gradient(x_adv)


def _check_loop(name, x, y, eps, key, eot_samples, random_start, steps, step_size) -> None:
  core.check_inputs(x, y, eps, key, eot_samples, random_start, name=name)
  core.check_int(steps, f"{name}: steps")
  core.check_positive(step_size, f"{name}: step_size")


def pgd(logits_fn: core.LogitsFn, x: jax.Array, y: jax.Array, *, eps, step_size, steps: int,
        key=None, random_start: bool = True, loss: str = "ce", eot_samples: int = 1,
        unroll: bool | int = False) -> jax.Array:
  """Projected gradient descent (IFGSM) in the l_inf ball: ``x <- P(x + step_size * sign(grad))``.

  ``P`` projects onto the eps-ball around the clean ``x`` *and* [0, 1] after every step. With
  ``random_start`` the attack starts from ``clip(x + U(-eps, eps), 0, 1)`` (Madry et al.); without it,
  from ``x`` (the paper's IFGSM).

  Args:
    logits_fn: ``logits_fn(x, key) -> (batch, classes)`` logits, the model in inference mode
      (BatchNorm with running statistics).
    x: images in [0, 1] with a leading batch axis.
    y: ``(batch,)`` int labels.
    eps: l_inf radius (may be traced, e.g. under ``vmap``).
    step_size: step of each sign-gradient update (may be traced).
    steps: number of steps (static Python int >= 1).
    key: PRNG key (see the module docstring for its schedule); required for ``random_start`` and EOT.
    random_start: start from a uniform point of the eps-ball.
    loss: ``"ce"`` cross-entropy or ``"cw"`` the (unclamped) CW margin ``-(z_y - max_{j!=y} z_j)``.
    eot_samples: number of noise keys each step's loss is averaged over (EOT); 1 is plain PGD.
    unroll: ``lax.fori_loop`` unrolling (rolled by default: see the module docstring).

  Returns:
    The adversarial images, gradient stopped.

  Raises:
    ValueError: for a bad eps/step size/steps/loss/eot_samples, or ``random_start`` without a key.
  """
  _check_loop("pgd", x, y, eps, key, eot_samples, random_start, steps, step_size)
  if loss not in PGD_LOSSES:
    raise ValueError(f"pgd: loss must be one of {PGD_LOSSES}, got {loss!r}")
  return sign_pgd(logits_fn, x, y, eps=eps, step_size=step_size, steps=steps, key=key,
                  random_start=random_start, loss_fn=objectives.LOSSES[loss],
                  eot_samples=eot_samples, unroll=unroll)


def cw_linf(logits_fn: core.LogitsFn, x: jax.Array, y: jax.Array, *, eps, step_size, steps: int,
            key=None, kappa: float = 0.0, eot_samples: int = 1, random_start: bool = False,
            unroll: bool | int = False) -> jax.Array:
  """Carlini-Wagner margin attack under l_inf PGD (the field's "CW-l_inf").

  Minimises ``max(z_y - max_{j!=y} z_j, -kappa)`` with sign-gradient steps projected onto the eps-ball
  and [0, 1]. Once an example's margin is below ``-kappa`` its gradient is zero and it stops moving
  (``kappa`` is the confidence; a large kappa, e.g. 50, keeps pushing as Madry et al.'s CW-l_inf does).
  This is a bounded l_inf attack, not the original's L2 objective with Adam
  (:func:`enquant.attacks.carlini_wagner.cw_l2_rescaled` is that one).

  Args:
    logits_fn: ``logits_fn(x, key) -> (batch, classes)`` logits, the model in inference mode.
    x: images in [0, 1] with a leading batch axis.
    y: ``(batch,)`` int labels.
    eps: l_inf radius (may be traced).
    step_size: sign-gradient step (may be traced).
    steps: number of steps (static Python int >= 1).
    key: PRNG key (module docstring); required for ``random_start`` and EOT.
    kappa: confidence >= 0.
    eot_samples: number of noise keys each loss is averaged over (EOT).
    random_start: start from a uniform point of the eps-ball instead of ``x``.
    unroll: ``lax.fori_loop`` unrolling (see :func:`pgd`).

  Returns:
    The adversarial images, gradient stopped.

  References:
    Carlini & Wagner, 2017, objective f_6; Madry et al., 2018 (l_inf PGD on the CW loss).
  """
  _check_loop("cw_linf", x, y, eps, key, eot_samples, random_start, steps, step_size)
  if core.is_number(kappa) and not kappa >= 0:
    raise ValueError(f"cw_linf: kappa must be >= 0, got {kappa}")

  def loss_fn(logits, labels):
    return -jnp.maximum(objectives.margin(logits, labels), -kappa)

  return sign_pgd(logits_fn, x, y, eps=eps, step_size=step_size, steps=steps, key=key,
                  random_start=random_start, loss_fn=loss_fn, eot_samples=eot_samples, unroll=unroll)


__all__ = ["PGD_LOSSES", "cw_linf", "fgsm", "pgd", "sign_pgd"]
