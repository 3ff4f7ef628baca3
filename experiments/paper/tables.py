"""The paper's tables as data: every table (I-VIII) a list of rows with the paper's numbers, and the claims.

Li, Wang, Xin, "An Integrated Approach to Produce Robust Models with High Efficiency". Each table is a
:class:`Table` of :class:`Row` s; a row names a configuration (dataset, net, quantization, loss) and the
numbers the paper reports for it; :class:`Check` s (paired comparisons) and :class:`Trend` s (one number of
two rows) are the claims our runs test. Nothing here knows about scales or configs:
:mod:`experiments.paper.scales` turns a row into an :class:`~enquant.config.ExperimentConfig`.
"""

import dataclasses


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
    noise_rng: generator of the noise's normals (None: the protocol's, ``scales.PAPER_NOISE_RNG``).
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
  """The paired comparisons of the claims that a comparison of two rows can test (I, II, III, V, VI, VIII)."""
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
  viii = TABLES["VIII"].rows  # every quantized row against the float row of its dataset and net
  checks["VIII"] = tuple(
      Check(f"float beats {q.quant_label}, {q.net} {q.dataset}", f, q, _ACC) for q in viii if q.quant != "float"
      for f in viii if f.quant == "float" and (f.dataset, f.net) == (q.dataset, q.net))
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


def table(name: str) -> Table:
  """The table named ``name`` (``"I"`` .. ``"VIII"``)."""
  key = name.upper()
  if key not in TABLES:
    raise ValueError(f"unknown table {name!r}; expected one of {', '.join(TABLES)}")
  return TABLES[key]


__all__ = ["Check", "Row", "TABLES", "Table", "Trend", "table"]
