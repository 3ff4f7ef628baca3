"""The C&W procedure of the EnResNet code: an L2 Carlini-Wagner attack with Adam, rescaled to eps.

EnResNet's attack script (``ResNet20/Attack_PGD_EnResNet_5_20.py``, ``-method cw``, of the authors'
repository BaoWangMath/EnResNet) crafts its "C&W" examples as follows, one image at a time:
  1. the target ``t`` is the class with the second-largest clean logit;
  2. ``w`` starts at the clean image ``x`` and Adam (learning rate 0.0006, PyTorch's betas 0.9/0.999
     and epsilon 1e-8) minimises ``||w - x||_2^2 + c * max(z_y(w) - z_t(w) + kappa, 0)`` for 50
     iterations, with ``c = 10`` and ``kappa = 0``; ``w`` is not clipped;
  3. the ``w`` with the lowest objective is kept, and the adversarial image is
     ``x + eps * (w - x)``: the L2 perturbation *scaled by* eps (not normalised to the eps-ball).
These are the defaults of :func:`cw_l2_rescaled`. Since Adam moves a coordinate by about the learning
rate per step, 50 steps leave ``|w - x| <= ~0.03`` and the final perturbation is ``~eps * 0.03``: a
weak attack, far from the l_inf ball's surface.

Differences from that script: batched (Adam is elementwise and the objective a sum over examples, so
every example follows its own trajectory); ``y`` is the label and the target the class with the
largest clean logit other than ``y`` (the script uses the clean prediction and the second-largest
logit: the same classes for every correctly classified image); the objective is recorded at the point
it is computed at (the script stores the iterate after the Adam step with the loss of the one before);
the result is projected onto the eps-ball and [0, 1] (the script does not clip; the projection only
acts when ``|w - x| > 1`` or the image leaves [0, 1]); explicit keys (one noise draw per step,
``split(loop_key, steps)[i]``, and the target's clean pass on ``start_key``, as
:func:`enquant.attacks.core.key_schedule`), and EOT over ``eot_samples`` draws if asked (the script has
none).

References:
  Carlini & Wagner, "Towards evaluating the robustness of neural networks", IEEE S&P 2017 (L2 attack).
  Wang, Yuan, Shi & Osher, "ResNets ensemble via the Feynman-Kac formalism to improve natural and
  robust accuracies", NeurIPS 2019 (EnResNet; the attack script of its code).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from enquant.attacks import core

LEARNING_RATE = 0.0006
STEPS = 50
C = 10.0
KAPPA = 0.0


class CWL2Result(NamedTuple):
  """Result of :func:`cw_l2`, per example.

  Attributes:
    w: the iterate with the lowest objective (not clipped, not rescaled).
    objective: its objective ``||w - x||^2 + c * max(z_y - z_t + kappa, 0)``.
    target: the target class.
  """

  w: jax.Array
  objective: jax.Array
  target: jax.Array


def _check(x, y, key, eot_samples, steps, learning_rate, c, kappa, name) -> None:
  core.check_inputs(x, y, 0.0, key, eot_samples, name=name)
  core.check_int(steps, f"{name}: steps")
  core.check_positive(learning_rate, f"{name}: learning_rate")
  for label, value in (("c", c), ("kappa", kappa)):
    if core.is_number(value) and not value >= 0:
      raise ValueError(f"{name}: {label} must be >= 0, got {value}")


def cw_l2(logits_fn: core.LogitsFn, x: jax.Array, y: jax.Array, *, key=None,
          steps: int = STEPS, learning_rate: float = LEARNING_RATE, c: float = C,
          kappa: float = KAPPA, eot_samples: int = 1) -> CWL2Result:
  """The Adam minimisation of EnResNet's C&W (module docstring), before the rescaling.

  Args:
    logits_fn: ``logits_fn(x, key) -> (batch, classes)`` logits, the model in inference mode.
    x: images in [0, 1] with a leading batch axis.
    y: ``(batch,)`` int labels.
    key: PRNG key (``None`` only for deterministic models).
    steps: Adam iterations (50).
    learning_rate: Adam's learning rate (0.0006).
    c: weight of the hinge term (10).
    kappa: confidence of the hinge (0).
    eot_samples: noise draws the hinge is averaged over per step (1, as the script).

  Returns:
    A :class:`CWL2Result`.
  """
  _check(x, y, key, eot_samples, steps, learning_rate, c, kappa, "cw_l2")
  start_key, step_keys = core.key_schedule(key, steps)
  clean = logits_fn(x, start_key)
  target = jnp.argmax(jnp.where(jax.nn.one_hot(y, clean.shape[-1], dtype=bool), -jnp.inf, clean),
                      axis=-1)

  def hinge(logits, labels):
    rows = jnp.arange(logits.shape[0])
    return jnp.maximum(logits[rows, labels] - logits[rows, target] + kappa, 0.0)

  grad_fn = core.eot_loss_grad(logits_fn, hinge, eot_samples)
  opt = optax.adam(learning_rate)
  l2 = lambda w: jnp.sum(jnp.square(w - x).reshape(x.shape[0], -1), axis=-1)  # noqa: E731

  def body(i, state):
    w, opt_state, best_w, best = state
    grad, h, _ = grad_fn(w, y, core.step_key(step_keys, i))
    objective = l2(w) + c * h
    better = objective < best
    best_w = jnp.where(core.expand(better, x), w, best_w)
    updates, opt_state = opt.update(2.0 * (w - x) + c * grad, opt_state)
    return optax.apply_updates(w, updates), opt_state, best_w, jnp.where(better, objective, best)

  init = (x, opt.init(x), x, jnp.full(x.shape[:1], jnp.inf, x.dtype))
  _, _, best_w, best = jax.lax.fori_loop(0, steps, body, init)
  return CWL2Result(jax.lax.stop_gradient(best_w), best, target)


def cw_l2_rescaled(logits_fn: core.LogitsFn, x: jax.Array, y: jax.Array, *, eps, key=None,
                   steps: int = STEPS, learning_rate: float = LEARNING_RATE, c: float = C,
                   kappa: float = KAPPA, eot_samples: int = 1) -> jax.Array:
  """EnResNet's C&W: :func:`cw_l2`, then ``x + eps * (w - x)`` projected onto the eps-ball and [0, 1].

  Args:
    logits_fn: ``logits_fn(x, key) -> (batch, classes)`` logits, the model in inference mode.
    x: images in [0, 1] with a leading batch axis.
    y: ``(batch,)`` int labels.
    eps: the scale of the perturbation and the l_inf radius of the projection (may be traced).
    key: PRNG key (``None`` only for deterministic models).
    steps, learning_rate, c, kappa, eot_samples: as :func:`cw_l2` (defaults: the EnResNet script's).

  Returns:
    The adversarial images, gradient stopped.

  References:
    Carlini & Wagner, 2017 (L2 attack); the EnResNet code's ``-method cw`` (module docstring).
  """
  core.check_eps(eps, "cw_l2_rescaled")
  res = cw_l2(logits_fn, x, y, key=key, steps=steps, learning_rate=learning_rate, c=c, kappa=kappa,
              eot_samples=eot_samples)
  return jax.lax.stop_gradient(core.project_ball(x + eps * (res.w - x), x, eps))


__all__ = ["C", "CWL2Result", "KAPPA", "LEARNING_RATE", "STEPS", "cw_l2", "cw_l2_rescaled"]
