"""Flags shared by every experiment, and the flags -> config -> train_and_evaluate glue.

Example::

    python -m experiments.cifar10 --ensembles=5 --quant=br --bits=1 --loss=tradeoff --alpha=1 --beta=8
    python -m experiments.mnist --quick --workdir=/tmp/mnist_quick

``--help`` lists these flags grouped by topic (:data:`HELP_GROUPS`, :func:`parse_flags`); absl's
``--helpfull`` lists every flag of every module.
"""

import os
import sys
import textwrap

from absl import app
from absl import flags

FLAGS = flags.FLAGS

# Model.
flags.DEFINE_integer("ensembles", 1, "Members n of the En_n ResNet ensemble.")
flags.DEFINE_integer("depth", 20, "ResNet depth 6n+2 (20, 32, 44, 56, 110).")
flags.DEFINE_list("stages", None, "Explicit blocks per stage, e.g. 5,5,5 (overrides --depth).")
flags.DEFINE_integer("width", 16, "Base width; the stages use width, 2*width, 4*width.")
flags.DEFINE_float("noise_coef", 0.1, "EnResNet noise coefficient (0: a plain deterministic ResNet).")
flags.DEFINE_enum("noise_rng", "hash", ["hash", "threefry"], "Generator of the noise's normals: hash "
                  "(~4x cheaper on CPUs) or JAX's threefry (the paper tables'); same distribution "
                  "(enquant.models.noise).")
# Optimisation.
flags.DEFINE_integer("epochs", 200, "Training epochs.")
flags.DEFINE_integer("batch_size", 128, "Global batch size (split over all devices, of every process "
                     "with --distributed).")
flags.DEFINE_float("lr", 0.1, "Peak learning rate.")
flags.DEFINE_enum("lr_schedule", "multistep", ["multistep", "cosine", "constant"], "LR schedule.")
flags.DEFINE_float("weight_decay", 5e-4, "Weight decay.")
flags.DEFINE_integer("seed", 0, "Seed of initialisation, batches, augmentation, noise and attacks.")
flags.DEFINE_enum("augment", "auto", ["auto", "on", "off"], "Random pad-4 crop (auto: 32x32 sets).")
flags.DEFINE_enum("flip", "auto", ["auto", "on", "off"], "Horizontal flips with the crop (auto: all "
                  "but SVHN).")
# Data.
flags.DEFINE_string("data_dir", None, "Folder with the official dataset files (default: "
                    "$ENQUANT_DATA_DIR, ../shared/data beside the repo, or ~/.enquant/data); with "
                    "--data_source=tfds, TFDS's data directory (default: $TFDS_DATA_DIR or "
                    "~/tensorflow_datasets).")
flags.DEFINE_enum("data_source", "auto", ["auto", "local", "tfds", "embedded"], "Where data comes from "
                  "(auto: local files, else TFDS; embedded: the 5000/1000 MNIST sample in the package; "
                  "mnist --quick uses it when there are no local files).")
flags.DEFINE_integer("max_train", 0, "Use only the first N training images (0: all).")
flags.DEFINE_integer("max_test", 0, "Use only the first N test images (0: all).")
# Quantization.
flags.DEFINE_enum("quant", "float", ["float", "bc", "br"], "Weight quantization of conv kernels.")
flags.DEFINE_integer("bits", 1, "1 binary, 2 ternary, 4 four-bit.")
flags.DEFINE_enum("ternary_method", "br", ["exact", "twn", "br"], "Ternary projection (br: "
                  "BinaryRelax's quantize_tnn, the paper's tnn; exact: the Euclidean projection).")
flags.DEFINE_enum("mbit_method", "bcgd", ["bcgd", "lloyd", "exact"], "m-bit projection (bcgd: "
                  "BinaryRelax/BCGD's quantize_fbit, the paper's 4-bit; lloyd: refined, less sparse).")
flags.DEFINE_float("br_lambda0", 1.0, "Binary-Relax initial lambda.")
flags.DEFINE_float("br_growth", 1.05, "Binary-Relax lambda growth rate.")
flags.DEFINE_float("br_growth_every", 1.0, "Grow lambda every this many epochs.")
flags.DEFINE_float("br_relax_fraction", 0.4, "Fraction of epochs relaxed before Binary-Connect.")
# Loss.
flags.DEFINE_enum("loss", "tradeoff", ["natural", "at", "tradeoff", "trades"], "Training objective "
                  "(at: PGD-AT; tradeoff: the paper's loss (6); trades: loss (5)).")
