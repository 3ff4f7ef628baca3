"""Evaluate a finished (or checkpointed) run, white-box or black-box.

    python -m experiments.evaluate --run=runs/demo
    python -m experiments.evaluate --run=runs/demo --attacks=a2,apgd-ce,apgd-dlr --eot_samples=10
    python -m experiments.evaluate --run=runs/target --oracle=runs/oracle     # transfer (Table III)
    python -m experiments.evaluate --run=runs/demo --attacks=autoattack --tag=aa   # AutoAttack standard
    python -m experiments.evaluate --run=runs/demo --attacks=a2,autoattack-rand --sanity
    python -m experiments.evaluate --run=results/cpu/runs/RUN.npz --attacks=a1,a2,a3,cwl2   # a kept model

Writes ``evaluation[-<tag>].json`` and ``.md`` into the run directory (never overwriting an existing file
unless --overwrite). ``--run`` (and ``--oracle``) may also name a kept model, a run's model file committed
beside its results (``results/<scale>/runs/<run>.npz``, or ``reruns/<run>.npz`` for a retrained run that
moved; the run's configuration comes from the results file ``<run>.json`` beside it): its evaluation goes
to ``--out``, by default ``runs/kept/<run>`` (``runs/kept/reruns/<run>``) with a copy of the run's
``config.json``, so a committed row is attacked again without its run directory or any training. With
--oracle, adversarial examples are crafted on the oracle run's model (its P(w) for quantized runs) and the
target's accuracy on them is reported.

``autoattack`` / ``autoattack-rand`` in --attacks run :func:`enquant.attacks.autoattack.evaluate` (standard:
APGD-CE, APGD-T, FAB-T, Square; rand: APGD-CE and APGD-DLR with EOT 20) on the same images; the JSON
gets ``autoattack_acc`` (AutoAttack's count: an image is lost if any noise draw misclassifies it),
``autoattack_rescored_acc`` (one fresh draw on the final points), both robust counts, the accuracy after
each attack, and the RobustBench-style row becomes the per-image worst case over every attack run at the
main eps, AutoAttack included. --sanity adds the sanity checks of :mod:`enquant.sanity` (``"sanity"`` in
the JSON, a table in the ``.md``).
"""

import dataclasses
import os
import sys
import tempfile

from absl import app
from absl import flags

import experiments  # noqa: F401  (XLA flags before JAX)

flags.DEFINE_string("run", None, "Run directory to evaluate, or a kept model file (results/<scale>/runs/"
                    "<run>.npz, reruns/<run>.npz; its results <run>.json beside it).", required=True)
flags.DEFINE_string("oracle", None, "Run directory or kept model file of the oracle model (black-box "
                    "transfer).")
flags.DEFINE_string("out", None, "Directory of a kept model's evaluation files (default: runs/kept/<run>, "
                    "runs/kept/reruns/<run> for a rerun's model); a run directory's go into it.")
flags.DEFINE_string("attacks", None, "Attacks (default: the run's own evaluation attacks); also "
                    "autoattack (standard version) and autoattack-rand (EOT 20, randomized models).")
flags.DEFINE_float("eps", None, "l_inf radius (default: the run's).")
flags.DEFINE_integer("eot_samples", None, "EOT samples for randomized models (default: the run's).")
flags.DEFINE_integer("max_examples", None, "First N test images (0: all; default: the run's).")
flags.DEFINE_integer("seed", None, "Evaluation key (default: the run's).")
flags.DEFINE_enum("noise_rng", None, ["hash", "threefry"], "Generator of the model's noise during the "
                  "evaluation (default: the run's; enquant.models.noise).")
flags.DEFINE_string("data_dir", None, "Override the run's data directory.")
flags.DEFINE_string("tag", None, "Suffix of the output files.")
flags.DEFINE_bool("overwrite", False, "Replace an existing evaluation file.")
flags.DEFINE_bool("progress", True, "Show progress bars.")
flags.DEFINE_bool("sanity", False, "Also run the sanity checks of the evaluation (enquant.sanity).")
FLAGS = flags.FLAGS

AUTOATTACK = {"autoattack": "standard", "autoattack-rand": "rand"}


