"""Training objectives: natural CE, PGD-AT, the paper's trade-off loss (6) and TRADES (5).

A training objective is split in two pure functions so the train step can craft adversarial examples
*outside* the parameter gradient:

* ``perturb(model, variables, x, y, key) -> (x_adv, batch_stats)`` (or ``None`` for natural training)
  crafts x' at the weights the model runs with (the relaxed weights u under Binary-Relax). With
  ``attack_bn="eval"`` (default) BatchNorm uses its running statistics and ``batch_stats`` come back
  unchanged; with ``attack_bn="train"`` every attack step runs BatchNorm in training mode (batch
  statistics) and updates the running averages, as the EnResNet PGD-AT code does (its attack module calls
  the network while it is in ``train()`` mode);
* ``loss(model, params, batch_stats, x, x_adv, y, key) -> (loss, (new_batch_stats, metrics))`` is
  differentiated with respect to ``params``; forward passes run in training mode. When a loss uses both x and
  x', each pass normalises with its own batch statistics and the running statistics are updated by both, x
  first, as in the TRADES reference code (:func:`paired_forward` runs the two as one batched pass).

References:
  Madry et al. Towards Deep Learning Models Resistant to Adversarial Attacks. ICLR 2018.
  Zhang et al. Theoretically Principled Trade-off between Robustness and Accuracy (TRADES). ICML 2019.
  Li, Wang, Xin. An Integrated Approach to Produce Robust Models with High Efficiency (loss (6)).
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from enquant import attacks
from enquant.attacks import core
from enquant.models import resnet

LOSSES = ("natural", "at", "tradeoff", "trades")
ATTACK_BN = ("eval", "train")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Which objective and how its adversarial examples are made.

  Attributes:
    kind: "natural" | "at" (CE on x') | "tradeoff" (alpha*CE(f(x),y) + beta*CE(f(x'),y)) |
      "trades" (CE(f(x),y) + beta*KL(f(x) || f(x'))).
    alpha: weight of the natural term of the trade-off loss (6).
    beta: weight of the robust term of (6), or TRADES' beta.
    eps: l_inf radius of the training attack.
    step_size: its step size.
    steps: its number of steps.
    random_start: uniform random start of the PGD attack (at, tradeoff).
    attack_bn: BatchNorm mode while crafting the training attack: "eval" (running statistics) or
      "train" (batch statistics, running averages updated by every attack step: the EnResNet code).
      None (the default) resolves to "train", or "eval" for TRADES (its reference code).

  The defaults are the paper's training attack (the EnResNet code): PGD-10, eps 0.031, step 0.007, random
  start, BatchNorm in train mode.
  """

  kind: str = "natural"
  alpha: float = 1.0
  beta: float = 8.0
  eps: float = core.PAPER_EPS
  step_size: float = 0.007
  steps: int = 10
  random_start: bool = True
  attack_bn: str | None = None

  def __post_init__(self):
    if self.attack_bn is None:  # frozen: resolve the default in place, so to_dict holds the value
      object.__setattr__(self, "attack_bn", "eval" if self.kind == "trades" else "train")
    if self.kind not in LOSSES:
      raise ValueError(f"loss must be one of {LOSSES}, got {self.kind!r}")
    if self.attack_bn not in ATTACK_BN:
      raise ValueError(f"train_attack_bn must be one of {ATTACK_BN}, got {self.attack_bn!r}")
    if self.kind == "trades" and self.attack_bn == "train":
      raise ValueError("TRADES crafts its attack with BatchNorm in eval mode (as its reference code); "
                       "use --train_attack_bn=eval with --loss=trades")
    if self.alpha < 0 or self.beta < 0:
      raise ValueError(f"alpha and beta must be >= 0, got alpha={self.alpha}, beta={self.beta}")
    if self.kind == "tradeoff" and self.alpha == 0 and self.beta == 0:
      raise ValueError("tradeoff loss needs alpha > 0 or beta > 0")
    if self.kind != "natural":
      if not 0 < self.eps <= 1:
        raise ValueError(f"train eps must be in (0, 1], got {self.eps}")
      if self.step_size <= 0 or self.steps < 1:
        raise ValueError(f"train attack needs step_size > 0 and steps >= 1, got "
                         f"{self.step_size}, {self.steps}")


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def kl_divergence(p_logits: jax.Array, q_logits: jax.Array) -> jax.Array:
  """Mean over the batch of KL(softmax(p) || softmax(q))."""
  p_log = jax.nn.log_softmax(p_logits)
  q_log = jax.nn.log_softmax(q_logits)
  return jnp.mean(jnp.sum(jnp.exp(p_log) * (p_log - q_log), axis=-1))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits, -1) == labels)


def trades_attack(logits_fn, x, *, eps, step_size, steps, key, unroll=False):
  """TRADES' inner maximisation: sign-gradient ascent on KL(f(x) || f(x')) from x + 0.001*N(0, I)."""
  k_init, k_loop = jax.random.split(key)
  clean = jax.lax.stop_gradient(logits_fn(x, k_init))

  def kl_sum(xa, k):  # the batch sum, so each example's ascent direction is its own KL gradient
    return x.shape[0] * kl_divergence(clean, logits_fn(xa, k))

  def step(i, xa):
    g = jax.grad(kl_sum)(xa, jax.random.fold_in(k_loop, i))
    return core.project_ball(xa + step_size * jnp.sign(g), x, eps)

  x0 = jnp.clip(x + 0.001 * jax.random.normal(k_init, x.shape, x.dtype), 0.0, 1.0)
  return jax.lax.stop_gradient(jax.lax.fori_loop(0, steps, step, x0, unroll=unroll))


