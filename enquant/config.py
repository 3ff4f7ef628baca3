"""Experiment configuration: one tree of frozen dataclasses, the paper's protocol as its defaults.

Each setting lives in one place: its field (type and default), its help text (``metadata["help"]``, or the
``Attributes:`` entry of the class docstring for :class:`ModelConfig` and :class:`LossConfig`), and its
validation (``__post_init__``). The command line is generated from this tree (``experiments/common.py``),
so adding a setting is one field here plus its test. A notebook and the CLI get the same model from the same
words: ``QuantConfig(mode="br", bits=2)`` is BinaryRelax's ``quantize_tnn`` ternary projection either way.

Per-dataset protocols are data (:data:`PRESETS`, applied by :func:`preset`). The paper-scale CIFAR-10 run::

    python -m experiments.cifar10 --ensembles=5 --quant=br --bits=1 --loss=tradeoff --alpha=1 --beta=8

``--quick`` gives the small CPU smoke variant of any experiment (:func:`quick`).
"""

import dataclasses
import json
import math
import re
from typing import Any, Iterator, NamedTuple

from enquant import attackspecs
from enquant import data as data_lib
from enquant.attacks.core import PAPER_EPS
from enquant.losses import LossConfig
from enquant.models.ensemble import ModelConfig
from enquant.quant import MBIT_METHODS, TERNARY_METHODS

QUANT_MODES = ("float", "bc", "br")
LR_SCHEDULES = ("multistep", "cosine", "constant")
DATA_SOURCES = ("auto", "local", "tfds", "embedded")