def split_attacks(names: str) -> tuple[list[str], list[str]]:
  """``(other attack names, AutoAttack versions)`` of a comma-separated --attacks value."""
  regular, versions = [], []
  for raw in names.split(","):
    name = raw.strip().lower()
    if name in AUTOATTACK:
      if AUTOATTACK[name] in versions:
        raise ValueError(f"attack {raw.strip()!r} is listed twice")
      versions.append(AUTOATTACK[name])
    elif name:
      regular.append(raw.strip())
  return regular, versions


def autoattack_evaluation(cfg, model, variables, images, labels, versions, *, progress) -> dict:
  """The run's attacks (:meth:`enquant.config.EvalConfig.attack_specs`, same keys as the pipeline) and each
  AutoAttack version on the same images, with per-example masks for the per-image worst case."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from enquant import evalfiles  # pylint: disable=g-import-not-at-top
  from enquant import evaluate as evaluate_lib  # pylint: disable=g-import-not-at-top
  from enquant.attacks import autoattack  # pylint: disable=g-import-not-at-top

  specs = cfg.eval.attack_specs(cfg.model.noise_coef > 0)
  key = jax.random.PRNGKey(cfg.eval.seed)
  target_fn = jax.tree_util.Partial(model.apply_eval, variables)
  acc, masks = evaluate_lib.evaluate(target_fn, images, labels, specs, batch_size=cfg.eval.batch_size,
                                     key=key, progress=progress, max_unroll=cfg.eval.max_unroll,
                                     return_masks=True)
  out = {"accuracy": acc, "attacks": [s.to_dict() for s in specs], "eval_seed": cfg.eval.seed,
         "examples": int(acc["n"])}
  at_eps = [s.name for s in specs if s.kind != "none" and s.eps == cfg.eval.eps]
  robust, rescored = [], []
  for version in versions:
    name = "autoattack" if version == "standard" else "autoattack-rand"
    aa_acc, aa_masks = autoattack.evaluate(
        target_fn, images, labels, eps=cfg.eval.eps,
        key=jax.random.fold_in(key, 0x4141 if version == "standard" else 0x4142),
        version=version, batch_size=cfg.eval.batch_size, progress=progress)
    out[name] = {"accuracy": aa_acc, **autoattack.describe(version),
                 "robust_count": int(aa_masks["robust"].sum()),
                 "robust_count_rescored": int(aa_masks["robust_rescored"].sum()),
                 "randomized_model": cfg.model.noise_coef > 0}
    if version == "standard" and cfg.model.noise_coef > 0:
      out[name]["note"] = ("the standard version is meant for deterministic models; for a randomized "
                           "one prefer autoattack-rand (EOT)")
    acc[name] = aa_acc["autoattack"]
    masks[name] = aa_masks["robust"]
    at_eps.append(name)
    robust.append(aa_masks["robust"])
    rescored.append(aa_masks["robust_rescored"])
  # Both counts over every AutoAttack version run (an image is robust only if it survives all).
  out["autoattack_acc"] = float(np.logical_and.reduce(robust).mean())
  out["autoattack_rescored_acc"] = float(np.logical_and.reduce(rescored).mean())
  out["autoattack_robust_count"] = int(np.logical_and.reduce(robust).sum())
  out["autoattack_rescored_robust_count"] = int(np.logical_and.reduce(rescored).sum())
  worst = evaluate_lib.worst_case(masks, at_eps)
  out["accuracy_worst_case"] = float(worst.mean())
  out["robustbench"] = dict(
      evaluate_lib.robustbench_entry(dict(acc, worst_case=float(worst.mean())), "worst_case",
                                     eps=cfg.eval.eps),
      attacks=at_eps, aggregation="per-image worst case", autoattack_acc=out["autoattack_acc"])
  # Per-image masks (AutoAttack's: robust AND clean-correct), for paired claim checks on the same images.
  out["masks"] = {name: evalfiles.pack_mask(mask) for name, mask in masks.items()}
  return out


def sanity_report(cfg, model, variables, images, labels, *, progress) -> dict:
  """:func:`enquant.sanity.sanity_checks` at the run's eps (EOT samples: the run's, at least 2)."""
  import jax  # pylint: disable=g-import-not-at-top

  from enquant import sanity  # pylint: disable=g-import-not-at-top

  config = sanity.SanityConfig(eot_samples=max(2, cfg.eval.eot_samples))
  return sanity.sanity_checks(jax.tree_util.Partial(model.apply_eval, variables), images, labels,
                              eps=cfg.eval.eps, key=jax.random.PRNGKey(cfg.eval.seed + 1),
                              batch_size=cfg.eval.batch_size, config=config, progress=progress)


def eval_overrides() -> dict:
  """The evaluation settings given as flags, checked by :class:`enquant.config.EvalConfig` before
  anything is loaded (ValueError naming the flag)."""
  from enquant import config as config_lib  # pylint: disable=g-import-not-at-top

  names = dict(eps="eps", eot_samples="eot_samples", max_examples="max_examples", seed="seed")
  overrides = {field: FLAGS[flag].value for field, flag in names.items() if FLAGS[flag].value is not None}
  try:
    config_lib.EvalConfig(**overrides)
  except ValueError as e:
    raise ValueError(f"--{' --'.join(f'{names[k]}={v}' for k, v in overrides.items())}: {e}") from None
  if FLAGS.attacks is not None:
    overrides["attacks"] = FLAGS.attacks
  return overrides


def check_writable(run: str) -> None:
  """Fails before any computing when the run directory cannot take the evaluation's files (a probe file
  is created and removed: permissions, a read-only file system and a full disk all show)."""
  if not os.path.isdir(run):
    return  # load_run names the missing run
  try:
    with tempfile.TemporaryFile(dir=run):
      pass
  except OSError as e:
    raise ValueError(f"run directory {run} is not writable ({e.strerror or type(e).__name__}): the "
                     "evaluation writes evaluation*.json there; copy the run elsewhere or fix it") from None


def is_kept(path: str) -> bool:
  """Whether ``path`` names a kept model file rather than a run directory."""
  return path.endswith(".npz")


def output_dir(run: str, out: str | None) -> str:
  """Where the evaluation files go: the run directory, or for a kept model ``out`` (default
  ``runs/kept/<run>``, ``runs/kept/reruns/<run>`` for a file in a ``reruns`` directory)."""
  if not is_kept(run):
    if out is not None:
      raise ValueError(f"--out is for a kept model (.npz); a run directory's evaluation goes into {run}")
    return run
  if out is not None:
    return out
  rerun = os.path.basename(os.path.dirname(os.path.abspath(run))) == "reruns"
  return os.path.join("runs", "kept", *(["reruns"] if rerun else []), os.path.basename(run)[:-len(".npz")])


def prepare_kept_output(out: str, cfg) -> None:
  """Makes ``out`` for a kept model's evaluation with the run's ``config.json`` (kept if it is there and
  of the same run; another run's is refused)."""
  from enquant import config as config_lib  # pylint: disable=g-import-not-at-top
  from enquant import files  # pylint: disable=g-import-not-at-top

  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out {out} is a file, not a directory")
  os.makedirs(out, exist_ok=True)
  check_writable(out)
  path = os.path.join(out, "config.json")
  if os.path.exists(path):
    try:
      theirs = config_lib.ExperimentConfig.from_dict(files.read_json(path)).fingerprint_dict()
    except (ValueError, TypeError, AttributeError) as e:
      raise ValueError(f"{path} is unreadable ({type(e).__name__}: {e})") from None
    if theirs != cfg.fingerprint_dict():
      raise ValueError(f"{out} holds another run ({path}); choose another --out")
  else:
    files.write_json_atomic(path, cfg.to_dict())


def evaluate_run() -> dict:
  """Validates the flags and the run directory (or kept model), then evaluates holding the output
  directory's lock."""
  from enquant import files  # pylint: disable=g-import-not-at-top
  from enquant import pipeline  # pylint: disable=g-import-not-at-top

  overrides = eval_overrides()
  out = output_dir(FLAGS.run, FLAGS.out)
  source = None
  if is_kept(FLAGS.run):
    source = pipeline.load_kept(FLAGS.run, data_dir=FLAGS.data_dir)  # validated before any write
    prepare_kept_output(out, source[0])
  else:
    check_writable(out)
  with files.hold_lock(os.path.join(out, ".lock"), f"run directory {out}"):
    # One writer: no training or other evaluation meanwhile (a run directory is loaded under the lock).
    return _evaluate_locked(overrides, out,
                            source or pipeline.load_trained(FLAGS.run, data_dir=FLAGS.data_dir))


def _evaluate_locked(overrides: dict, out_dir: str, source) -> dict:
  from enquant import data as data_lib  # pylint: disable=g-import-not-at-top
  from enquant import files  # pylint: disable=g-import-not-at-top
  from enquant import pipeline  # pylint: disable=g-import-not-at-top
  from enquant import run_results  # pylint: disable=g-import-not-at-top

  cfg, model, variables = source
  cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **overrides))
  if FLAGS.noise_rng is not None and FLAGS.noise_rng != cfg.model.noise_rng:
    from enquant.models import EnResNet  # pylint: disable=g-import-not-at-top
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, noise_rng=FLAGS.noise_rng))
    model = EnResNet(cfg.model)
  regular, versions = split_attacks(cfg.eval.attacks)
  cfg = dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, attacks=",".join(regular)))
  cfg.eval.attack_specs(cfg.model.noise_coef > 0)  # bad attack names fail now
  if versions and FLAGS.oracle:
    raise ValueError("AutoAttack is a white-box evaluation: drop --oracle or the autoattack entries")
  oracle = None
  if FLAGS.oracle:
    ocfg, omodel, ovars = pipeline.load_trained(FLAGS.oracle, data_dir=FLAGS.data_dir)
    if ocfg.dataset != cfg.dataset:
      raise ValueError(f"oracle was trained on {ocfg.dataset}, target on {cfg.dataset}")
    oracle = (omodel, ovars)
  tag = FLAGS.tag or ("transfer" if FLAGS.oracle else "")
  out = os.path.join(out_dir, f"evaluation{'-' + tag if tag else ''}.json")
  if os.path.exists(out) and not FLAGS.overwrite:
    raise ValueError(f"{out} exists; pass --overwrite or --tag=NAME")
  ds = data_lib.load(cfg.dataset, cfg.data_dir, source=cfg.data_source,
                     max_test=cfg.max_test or None, max_train=1)
  n = min(len(ds.test_images), cfg.eval.max_examples or len(ds.test_images))
  images, labels = ds.test_images[:n], ds.test_labels[:n]
  if versions:
    result = autoattack_evaluation(cfg, model, variables, images, labels, versions,
                                   progress=FLAGS.progress)
  else:
    result = run_results.robust_evaluation(cfg, model, variables, images, labels,
                                        progress=FLAGS.progress, oracle=oracle,
                                        resume_path=out[:-5] + "-progress.json")
  if FLAGS.sanity:
    result["sanity"] = sanity_report(cfg, model, variables, images, labels, progress=FLAGS.progress)
  result.update(run=os.path.abspath(FLAGS.run), kept_model=is_kept(FLAGS.run), eps=cfg.eval.eps,
                noise_rng=cfg.model.noise_rng,
                oracle=os.path.abspath(FLAGS.oracle) if FLAGS.oracle else None,
                software=pipeline.software_versions())
  files.write_json_atomic(out, result)
  files.remove_if_exists(out[:-5] + "-progress.json")
  acc = result["accuracy"]
  table = ("| " + " | ".join(k for k in acc if k != "n") + " |\n|" + "---|" * (len(acc) - 1) + "\n| "
           + " | ".join(f"{100 * v:.2f}%" for k, v in acc.items() if k != "n") + " |\n")
  if "sanity" in result:
    from enquant import sanity  # pylint: disable=g-import-not-at-top
    table += "\n" + sanity.format_report(result["sanity"])
  files.write_text_atomic(out[:-5] + ".md", table)
  print(table)
  print(f"written to {out}")
  return result


def main(argv):
  if len(argv) > 1:
    print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
    sys.exit(2)
  experiments.quiet_logs()
  try:
    experiments.start_compilation_cache()
    evaluate_run()
  except KeyboardInterrupt:
    print("interrupted; run the same command to resume (finished units are kept)", file=sys.stderr)
    sys.exit(130)
  except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: files.LockedError, the holder's pid
    print(f"error: {(str(e).splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=experiments.parse_flags_strict)
