"""The paper's experiments as data: its protocol, every table as a list of runs, and its scales.

Li, Wang, Xin, "An Integrated Approach to Produce Robust Models with High Efficiency". Each table (I-VIII) is a
:class:`Table` of :class:`Row` s; a row names a configuration (dataset, net, quantization, loss) and the
numbers the paper reports for it. :func:`build_config` turns a row into an :class:`ExperimentConfig` at a
scale:

* ``"paper"``: exactly the paper's protocol (:func:`protocol`): 200 epochs, SGD 0.1 x0.1 at 80/120/160, PGD-10
  training attack, A1-A3 at eps 0.031 on the whole test set. A GPU/TPU job.
* ``"cpu"``: a reduced protocol for a 2-core CPU (every run <= ~60 minutes), stated in every table header
  (:data:`CPU_NOTES`). CIFAR-10/100 and SVHN cannot be obtained on that machine: their rows run the same
  comparison on Fashion-MNIST (a claim check, not a number match); Table VIII's MNIST/Fashion-MNIST rows
  keep their dataset and network (the only direct comparison with the paper's numbers).
* ``"gpu<E>"`` (e.g. ``"gpu5"``): the paper's protocol (data, network, PGD-10 training attack, schedule as
  fractions of training, full test set) cut to E epochs, for an accelerator lent for minutes
  (:func:`gpu_note`). Binary-Relax's lambda reaches the paper's value at its switch, as at ``cpu`` scale.

Rows that resolve to the same configuration share one run directory (named by :func:`run_name`), so a run
serves every table that needs it. ``experiments.paper`` trains, evaluates and tabulates.
"""

import dataclasses
import hashlib
import json
import math
from typing import Any

from enquant import data as data_lib
from enquant.config import EvalConfig, ExperimentConfig, QuantConfig, TrainConfig
from enquant.losses import LossConfig
from enquant.models.ensemble import ModelConfig

SCALES = ("paper", "cpu", "gpu<E>")
PAPER_EPS = 0.031
# Binary-Relax schedule of the paper's runs (docs/DESIGN.md §3): lambda x1.05 per epoch, relaxed until epoch 80.
BR_GROWTH, BR_RELAX_EPOCHS, PAPER_EPOCHS = 1.05, 80, 200


# The tables' runs draw EnResNet's noise with the library's hash generator (enquant.models.noise: the same
# N(0, 1), ~1.25x faster CPU training); Table VIII's two MNIST rows keep threefry (Row.noise_rng), which
# they were trained with before the hash existed, so their run directories keep their names.
PAPER_NOISE_RNG = "hash"


def protocol(dataset: str) -> ExperimentConfig:
  """The paper's protocol for ``dataset`` (what ``python -m experiments.<dataset>`` trains by default).

  Shared (EnResNet and BinaryRelax code, docs/DESIGN.md §3): ResNet20 with noise 0.1; 200 epochs, batch 128, SGD
  (Nesterov 0.9) lr 0.1 x0.1 at epochs 80/120/160, weight decay 5e-4; PGD-10 training attack (eps 0.031,
  step 0.007, random start, BatchNorm in train mode while crafting as the EnResNet code); BinaryRelax's
  ``quantize_tnn`` ternary and ``quantize_fbit`` 4-bit projections; evaluation A1 (FGSM), A2 (IFGSM-20), A3
  (CW-l_inf 50) at eps 0.031 on the whole test set, with EOT-5 variants for randomized models.
  Per dataset: CIFAR-10 trains PGD-AT (Tables I-IV, VII); the others loss (6) with alpha = 1, beta = 8
  (Table VIII); MNIST and Fashion-MNIST are also attacked at eps 0.1 and 0.3.
  """
  if dataset not in data_lib.DATASETS:
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {sorted(data_lib.DATASETS)}")
  digits = dataset in ("mnist", "fmnist")
  return ExperimentConfig(
      dataset=dataset,
      model=ModelConfig(num_classes=data_lib.DATASETS[dataset].num_classes, depth=20, noise_coef=0.1,
                        noise_rng=PAPER_NOISE_RNG),
      train=TrainConfig(epochs=PAPER_EPOCHS, batch_size=128, lr=0.1, lr_schedule="multistep",
                        milestones=(0.4, 0.6, 0.8), weight_decay=5e-4, momentum=0.9),
      loss=LossConfig(kind="at" if dataset == "cifar10" else "tradeoff", alpha=1.0, beta=8.0,
                      eps=PAPER_EPS, step_size=0.007, steps=10, attack_bn="train"),
      quant=QuantConfig(mode="float", ternary_method="br", mbit_method="bcgd", lambda0=1.0,
                        growth=BR_GROWTH, growth_every_epochs=1.0,
                        relax_fraction=BR_RELAX_EPOCHS / PAPER_EPOCHS),
      eval=EvalConfig(attacks="a1,a2,a3", eps=PAPER_EPS, extra_eps=(0.1, 0.3) if digits else (),
                      max_examples=0, eot_samples=5),
  )


