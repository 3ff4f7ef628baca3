"""README's strong evaluation line at reduced size: one evaluation per process, two implementations.

    python -m benchmarks.strong_line --compare --images=64 --rounds=2 --cache  # writes results/bench/
    python -m benchmarks.strong_line --images=64                  # one evaluation, JSON on stdout
    python -m benchmarks.strong_line --profile --images=32        # where an EOT-10 gradient's time goes

The line is ``experiments.evaluate --attacks=a2,apgd-ce,apgd-dlr --eot_samples=10`` on the demo's
En2ResNet8 (widths 8/16/32, noise 0.1, hash noise, MNIST 28x28x1): the specs A2, apgd-ce, apgd-dlr and
their EOT-10 twins (:func:`enquant.run_results.eval_specs`), at eps 0.1, on the first ``--images`` images
of the embedded MNIST test sample, with freshly initialised weights (the work of every attack step does not
depend on the weights). ``--compare`` runs the whole package as it is at git revision ``--baseline``
(``git archive`` into a temporary folder; that tree's own ``benchmarks.strong_line``) and the working
tree's, interleaved, each evaluation in a fresh process, so each pays its own compiles; CPU seconds are
the process's user + system time; compile seconds are JAX's trace, lowering and backend compile events
(wall). With ``--cache`` two more evaluations of the working tree share a fresh persistent compilation
cache (``--cache_dir``): the first fills it, the second reads it. ``--specs=sweep`` runs a1,a2,a3 at three
eps instead (specs that share programs).
"""

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

from enquant import runtime

flags.DEFINE_string("baseline", "a7388f7", "Git revision of the baseline package for --compare.")
flags.DEFINE_string("cache_dir", "", "JAX persistent compilation cache of this evaluation (empty: off).")
flags.DEFINE_bool("cache", False, "--compare also runs the working tree twice on a fresh cache.")
flags.DEFINE_integer("images", 32, "Test images (one batch).")
flags.DEFINE_integer("eot_samples", 10, "EOT samples of the EOT twins.")
flags.DEFINE_enum("specs", "strong", ["strong", "sweep"], "strong: README's strong line; sweep: "
                  "a1,a2,a3 at eps 0.05, 0.1, 0.2 (programs shared between eps).")
flags.DEFINE_bool("compare", False, "Run baseline and current interleaved in subprocesses and write "
                  "--out_dir/<name>.md and .json.")
flags.DEFINE_integer("rounds", 1, "Interleaved rounds of --compare.")
flags.DEFINE_bool("profile", False, "Time an EOT-10 input gradient and its parts (current model).")
flags.DEFINE_string("out_dir", "results/bench", "Where --compare writes.")
FLAGS = flags.FLAGS

EPS = 0.1
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


def _model():
  from enquant.models import EnResNet, ModelConfig  # pylint: disable=g-import-not-at-top
  return EnResNet(ModelConfig(num_classes=10, depth=8, widths=(8, 16, 32), noise_coef=0.1, ensembles=2,
                              noise_rng="hash"))


def _data(n):
  from enquant import data  # pylint: disable=g-import-not-at-top
  ds = data.load("mnist", source="embedded")
  return ds.test_images[:n], ds.test_labels[:n]


def _specs(ev):
  import dataclasses  # pylint: disable=g-import-not-at-top
  if FLAGS.specs == "sweep":
    specs = []
    for eps in (0.05, 0.1, 0.2):
      specs += [dataclasses.replace(s, name=f"{s.name}@{eps:g}")
                for s in ev.parse_attacks("a1,a2,a3", eps=eps)]
    return tuple(specs)
  base = list(ev.parse_attacks("a2,apgd-ce,apgd-dlr", eps=EPS))
  k = FLAGS.eot_samples
  return tuple(base + [dataclasses.replace(s, name=f"{s.name}-eot{k}", eot_samples=k) for s in base])


