"""CIFAR-style pre-activation ResNet with EnResNet's noise injection.

The member network of an EnResNet (Wang, Shi, Osher 2019): a 3x3 stem convolution, three stages of
pre-activation basic blocks (widths 16/32/64 by default, stride 2 at the start of stages 2 and 3 with a 1x1
projection shortcut), a final BatchNorm-ReLU, global average pooling and a dense layer.

Noise (docs/DESIGN.md §5): after each residual sum, ``out + noise_coef * std(out) * N(0, I)`` where ``std`` is ONE
scalar over the whole batch tensor (not stop-gradiented). The noise is drawn from the ``"noise"`` rng stream and
is on at train *and* test time: EnResNet is a randomized defence. ``noise_coef=0`` removes it exactly.

References:
  Wang, Shi, Osher. ResNets Ensemble via the Feynman-Kac Formalism to Improve Natural and Robust Accuracies.
  NeurIPS 2019.
  He, Zhang, Ren, Sun. Identity Mappings in Deep Residual Networks. ECCV 2016.
"""

from collections.abc import Sequence
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from enquant.models import conv as conv_lib
from enquant.models import noise as noise_lib

# BatchNorm's running averages: r <- BN_MOMENTUM * r + (1 - BN_MOMENTUM) * batch statistic (the PyTorch
# reference's momentum 0.1 in its convention).
BN_MOMENTUM = 0.9

# He-normal over fan-out, as the EnResNet/PyTorch code initialises convolutions.
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def stages_for_depth(depth: int) -> tuple[int, int, int]:
  """Blocks per stage of a CIFAR ResNet of depth 6n+2 (20, 32, 44, 56, 110, ...)."""
  if depth < 8 or (depth - 2) % 6:
    raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 20, 32, 44, 56, 110, ...), got {depth}")
  n = (depth - 2) // 6
  return (n, n, n)


def add_noise(x: jax.Array, coef: float, key: jax.Array, rng: str = "threefry") -> jax.Array:
  """EnResNet noise: ``x + coef * std(x) * N(0, I)``, std one scalar over the whole tensor; the normals
  come from generator ``rng`` (:data:`enquant.models.noise.NOISE_RNGS`)."""
  return x + coef * jnp.std(x) * noise_lib.normal(key, x.shape, x.dtype, rng)


class PreActBlock(nn.Module):
  """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 (+ shortcut), then noise.

  Attributes:
    features: output channels.
    strides: stride of the first convolution (and of the projection shortcut).
    mid_features: channels between the two convolutions (``None``: ``features``; smaller after channel
      pruning).
    noise_coef: EnResNet noise coefficient (0 disables it).
    noise_rng: generator of the noise's normals (:mod:`enquant.models.noise`).
  """

  features: int
  strides: int = 1
  mid_features: int | None = None
  noise_coef: float = 0.0
  conv_module: type[nn.Module] = conv_lib.Conv
  noise_rng: str = "threefry"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM, epsilon=1e-5)
    conv = functools.partial(self.conv_module, kernel_init=_conv_init)
    pad = ((1, 1), (1, 1))
    out = nn.relu(norm(name="bn1")(x))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, (1, 1), strides=self.strides, padding="VALID",
                      name="shortcut")(out)
    out = conv(self.mid_features or self.features, (3, 3), strides=self.strides, padding=pad,
               name="conv1")(out)
    out = nn.relu(norm(name="bn2")(out))
    out = conv(self.features, (3, 3), padding=pad, name="conv2")(out)
    out = out + shortcut
    if self.noise_coef:
      out = add_noise(out, self.noise_coef, self.make_rng("noise"), self.noise_rng)
    return out