@dataclasses.dataclass(frozen=True)
class Row:
  """One run of a table and the paper's numbers for it.

  Attributes:
    dataset: the paper's dataset.
    ensembles: n of En_n (1 with ``noise`` 0.1 is En1ResNet; ``noise=0`` a plain ResNet).
    depth: 20 or 56 (or any 6n+2); ``stages`` overrides it (ResNet34 of Table II).
    quant: "float", "bc" or "br".
    bits: 1 binary, 2 ternary (tnn), 4.
    loss: "natural", "at" (PGD-AT = loss (6) with alpha 0, beta 1), "tradeoff" (6) or "trades" (5).
    alpha: loss (6)'s natural weight.
    beta: loss (6)'s robust weight or TRADES' beta.
    noise: EnResNet noise coefficient.
    stages: explicit blocks per stage.
    oracle: for transfer rows (Table III), the oracle row; accuracy of this row's model on its examples.
    paper: the paper's numbers, keyed by column (percentages, or M for Table IV).
    noise_rng: generator of the noise's normals (None: the protocol's :data:`PAPER_NOISE_RNG`).
  """

  dataset: str
  ensembles: int = 1
  depth: int = 20
  quant: str = "float"
  bits: int = 1
  loss: str = "at"
  alpha: float = 1.0
  beta: float = 8.0
  noise: float = 0.1
  stages: tuple[int, ...] | None = None
  oracle: "Row | None" = None
  paper: tuple[tuple[str, float], ...] = ()
  noise_rng: str | None = None

  @property
  def net(self) -> str:
    if self.stages is not None:
      base = f"ResNet{2 + 2 * sum(self.stages)}"
    else:
      base = f"ResNet{self.depth}"
    return f"En{self.ensembles}{base}" if self.noise else base

  @property
  def quant_label(self) -> str:
    if self.quant == "float":
      return "float"
    return {1: self.quant.upper(), 2: "tnn", 4: "4-bit"}.get(self.bits, f"{self.bits}-bit")

  @property
  def loss_label(self) -> str:
    if self.loss == "tradeoff":
      return f"(6) a={self.alpha:g} b={self.beta:g}"
    if self.loss == "trades":
      return f"(5) b={self.beta:g}"
    return {"at": "AT", "natural": "Natural"}[self.loss]


@dataclasses.dataclass(frozen=True)
class Check:
  """One comparison behind a table's claim: ``better``'s accuracy minus ``worse``'s on the same test images,
  per column (``"N"`` is the clean accuracy on those images). A row with an oracle is compared through its
  transfer evaluation (Table III: transfer vs white-box on the same target)."""

  label: str
  better: Row
  worse: Row
  columns: tuple[str, ...] = ("A1", "A2", "A3")


@dataclasses.dataclass(frozen=True)
class Trend:
  """A claim about one number of two rows that no per-image difference can test (M, sparsity): ``larger``'s
  ``column`` exceeds ``smaller``'s. Judged on the one run of each (no interval), beside the paper's own
  difference of the same two rows."""

  label: str
  larger: Row
  smaller: Row
  column: str


@dataclasses.dataclass(frozen=True)
class Table:
  """A table of the paper: its rows, the columns it reports, the claim it supports and the paired
  comparisons (:class:`Check`) that test the claim on our runs."""

  name: str
  title: str
  claim: str
  columns: tuple[str, ...]
  rows: tuple[Row, ...]
  transfer: bool = False
  checks: tuple[Check, ...] = ()
  trends: tuple[Trend, ...] = ()


def _paper(**numbers) -> tuple[tuple[str, float], ...]:
  return tuple(numbers.items())


def _acc(n, a1, a2, a3=None):
  out = dict(N=n, A1=a1, A2=a2)
  if a3 is not None:
    out["A3"] = a3
  return out


def _table_i() -> tuple[Row, ...]:
  numbers = {
      1: {"float": (78.31, 56.64, 49.00, 66.84), "bc": (68.84, 46.31, 42.45, 58.52),
          "br": (69.60, 47.17, 43.89, 58.79)},
      2: {"float": (80.10, 57.48, 49.55, 66.73), "bc": (71.48, 47.83, 43.03, 59.09),
          "br": (72.58, 49.29, 44.72, 60.36)},
      5: {"float": (80.64, 58.14, 50.32, 66.96), "bc": (75.54, 51.03, 46.01, 60.92),
          "br": (75.40, 51.60, 46.91, 61.52)},
  }
  return tuple(Row("cifar10", ensembles=n, quant=q, paper=_paper(**_acc(*v)))
               for n, qs in numbers.items() for q, v in qs.items())


