"""The pruned EnResNet member: Flax modules that compute only the channels a quantized model needs.

Built by :func:`enquant.prune.prune` (which explains why each removal is exact); inference only.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from enquant.models import cost
from enquant.models import noise as noise_lib
from enquant.models.ensemble import EnResNet, ModelConfig

Indices = tuple[int, ...]
EPS = 1e-5  # BatchNorm epsilon of enquant.models.resnet
_PAD = ((1, 1), (1, 1))


def _take(x: jax.Array, idx: Indices) -> jax.Array:
  """Channels ``idx`` of ``x`` (no gather when ``idx`` is all of them, in order)."""
  if idx == tuple(range(x.shape[-1])):
    return x
  return x[..., np.asarray(idx, np.int32)]


def _scatter_add(base: jax.Array, idx: Indices, y: jax.Array) -> jax.Array:
  """``base`` with ``y`` added into channels ``idx`` (a plain add when ``idx`` is every channel)."""
  if idx == tuple(range(base.shape[-1])):
    return y + base  # the order of the unpruned block: conv2(...) + shortcut
  return base.at[..., np.asarray(idx, np.int32)].add(y, indices_are_sorted=True, unique_indices=True)


def _norm(name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=EPS, name=name)


def _conv(features: int, size: int, strides: int, name: str) -> nn.Conv:
  padding = _PAD if size == 3 else "VALID"
  return nn.Conv(features, (size, size), strides=strides, padding=padding, use_bias=False, name=name)


class PrunedBlock(nn.Module):
  """A pre-activation block that computes only the channels it needs (inference only).

  Attributes:
    features: width of the residual stream it writes (the unpruned block's ``features``).
    strides: stride of ``conv1`` and of the projection shortcut.
    projection: whether the unpruned block has a 1x1 projection shortcut.
    bn1_channels: residual channels normalised by ``bn1`` (those read by ``conv1`` or the shortcut).
    conv1_inputs: positions, within ``bn1_channels``, of the channels ``conv1`` reads.
    mid: inner channels kept (``conv1`` outputs, ``bn2``, ``conv2`` inputs); 0 removes ``conv1``.
    conv2_outputs: residual channels ``conv2`` (and ``conv2_const``) write.
    folded: whether constant inner channels were folded into ``conv2_const``.
    shortcut_inputs: positions, within ``bn1_channels``, of the channels the shortcut reads.
    shortcut_outputs: residual channels the projection shortcut writes (the others are 0).
    noise_coef: EnResNet noise coefficient (0 disables it).
  """

  features: int
  strides: int
  projection: bool
  bn1_channels: Indices
  conv1_inputs: Indices
  mid: int
  conv2_outputs: Indices
  folded: bool
  shortcut_inputs: Indices
  shortcut_outputs: Indices
  noise_coef: float = 0.0

  @nn.compact
  def __call__(self, x: jax.Array, noise: jax.Array | None = None) -> jax.Array:
    """The block's output; ``noise`` is this block's ``N(0, I)`` draw (required when ``noise_coef``)."""
    n, h, w, _ = x.shape
    oh, ow = (h - 1) // self.strides + 1, (w - 1) // self.strides + 1
    out = None
    if self.bn1_channels:
      out = nn.relu(_norm("bn1")(_take(x, self.bn1_channels)))
    if self.projection:
      base = jnp.zeros((n, oh, ow, self.features), x.dtype)
      if self.shortcut_outputs:
        y = _conv(len(self.shortcut_outputs), 1, self.strides, "shortcut")(
            _take(out, self.shortcut_inputs))
        if self.shortcut_outputs == tuple(range(self.features)):
          base = y
        else:
          base = base.at[..., np.asarray(self.shortcut_outputs, np.int32)].set(
              y, indices_are_sorted=True, unique_indices=True)
    else:
      base = x
    if self.conv2_outputs:
      width = len(self.conv2_outputs)
      y = None
      if self.mid:
        hid = _conv(self.mid, 3, self.strides, "conv1")(_take(out, self.conv1_inputs))
        hid = nn.relu(_norm("bn2")(hid))
        y = _conv(width, 3, 1, "conv2")(hid)
      if self.folded:
        const = _conv(width, 3, 1, "conv2_const")(jnp.ones((1, oh, ow, 1), x.dtype))
        y = const if y is None else y + const
      base = _scatter_add(base, self.conv2_outputs, y)
    if self.noise_coef:
      if noise is None:
        raise ValueError("a pruned block with noise_coef > 0 needs its noise draw")
      base = base + self.noise_coef * jnp.std(base) * noise  # add_noise's formula, the draw given
    return base


class PrunedResNet(nn.Module):
  """One pruned EnResNet member (inference only): pruned stem and blocks, then the unchanged head.

  Attributes:
    num_classes: size of the output layer.
    stem_width: channels of the residual stream after the stem.
    stem_inputs: image channels the stem reads.
    stem_outputs: stem channels computed (the others are 0).
    blocks: ``((name, PrunedBlock attributes as a dict-like tuple of items), ...)``.
  """

  num_classes: int
  stem_width: int
  stem_inputs: Indices
  stem_outputs: Indices
  blocks: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]

  @nn.compact
  def __call__(self, x: jax.Array, noise: Sequence[jax.Array] | None = None) -> jax.Array:
    """Logits; ``noise`` holds each block's ``N(0, I)`` draw (see :func:`noise_draws`)."""
    n, h, w, _ = x.shape
    if self.stem_outputs == tuple(range(self.stem_width)):
      x = _conv(self.stem_width, 3, 1, "stem")(_take(x, self.stem_inputs))
    else:
      stream = jnp.zeros((n, h, w, self.stem_width), x.dtype)
      if self.stem_outputs:
        y = _conv(len(self.stem_outputs), 3, 1, "stem")(_take(x, self.stem_inputs))
        stream = stream.at[..., np.asarray(self.stem_outputs, np.int32)].set(
            y, indices_are_sorted=True, unique_indices=True)
      x = stream
    for index, (name, fields) in enumerate(self.blocks):
      x = PrunedBlock(**dict(fields), name=name)(x, None if noise is None else noise[index])
    x = nn.relu(_norm("bn_final")(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)


class _Draw(nn.Module):
  """``N(0, I)`` of one block's output shape from ``make_rng("noise")``, as PreActBlock draws it."""

  shape: tuple[int, ...]
  rng: str = "threefry"

  @nn.compact
  def __call__(self) -> jax.Array:
    return noise_lib.normal(self.make_rng("noise"), self.shape, jnp.float32, self.rng)


class _NoiseDraws(nn.Module):
  """Every block's noise draw, from scopes named like the blocks of :class:`enquant.models.ResNet`."""

  shapes: tuple[tuple[str, tuple[int, ...]], ...]
  rng: str = "threefry"

  @nn.compact
  def __call__(self) -> tuple[jax.Array, ...]:
    return tuple(_Draw(shape, self.rng, name=name)() for name, shape in self.shapes)


def noise_draws(model_config: ModelConfig, x_shape: Sequence[int], key: jax.Array) -> tuple[jax.Array, ...]:
  """The ``N(0, I)`` draws of every block and member that ``EnResNet.apply(..., x, key)`` makes.

  Member ``i`` uses ``jax.random.split(key, n)[i]`` and block ``stage{s}_block{b}`` draws from
  ``make_rng("noise")`` in a scope of that name, mapped over the members exactly as
  :meth:`enquant.models.EnResNet.apply` maps them (``map_members``: vmap or unrolled), with the model's
  generator (``model_config.noise_rng``): so the draws are bitwise those of the unpruned model for every
  PRNG implementation (``rbg`` keys give different numbers under ``vmap`` than one key at a time).

  Args:
    model_config: the model.
    x_shape: ``(N, H, W, C)`` of the input batch.
    key: the noise key given to ``apply``.

  Returns:
    One ``(members, N, H_b, W_b, C_b)`` array per block.
  """
  n, h, w, _ = x_shape
  shapes = []
  for name, _, width, strides, _ in cost.block_layout(model_config):
    h, w = cost.out_size(h, strides), cost.out_size(w, strides)
    shapes.append((name, (n, h, w, width)))
  draws = _NoiseDraws(tuple(shapes), model_config.noise_rng)
  keys = jax.random.split(key, model_config.ensembles)
  return EnResNet(model_config).map_members(
      lambda _, k: draws.apply({}, rngs={"noise": k}), None, keys)


def member_macs(module: PrunedResNet, input_shape: Sequence[int]) -> int:
  """Multiply-accumulates per image of one pruned member (the convolutions it computes, and ``fc``)."""
  h, w, _ = cost.image_shape(input_shape)
  total = h * w * 9 * len(module.stem_inputs) * len(module.stem_outputs)
  for _, fields in module.blocks:
    f = dict(fields)
    h, w = cost.out_size(h, f["strides"]), cost.out_size(w, f["strides"])
    outputs = len(f["conv2_outputs"])
    if outputs:
      total += h * w * 9 * (len(f["conv1_inputs"]) * f["mid"] + f["mid"] * outputs)
      total += h * w * 9 * outputs * int(f["folded"])
    if f["projection"]:
      total += h * w * len(f["shortcut_inputs"]) * len(f["shortcut_outputs"])
  fc_in = dict(module.blocks[-1][1])["features"] if module.blocks else module.stem_width
  return total + fc_in * module.num_classes
