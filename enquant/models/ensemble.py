"""En_n ResNet: n members with stacked parameters, applied with ``jax.vmap``, logits averaged.

Every leaf of the variables carries a leading member axis of size n (n = 1 for a single ResNet), so one
pytree holds the whole ensemble, the optimizer and the quantizer see ordinary arrays, and the forward is one
vectorised computation. The forward is a pure function of ``(variables, x, key, train)``; the key drives the
EnResNet noise and is split into one independent key per member.
"""

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from enquant.models import conv as conv_lib
from enquant.models import noise as noise_lib
from enquant.models import resnet

Variables = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """What defines an EnResNet; plain data (goes into ``config.json``).

  Attributes:
    num_classes: classes of the dataset.
    depth: 6n+2 depth (20, 32, 44, 56, 110); ignored when ``stages`` is given.
    stages: explicit blocks per stage, overriding ``depth``.
    widths: stem/stage channels (16, 32, 64 in the paper; tiny tests use 4-8).
    noise_coef: EnResNet noise coefficient (0.1 in the paper; 0 gives a deterministic ResNet).
    ensembles: number of members n of En_n.
    compute_dtype: dtype of the convolutions' arithmetic: "float32", or "bfloat16" (float32 parameters,
      BatchNorm, noise and logits; for GPU/TPU tensor cores).
    noise_rng: generator of the noise's normals (:mod:`enquant.models.noise`): ``"hash"`` (default, ~4x
      cheaper on CPUs) or ``"threefry"`` (``jax.random.normal``). Same distribution, different draws.
  """

  num_classes: int = 10
  depth: int = 20
  stages: tuple[int, ...] | None = None
  widths: tuple[int, ...] = (16, 32, 64)
  noise_coef: float = 0.1
  ensembles: int = 1
  compute_dtype: str = "float32"
  noise_rng: str = "hash"

  def __post_init__(self):
    if self.num_classes < 2:
      raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
    if self.ensembles < 1:
      raise ValueError(f"ensembles must be >= 1, got {self.ensembles}")
    if self.noise_coef < 0 or not math.isfinite(self.noise_coef):
      raise ValueError(f"noise_coef must be a finite number >= 0, got {self.noise_coef}")
    if any(w < 1 for w in self.widths) or len(self.widths) != len(self.block_stages):
      raise ValueError(f"widths must be {len(self.block_stages)} positive ints, got {self.widths}")
    if self.compute_dtype not in COMPUTE_DTYPES:
      raise ValueError(f"compute_dtype must be one of {COMPUTE_DTYPES}, got {self.compute_dtype!r}")
    if self.noise_rng not in noise_lib.NOISE_RNGS:
      raise ValueError(f"noise_rng must be one of {noise_lib.NOISE_RNGS}, got {self.noise_rng!r}")

  def to_dict(self) -> dict[str, Any]:
    """The fields as a JSON-ready dict."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
    """Inverse of :meth:`to_dict` (lists become tuples)."""
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

  @property
  def block_stages(self) -> tuple[int, ...]:
    if self.stages is not None:
      if not self.stages or any(s < 1 for s in self.stages):
        raise ValueError(f"stages must be positive block counts, got {self.stages}")
      return tuple(self.stages)
    return resnet.stages_for_depth(self.depth)

  @property
  def name(self) -> str:
    depth = 2 + 2 * sum(self.block_stages)
    base = f"ResNet{depth}"
    return f"En{self.ensembles}{base}" if self.noise_coef else (
        base if self.ensembles == 1 else f"{self.ensembles}x{base}")

  def member(self, mid_widths=None, conv_grad: str = "layout") -> resnet.ResNet:
    """The Flax member module (``conv_grad``: see :class:`EnResNet`)."""
    if conv_grad not in CONV_GRADS:
      raise ValueError(f"conv_grad must be one of {CONV_GRADS}, got {conv_grad!r}")
    dtype = None if self.compute_dtype == "float32" else jnp.dtype(self.compute_dtype)
    if conv_grad == "lax":
      conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype)
    else:
      conv = functools.partial(conv_lib.Conv, compute_dtype=dtype)
    return resnet.ResNet(num_classes=self.num_classes, stages=self.block_stages,
                         widths=tuple(self.widths), noise_coef=self.noise_coef,
                         mid_widths=mid_widths, conv_module=conv, noise_rng=self.noise_rng)


COMPUTE_DTYPES = ("float32", "bfloat16")
CONV_GRADS = ("layout", "lax")
MEMBER_MAPS = ("auto", "vmap", "unrolled", "grouped")


@dataclasses.dataclass(frozen=True)
class EnResNet:
  """Functional handle on an En_n ResNet: ``init`` and ``apply`` over stacked variables.

  Attributes:
    config: the model.
    member_map: how the members are applied to the stacked variables. ``"vmap"`` vectorises them
      (``jax.vmap``: batched convolutions, the natural choice on GPU/TPU); ``"unrolled"`` applies member i
      to slice i of the same stacked arrays, one after the other in the same jitted program (XLA:CPU runs
      vmapped convolutions as a slow grouped convolution: measured 13x slower for En2 on 2 CPU cores,
      BUILD_NOTES.md); ``"grouped"`` runs all members as one network with the members' channels side
      by side, every convolution one grouped convolution (``feature_group_count`` = members,
      :func:`enquant.models.resnet.grouped_apply`; for GPUs/TPUs, with JAX's own convolution
      gradient). ``"auto"``: unrolled on CPU, vmap elsewhere. All give the same numbers up to float
      rounding (tested); the random keys per member are the same.
    conv_grad: ``"layout"`` (:mod:`enquant.models.conv`: input gradients as forward-layout convolutions,
      which XLA:CPU runs ~4x faster inside rolled attack loops) or ``"lax"`` (JAX's stock rule; kept for
      benchmarks). Identical values and gradients.
  """

  config: ModelConfig
  member_map: str = "auto"
  conv_grad: str = "layout"

  def __post_init__(self):
    if self.member_map not in MEMBER_MAPS:
      raise ValueError(f"member_map must be one of {MEMBER_MAPS}, got {self.member_map!r}")
    if self.conv_grad not in CONV_GRADS:
      raise ValueError(f"conv_grad must be one of {CONV_GRADS}, got {self.conv_grad!r}")

  def map_members(self, fn, variables, keys):
    """``vmap(fn)(variables, keys)`` or its unrolled equivalent (stacked outputs either way); an
    arbitrary ``fn`` cannot be grouped, so ``"grouped"`` maps it with ``vmap``."""
    strategy = self.member_map
    if strategy == "auto":
      strategy = "unrolled" if jax.default_backend() == "cpu" else "vmap"
    if strategy in ("vmap", "grouped") or self.members == 1:
      return jax.vmap(fn)(variables, keys)
    outs = [fn(jax.tree.map(lambda a, i=i: a[i], variables), keys[i]) for i in range(self.members)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *outs)

  @property
  def members(self) -> int:
    return self.config.ensembles

  def init(self, key: jax.Array, sample_x: jax.Array) -> Variables:
    """Stacked variables ``{"params", "batch_stats"}``; member i is initialised from ``split(key)[i]``."""
    module = self.config.member(conv_grad=self.conv_grad)

    def init_one(k):
      param_key, noise_key = jax.random.split(k)
      return module.init({"params": param_key, "noise": noise_key}, sample_x[:1], train=False)

    return jax.jit(jax.vmap(init_one))(jax.random.split(key, self.members))

  def apply(self, variables: Variables, x: jax.Array, key: jax.Array, train: bool = False):
    """Averaged logits of the members.

    Args:
      variables: stacked ``{"params": ..., "batch_stats": ...}``.
      x: float32 images in [0, 1], NHWC.
      key: noise key (split into one per member). Deterministic models (``noise_coef == 0``) ignore it
        and accept ``None``; randomized ones raise ``ValueError`` without a key.
      train: BatchNorm uses batch statistics and updates its running averages.

    Returns:
      ``logits`` when ``train`` is False; ``(logits, new_batch_stats)`` when True.
    """
    module = self.config.member(conv_grad=self.conv_grad)
    if key is None:
      if self.config.noise_coef:
        raise ValueError(f"{self.config.name} is randomized (noise_coef={self.config.noise_coef}): "
                         "pass a PRNG key for its noise")
      key = jax.random.PRNGKey(0)  # never drawn from: the model has no noise
    keys = jax.random.split(key, self.members)

    if self.member_map == "grouped":
      dtype = None if self.config.compute_dtype == "float32" else jnp.dtype(self.config.compute_dtype)
      out = resnet.grouped_apply(variables, x, keys, stages=self.config.block_stages,
                                 noise_coef=self.config.noise_coef, noise_rng=self.config.noise_rng,
                                 train=train, compute_dtype=dtype)
      if train:
        return jnp.mean(out[0], axis=0), out[1]
      return jnp.mean(out, axis=0)

    def apply_one(v, k):
      if train:
        return module.apply(v, x, train=True, rngs={"noise": k}, mutable=["batch_stats"])
      return module.apply(v, x, train=False, rngs={"noise": k})

    out = self.map_members(apply_one, variables, keys)
    if train:
      logits, updates = out
      return jnp.mean(logits, axis=0), updates["batch_stats"]
    return jnp.mean(out, axis=0)

  def apply_eval(self, variables: Variables, x: jax.Array, key: jax.Array) -> jax.Array:
    """Inference-mode logits; ``jax.tree_util.Partial(model.apply_eval, variables)`` is a logits_fn
    whose variables are traced arguments (new weights reuse compiled evaluation functions)."""
    return self.apply(variables, x, key, train=False)

  def logits_fn(self, variables: Variables):
    """``(x, key) -> logits`` in inference mode (BatchNorm running averages): what attacks see."""
    return lambda x, key: self.apply(variables, x, key, train=False)


def count_params(params) -> int:
  """Number of scalars in a parameter pytree (all members of a stacked ensemble)."""
  return sum(int(p.size) for p in jax.tree.leaves(params))