TABLES: dict[str, Table] = {}


def _register(table: Table) -> None:
  TABLES[table.name] = table


_ACC = ("N", "A1", "A2", "A3")
_register(Table("I", "Binary Connect vs Binary Relax (CIFAR-10, PGD-AT, binary weights)",
                "BR beats BC in natural and robust accuracy; quantization costs robust accuracy about as "
                "much as natural accuracy; more members are more accurate and more robust", _ACC, _table_i()))
_register(Table("II", "Ensemble ResNet vs ResNets of similar size (CIFAR-10, PGD-AT)",
                "En_nResNet20 is more robust than a ResNet with as many parameters, float and BR",
                _ACC, (
                    Row("cifar10", 1, quant="float", paper=_paper(**_acc(78.31, 56.61, 49.00, 66.84))),
                    Row("cifar10", 1, quant="br", paper=_paper(**_acc(69.60, 47.17, 43.89, 58.79))),
                    Row("cifar10", 1, quant="float", noise=0.0,
                        paper=_paper(**_acc(76.30, 51.19, 46.72, 57.90))),
                    Row("cifar10", 1, quant="br", noise=0.0,
                        paper=_paper(**_acc(66.81, 43.37, 40.72, 52.14))),
                    Row("cifar10", 2, quant="float", paper=_paper(**_acc(80.10, 57.48, 49.36, 66.73))),
                    Row("cifar10", 2, quant="br", paper=_paper(**_acc(72.58, 49.29, 44.72, 60.36))),
                    # ResNet34 (0.56M in the paper): a CIFAR PreAct ResNet with 16 blocks (2 + 2*16 = 34).
                    Row("cifar10", 1, quant="float", noise=0.0, stages=(5, 5, 6),
                        paper=_paper(**_acc(77.82, 54.05, 49.89, 61.38))),
                    Row("cifar10", 1, quant="br", noise=0.0, stages=(5, 5, 6),
                        paper=_paper(**_acc(70.31, 46.42, 43.26, 54.75))),
                )))
_EN2_BR, _EN5_BR = Row("cifar10", 2, quant="br"), Row("cifar10", 5, quant="br")
_register(Table("III", "Binarized models under black-box (transfer) attacks (CIFAR-10)",
                "transfer attacks from another model are weaker than white-box attacks",
                ("A1", "A2", "A3"), (
                    dataclasses.replace(_EN2_BR, oracle=Row("cifar10", 2, quant="float"),
                                        paper=_paper(A1=59.88, A2=55.65, A3=66.06)),
                    dataclasses.replace(_EN2_BR, oracle=Row("cifar10", 3, quant="br"),
                                        paper=_paper(A1=55.18, A2=52.74, A3=65.82)),
                    dataclasses.replace(_EN2_BR, oracle=Row("cifar10", 3, quant="float"),
                                        paper=_paper(A1=59.58, A2=55.59, A3=65.83)),
                    dataclasses.replace(_EN5_BR, oracle=Row("cifar10", 5, quant="float"),
                                        paper=_paper(A1=61.30, A2=57.05, A3=68.14)),
                    dataclasses.replace(_EN5_BR, oracle=Row("cifar10", 1, quant="br"),
                                        paper=_paper(A1=58.96, A2=56.54, A3=68.14)),
                    dataclasses.replace(_EN5_BR, oracle=Row("cifar10", 1, quant="float"),
                                        paper=_paper(A1=61.58, A2=57.72, A3=69.82)),
                ), transfer=True))
_register(Table("IV", "The uniform bound M = max_t M_t of binary (BR, PGD-AT) EnResNet20",
                "M is bounded and decreases as the number of ensemble members grows", ("M",), tuple(
                    Row("cifar10", n, quant="br", paper=_paper(M=m))
                    for n, m in ((1, 0.2762), (2, 0.2399), (3, 0.2065), (5, 0.1819)))))