flags.DEFINE_float("alpha", 1.0, "Trade-off loss (6): weight of the natural CE.")
flags.DEFINE_float("beta", 8.0, "Trade-off loss (6) weight of the adversarial CE / TRADES beta.")
flags.DEFINE_float("train_eps", 0.031, "Training attack l_inf radius (EnResNet code: 0.031).")
flags.DEFINE_float("train_step_size", 0.007, "Training attack step size (EnResNet code: 0.007).")
flags.DEFINE_integer("train_steps", 10, "Training attack steps.")
flags.DEFINE_enum("train_attack_bn", "train", ["eval", "train"], "BatchNorm mode while crafting training "
                  "attacks (train: batch statistics, as the EnResNet PGD-AT code; eval: running stats).")
# Evaluation.
flags.DEFINE_string("attacks", "a1,a2,a3", "Final evaluation attacks, comma-separated: a1 (FGSM), "
                    "a2 (IFGSM-20), a3 (CW-l_inf 50), fgsm, pgd<N>, cw<N>, apgd-ce, apgd-dlr, "
                    "with optional -eot<K>, -r<R> (restarts), -rs (random start).")
flags.DEFINE_integer("eot_samples", 5, "Also run every attack with EOT over K noise draws (randomized "
                     "models only; <= 1: off).")
flags.DEFINE_float("eval_eps", 0.031, "Evaluation attack l_inf radius (the paper: 0.031).")
flags.DEFINE_list("eval_extra_eps", [], "Further radii every attack also runs at (mnist/fmnist: 0.1,0.3).")
flags.DEFINE_integer("eval_max", 0, "Robust evaluation on the first N test images (0: all).")
flags.DEFINE_integer("eval_seed", 1234, "Key of the (randomized) evaluation.")
flags.DEFINE_integer("max_unroll", 0, "Attacks of at most this many steps are unrolled (longer "
                     "compiles, no faster with enquant's convolution gradient); 0: all rolled.")
# Run.
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<dataset>-<model>-<quant>-<loss>-s<seed>).")
flags.DEFINE_bool("quick", False, "Shrink everything for a CPU smoke run.")
flags.DEFINE_bool("overwrite", False, "Replace a finished run in --workdir.")
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.DEFINE_bool("tensorboard", True, "Write TensorBoard summaries next to metrics.jsonl "
                  "(<workdir>/tensorboard/; tensorboard --logdir=runs).")
# Multi-host (enquant.distributed).
flags.DEFINE_bool("distributed", False, "Join a multi-process JAX job (jax.distributed.initialize): one "
                  "process per host/GPU, the batch split over the devices of all of them. On a TPU pod "
                  "slice or under SLURM the three flags below come from the environment.")