class ResNet(nn.Module):
  """CIFAR-style pre-activation ResNet (one EnResNet member).

  Attributes:
    num_classes: size of the output layer.
    stages: blocks per stage, e.g. ``(3, 3, 3)`` for ResNet20 (see :func:`stages_for_depth`).
    widths: channels of the stem and of each stage.
    noise_coef: EnResNet noise coefficient after every residual sum (0: a plain ResNet).
    mid_widths: optional per-block inner widths (flattened over stages), used by channel pruning.
    conv_module: the convolution (:class:`enquant.models.conv.Conv`: fast input gradients inside rolled
      loops; ``functools.partial(Conv, compute_dtype=jnp.bfloat16)`` for bf16 compute, or ``nn.Conv``
      with ``use_bias=False`` for JAX's stock gradient). Same parameters and values either way.
    noise_rng: generator of the noise's normals, ``"threefry"`` or ``"hash"`` (:mod:`enquant.models.noise`).
  """

  num_classes: int = 10
  stages: Sequence[int] = (3, 3, 3)
  widths: Sequence[int] = (16, 32, 64)
  noise_coef: float = 0.0
  mid_widths: Sequence[int] | None = None
  conv_module: type[nn.Module] = conv_lib.Conv
  noise_rng: str = "threefry"

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    x = self.conv_module(self.widths[0], (3, 3), padding=((1, 1), (1, 1)), kernel_init=_conv_init,
                         name="stem")(x)
    index = 0
    for stage, (blocks, width) in enumerate(zip(self.stages, self.widths)):
      for block in range(blocks):
        strides = 2 if stage > 0 and block == 0 else 1
        mid = self.mid_widths[index] if self.mid_widths is not None else None
        x = PreActBlock(width, strides, mid, self.noise_coef, self.conv_module, self.noise_rng,
                        name=f"stage{stage + 1}_block{block + 1}")(x, train)
        index += 1
    x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=1e-5, name="bn_final")(x)
    x = nn.relu(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, name="fc")(x)


# ----------------------------------------------------------------------------------------------------
# Grouped members: every member of a stacked ensemble in one network with member-major channels
# ----------------------------------------------------------------------------------------------------


class _NoiseKey(nn.Module):
  @nn.compact
  def __call__(self) -> jax.Array:
    return self.make_rng("noise")


class _NoiseKeys(nn.Module):
  """The noise keys :class:`ResNet`'s blocks draw (same module names, same ``make_rng`` calls)."""

  names: Sequence[str]

  @nn.compact
  def __call__(self) -> list[jax.Array]:
    return [_NoiseKey(name=name)() for name in self.names]


def _block_names(stages: Sequence[int]) -> list[str]:
  return [f"stage{s + 1}_block{b + 1}" for s, blocks in enumerate(stages) for b in range(blocks)]


def _grouped_kernel(kernel: jax.Array) -> jax.Array:
  """``(M, kh, kw, C_in, C_out)`` stacked kernels -> ``(kh, kw, C_in, M * C_out)`` (member-major)."""
  m, kh, kw, cin, cout = kernel.shape
  return jnp.transpose(kernel, (1, 2, 3, 0, 4)).reshape(kh, kw, cin, m * cout)


def _grouped_conv(x, kernel, strides, padding, groups, compute_dtype):
  w = _grouped_kernel(kernel)
  if compute_dtype is not None:
    x_in, w = x.astype(compute_dtype), w.astype(compute_dtype)
  else:
    x_in = x
  y = jax.lax.conv_general_dilated(x_in, w, (strides, strides), padding,
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   feature_group_count=groups)
  return y.astype(x.dtype)


def _grouped_norm(x, params, stats, train: bool, new_stats: dict, name: str):
  """BatchNorm over member-major channels, as ``nn.BatchNorm`` computes it per member."""
  flat = lambda a: a.reshape(-1)
  if train:
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.maximum(0.0, jnp.mean(x * x, axis=(0, 1, 2)) - mean * mean)
    m = stats["mean"].shape[0]
    new_stats[name] = {
        "mean": BN_MOMENTUM * stats["mean"] + (1 - BN_MOMENTUM) * mean.reshape(m, -1),
        "var": BN_MOMENTUM * stats["var"] + (1 - BN_MOMENTUM) * var.reshape(m, -1)}
  else:
    mean, var = flat(stats["mean"]), flat(stats["var"])
  mul = jax.lax.rsqrt(var + 1e-5) * flat(params["scale"])
  return (x - mean) * mul + flat(params["bias"])