_register(Table("V", "Loss (5) (TRADES-style) vs loss (6) (float En1ResNet20, CIFAR-10)",
                "(6) trades less natural accuracy for robustness than (5)", _ACC, tuple(
                    Row("cifar10", 1, loss=kind, alpha=1.0, beta=beta, paper=_paper(**_acc(*v)))
                    for beta, kind, v in (
                        (1, "trades", (84.49, 45.96, 34.81, 51.94)),
                        (1, "tradeoff", (83.47, 54.46, 43.86, 64.04)),
                        (4, "trades", (80.05, 51.24, 45.43, 58.85)),
                        (4, "tradeoff", (80.91, 55.92, 47.77, 66.53)),
                        (8, "trades", (75.82, 51.63, 46.95, 59.31)),
                        (8, "tradeoff", (79.31, 56.28, 47.82, 66.07))))))


def _table_vi() -> tuple[Row, ...]:
  numbers = {1: ((69.60, 47.81, 43.89, 58.79), (73.40, 47.41, 41.86, 57.83),
                 (71.35, 47.42, 42.46, 59.01)),
             2: ((71.58, 49.29, 44.62, 60.36), (75.92, 48.97, 43.41, 59.40),
                 (74.72, 49.66, 43.96, 60.65)),
             5: ((75.40, 51.60, 46.91, 61.52), (78.50, 50.85, 45.02, 60.96),
                 (77.35, 51.62, 45.63, 61.11))}
  rows = []
  for n, (at, b4, b8) in numbers.items():
    rows.append(Row("cifar10", n, quant="br", loss="at", paper=_paper(**_acc(*at))))
    rows.append(Row("cifar10", n, quant="br", loss="tradeoff", beta=4.0, paper=_paper(**_acc(*b4))))
    rows.append(Row("cifar10", n, quant="br", loss="tradeoff", beta=8.0, paper=_paper(**_acc(*b8))))
  return tuple(rows)


_register(Table("VI", "Trade-off loss (6) for binary (BR) models (CIFAR-10); alpha=0, beta=1 is PGD-AT",
                "alpha = 1 raises natural accuracy at little cost in FGSM/CW robustness; IFGSM drops",
                _ACC, _table_vi()))


def _table_vii() -> tuple[Row, ...]:
  v = [  # net (depth, noise), quant bits, loss, weight sparsity, channel sparsity, N, A1, A2
      (20, 0.0, 2, "natural", 53.00, 11.16, 90.54, 12.71, 0.00),
      (20, 0.1, 2, "natural", 52.19, 9.57, 90.61, 26.21, 0.71),
      (20, 0.0, 2, "at", 50.71, 2.55, 68.30, 44.80, 42.53),
      (20, 0.1, 2, "at", 50.31, 4.14, 71.30, 48.17, 43.27),
      (20, 0.1, 2, "tradeoff", 55.66, 7.02, 73.05, 48.10, 42.65),
      (20, 0.0, 4, "natural", 42.79, 9.53, 91.75, 12.38, 0.00),
      (20, 0.1, 4, "natural", 44.73, 10.52, 91.42, 27.99, 0.62),
      (20, 0.0, 4, "at", 43.93, 2.55, 71.49, 47.63, 44.08),
      (20, 0.1, 4, "at", 48.35, 4.94, 73.05, 51.43, 45.10),
      (20, 0.1, 4, "tradeoff", 55.57, 7.42, 76.61, 51.92, 44.39),
      (56, 0.0, 2, "natural", 60.96, 31.86, 91.91, 15.58, 0.00),
      (56, 0.1, 2, "natural", 60.66, 28.97, 91.46, 38.22, 0.36),
      (56, 0.0, 2, "at", 54.21, 15.37, 74.56, 51.73, 46.62),
      (56, 0.1, 2, "at", 54.70, 16.74, 76.87, 53.16, 47.89),
      (56, 0.1, 2, "tradeoff", 58.89, 21.36, 77.24, 52.96, 46.01),
      (56, 0.0, 4, "natural", 67.94, 39.16, 93.09, 16.02, 0.00),
      (56, 0.1, 4, "natural", 71.07, 41.10, 92.39, 39.79, 0.33),
      (56, 0.0, 4, "at", 55.29, 17.10, 77.67, 52.43, 48.22),
      (56, 0.1, 4, "at", 55.09, 18.11, 78.25, 55.48, 49.03),
      (56, 0.1, 4, "tradeoff", 67.31, 33.18, 79.44, 55.41, 47.80),
  ]
  return tuple(Row("cifar10", 1, depth=d, noise=noise, quant="br", bits=bits, loss=loss,
                   paper=_paper(weight_sparsity=ws, channel_sparsity=cs, N=n, A1=a1, A2=a2))
               for d, noise, bits, loss, ws, cs, n, a1, a2 in v)


_register(Table("VII", "Sparsity and its structure for ternary (tnn) and 4-bit models (CIFAR-10, "
                "(6) with alpha=1, beta=8)",
                "natural training gives structured (channel) sparsity, PGD-AT unstructured; loss (6) and "
                "depth make it more structured",
                ("weight_sparsity", "channel_sparsity", "zero_dispersion", "N", "A1", "A2"), _table_vii()))
