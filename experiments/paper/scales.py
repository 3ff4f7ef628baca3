"""The paper's experiments as configs: its protocol, its scales, and the run of every table row at a scale.

Each table (I-VIII) is a :class:`~experiments.paper.tables.Table` of rows; :func:`build_config` turns a row
into an :class:`~enquant.config.ExperimentConfig` at a scale:

* ``"paper"``: exactly the paper's protocol (:func:`protocol`): 200 epochs, SGD 0.1 x0.1 at 80/120/160, PGD-10
  training attack, A1-A3 at eps 0.031 on the whole test set. A GPU/TPU job.
* ``"cpu"``: a reduced protocol for a 2-core CPU (every run <= ~60 minutes), stated in every table header
  (:data:`CPU_NOTES`). Its CIFAR-10/100 and SVHN rows run the same comparison on Fashion-MNIST (a claim
  check, not a number match); Table VIII's MNIST/Fashion-MNIST rows keep their dataset and network (the
  direct comparisons with the paper's numbers).
* ``"gpu<E>"`` (e.g. ``"gpu5"``): the paper's protocol (data, network, PGD-10 training attack, schedule as
  fractions of training, full test set) cut to E epochs (:func:`gpu_note`). Binary-Relax's lambda reaches
  the paper's value at its switch, as at ``cpu`` scale.

Rows that resolve to the same configuration share one run directory (named by :func:`run_name`), so a run
serves every table that needs it. ``python -m experiments.paper`` trains, evaluates and tabulates.
"""

import dataclasses
import hashlib
import json
import math

from enquant import data as data_lib
from enquant import config as config_lib
from enquant.config import ExperimentConfig
from experiments.paper.tables import TABLES, Check, Row, Table, Trend, table

SCALES = ("paper", "cpu", "gpu<E>")
# Binary-Relax schedule of the paper's runs (docs/DESIGN.md §5): lambda x1.05 per epoch, relaxed until epoch 80.
BR_GROWTH, BR_RELAX_EPOCHS, PAPER_EPOCHS = 1.05, 80, 200


# The tables' runs draw EnResNet's noise with the hash generator (enquant.models.noise: the same N(0, 1),
# ~1.25x faster CPU training); a row may name another (Row.noise_rng: Table VIII's MNIST rows use threefry).
PAPER_NOISE_RNG = "hash"


def protocol(dataset: str) -> ExperimentConfig:
  """The paper's protocol for ``dataset``: the library's preset (:func:`enquant.config.preset`)."""
  return config_lib.preset(dataset)


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


__all__ = ["CPU_NOTES", "Check", "Row", "SCALES", "TABLES", "Table", "Trend", "build_config", "cpu_kind", "find_run",
           "gpu_epochs", "gpu_note", "kernel_layer", "protocol", "run_name", "runs_of", "table",
           "with_epochs", "with_seed"]