def _grouped_noise(x, coef, keys, rng, groups):
  """Per member: ``x + coef * std(x_member) * N(0, I)`` with the member's own key."""
  n, h, w, c = x.shape
  xm = x.reshape(n, h, w, groups, c // groups)
  std = jnp.std(xm, axis=(0, 1, 2, 4), keepdims=True)
  normals = jax.vmap(lambda k: noise_lib.normal(k, (n, h, w, c // groups), x.dtype, rng))(keys)
  return (xm + coef * std * jnp.transpose(normals, (1, 2, 3, 0, 4))).reshape(x.shape)


def _grouped_block(x, p, s, keys, *, strides, noise_coef, noise_rng, train, new_stats, groups,
                   compute_dtype):
  """:class:`PreActBlock` over member-major channels; returns ``(out, new block stats)``."""
  stats: dict = {}
  pad = ((1, 1), (1, 1))
  out = nn.relu(_grouped_norm(x, p["bn1"], s["bn1"], train, stats, "bn1"))
  shortcut = x
  if "shortcut" in p:
    shortcut = _grouped_conv(out, p["shortcut"]["kernel"], strides, ((0, 0), (0, 0)), groups,
                             compute_dtype)
  out = _grouped_conv(out, p["conv1"]["kernel"], strides, pad, groups, compute_dtype)
  out = nn.relu(_grouped_norm(out, p["bn2"], s["bn2"], train, stats, "bn2"))
  out = _grouped_conv(out, p["conv2"]["kernel"], 1, pad, groups, compute_dtype) + shortcut
  if noise_coef:
    out = _grouped_noise(out, noise_coef, keys, noise_rng, groups)
  new_stats.update(stats)
  return out


def grouped_apply(variables, x: jax.Array, member_keys: jax.Array, *, stages: Sequence[int],
                  noise_coef: float, noise_rng: str, train: bool = False, compute_dtype=None):
  """Every member of a stacked ensemble at once, as grouped convolutions (``feature_group_count`` =
  members): the same values as applying :class:`ResNet` to each member's slice (tested).

  One network whose channels are the members' channels side by side (member-major): the stem is one
  convolution with ``M x width`` outputs, every other convolution a grouped one, BatchNorm per channel,
  the noise's std per member, and member ``i``'s noise drawn from ``member_keys[i]`` exactly as
  :class:`ResNet` draws it. Made for GPUs/TPUs, which run one wide grouped convolution better than
  ``M`` narrow ones; XLA:CPU runs grouped convolutions slowly.

  Args:
    variables: stacked ``{"params", "batch_stats"}`` (leading member axis, :class:`EnResNet` layout).
    x: ``(N, H, W, C)`` images, shared by the members.
    member_keys: ``(M,)`` noise keys, one per member.
    stages: blocks per stage.
    noise_coef: EnResNet noise coefficient.
    noise_rng: generator of the noise's normals.
    train: BatchNorm with batch statistics (and updated running averages).
    compute_dtype: dtype of the convolutions' arithmetic (``None``: the input's).

  Returns:
    ``(M, N, classes)`` logits; with ``train`` also the new stacked ``batch_stats``.
  """
  params, batch_stats = variables["params"], variables["batch_stats"]
  groups = params["fc"]["kernel"].shape[0]
  names = _block_names(stages)
  keys = (jax.vmap(lambda k: _NoiseKeys(names).apply({}, rngs={"noise": k}))(member_keys)
          if noise_coef else [None] * len(names))
  out = _grouped_conv(x, params["stem"]["kernel"], 1, ((1, 1), (1, 1)), 1, compute_dtype)
  new_stats: dict = {}
  for i, name in enumerate(names):
    strides = 2 if name.endswith("_block1") and not name.startswith("stage1") else 1
    block_stats: dict = {}
    out = _grouped_block(out, params[name], batch_stats[name], keys[i], strides=strides,
                         noise_coef=noise_coef, noise_rng=noise_rng, train=train,
                         new_stats=block_stats, groups=groups, compute_dtype=compute_dtype)
    new_stats[name] = block_stats
  final: dict = {}
  out = nn.relu(_grouped_norm(out, params["bn_final"], batch_stats["bn_final"], train, final, "bn"))
  if train:
    new_stats["bn_final"] = final["bn"]
  pooled = jnp.mean(out, axis=(1, 2)).reshape(x.shape[0], groups, -1)
  logits = jnp.einsum("nmc,mck->mnk", pooled, params["fc"]["kernel"]) + params["fc"]["bias"][:, None]
  return (logits, new_stats) if train else logits
