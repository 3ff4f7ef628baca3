"""The training command line, generated from :class:`enquant.config.ExperimentConfig`, and its glue.

Every setting of the configuration tree is a flag, under two names: its path (``--config.loss.beta=8``,
the ml_collections ``config_flags`` spelling of flax examples and big_vision) and, where the setting had
one, its flat name (``--beta=8``, ``--ensembles=5``, ``--quant=br``: the commands of the README, the paper
tables and every earlier run keep working). The flags are absl flags defined by walking the dataclass
fields (:func:`enquant.config.settings`) rather than an ``ml_collections.ConfigDict``: the dataclasses stay
the one typed, frozen, self-validating source (a bad value fails in ``__post_init__`` with one line), and no
extra dependency or second config format is needed. A new setting is one field in ``enquant/config.py``.

Precedence: the dataset's preset (:func:`enquant.config.preset`), then the entry point's defaults (the
demo's), then ``--quick``, then every flag given on the command line: explicit flags always win.

    python -m experiments.train --dataset=cifar10 --ensembles=5 --quant=br --config.loss.beta=8
    python -m experiments.mnist --quick --workdir=/tmp/mnist_quick
"""

import os
import sys
import textwrap
import types
import typing

from absl import app
from absl import flags

import experiments
from enquant import config as config_lib

FLAGS = flags.FLAGS
PREFIX = "config."
_TRISTATE = {"auto": None, "on": True, "off": False}


def _kind(setting: config_lib.Setting) -> tuple[str, type | None]:
  """``(flag kind, element type)`` of a setting from its type annotation."""
  tp = typing.get_type_hints(setting.owner)[setting.field.name]
  args = [a for a in typing.get_args(tp) if a is not type(None)]
  optional = isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union
  base = args[0] if optional else tp
  if typing.get_origin(base) is tuple:
    return "list", typing.get_args(base)[0]
  if base is bool:
    return ("tristate" if optional else "bool"), None
  return {int: "int", float: "float"}.get(base, "str"), None


def _define(name: str, kind: str, help_text: str) -> None:
  if kind == "list":
    flags.DEFINE_list(name, None, help_text)
  elif kind == "tristate":
    flags.DEFINE_enum(name, None, list(_TRISTATE), help_text)
  else:
    define = {"int": flags.DEFINE_integer, "float": flags.DEFINE_float, "bool": flags.DEFINE_bool,
              "str": flags.DEFINE_string}[kind]
    define(name, None, help_text)


SETTINGS = tuple(config_lib.settings())
for _s in SETTINGS:
  for _name in filter(None, (_s.flag, PREFIX + _s.path)):
    _define(_name, _kind(_s)[0], _s.help)

flags.DEFINE_integer("width", None, "Base width; the stages use width, 2*width, 4*width (sets "
                     "--config.model.widths).")
# Run (not configuration: they change no number of the run).
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<dataset>-<model>-<quant>-<loss>-s<seed>).")
flags.DEFINE_bool("quick", False, "Shrink everything for a CPU smoke run; flags given explicitly win.")
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

SECTION_TITLES = (("", "Data"), ("model", "Model"), ("train", "Optimisation"),
                  ("quant", "Quantization (Binary-Relax / Binary-Connect)"),
                  ("loss", "Training loss and its attack"), ("eval", "Evaluation"))
RUN_FLAGS = ("workdir", "quick", "overwrite", "progress", "tensorboard", "compilation_cache")
DISTRIBUTED_FLAGS = ("distributed", "coordinator_address", "num_processes", "process_id")
_HELP_ARGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")


def _section(setting: config_lib.Setting) -> str:
  return setting.path.split(".")[0] if "." in setting.path else ""


def _value(setting: config_lib.Setting, name: str):
  """The setting's value from flag ``name`` (lists become typed tuples; ValueError naming the flag)."""
  kind, element = _kind(setting)
  raw = FLAGS[name].value
  if kind == "tristate":
    return _TRISTATE[raw]
  if kind != "list":
    return raw
  try:
    values = tuple(element(v) for v in raw)
  except ValueError:
    raise ValueError(f"--{name} must be comma-separated {element.__name__}s, got {','.join(raw)}") from None
  optional = setting.field.default is None
  return None if optional and not values else values


def explicit_settings() -> dict[str, object]:
  """``{path: value}`` of every setting given on the command line (either name; both is an error)."""
  out = {}
  for s in SETTINGS:
    given = [n for n in (s.flag, PREFIX + s.path) if n and FLAGS[n].present]
    if len(given) > 1:
      raise ValueError(f"--{given[0]} and --{given[1]} set the same setting; give one of them")
    if given:
      out[s.path] = _value(s, given[0])
  if FLAGS["width"].present:
    if "model.widths" in out:
      raise ValueError("--width and --config.model.widths set the same setting; give one of them")
    if FLAGS.width < 1:
      raise ValueError(f"--width must be >= 1, got {FLAGS.width}")
    out["model.widths"] = (FLAGS.width, 2 * FLAGS.width, 4 * FLAGS.width)
  return out