def _one_evaluation() -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  compile_s = [0.0]

  def listener(event, duration, **_):
    if event in _COMPILE_EVENTS:
      compile_s[0] += duration
  jax.monitoring.register_event_duration_secs_listener(listener)
  from enquant import evaluate as ev  # pylint: disable=g-import-not-at-top
  model = _model()
  images, labels = _data(FLAGS.images)
  variables = model.init(jax.random.PRNGKey(0), images[:1].astype("float32") / 255.0)
  jax.block_until_ready(variables)
  specs = _specs(ev)
  fn = jax.tree_util.Partial(model.apply_eval, variables)
  compile_before = compile_s[0]
  t0, c0 = time.perf_counter(), time.process_time()
  acc = ev.evaluate(fn, images, labels, specs, batch_size=200, key=jax.random.PRNGKey(0), progress=True)
  wall, cpu = time.perf_counter() - t0, time.process_time() - c0
  return {"impl": "current", "images": FLAGS.images, "specs": [s.name for s in specs],
          "wall_s": round(wall, 2), "cpu_s": round(cpu, 2),
          "compile_s": round(compile_s[0] - compile_before, 2), "accuracy": acc,
          "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}


def _lscpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    return next(line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line)
  except (OSError, subprocess.CalledProcessError, StopIteration):
    return platform.processor() or "unknown"


def _baseline_tree() -> str:
  """The package at ``--baseline``, extracted from git into a temporary folder."""
  root = tempfile.mkdtemp(prefix="enquant_baseline_")
  archive = subprocess.run(["git", "archive", FLAGS.baseline], check=True, capture_output=True).stdout
  subprocess.run(["tar", "-x", "-C", root], input=archive, check=True)
  return root


def _evaluation(impl: str, tree: str, cache_dir: str = "") -> dict:
  cmd = [sys.executable, "-m", "benchmarks.strong_line", f"--images={FLAGS.images}",
         f"--eot_samples={FLAGS.eot_samples}", f"--specs={FLAGS.specs}"]
  if cache_dir:
    cmd.append(f"--cache_dir={cache_dir}")
  env = dict(os.environ, PYTHONPATH=tree, ENQUANT_JAX_CACHE="")
  load = os.getloadavg()[0]
  out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=tree, env=env).stdout
  row = json.loads(out.strip().splitlines()[-1])
  row.update(impl=impl, load_before=round(load, 2), load_after=round(os.getloadavg()[0], 2),
             compile_share_of_wall=round(row["compile_s"] / row["wall_s"], 3))
  print(json.dumps(row), flush=True)
  return row


def _compare() -> None:
  trees = {"baseline": _baseline_tree(), "current": os.getcwd()}
  rows = []
  for r in range(FLAGS.rounds):
    for impl in ("baseline", "current"):
      rows.append(dict(_evaluation(impl, trees[impl]), round=r))
  cached = []
  if FLAGS.cache:
    cache_dir = tempfile.mkdtemp(prefix="enquant_cache_")
    cached = [dict(_evaluation("current", trees["current"], cache_dir), use=use)
              for use in ("first (fills the cache)", "second (reads the cache)")]
  name = "strong_line" if FLAGS.specs == "strong" else "spec_sweep"
  mean = lambda impl, k: sum(r[k] for r in rows if r["impl"] == impl) / FLAGS.rounds
  summary = {k: {impl: round(mean(impl, k), 2) for impl in ("baseline", "current")}
             for k in ("wall_s", "cpu_s", "compile_s")}
  for k, v in summary.items():
    v["current/baseline"] = round(v["current"] / v["baseline"], 3)
  record = {"command": "python -m benchmarks.strong_line --compare " + " ".join(sys.argv[1:]),
            "cpu": _lscpu_model(), "cores": os.cpu_count(), "baseline_revision": FLAGS.baseline,
            "rows": rows, "cached": cached, "summary": summary}
  os.makedirs(FLAGS.out_dir, exist_ok=True)
  with open(os.path.join(FLAGS.out_dir, f"{name}.json"), "w") as f:
    json.dump(record, f, indent=1)
  print(json.dumps(summary))


def main(argv):
  del argv
  runtime.configure(cache_dir=FLAGS.cache_dir or None)
  if FLAGS.compare:
    return _compare()
  if FLAGS.profile:
    from benchmarks import strong_line_profile  # pylint: disable=g-import-not-at-top
    print(json.dumps(strong_line_profile.profile(_model(), _data(FLAGS.images)[0], FLAGS.eot_samples)))
    return None
  print(json.dumps(_one_evaluation()))
  return None


if __name__ == "__main__":
  app.run(main)
