"""CIFAR-style pre-activation ResNet with EnResNet's noise injection.

The member network of an EnResNet (Wang, Shi, Osher 2019): a 3x3 stem convolution, three stages of
pre-activation basic blocks (widths 16/32/64 by default, stride 2 at the start of stages 2 and 3 with a 1x1
projection shortcut), a final BatchNorm-ReLU, global average pooling and a dense layer.

Noise (docs/DESIGN.md §3): after each residual sum, ``out + noise_coef * std(out) * N(0, I)`` where ``std`` is ONE
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
