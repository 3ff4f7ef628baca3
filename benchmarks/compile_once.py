"""Compile once: ``pipeline.load_run`` with an ``eval_shape`` restore target, and a second evaluation of the
same model with JAX's persistent compilation cache.

    python -m benchmarks.compile_once --bench_run=runs/demo --before_src=/path/to/checkout/before
    # writes results/bench/compile_once.json and .md

Every number comes from a fresh process (so nothing is cached in memory): ``load_run``'s time with the code
in --before_src (its ``load_run`` compiles and runs the model's init to build the restore target) and with
this checkout's; then ``experiments.evaluate`` twice with one cache folder (the second reads every program
back) and twice with the cache off, each reporting the seconds XLA spent compiling
(``/jax/core/compile/backend_compile_duration`` events) and its wall time.
"""

import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

flags.DEFINE_string("bench_run", None, "Run directory (a finished or checkpointed run).", required=True)
flags.DEFINE_string("before_src", None, "Source tree of the code to compare load_run with.")
flags.DEFINE_string("bench_attacks", "a1,a2", "Attacks of the evaluation.")
flags.DEFINE_integer("bench_examples", 64, "Test images of the evaluation.")
flags.DEFINE_integer("repeats", 2, "Fresh processes per load_run measurement.")
flags.DEFINE_string("out", "results/bench/compile_once", "Output path without extension.")
flags.DEFINE_string("part", None, "Internal: one measurement in this process (evaluate).")
flags.DEFINE_string("cache", "", "Internal: the compilation cache folder of --part=evaluate.")
FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _compile_seconds() -> list[float]:
  import jax  # pylint: disable=g-import-not-at-top
  seen = []
  jax.monitoring.register_event_duration_secs_listener(
      lambda name, secs, **_: seen.append(secs) if name == "/jax/core/compile/backend_compile_duration"
      else None)
  return seen


# One load_run in a fresh process, run with the working directory at the source tree measured.
LOAD_RUN = """
import json, sys, time
from enquant import runtime
runtime.configure()
import jax
seen = []
EVENT = "/jax/core/compile/backend_compile_duration"
jax.monitoring.register_event_duration_secs_listener(
    lambda name, secs, **_: seen.append(secs) if name == EVENT else None)
from enquant import pipeline
t0 = time.perf_counter()
pipeline.load_run(sys.argv[1], log=lambda *_: None)
print(json.dumps({"load_run_s": time.perf_counter() - t0, "compile_s": sum(seen), "compiles": len(seen)}))
"""


def part_evaluate() -> dict:
  from experiments import evaluate  # pylint: disable=g-import-not-at-top
  seen = _compile_seconds()
  flags.FLAGS(["evaluate", f"--run={FLAGS.bench_run}", f"--attacks={FLAGS.bench_attacks}",
               "--eot_samples=0", f"--max_examples={FLAGS.bench_examples}", "--tag=compile-once",
               "--overwrite", "--progress=false", f"--compilation_cache={FLAGS.cache}"], known_only=True)
  t0 = time.perf_counter()
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  with contextlib.redirect_stdout(io.StringIO()):
    evaluate.main(["evaluate"])
  return {"wall_s": time.perf_counter() - t0, "compile_s": sum(seen), "compiles": len(seen)}


def _spawn(args: list[str], src: str) -> dict:
  env = dict(os.environ, PYTHONPATH=src)
  run = os.path.abspath(FLAGS.bench_run)
  command = (["-c", LOAD_RUN, run] if args == ["--part=load_run"] else
             ["-m", "benchmarks.compile_once", f"--bench_run={run}", *args])
  proc = subprocess.run([sys.executable, *command], cwd=src, env=env, capture_output=True, text=True,
                        check=False)
  if proc.returncode:
    raise RuntimeError(proc.stderr[-3000:])
  return json.loads(proc.stdout.strip().splitlines()[-1])


def _model(run: str) -> str:
  with open(os.path.join(run, "config.json")) as f:
    cfg = json.load(f)
  m = cfg["model"]
  return (f"{cfg['dataset']}, {m['ensembles']} member(s), depth {m['depth']}, widths "
          f"{'/'.join(map(str, m['widths']))}, noise {m['noise_coef']}")


def _cpu() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    return next(l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith("Model name"))
  except (OSError, StopIteration):
    return platform.processor()


def main(argv):
  del argv
  if FLAGS.part == "evaluate":
    print(json.dumps(part_evaluate()))
    return
  out = {"command": " ".join(["python -m benchmarks.compile_once"] + sys.argv[1:]), "cpu": _cpu(),
         "cores": os.cpu_count(), "run": os.path.abspath(FLAGS.bench_run), "model": _model(FLAGS.bench_run),
         "before": "load_run building its restore target with a compiled init (the code in --before_src)",
         "after": "load_run building it with jax.eval_shape", "load_run": {}}
  sources = ([("before", FLAGS.before_src)] if FLAGS.before_src else []) + [("after", ROOT)]
  for _ in range(FLAGS.repeats):
    for name, src in sources:
      out["load_run"].setdefault(name, []).append(_spawn(["--part=load_run"], src))
  with tempfile.TemporaryDirectory() as cache:
    out["evaluate"] = {
        "cache_first": _spawn(["--part=evaluate", f"--cache={cache}"], ROOT),
        "cache_second": _spawn(["--part=evaluate", f"--cache={cache}"], ROOT),
        "no_cache_first": _spawn(["--part=evaluate", "--cache="], ROOT),
        "no_cache_second": _spawn(["--part=evaluate", "--cache="], ROOT)}
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  with open(FLAGS.out + ".json", "w") as f:
    json.dump(out, f, indent=2)
  with open(FLAGS.out + ".md", "w") as f:
    f.write(_markdown(out))
  print(_markdown(out))


def _markdown(out: dict) -> str:
  lines = ["# Compile once", "", f"`{out['command']}`", "",
           f"{out['cpu']}, {out['cores']} cores; every number from a fresh process. Run: {out['model']}.",
           f"before: {out['before']}; after: {out['after']}. evaluate: `experiments.evaluate` "
           "(attacks a1,a2 on 64 images) twice with one compilation cache folder, then twice without.", "",
           "Compile s and events: `/jax/core/compile/backend_compile_duration` (a program read back from the "
           "cache still reports one event, with the seconds it took). Other jobs shared the 2 cores.", "",
           "| measurement | wall s | XLA compile s | compile events |", "|---|---|---|---|"]
  for name, rows in out["load_run"].items():
    for i, r in enumerate(rows):
      lines.append(f"| load_run, {name} (process {i + 1}) | {r['load_run_s']:.2f} | {r['compile_s']:.2f} | "
                   f"{r['compiles']} |")
  for name, r in out["evaluate"].items():
    lines.append(f"| evaluate, {name.replace('_', ' ')} | {r['wall_s']:.2f} | {r['compile_s']:.2f} | "
                 f"{r['compiles']} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  app.run(main)