_register(Table("VIII", "Generalization to more datasets (loss (6), alpha=1, beta=8)",
                "binary models are almost as good as float ones on MNIST/Fashion-MNIST; 4-bit is close "
                "to float on the harder sets", ("channel_sparsity", "N", "A1", "A2", "A3"), (
                    Row("mnist", 2, quant="br", loss="tradeoff", noise_rng="threefry",
                        paper=_paper(**_acc(99.22, 98.90, 98.90, 99.12))),
                    Row("mnist", 2, quant="float", loss="tradeoff", noise_rng="threefry",
                        paper=_paper(**_acc(99.21, 99.02, 98.91, 99.14))),
                    Row("fmnist", 2, quant="br", loss="tradeoff",
                        paper=_paper(**_acc(91.69, 87.85, 87.22, 90.44))),
                    Row("fmnist", 2, quant="float", loss="tradeoff",
                        paper=_paper(**_acc(92.74, 89.35, 88.68, 91.72))),
                    Row("cifar10", 5, quant="br", bits=4, loss="tradeoff",
                        paper=_paper(channel_sparsity=35.24, **_acc(76.77, 54.03, 48.12, 63.74))),
                    Row("cifar10", 5, quant="br", bits=2, loss="tradeoff",
                        paper=_paper(channel_sparsity=18.18, **_acc(76.65, 52.99, 46.88, 62.69))),
                    Row("cifar10", 5, quant="float", loss="tradeoff",
                        paper=_paper(**_acc(80.64, 58.14, 50.32, 66.96))),
                    Row("cifar100", 2, depth=56, quant="br", bits=4, loss="tradeoff",
                        paper=_paper(channel_sparsity=43.94, **_acc(52.24, 29.29, 24.46, 39.49))),
                    Row("cifar100", 2, depth=56, quant="float", loss="tradeoff",
                        paper=_paper(**_acc(55.65, 31.83, 27.07, 40.79))),
                    Row("svhn", 2, depth=56, quant="br", bits=4, loss="tradeoff",
                        paper=_paper(channel_sparsity=49.03, **_acc(91.21, 70.91, 57.99, 72.44))),
                    Row("svhn", 2, depth=56, quant="float", loss="tradeoff",
                        paper=_paper(**_acc(93.33, 78.08, 58.11, 75.79))),
                )))



def _add_checks() -> None:
  """The paired comparisons of the claims that a comparison of two rows can test (I, II, III, V, VI)."""
  c = "cifar10"
  br = lambda n, **kw: Row(c, n, quant="br", **kw)
  resnet34 = dict(noise=0.0, stages=(5, 5, 6))
  checks = {
      "I": tuple(Check(f"BR beats BC, En{n}ResNet20", br(n), Row(c, n, quant="bc"), _ACC) for n in (1, 2, 5))
           + tuple(Check(f"En{m}ResNet20 beats En{n}ResNet20, {Row(c, m, quant=q).quant_label}",
                         Row(c, m, quant=q), Row(c, n, quant=q), _ACC)
                   for m, n in ((2, 1), (5, 2)) for q in ("float", "bc", "br")),
      "II": (Check("En1ResNet20 more robust than ResNet20, float", Row(c, 1), Row(c, 1, noise=0.0)),
             Check("En1ResNet20 more robust than ResNet20, BR", br(1), br(1, noise=0.0)),
             Check("En2ResNet20 more robust than ResNet34, float", Row(c, 2), Row(c, 1, **resnet34)),
             Check("En2ResNet20 more robust than ResNet34, BR", br(2), br(1, **resnet34))),
      "III": tuple(Check(f"transfer from {r.oracle.net} {r.oracle.quant_label} weaker than white-box, "
                         f"{r.net} {r.quant_label}", r, dataclasses.replace(r, oracle=None, paper=()))
                   for r in TABLES["III"].rows),
      "V": tuple(Check(f"(6) more robust than (5), beta={b}", Row(c, 1, loss="tradeoff", beta=b),
                       Row(c, 1, loss="trades", beta=b)) for b in (1, 4, 8)),  # int betas, as the rows
      "VI": tuple(Check(f"alpha=1 raises N, En{n}ResNet20 BR, beta={b}", br(n, loss="tradeoff", beta=float(b)),
                        br(n, loss="at"), ("N",)) for n in (1, 2, 5) for b in (4, 8)),
  }
  for name, table_checks in checks.items():
    TABLES[name] = dataclasses.replace(TABLES[name], checks=table_checks)
  iv = TABLES["IV"].rows  # n = 1, 2, 3, 5
  vii = {(r.depth, r.noise, r.bits, r.loss): r for r in TABLES["VII"].rows}
  label = lambda r: f"{r.net} {r.quant_label}"
  TABLES["IV"] = dataclasses.replace(TABLES["IV"], trends=tuple(
      Trend(f"M of {a.net} above {b.net}", a, b, "M") for a, b in zip(iv, iv[1:])))
  TABLES["VII"] = dataclasses.replace(TABLES["VII"], trends=tuple(
      [Trend(f"natural more channel-sparse than PGD-AT, {label(vii[d, z, b, 'natural'])}", vii[d, z, b, "natural"],
             vii[d, z, b, "at"], "channel_sparsity")
       for d in (20, 56) for b in (2, 4) for z in (0.0, 0.1)]
      + [Trend(f"(6) more channel-sparse than PGD-AT, {label(vii[d, 0.1, b, 'tradeoff'])}",
               vii[d, 0.1, b, "tradeoff"], vii[d, 0.1, b, "at"], "channel_sparsity")
         for d in (20, 56) for b in (2, 4)]
      + [Trend(f"deeper more channel-sparse, {label(deep)} vs {shallow.net}, {deep.loss_label}", deep, shallow,
               "channel_sparsity")
         for (d, z, b, loss), deep in vii.items() if d == 56 for shallow in [vii[20, z, b, loss]]]
      # The same claims on a graded measure of structure (the paper has none: its column reads "-").
      + [Trend(f"natural zeros more channel-structured than PGD-AT, {label(vii[d, z, b, 'natural'])}",
               vii[d, z, b, "natural"], vii[d, z, b, "at"], "zero_dispersion")
         for d in (20, 56) for b in (2, 4) for z in (0.0, 0.1)]
      + [Trend(f"(6) zeros more channel-structured than PGD-AT, {label(vii[d, 0.1, b, 'tradeoff'])}",
               vii[d, 0.1, b, "tradeoff"], vii[d, 0.1, b, "at"], "zero_dispersion")
         for d in (20, 56) for b in (2, 4)]))