def base_config(dataset: str, defaults: dict | None = None) -> config_lib.ExperimentConfig:
  """The dataset's preset with the entry point's ``defaults`` (paths, as :func:`enquant.config.replace`)."""
  return config_lib.replace(config_lib.preset(dataset), defaults or {})


def config_from_flags(dataset: str, defaults: dict | None = None) -> config_lib.ExperimentConfig:
  """Builds the :class:`ExperimentConfig`: preset, entry defaults, ``--quick``, then explicit flags.

  Raises:
    ValueError: one line naming the bad flag or value.
  """
  from enquant import data as data_lib  # pylint: disable=g-import-not-at-top
  explicit = explicit_settings()
  cfg = base_config(explicit.pop("dataset", dataset), defaults)
  if FLAGS.quick:
    cfg = config_lib.quick(cfg)
  if explicit.get("loss.kind") == "trades":  # TRADES crafts with BatchNorm in eval mode unless told
    explicit.setdefault("loss.attack_bn", "eval")
  cfg = config_lib.replace(cfg, explicit)
  cfg.eval.attack_specs(cfg.model.noise_coef > 0)  # bad attack names fail now, not after training
  if (FLAGS.quick and cfg.dataset == "mnist" and "data_source" not in explicit and cfg.data_source == "auto"
      and cfg.data_dir is None and not data_lib.has_local_copy("mnist")):
    cfg = config_lib.replace(cfg, {"data_source": "embedded"})  # a fresh machine: the bundled sample
  return cfg


def _flag_default(setting: config_lib.Setting, cfg: config_lib.ExperimentConfig) -> str:
  value = cfg
  for part in setting.path.split("."):
    value = getattr(value, part)
  if _kind(setting)[0] == "tristate":
    return {v: k for k, v in _TRISTATE.items()}[value]
  if isinstance(value, tuple):
    return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
  if isinstance(value, bool):
    return str(value).lower()
  return "" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _describe(name: str, default: str, help_text: str, alias: str | None = None) -> list[str]:
  head = f"  --{name}={default}" if default else f"  --{name}"
  body = help_text + (f" (also --{alias})" if alias else "")
  return [head] + textwrap.wrap(body, width=96, initial_indent="      ", subsequent_indent="      ")


def quick_summary(cfg: config_lib.ExperimentConfig) -> str:
  """What ``--quick`` changes in ``cfg``, as flags (``--epochs=2 --config.model.widths=8,16,32 ...``)."""
  shrunk = config_lib.quick(cfg)
  return " ".join(f"--{s.flag or PREFIX + s.path}={_flag_default(s, shrunk) or repr('')}" for s in SETTINGS
                  if _flag_default(s, shrunk) != _flag_default(s, cfg))


def help_text(program: str, doc: str | None, cfg: config_lib.ExperimentConfig) -> str:
  """The ``--help`` text: the entry point's docstring, then every flag grouped by topic with ``cfg``'s
  values (the entry point's defaults) as defaults."""
  lines = [(doc or "").strip(), "", f"usage: python -m {program} [--flag=value ...]",
           f"Defaults: the paper's protocol for {cfg.dataset} (enquant.config.preset) unless the entry "
           "point says otherwise. Every setting is also --config.<path> (--config.loss.beta=8).", ""]
  for section, title in SECTION_TITLES:
    lines.append(f"{title}:")
    for s in (s for s in SETTINGS if _section(s) == section):
      default = _flag_default(s, cfg)
      if s.flag:
        lines += _describe(s.flag, default, s.help, PREFIX + s.path)
      else:
        lines += _describe(PREFIX + s.path, default, s.help)
      if s.path == "model.stages":
        lines += _describe("width", str(cfg.model.widths[0]), FLAGS["width"].help)
    lines.append("")
  lines.append("Run directory and output:")
  for name in RUN_FLAGS:
    extra = f" It sets: {quick_summary(cfg)}." if name == "quick" else ""
    lines += _describe(name, (FLAGS[name].default_as_str or "").strip("'"), FLAGS[name].help + extra)
  lines += ["", "Multi-host (JAX distributed runtime):"]
  for name in DISTRIBUTED_FLAGS:
    lines += _describe(name, (FLAGS[name].default_as_str or "").strip("'"), FLAGS[name].help)
  return "\n".join(lines).lstrip("\n") + "\n"