def setting(default: Any, help: str, *, flag: str | None = None):  # pylint: disable=redefined-builtin
  """A dataclass field with its help text and, optionally, its flat command-line name (``--flag``)."""
  return dataclasses.field(default=default, metadata={"help": help, "flag": flag})


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Weight quantization of the conv kernels (BinaryRelax's projections by default, as the paper)."""

  mode: str = setting("float", f"Weight quantization of the conv kernels: one of {QUANT_MODES} (bc: "
                      "Binary-Connect, br: Binary-Relax).", flag="quant")
  bits: int = setting(1, "1 binary, 2 ternary, 4 (or 3..8) m-bit.", flag="bits")
  ternary_method: str = setting("br", "Ternary projection (bits=2): br (BinaryRelax's quantize_tnn, the "
                                "paper's tnn), exact (the Euclidean projection) or twn.",
                                flag="ternary_method")
  mbit_method: str = setting("bcgd", "m-bit projection (bits >= 3): bcgd (BinaryRelax/BCGD's "
                             "quantize_fbit, the paper's 4-bit), lloyd (refined, less sparse) or exact.",
                             flag="mbit_method")
  lambda0: float = setting(1.0, "Binary-Relax initial relaxation weight lambda.", flag="br_lambda0")
  growth: float = setting(1.05, "Binary-Relax growth rate rho of lambda.", flag="br_growth")
  growth_every_epochs: float = setting(1.0, "Grow lambda every this many epochs (converted to steps, at "
                                       "least 1).", flag="br_growth_every")
  relax_fraction: float = setting(0.4, "Fraction of the epochs trained relaxed before Binary-Connect (the "
                                  "paper's cut-off M: 80/200).", flag="br_relax_fraction")

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
  """Optimisation and data settings (the paper's: 200 epochs, SGD 0.1 x0.1 at 80/120/160)."""

  epochs: int = setting(200, "Training epochs.", flag="epochs")
  batch_size: int = setting(128, "Global batch size (split over all devices, of every process with "
                            "--distributed).", flag="batch_size")
  lr: float = setting(0.1, "Peak learning rate.", flag="lr")
  lr_schedule: str = setting("multistep", f"Learning-rate schedule: one of {LR_SCHEDULES}.",
                             flag="lr_schedule")
  milestones: tuple[float, ...] = setting((0.4, 0.6, 0.8), "Fractions of training at which the multistep "
                                          "schedule decays.")
  lr_decay: float = setting(0.1, "Multistep decay factor.")
  momentum: float = setting(0.9, "SGD (Nesterov) momentum.")
  weight_decay: float = setting(5e-4, "Weight decay (on the float weights w under Binary-Relax).",
                                flag="weight_decay")
  augment: bool | None = setting(None, "Random pad-4 crop (auto: on for 32x32 sets).", flag="augment")
  flip: bool | None = setting(None, "Horizontal flips with the crop (auto: all but SVHN).", flag="flip")
  seed: int = setting(0, "Seed of initialisation, batches, augmentation, noise and attacks.", flag="seed")

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
    if any(not 0 < m < 1 for m in self.milestones) or not 0 < self.lr_decay <= 1:
      raise ValueError(f"need milestones in (0, 1) and lr_decay in (0, 1], got {self.milestones}, "
                       f"{self.lr_decay}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """Final evaluation (the paper's A1-A3 at eps 0.031 on the whole test set)."""

  attacks: str = setting("a1,a2,a3", "Final evaluation attacks, comma-separated: a1 (FGSM), a2 "
                         "(IFGSM-20), a3 (CW-l_inf 50), fgsm, pgd<N>, cw<N>, cwl2 (the EnResNet code's "
                         "L2 C&W rescaled to eps), apgd-ce, apgd-dlr, with optional -eot<K>, -r<R> "
                         "(restarts), -rs (random start).", flag="attacks")
  eot_samples: int = setting(5, "Also run every attack with EOT over K noise draws (randomized models "
                             "only; 0 or 1: off).", flag="eot_samples")
  eps: float = setting(PAPER_EPS, "Evaluation attack l_inf radius, in (0, 1] (the paper: 0.031).",
                       flag="eval_eps")
  extra_eps: tuple[float, ...] = setting((), "Further radii every attack also runs at, named "
                                         "<attack>@<eps> (mnist/fmnist: 0.1,0.3).", flag="eval_extra_eps")
  max_examples: int = setting(0, "Robust evaluation on the first N test images (0: all).",
                              flag="eval_max")
  batch_size: int = setting(256, "Evaluation batch size.")
  seed: int = setting(1234, "Key of the (randomized) evaluation.", flag="eval_seed")
  max_unroll: int = setting(0, "Attacks of at most this many steps are unrolled (longer compiles); 0: all "
                            "rolled.", flag="max_unroll")

  def __post_init__(self):
    for name, value in (("eval eps", self.eps),) + tuple(("eval extra_eps", e) for e in self.extra_eps):
      if not (isinstance(value, (int, float)) and 0 < value <= 1):
        raise ValueError(f"{name} must be in (0, 1], got {value!r}")
    for name in ("eot_samples", "max_examples", "max_unroll"):
      if getattr(self, name) < 0:
        raise ValueError(f"eval {name} must be >= 0, got {getattr(self, name)}")
    if self.batch_size < 1:
      raise ValueError(f"eval batch_size must be >= 1, got {self.batch_size}")

  def attack_specs(self, randomized: bool) -> tuple[Any, ...]:
    """The typed attacks (:class:`enquant.attackspecs.AttackSpec`): ``attacks`` at ``eps``, their EOT
    variants for a randomized model (``eot_samples > 1``), then every attack at each of ``extra_eps``
    (named ``<name>@<eps>``). Raises ValueError naming an unknown attack."""
    base = list(attackspecs.parse_attacks(self.attacks, eps=self.eps))
    if randomized and self.eot_samples > 1:
      base += [dataclasses.replace(s, name=f"{s.name}-eot{self.eot_samples}", eot_samples=self.eot_samples)
               for s in base if s.kind != "none" and s.eot_samples == 1]
    specs = list(base)
    for eps in self.extra_eps:
      specs += [dataclasses.replace(s, name=f"{s.name}@{eps:g}")
                for s in attackspecs.parse_attacks(self.attacks, eps=eps) if s.kind != "none"]
    return tuple(specs)


def _paper_loss() -> LossConfig:
  """The paper's training attack: PGD-10, eps 0.031, step 0.007, BatchNorm in train mode while crafting
  (the EnResNet code); natural training until a preset or the user names a robust loss."""
  return LossConfig()


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  """Everything that defines a run; ``config.json`` of the run directory."""

  dataset: str = setting("cifar10", f"Dataset: one of {tuple(sorted(data_lib.DATASETS))}.",
                         flag="dataset")
  data_dir: str | None = setting(None, "Folder with the official dataset files (default: "
                                 "$ENQUANT_DATA_DIR, ../shared/data beside the repo, or ~/.enquant/data); "
                                 "with --data_source=tfds, TFDS's data directory.", flag="data_dir")
  data_source: str = setting("auto", "Where data comes from (auto: local files, else TFDS; embedded: the "
                             "5000/1000 MNIST sample in the package).", flag="data_source")
  max_train: int = setting(0, "Use only the first N training images (0: all).", flag="max_train")
  max_test: int = setting(0, "Use only the first N test images (0: all).", flag="max_test")
  model: ModelConfig = ModelConfig()
  train: TrainConfig = TrainConfig()
  loss: LossConfig = _paper_loss()
  quant: QuantConfig = QuantConfig()
  eval: EvalConfig = EvalConfig()

  def __post_init__(self):
    if self.dataset not in data_lib.DATASETS:
      raise ValueError(f"unknown dataset {self.dataset!r}; expected one of {sorted(data_lib.DATASETS)}")
    if self.data_source not in DATA_SOURCES:
      raise ValueError(f"data_source must be one of {DATA_SOURCES}, got {self.data_source!r}")
    if self.max_train < 0 or self.max_test < 0:
      raise ValueError(f"max_train and max_test must be >= 0, got {self.max_train}, {self.max_test}")

  def to_dict(self) -> dict[str, Any]:
    return dict(dataclasses.asdict(self), model=self.model.to_dict())

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "ExperimentConfig":
    kwargs = {}
    for k, v in d.items():
      if k == "model":
        v = ModelConfig.from_dict(v)
      elif k in SECTIONS:
        v = SECTIONS[k](**{kk: tuple(vv) if isinstance(vv, list) else vv for kk, vv in v.items()})
      kwargs[k] = v
    return cls(**kwargs)

  def fingerprint_dict(self) -> dict[str, Any]:
    """The fields that make a checkpoint compatible (data location and eval settings excluded)."""
    d = self.to_dict()
    for k in ("data_dir", "data_source", "eval"):
      d.pop(k)
    return d


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "loss": LossConfig, "quant": QuantConfig,
            "eval": EvalConfig}
# Flat command-line names of the settings of the classes defined beside their modules (ModelConfig,
# LossConfig); the other classes carry theirs in ``metadata["flag"]``.
FOREIGN_FLAGS = {"model.depth": "depth", "model.stages": "stages", "model.noise_coef": "noise_coef",
                 "model.ensembles": "ensembles", "model.noise_rng": "noise_rng", "loss.kind": "loss",
                 "loss.alpha": "alpha", "loss.beta": "beta", "loss.eps": "train_eps",
                 "loss.step_size": "train_step_size", "loss.steps": "train_steps",
                 "loss.attack_bn": "train_attack_bn"}
DERIVED = ("model.num_classes",)  # set by the dataset, never by hand

# Each dataset's protocol as overrides of the defaults (the paper, docs/DESIGN.md §5): CIFAR-10
# trains PGD-AT (Tables I-IV, VII); the others loss (6) with alpha = 1, beta = 8 (Table VIII); MNIST and
# Fashion-MNIST are also attacked at eps 0.1 and 0.3.
PRESETS = {
    "cifar10": {"loss.kind": "at"},
    "cifar100": {"loss.kind": "tradeoff"},
    "svhn": {"loss.kind": "tradeoff"},
    "mnist": {"loss.kind": "tradeoff", "eval.extra_eps": (0.1, 0.3)},
    "fmnist": {"loss.kind": "tradeoff", "eval.extra_eps": (0.1, 0.3)},
}


class Setting(NamedTuple):
  """One leaf of the tree: ``path`` ("loss.beta"), its field, owning class, help and flat flag name."""
  path: str
  field: dataclasses.Field
  owner: type
  help: str
  flag: str | None


def _docstring_help(cls: type) -> dict[str, str]:
  """``{attribute: text}`` of a Google-style ``Attributes:`` section."""
  doc = (cls.__doc__ or "").split("Attributes:", 1)
  out, name = {}, None
  for line in (doc[1] if len(doc) > 1 else "").splitlines():
    if (m := re.match(r"^\s{4}(\w+): (.*)$", line)):
      name, out[m.group(1)] = m.group(1), m.group(2).strip()
    elif name and line.strip():
      out[name] += " " + line.strip()
  return out


def settings() -> Iterator[Setting]:
  """Every setting of :class:`ExperimentConfig`, in field order (the derived ``model.num_classes`` left
  out)."""
  for f in dataclasses.fields(ExperimentConfig):
    if f.name not in SECTIONS:
      yield Setting(f.name, f, ExperimentConfig, f.metadata["help"], f.metadata["flag"])
      continue
    cls = SECTIONS[f.name]
    doc = _docstring_help(cls)
    for sub in dataclasses.fields(cls):
      path = f"{f.name}.{sub.name}"
      if path not in DERIVED:
        yield Setting(path, sub, cls, sub.metadata.get("help") or doc.get(sub.name, ""),
                      sub.metadata.get("flag") or FOREIGN_FLAGS.get(path))


def replace(cfg: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
  """``cfg`` with ``{"loss.beta": 8.0, "dataset": "svhn", ...}`` applied (each class validates itself).

  Raises:
    ValueError: an unknown path, or a value its class refuses.
  """
  top, parts = {}, {}
  for path, value in overrides.items():
    section, _, name = path.partition(".")
    if name:
      if section not in SECTIONS or name not in {f.name for f in dataclasses.fields(SECTIONS[section])}:
        raise ValueError(f"unknown setting {path!r}")
      parts.setdefault(section, {})[name] = value
    elif path in SECTIONS or path not in {f.name for f in dataclasses.fields(ExperimentConfig)}:
      raise ValueError(f"unknown setting {path!r}")
    else:
      top[path] = value
  top.update({s: dataclasses.replace(getattr(cfg, s), **kw) for s, kw in parts.items()})
  return dataclasses.replace(cfg, **top)


def preset(dataset: str) -> ExperimentConfig:
  """The paper's protocol for ``dataset``: the defaults plus :data:`PRESETS` and the dataset's classes.

  What ``python -m experiments.<dataset>`` trains: ResNet20 with noise 0.1; 200 epochs, batch 128, SGD
  (Nesterov 0.9) lr 0.1 x0.1 at epochs 80/120/160, weight decay 5e-4; PGD-10 training attack (eps 0.031,
  step 0.007, random start, BatchNorm in train mode while crafting); BinaryRelax's ``quantize_tnn`` ternary
  and ``quantize_fbit`` 4-bit projections; A1 (FGSM), A2 (IFGSM-20), A3 (CW-l_inf 50) at eps 0.031 on
  the whole test set, with EOT-5 variants for randomized models.
  """
  if dataset not in data_lib.DATASETS:
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(data_lib.DATASETS)}")
  return replace(ExperimentConfig(), dict(PRESETS.get(dataset, {}), dataset=dataset,
                                          **{"model.num_classes": data_lib.DATASETS[dataset].num_classes}))


def augmentation(cfg: ExperimentConfig, image_size: int) -> tuple[bool, bool]:
  """``(crop, flip)`` of a run: the pad-4 random crop for 32x32 images unless set, and horizontal flips with
  it except for SVHN (house-number digits are not mirror-symmetric) unless set."""
  crop = cfg.train.augment if cfg.train.augment is not None else image_size == 32
  flip = cfg.train.flip if cfg.train.flip is not None else cfg.dataset != "svhn"
  return crop, crop and flip


def quick_overrides(cfg: ExperimentConfig) -> dict[str, Any]:
  """What ``--quick`` sets, as :func:`replace` overrides: tiny widths, 2 epochs, few examples, short
  attacks."""
  return {"max_train": cfg.max_train or 2000, "max_test": cfg.max_test or 500, "model.depth": 8,
          "model.stages": None, "model.widths": (8, 16, 32), "train.epochs": min(cfg.train.epochs, 2),
          "train.batch_size": 64, "loss.steps": min(cfg.loss.steps, 3),
          "eval.max_examples": min(cfg.eval.max_examples or 200, 200), "eval.attacks": "a1,a2",
          "eval.eot_samples": min(cfg.eval.eot_samples, 2), "eval.extra_eps": ()}


def quick(cfg: ExperimentConfig) -> ExperimentConfig:
  """The CPU smoke variant (:func:`quick_overrides`)."""
  return replace(cfg, quick_overrides(cfg))