_add_checks()

# --------------------------------------------------------------------------------------------- scales

CPU_SUBSTITUTE = {"cifar10": "fmnist", "cifar100": "fmnist", "svhn": "fmnist"}
CPU_DEPTH = {20: 8, 56: 14}  # 3 -> 1 and 9 -> 2 blocks per stage
CPU_CLAIM = dict(max_train=10_000, epochs=6, train_steps=3, train_step=0.0124, eval_examples=1000)
CPU_DIRECT = dict(max_train=30_000, epochs=2, train_steps=3, train_step=0.0124, eval_examples=1000)
CPU_NOTES = {
    "claim": ("cpu scale (2-core CPU, <= ~60 min per run): CIFAR-10/100 and SVHN rows run on Fashion-MNIST "
              "(a claim check, not a number match); depth 20 -> 8 and 56 -> 14 (ResNet34 -> stages 2,2,2); "
              f"first {CPU_CLAIM['max_train']:,} training images, {CPU_CLAIM['epochs']} epochs (lr x0.1 at "
              "40/60/80 % of training, Binary-Relax lambda reaching the paper's value at its switch), PGD-3 "
              "training attack (step 0.0124, eps 0.031); A1-A3 (+ A2 with EOT-5 for randomized models) "
              f"on the first {CPU_CLAIM['eval_examples']} test images, N on all 10,000."),
    "direct": ("cpu scale (2-core CPU): the paper's dataset and network (En2ResNet20), the first "
               f"{CPU_DIRECT['max_train']:,} training images for {CPU_DIRECT['epochs']} epochs instead of 60,000 "
               "for 200 (cosine lr from 0.1), PGD-3 training attack "
               "(step 0.0124, eps 0.031, BatchNorm in train mode while crafting); A1-A3 (+ A2 with EOT-5, "
               f"APGD-CE) at eps 0.031 on the first {CPU_DIRECT['eval_examples']} test images, N on all "
               "10,000."),
}


def _row_config(row: Row) -> ExperimentConfig:
  cfg = protocol(row.dataset)
  return dataclasses.replace(
      cfg,
      model=dataclasses.replace(cfg.model, ensembles=row.ensembles, depth=row.depth, stages=row.stages,
                                noise_coef=row.noise, noise_rng=row.noise_rng or cfg.model.noise_rng),
      loss=dataclasses.replace(cfg.loss, kind=row.loss, alpha=row.alpha, beta=row.beta,
                               attack_bn="eval" if row.loss == "trades" else cfg.loss.attack_bn),
      quant=dataclasses.replace(cfg.quant, mode=row.quant, bits=row.bits),
  )