def pgd_train_bn(model, variables, x, y, *, eps, step_size, steps, key, random_start=True):
  """PGD (CE, sign steps) with BatchNorm in training mode, as the EnResNet PGD-AT code crafts.

  Every step's forward uses the batch statistics and updates the running averages; the keys follow
  :func:`enquant.attacks.pgd`'s schedule, so with a BatchNorm-free model both give the same x_adv.

  Returns:
    ``(x_adv, batch_stats)``: the adversarial images (gradient stopped) and the updated running stats.
  """
  params = jax.lax.stop_gradient(variables["params"])
  start_key, step_keys = core.key_schedule(key, steps)

  def total(xa, stats, k):
    logits, new_stats = model.apply({"params": params, "batch_stats": stats}, xa, k, train=True)
    return jnp.sum(attacks.cross_entropy(logits, y)), new_stats

  def body(i, carry):
    xa, stats = carry
    g, stats = jax.grad(total, has_aux=True)(xa, stats, step_keys[i])
    xa = core.project_ball(xa + step_size * jnp.sign(g), x, eps)
    return xa, stats

  x0 = core.uniform_start(x, eps, start_key) if random_start else x
  x_adv, stats = jax.lax.fori_loop(0, steps, body, (x0, variables["batch_stats"]))
  return jax.lax.stop_gradient(x_adv), jax.lax.stop_gradient(stats)


def paired_forward(model, params, batch_stats, x, x_adv, k_nat, k_adv):
  """Training-mode forwards of x (key ``k_nat``) then x' (``k_adv``), computed as one batched pass.

  Returns ``(nat_logits, adv_logits, new_batch_stats)``, equal within float rounding to two passes one after
  the other (tested): ``vmap`` keeps each pass's batch statistics apart, and the running averages of the
  sequential passes, ``s2 = m * s1 + (1 - m) * b'`` with ``s1 = m * s0 + (1 - m) * b``, are rebuilt from the
  two single-pass updates ``r = m * s0 + (1 - m) * b`` and ``r' = m * s0 + (1 - m) * b'`` of the same
  ``s0`` as ``s2 = m * r + r' - m * s0``. Why: the compiled step holds one copy of the network instead of
  two (the trade-off train step compiles ~14 % faster on a CPU), and accelerators see one
  batch of 2B images.
  """
  m = resnet.BN_MOMENTUM

  def one(xx, kk):
    return model.apply({"params": params, "batch_stats": batch_stats}, xx, kk, train=True)

  logits, stats = jax.vmap(one)(jnp.stack([x, x_adv]), jnp.stack([k_nat, k_adv]))
  new_stats = jax.tree.map(lambda s0, s: m * s[0] + s[1] - m * s0, batch_stats, stats)
  return logits[0], logits[1], new_stats


def make_objective(cfg: LossConfig) -> tuple[Callable | None, Callable]:
  """``(perturb, loss)`` for a :class:`LossConfig` (see the module docstring for the signatures)."""

  def forward(model, params, batch_stats, x, key):
    return model.apply({"params": params, "batch_stats": batch_stats}, x, key, train=True)

  def perturb(model, variables, x, y, key):
    if cfg.attack_bn == "train":
      return pgd_train_bn(model, variables, x, y, eps=cfg.eps, step_size=cfg.step_size,
                          steps=cfg.steps, key=key, random_start=cfg.random_start)
    frozen = jax.lax.stop_gradient(variables)
    logits_fn = model.logits_fn(frozen)
    if cfg.kind == "trades":
      x_adv = trades_attack(logits_fn, x, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps,
                            key=key)
    else:
      x_adv = attacks.pgd(logits_fn, x, y, eps=cfg.eps, step_size=cfg.step_size, steps=cfg.steps,
                          key=key, random_start=cfg.random_start)
    return x_adv, variables["batch_stats"]

  def loss(model, params, batch_stats, x, x_adv, y, key):
    k_nat, k_adv = jax.random.split(key)
    metrics: dict[str, Any] = {}
    total = 0.0
    need_natural = cfg.kind in ("natural", "trades") or (cfg.kind == "tradeoff" and cfg.alpha > 0)
    if cfg.kind == "natural":
      nat_logits, batch_stats = forward(model, params, batch_stats, x, k_nat)
    elif need_natural:
      nat_logits, adv_logits, batch_stats = paired_forward(model, params, batch_stats, x, x_adv, k_nat,
                                                           k_adv)
    else:
      adv_logits, batch_stats = forward(model, params, batch_stats, x_adv, k_adv)
    if need_natural:
      nat_ce = cross_entropy(nat_logits, y)
      metrics.update(nat_loss=nat_ce, nat_acc=accuracy(nat_logits, y))
    if cfg.kind == "natural":
      total = nat_ce
    else:
      adv_ce = cross_entropy(adv_logits, y)
      metrics.update(adv_loss=adv_ce, adv_acc=accuracy(adv_logits, y))
      if cfg.kind == "at":
        total = adv_ce
      elif cfg.kind == "tradeoff":
        total = cfg.beta * adv_ce + (cfg.alpha * nat_ce if need_natural else 0.0)
      else:  # trades
        kl = kl_divergence(nat_logits, adv_logits)
        metrics.update(kl=kl)
        total = nat_ce + cfg.beta * kl
    metrics["loss"] = total
    return total, (batch_stats, metrics)

  return (None if cfg.kind == "natural" else perturb), loss