def parse_flags_for(dataset: str, defaults: dict | None = None):
  """A ``flags_parser`` for ``app.run``: ``--help`` prints :func:`help_text`; every usage error is one
  line and exit status 2."""

  def parse(argv: list[str]) -> list[str]:
    for arg in argv[1:]:
      if arg == "--":
        break
      if arg in _HELP_ARGS:
        main_module = sys.modules.get("__main__")
        spec = getattr(main_module, "__spec__", None)
        program = spec.name if spec is not None else os.path.basename(argv[0])
        chosen = [a.split("=", 1)[1] for a in argv[1:] if a.startswith(("--dataset=", "--config.dataset="))]
        try:
          print(help_text(program, getattr(main_module, "__doc__", None),
                          base_config(chosen[-1] if chosen else dataset, defaults)), flush=True)
        except BrokenPipeError:  # --help | head
          pass
        except ValueError as e:
          print(f"error: {e}", file=sys.stderr)
          sys.exit(2)
        sys.exit(0)
    return experiments.parse_flags_strict(argv)

  return parse


def default_workdir(cfg) -> str:
  q = cfg.quant
  quant = "float" if not q.enabled else f"{q.mode}{q.bits}b"
  return os.path.join("runs", f"{cfg.dataset}-{cfg.model.name}-{quant}-{cfg.loss.kind}-s{cfg.train.seed}"
                      + ("-quick" if FLAGS.quick else ""))


def error_lines(e: BaseException, limit: int = 3) -> list[str]:
  """At most ``limit`` lines of an error: its first line, then its last lines naming a flag to use."""
  lines = [l.strip() for l in str(e).splitlines() if l.strip()] or [type(e).__name__]
  if len(lines) <= limit:
    return lines
  hints = [l for l in lines[1:] if "--" in l]
  return [lines[0]] + hints[-(limit - 1):] if hints else lines[:1]


def _interrupted_line(e: KeyboardInterrupt) -> str:
  where = getattr(e, "where", None) or "before the first epoch ended"
  return f"interrupted {where}; run the same command to resume"


def run(dataset: str, defaults: dict | None = None, workdir: str | None = None):
  """Entry point body shared by every dataset: exits non-zero with one clear line on bad input.

  Exit status 2: bad flags, data (TFDS included), run directory (``OSError`` included: read-only, a file,
  disk full, in use by another process), an unusable checkpoint, or a ``--distributed`` job that could not
  be joined; 3: training diverged (NaN/inf; no results written, the last good checkpoint stays); 130:
  interrupted (Ctrl-C; the same command resumes).
  """
  from enquant import distributed  # pylint: disable=g-import-not-at-top
  from enquant import pipeline  # pylint: disable=g-import-not-at-top
  from enquant import train as train_lib  # pylint: disable=g-import-not-at-top

  experiments.quiet_logs()
  try:
    start_distributed()
    main = distributed.is_main_process()
    cfg = config_from_flags(dataset, defaults)
    if (main and cfg.data_source == "embedded" and FLAGS.data_source is None
        and "data_source" not in (defaults or {})):  # switched by --quick, not the entry's (demo) default
      print("note: no local MNIST files: --quick trains on the embedded 5000/1000 MNIST sample "
            "(--data_dir=DIR or --data_source=tfds for the full set)")
    workdir = FLAGS.workdir or workdir or default_workdir(cfg)
    results = pipeline.train_and_evaluate(cfg, workdir, progress=FLAGS.progress,
                                          overwrite=FLAGS.overwrite, tensorboard=FLAGS.tensorboard)
  except train_lib.NonFiniteError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  except KeyboardInterrupt as e:
    print(_interrupted_line(e), file=sys.stderr, flush=True)
    sys.stdout.flush()
    # The run's files are closed by now; exiting at once keeps background threads (orbax's event loop)
    # from printing their shutdown tracebacks after the one line.
    os._exit(130)  # pylint: disable=protected-access
  except (ValueError, OSError, RuntimeError, pipeline.RunExistsError) as e:
    print("error: " + "\n  ".join(error_lines(e)), file=sys.stderr)
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


def main_for(dataset: str, defaults: dict | None = None, workdir: str | None = None):
  """An absl ``main`` for ``dataset`` (:func:`enquant.config.preset`: ``python -m experiments.cifar10
  --ensembles=5 --quant=br`` trains Table I's En5ResNet20 BR row), with the entry point's ``defaults``
  (setting paths) and default ``workdir`` (the demo's)."""

  def main(argv):
    if len(argv) > 1:
      print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
      sys.exit(2)
    try:
      experiments.start_compilation_cache()
    except OSError as e:
      print(f"error: --compilation_cache: {e}", file=sys.stderr)
      sys.exit(2)
    run(dataset, defaults, workdir)

  return main


def launch(dataset: str, defaults: dict | None = None, workdir: str | None = None) -> None:
  """``app.run`` of :func:`main_for` with the generated parser: the body of every training entry point."""
  if workdir is not None:
    FLAGS.set_default("workdir", workdir)  # shown by --help
  app.run(main_for(dataset, defaults, workdir), flags_parser=parse_flags_for(dataset, defaults))


__all__ = ["SETTINGS", "base_config", "config_from_flags", "explicit_settings", "help_text", "launch",
           "main_for", "parse_flags_for", "quick_summary", "run", "start_distributed"]