def cpu_kind(row: Row) -> str:
  """``"direct"`` for rows on MNIST/Fashion-MNIST (kept as in the paper), else ``"claim"``."""
  return "direct" if row.dataset in ("mnist", "fmnist") else "claim"


def _br_growth(epochs: float, steps_per_growth_epoch: float) -> float:
  """Growth per step of lambda reaching the paper's lambda at the switch (1.05^80) in fewer growths."""
  growths = max(1.0, epochs * (BR_RELAX_EPOCHS / PAPER_EPOCHS) / steps_per_growth_epoch)
  return math.exp(BR_RELAX_EPOCHS * math.log(BR_GROWTH) / growths)


def gpu_epochs(scale: str) -> int | None:
  """E of a ``"gpu<E>"`` scale; ``None`` for the other scales. Raises ValueError for an unknown scale."""
  if scale in ("paper", "cpu"):
    return None
  digits = scale[3:] if scale.startswith("gpu") else ""
  if not digits.isdigit() or int(digits) < 1:
    raise ValueError(f"--scale must be paper, cpu or gpu<E> with E >= 1 epochs (e.g. gpu5), got {scale!r}")
  return int(digits)


def gpu_note(epochs: int) -> str:
  """The protocol line of a ``gpu<E>`` table header."""
  return (f"gpu{epochs} scale: the paper's protocol (full training set, PGD-10 training attack with step 0.007 "
          f"and BatchNorm in train mode, SGD lr 0.1 x0.1 at 40/60/80 % of training) cut to {epochs} epochs "
          "instead of 200, Binary-Relax lambda reaching the paper's value at its switch; A1-A3 (+ A2 with "
          "EOT-5 for randomized models) at eps 0.031 on the whole test set.")


def _gpu_config(cfg: ExperimentConfig, epochs: int) -> ExperimentConfig:
  growth_every = 0.1
  return dataclasses.replace(
      cfg, train=dataclasses.replace(cfg.train, epochs=epochs),
      quant=dataclasses.replace(cfg.quant, growth_every_epochs=growth_every,
                                growth=round(_br_growth(epochs, growth_every), 6)),
      eval=dataclasses.replace(cfg.eval, attacks="a1,a2,a3" + (",a2-eot5" if cfg.model.noise_coef else ""),
                               eot_samples=0, extra_eps=(), max_examples=0, batch_size=1000))


def build_config(row: Row, scale: str) -> ExperimentConfig:
  """The run of ``row`` at ``scale`` (``"paper"``, ``"cpu"`` or ``"gpu<E>"``; see the module docstring)."""
  epochs = gpu_epochs(scale)
  cfg = _row_config(row)
  if scale == "paper":
    return cfg
  if epochs is not None:
    return _gpu_config(cfg, epochs)
  kind = cpu_kind(row)
  p = CPU_CLAIM if kind == "claim" else CPU_DIRECT
  model = cfg.model
  if kind == "claim":
    dataset = CPU_SUBSTITUTE.get(row.dataset, row.dataset)
    stages = (2, 2, 2) if row.stages is not None else None
    model = dataclasses.replace(model, num_classes=data_lib.DATASETS[dataset].num_classes,
                                depth=CPU_DEPTH.get(row.depth, row.depth), stages=stages)
    cfg = dataclasses.replace(protocol(dataset), model=model, loss=cfg.loss, quant=cfg.quant)
  growth_every = 0.1
  train = dataclasses.replace(cfg.train, epochs=p["epochs"],
                              lr_schedule="cosine" if kind == "direct" else "multistep")
  quant = dataclasses.replace(cfg.quant, growth_every_epochs=growth_every,
                              growth=round(_br_growth(p["epochs"], growth_every), 6))
  loss = cfg.loss
  if loss.kind != "natural":
    loss = dataclasses.replace(loss, steps=p["train_steps"], step_size=p["train_step"])
  attacks = "a1,a2,a3" + (",a2-eot5" if model.noise_coef else "") + (",apgd-ce" if kind == "direct" else "")
  evalc = dataclasses.replace(cfg.eval, attacks=attacks, eot_samples=0, extra_eps=(),
                              max_examples=p["eval_examples"])
  return dataclasses.replace(cfg, max_train=p["max_train"], train=train, loss=loss, quant=quant,
                             eval=evalc)