flags.DEFINE_string("coordinator_address", None, "--distributed: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "--distributed: number of processes.")
flags.DEFINE_integer("process_id", None, "--distributed: this process's index, 0..num_processes-1.")

# What --help shows, by topic (every flag above belongs to exactly one group; tested).
HELP_GROUPS = (
    ("Model", ("ensembles", "depth", "stages", "width", "noise_coef", "noise_rng")),
    ("Optimisation", ("epochs", "batch_size", "lr", "lr_schedule", "weight_decay", "seed", "augment",
                      "flip")),
    ("Data", ("data_dir", "data_source", "max_train", "max_test")),
    ("Quantization (Binary-Relax / Binary-Connect)", (
        "quant", "bits", "ternary_method", "mbit_method", "br_lambda0", "br_growth", "br_growth_every",
        "br_relax_fraction")),
    ("Training loss and its attack", ("loss", "alpha", "beta", "train_eps", "train_step_size",
                                      "train_steps", "train_attack_bn")),
    ("Evaluation", ("attacks", "eot_samples", "eval_eps", "eval_extra_eps", "eval_max", "eval_seed",
                    "max_unroll")),
    ("Run directory and output", ("workdir", "quick", "overwrite", "progress", "tensorboard")),
    ("Multi-host (JAX distributed runtime)", ("distributed", "coordinator_address", "num_processes",
                                              "process_id")),
)
_HELP_ARGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")


def _describe_flag(name: str) -> list[str]:
  flag = FLAGS[name]
  default = (flag.default_as_str or "").strip("'")
  head = f"  --{name}={default}" if default else f"  --{name}  (no default)"
  return [head] + textwrap.wrap(flag.help, width=96, initial_indent="      ", subsequent_indent="      ")


def help_text(program: str, doc: str | None = None) -> str:
  """The ``--help`` text: the entry point's docstring, then its flags grouped by topic."""
  lines = [(doc or "").strip(), "", f"usage: python -m {program} [--flag=value ...]",
           "Defaults: the paper's protocol for the dataset (enquant.paper.protocol) unless the entry point",
           "says otherwise. --helpfull lists every flag of every module.", ""]
  for title, names in HELP_GROUPS:
    lines.append(f"{title}:")
    for name in names:
      lines += _describe_flag(name)
    lines.append("")
  return "\n".join(lines).lstrip("\n")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parser, with ``--help`` (``-h``, ``--helpshort``) printing :func:`help_text`.

  Pass it to ``app.run(main, flags_parser=common.parse_flags)``.
  """
  for arg in argv[1:]:
    if arg == "--":
      break
    if arg in _HELP_ARGS:
      main_module = sys.modules.get("__main__")
      spec = getattr(main_module, "__spec__", None)
      program = spec.name if spec is not None else os.path.basename(argv[0])
      try:
        print(help_text(program, getattr(main_module, "__doc__", None)), flush=True)
      except BrokenPipeError:  # --help | head
        pass
      sys.exit(0)
  return app.parse_flags_with_usage(argv)


def _tristate(value: str) -> bool | None:
  return {"auto": None, "on": True, "off": False}[value]


def set_defaults(values: dict) -> None:
  """Sets flag defaults (before absl parses the command line)."""
  for name, value in values.items():
    FLAGS.set_default(name, value)


def config_from_flags(dataset: str):
  """Builds the :class:`ExperimentConfig` (raises ValueError on bad values)."""
  from enquant import config as config_lib  # pylint: disable=g-import-not-at-top
  from enquant import data as data_lib  # pylint: disable=g-import-not-at-top
  from enquant.losses import LossConfig  # pylint: disable=g-import-not-at-top
  from enquant.models import ModelConfig  # pylint: disable=g-import-not-at-top

  if FLAGS.width < 1:
    raise ValueError(f"--width must be >= 1, got {FLAGS.width}")
  try:
    extra_eps = tuple(float(e) for e in FLAGS.eval_extra_eps)
  except ValueError as e:
    raise ValueError(f"--eval_extra_eps must be numbers, got {FLAGS.eval_extra_eps}") from e
  if any(not 0 < e <= 1 for e in extra_eps):
    raise ValueError(f"--eval_extra_eps must lie in (0, 1], got {FLAGS.eval_extra_eps}")
  try:
    stages = tuple(int(s) for s in FLAGS.stages) if FLAGS.stages else None
  except ValueError as e:
    raise ValueError(f"--stages must be integers, got {FLAGS.stages}") from e
  cfg = config_lib.ExperimentConfig(
      dataset=dataset, data_dir=FLAGS.data_dir, data_source=FLAGS.data_source,
      max_train=FLAGS.max_train, max_test=FLAGS.max_test,
      model=ModelConfig(num_classes=data_lib.DATASETS[dataset].num_classes, depth=FLAGS.depth,
                        stages=stages, widths=(FLAGS.width, 2 * FLAGS.width, 4 * FLAGS.width),
                        noise_coef=FLAGS.noise_coef, ensembles=FLAGS.ensembles,
                        noise_rng=FLAGS.noise_rng),
      train=config_lib.TrainConfig(
          epochs=FLAGS.epochs, batch_size=FLAGS.batch_size, lr=FLAGS.lr,
          lr_schedule=FLAGS.lr_schedule, weight_decay=FLAGS.weight_decay, seed=FLAGS.seed,
          augment=_tristate(FLAGS.augment), flip=_tristate(FLAGS.flip)),
      loss=LossConfig(kind=FLAGS.loss, alpha=FLAGS.alpha, beta=FLAGS.beta, eps=FLAGS.train_eps,
                      step_size=FLAGS.train_step_size, steps=FLAGS.train_steps,
                      attack_bn="eval" if FLAGS.loss == "trades" else FLAGS.train_attack_bn),
      quant=config_lib.QuantConfig(
          mode=FLAGS.quant, bits=FLAGS.bits, ternary_method=FLAGS.ternary_method,
          mbit_method=FLAGS.mbit_method,
          lambda0=FLAGS.br_lambda0, growth=FLAGS.br_growth, growth_every_epochs=FLAGS.br_growth_every,
          relax_fraction=FLAGS.br_relax_fraction),
      eval=config_lib.EvalConfig(attacks=FLAGS.attacks, eps=FLAGS.eval_eps, extra_eps=extra_eps,
                                 max_examples=FLAGS.eval_max,
                                 seed=FLAGS.eval_seed, eot_samples=FLAGS.eot_samples,
                                 max_unroll=FLAGS.max_unroll),
  )
  from enquant import evaluate  # pylint: disable=g-import-not-at-top
  evaluate.parse_attacks(FLAGS.attacks, eps=FLAGS.eval_eps)  # fail now, not after training
  if FLAGS.quick:
    cfg = config_lib.quick(cfg)
  if FLAGS.eval_max < 0 or FLAGS.max_train < 0 or FLAGS.max_test < 0:
    raise ValueError("--eval_max, --max_train and --max_test must be >= 0")
  if not 0 < FLAGS.eval_eps <= 1:
    raise ValueError(f"--eval_eps must be in (0, 1], got {FLAGS.eval_eps}")
  if (FLAGS.quick and dataset == "mnist" and FLAGS.data_source == "auto" and FLAGS.data_dir is None
      and not data_lib.has_local_copy("mnist")):
    import dataclasses  # pylint: disable=g-import-not-at-top
    cfg = dataclasses.replace(cfg, data_source="embedded")  # a fresh machine: the bundled sample
  return cfg


def default_workdir(cfg) -> str:
  q = cfg.quant
  quant = "float" if not q.enabled else f"{q.mode}{q.bits}b"
  return os.path.join("runs", f"{cfg.dataset}-{cfg.model.name}-{quant}-{cfg.loss.kind}-s{cfg.train.seed}"
                      + ("-quick" if FLAGS.quick else ""))


def run(dataset: str) -> None:
  """Entry point body shared by every dataset: exits non-zero with one clear line on bad input.

  Exit status 2: bad flags, data (TFDS included), run directory (``OSError`` included: read-only, a file,
  disk full), an unusable checkpoint, or a ``--distributed`` job that could not be joined; 3: training
  diverged (NaN/inf; no results written, the last good checkpoint stays).
  """
  from enquant import distributed  # pylint: disable=g-import-not-at-top
  from enquant import pipeline  # pylint: disable=g-import-not-at-top
  from enquant import train as train_lib  # pylint: disable=g-import-not-at-top
  import experiments  # pylint: disable=g-import-not-at-top

  experiments.quiet_logs()
  try:
    start_distributed()
    main = distributed.is_main_process()
    cfg = config_from_flags(dataset)
    if main and cfg.data_source == "embedded" and FLAGS.data_source == "auto":
      print("note: no local MNIST files: --quick trains on the embedded 5000/1000 MNIST sample "
            "(--data_dir=DIR or --data_source=tfds for the full set)")
    workdir = FLAGS.workdir or default_workdir(cfg)
    results = pipeline.train_and_evaluate(cfg, workdir, progress=FLAGS.progress,
                                          overwrite=FLAGS.overwrite, tensorboard=FLAGS.tensorboard)
  except train_lib.NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  except (ValueError, OSError, RuntimeError, pipeline.RunExistsError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if main:
    print(f"results written to {os.path.join(workdir, 'results.json')}")
  return results


def start_distributed() -> None:
  """``jax.distributed.initialize`` when ``--distributed`` is given (before any JAX computation).

  Raises:
    ValueError: a process flag without ``--distributed``.
    enquant.distributed.DistributedError: the job could not be joined (one line).
  """
  given = [f"--{n}" for n in ("coordinator_address", "num_processes", "process_id")
           if FLAGS[n].value is not None]
  if not FLAGS.distributed:
    if given:
      raise ValueError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} --distributed")
    return
  from enquant import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def protocol_defaults(dataset: str) -> dict:
  """Flag values of the paper's protocol for ``dataset`` (:func:`enquant.paper.protocol`)."""
  from experiments.paper import scales as paper  # pylint: disable=g-import-not-at-top
  cfg = paper.protocol(dataset)
  m, t, l, q, e = cfg.model, cfg.train, cfg.loss, cfg.quant, cfg.eval
  return dict(
      depth=m.depth, noise_coef=m.noise_coef, noise_rng=m.noise_rng, ensembles=m.ensembles,
      epochs=t.epochs,
      batch_size=t.batch_size, lr=t.lr, lr_schedule=t.lr_schedule, weight_decay=t.weight_decay,
      loss=l.kind, alpha=l.alpha, beta=l.beta, train_eps=l.eps, train_step_size=l.step_size,
      train_steps=l.steps, train_attack_bn=l.attack_bn, quant=q.mode, bits=q.bits,
      ternary_method=q.ternary_method, mbit_method=q.mbit_method, br_lambda0=q.lambda0,
      br_growth=q.growth, br_growth_every=q.growth_every_epochs, br_relax_fraction=q.relax_fraction,
      attacks=e.attacks, eval_eps=e.eps, eval_extra_eps=[f"{v:g}" for v in e.extra_eps],
      eval_max=e.max_examples, eot_samples=e.eot_samples)


def main_for(dataset: str, defaults: dict | None = None):
  """An absl ``main`` for ``dataset``; the flag defaults are the paper's protocol for it
  (:func:`enquant.paper.protocol`: ``python -m experiments.cifar10 --ensembles=5 --quant=br`` trains
  Table I's En5ResNet20 BR row), then ``defaults`` (the demo's)."""
  set_defaults(protocol_defaults(dataset))
  set_defaults(defaults or {})

  def main(argv):
    if len(argv) > 1:
      print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
      sys.exit(2)
    run(dataset)

  return main


__all__ = ["HELP_GROUPS", "config_from_flags", "help_text", "main_for", "parse_flags", "run",
           "start_distributed"]
