"""Experiment configuration as plain data (nested frozen dataclasses <-> JSON).

The launch command of the paper-scale CIFAR-10 run is::

    python -m experiments.cifar10 --ensembles=5 --quant=br --bits=1 --loss=tradeoff --alpha=1 --beta=8

and ``--quick`` gives the small CPU smoke variant of any experiment (:func:`quick`).
"""

import dataclasses
import json
import math
from typing import Any

from enquant.losses import LossConfig
from enquant.models.ensemble import ModelConfig

QUANT_MODES = ("float", "bc", "br")
LR_SCHEDULES = ("multistep", "cosine", "constant")
TERNARY_METHODS = ("exact", "twn", "br")
MBIT_METHODS = ("bcgd", "lloyd", "exact")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Weight quantization of the conv kernels.

  Attributes:
    mode: "float" (none), "bc" (Binary-Connect) or "br" (Binary-Relax).
    bits: 1 binary, 2 ternary, 4 (or 3..8) m-bit.
    ternary_method: "exact" | "twn" | "br" projection for bits=2 ("br" is BinaryRelax's quantize_tnn,
      the paper's "tnn").
    mbit_method: "bcgd" (BinaryRelax/BCGD's quantize_fbit, the paper's 4-bit) | "lloyd" | "exact" for
      bits >= 3.
    lambda0: initial relaxation weight lambda.
    growth: lambda's growth rate rho.
    growth_every_epochs: lambda *= growth every this many epochs (converted to steps, at least 1).
    relax_fraction: fraction of the epochs trained relaxed before switching to Binary-Connect
      (the paper's cut-off M; 80/200 = 0.4 in Algorithm 1's experiments).
  """

  mode: str = "float"
  bits: int = 1
  ternary_method: str = "exact"
  mbit_method: str = "lloyd"
  lambda0: float = 1.0
  growth: float = 1.05
  growth_every_epochs: float = 1.0
  relax_fraction: float = 0.4

  def __post_init__(self):
    if self.mode not in QUANT_MODES:
      raise ValueError(f"quant must be one of {QUANT_MODES}, got {self.mode!r}")
    if not 1 <= self.bits <= 8:
      raise ValueError(f"bits must be in 1..8 (1 binary, 2 ternary, 4 four-bit), got {self.bits}")
    if self.ternary_method not in TERNARY_METHODS:
      raise ValueError(f"ternary_method must be one of {TERNARY_METHODS}, got {self.ternary_method!r}")
    if self.mbit_method not in MBIT_METHODS:
      raise ValueError(f"mbit_method must be one of {MBIT_METHODS}, got {self.mbit_method!r}")
    if self.lambda0 <= 0 or self.growth < 1 or self.growth_every_epochs <= 0:
      raise ValueError(f"need lambda0 > 0, growth >= 1, growth_every_epochs > 0; got "
                       f"{self.lambda0}, {self.growth}, {self.growth_every_epochs}")
    if not 0 <= self.relax_fraction <= 1:
      raise ValueError(f"relax_fraction must be in [0, 1], got {self.relax_fraction}")

  @property
  def enabled(self) -> bool:
    return self.mode != "float"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation and data settings.

  Attributes:
    epochs: training epochs.
    batch_size: global batch (split over all local devices).
    lr: peak learning rate.
    lr_schedule: "multistep" (x lr_decay at `milestones`, fractions of the epochs: 80/120/160 of 200),
      "cosine" or "constant".
    milestones: fractions of training at which the multistep schedule decays.
    lr_decay: multistep decay factor.
    momentum: SGD momentum (Nesterov).
    weight_decay: L2 weight decay (acts on the float weights w under Binary-Relax).
    augment: pad-4 random crop (None: on for 32x32 datasets, off for 28x28 digits).
    flip: random horizontal flips with the crop (None: on except for SVHN, whose digits flip meaning).
    seed: seeds initialisation, batching, augmentation, noise and attacks.
  """

  epochs: int = 200
  batch_size: int = 128
  lr: float = 0.1
  lr_schedule: str = "multistep"
  milestones: tuple[float, ...] = (0.4, 0.6, 0.8)
  lr_decay: float = 0.1
  momentum: float = 0.9
  weight_decay: float = 5e-4
  augment: bool | None = None
  flip: bool | None = None
  seed: int = 0

  def __post_init__(self):
    if self.epochs < 1:
      raise ValueError(f"epochs must be >= 1, got {self.epochs}")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    if not (self.lr > 0 and math.isfinite(self.lr)):
      raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
    if self.lr_schedule not in LR_SCHEDULES:
      raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
    if self.weight_decay < 0 or not 0 <= self.momentum < 1:
      raise ValueError(f"need weight_decay >= 0 and 0 <= momentum < 1, got "
                       f"{self.weight_decay}, {self.momentum}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Final evaluation.

  Attributes:
    attacks: comma-separated attack names (see :func:`enquant.evaluate.parse_attacks`); "" for none.
      The default a1,a2,a3 are the paper's FGSM, IFGSM-20 and CW-l_inf (50 steps).
    eot_samples: for randomized models (noise_coef > 0) each attack is repeated with gradients averaged
      over this many noise draws (EOT); <= 1 disables.
    eps: l_inf radius of the evaluation attacks (the paper: 0.031 for every dataset).
    extra_eps: further radii at which every attack also runs (named ``<attack>@<eps>``; MNIST and
      Fashion-MNIST also at 0.1 and 0.3 in the paper protocol).
    max_examples: robust evaluation on the first N test images (0: all, the paper protocol); natural
      accuracy always uses all.
    batch_size: evaluation batch.
    seed: key of the randomized evaluation (recorded, so numbers are reproducible).
    max_unroll: attacks of at most this many steps run unrolled (compile time grows with the steps);
      0 rolls every loop (as fast, with enquant's convolution gradient).
  """

  attacks: str = "a1,a2,a3"
  eot_samples: int = 5
  eps: float = 0.031
  extra_eps: tuple[float, ...] = ()
  max_examples: int = 0
  batch_size: int = 256
  seed: int = 1234
  max_unroll: int = 0


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything that defines a run; ``config.json`` of the run directory."""

  dataset: str = "cifar10"
  data_dir: str | None = None
  data_source: str = "auto"
  max_train: int = 0
  max_test: int = 0
  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig()
  loss: LossConfig = LossConfig()
  quant: QuantConfig = QuantConfig()
  eval: EvalConfig = EvalConfig()

  def to_dict(self) -> dict[str, Any]:
    return dict(dataclasses.asdict(self), model=self.model.to_dict())

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ExperimentConfig":
    parts = {"train": TrainConfig, "loss": LossConfig,
             "quant": QuantConfig, "eval": EvalConfig}
    kwargs = {}
    for k, v in d.items():
      if k == "model":
        v = ModelConfig.from_dict(v)
      elif k in parts:
        v = parts[k](**{kk: tuple(vv) if isinstance(vv, list) else vv for kk, vv in v.items()})
      kwargs[k] = v
    return cls(**kwargs)

  def fingerprint_dict(self) -> dict[str, Any]:
    """The fields that make a checkpoint compatible (data location and eval settings excluded)."""
    d = self.to_dict()
    for k in ("data_dir", "data_source", "eval"):
      d.pop(k)
    return d


def augmentation(cfg: ExperimentConfig, image_size: int) -> tuple[bool, bool]:
  """``(crop, flip)`` of a run: the pad-4 random crop for 32x32 images unless set, and horizontal flips with
  it except for SVHN (house-number digits are not mirror-symmetric) unless set."""
  crop = cfg.train.augment if cfg.train.augment is not None else image_size == 32
  flip = cfg.train.flip if cfg.train.flip is not None else cfg.dataset != "svhn"
  return crop, crop and flip


def quick(cfg: ExperimentConfig) -> ExperimentConfig:
  """The CPU smoke variant: tiny widths, 2 epochs, few examples, short attacks."""
  return dataclasses.replace(
      cfg,
      max_train=cfg.max_train or 2000,
      max_test=cfg.max_test or 500,
      model=dataclasses.replace(cfg.model, depth=8, stages=None, widths=(8, 16, 32)),
      train=dataclasses.replace(cfg.train, epochs=min(cfg.train.epochs, 2), batch_size=64),
      loss=dataclasses.replace(cfg.loss, steps=min(cfg.loss.steps, 3)),
      eval=dataclasses.replace(cfg.eval, max_examples=min(cfg.eval.max_examples or 200, 200),
                               attacks="a1,a2", eot_samples=min(cfg.eval.eot_samples, 2), extra_eps=()),
  )