def with_epochs(cfg: ExperimentConfig, epochs: int) -> ExperimentConfig:
  """``cfg`` trained for ``epochs`` instead: the learning-rate milestones are fractions of training and stay
  put, and Binary-Relax's growth of lambda is rescaled (as :func:`build_config` does) so that lambda reaches
  the paper's value at the same fraction of training."""
  if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
    raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
  quant = dataclasses.replace(cfg.quant, growth=round(_br_growth(epochs, cfg.quant.growth_every_epochs), 6))
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, epochs=epochs), quant=quant)


def kernel_layer(params) -> tuple[str, str]:
  """The layer the kernel figures show: ``conv1`` of stage 1's second block, or of its last block when
  the network has fewer (ResNet8 at cpu scale has one block per stage)."""
  blocks = sorted((k for k in params if k.startswith("stage1_block")),
                  key=lambda k: int(k[len("stage1_block"):]))
  if not blocks:
    raise ValueError(f"no stage-1 block among the parameters {sorted(params)}")
  return ("stage1_block2" if "stage1_block2" in blocks else blocks[-1]), "conv1"


def run_name(cfg: ExperimentConfig) -> str:
  """A readable, unique directory name: ``<dataset>-<net>-<quant>-<loss>-<hash of the config>``."""
  q = cfg.quant
  quant = "float" if not q.enabled else f"{q.mode}{q.bits}b"
  loss = cfg.loss.kind + (f"-a{cfg.loss.alpha:g}b{cfg.loss.beta:g}"
                          if cfg.loss.kind in ("tradeoff", "trades") else "")
  digest = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
  return f"{cfg.dataset}-{cfg.model.name}-{quant}-{loss}-{digest}"


def table(name: str) -> Table:
  """The table named ``name`` (``"I"`` .. ``"VIII"``)."""
  key = name.upper()
  if key not in TABLES:
    raise ValueError(f"unknown table {name!r}; expected one of {', '.join(TABLES)}")
  return TABLES[key]


def runs_of(tbl: Table, scale: str) -> list[tuple[Row, ExperimentConfig]]:
  """Every distinct training run a table needs at ``scale`` (rows and transfer oracles), in order."""
  seen, out = set(), []
  for row in tbl.rows:
    for r in ((row.oracle,) if row.oracle is not None else ()) + (row,):
      cfg = build_config(r, scale)
      if run_name(cfg) not in seen:
        seen.add(run_name(cfg))
        out.append((r, cfg))
  return out


def find_run(name: str, scale: str) -> tuple[Row, ExperimentConfig]:
  """The ``(row, config)`` of the table run called ``name`` at ``scale`` (as ``experiments.paper --list``
  prints it); ValueError naming similar runs."""
  runs = {run_name(c): (r, c) for t in TABLES.values() for r, c in runs_of(t, scale)}
  if name not in runs:
    prefix = name.rsplit("-", 1)[0]
    close = sorted(n for n in runs if n.startswith(prefix)) or sorted(runs)[:5]
    raise ValueError(f"--run={name} is no run of the paper's tables at --scale={scale}; e.g. "
                     f"{', '.join(close)}")
  return runs[name]


def with_seed(cfg: ExperimentConfig, seed: int) -> ExperimentConfig:
  """``cfg`` trained from another seed (initialisation, batches, noise, training attacks); the evaluation
  key stays, so two seeds are compared on the same test images under the same attack keys."""
  return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))


def measured(results: dict[str, Any], column: str, transfer: dict[str, Any] | None = None) -> float | None:
  """The number of ``column`` (percent, or M) from a run's ``results.json`` (or its transfer evaluation)."""
  if column == "M":
    return results.get("m_bound")
  if column == "weight_sparsity":
    value = results.get("efficiency", {}).get("sparsity", {}).get("total/weight_sparsity")
    return None if value is None else 100 * value
  if column == "channel_sparsity":
    paper = results.get("efficiency", {}).get("sparsity_paper_counting", {})
    value = paper.get("total/in_channel_sparsity")
    return None if value is None else 100 * value
  if column == "zero_dispersion":  # a ratio (1: unstructured zeros), over the paper's 3x3 kernels
    return results.get("efficiency", {}).get("sparsity_paper_counting", {}).get("total/zero_dispersion")
  source = transfer if transfer is not None else results.get("robust", {})
  acc = source.get("accuracy", {}) if source else {}
  if column == "N":
    value = results.get("natural_accuracy") if transfer is None else acc.get("natural")
  else:
    value = acc.get(column)
  return None if value is None else 100 * value


__all__ = ["CPU_NOTES", "Check", "Row", "SCALES", "TABLES", "Table", "Trend", "build_config", "cpu_kind", "find_run",
           "gpu_epochs", "gpu_note", "kernel_layer", "measured", "protocol", "run_name", "runs_of", "table",
           "with_epochs", "with_seed"]
