"""EOT input-gradient rate: the gradient of the EOT mean loss against the mean of vmapped gradients.

    python -m benchmarks.eot_grad                  # the demo's En2ResNet8 (8/16/32), 28x28x1, batch 64
    python -m benchmarks.eot_grad --eot=10 --rounds=7 --out=results/bench/eot_grad

Both gradients (:func:`enquant.attacks.core.eot_loss_grad` and its vmapped reference
:func:`enquant.attacks.core.eot_loss_grad_vmapped`) are compiled first, then timed in interleaved rounds in
one process (so load on the machine hits both alike); the median per-call time gives the rate in input
gradients per second (batch x EOT samples per call). Also checks that the two gradients agree.
"""

import json
import os
import platform
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

from enquant import runtime

flags.DEFINE_integer("depth", 8, "ResNet depth.")
flags.DEFINE_integer("width", 8, "Stem width (stages: width, 2 width, 4 width).")
flags.DEFINE_integer("ensembles", 2, "Members.")
flags.DEFINE_integer("batch", 64, "Images per gradient.")
flags.DEFINE_integer("size", 28, "Image height and width (1 channel).")
flags.DEFINE_integer("eot", 10, "EOT samples per gradient.")
flags.DEFINE_integer("rounds", 7, "Timed rounds (median reported).")
flags.DEFINE_integer("calls", 3, "Calls per variant per round.")
flags.DEFINE_string("out", "", "Write <out>.json and <out>.md (e.g. results/bench/eot_grad).")
FLAGS = flags.FLAGS


def _cpu_model() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
      if line.startswith("Model name:"):
        return line.split(":", 1)[1].strip()
  except (OSError, subprocess.CalledProcessError):
    pass
  return platform.processor() or "unknown"


def _interleaved(fns: dict, args: tuple, rounds: int, calls: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  for fn in fns.values():
    jax.block_until_ready(fn(*args))  # compile and warm up
  times = {name: [] for name in fns}
  for r in range(rounds):
    order = list(fns) if r % 2 == 0 else list(fns)[::-1]
    for name in order:
      start = time.perf_counter()
      for _ in range(calls):
        jax.block_until_ready(fns[name](*args))
      times[name].append((time.perf_counter() - start) / calls)
  return times


def main(argv):
  del argv
  runtime.configure()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from enquant.attacks import core, objectives  # pylint: disable=g-import-not-at-top
  from enquant.models import EnResNet, ModelConfig  # pylint: disable=g-import-not-at-top

  w, s, b, k = FLAGS.width, FLAGS.size, FLAGS.batch, FLAGS.eot
  cfg = ModelConfig(num_classes=10, depth=FLAGS.depth, widths=(w, 2 * w, 4 * w),
                    ensembles=FLAGS.ensembles, noise_coef=0.1)
  model = EnResNet(cfg)
  x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (b, s, s, 1)), jnp.float32)
  y = jnp.asarray(np.arange(b) % 10, jnp.int32)
  fn = jax.tree_util.Partial(model.apply_eval, model.init(jax.random.PRNGKey(0), x))
  key = jax.random.PRNGKey(1)
  fns = {
      "vmap_grad_then_mean": jax.jit(core.eot_loss_grad_vmapped(fn, objectives.cross_entropy, k)),
      "grad_of_eot_mean": jax.jit(core.eot_loss_grad(fn, objectives.cross_entropy, k)),
  }
  g_old, g_new = fns["vmap_grad_then_mean"](x, y, key)[0], fns["grad_of_eot_mean"](x, y, key)[0]
  rel = float(jnp.max(jnp.abs(g_old - g_new)) / jnp.max(jnp.abs(g_old)))
  sign = float(jnp.mean(jnp.sign(g_old) == jnp.sign(g_new)))
  load_before = os.getloadavg()[0]
  times = _interleaved(fns, (x, y, key), FLAGS.rounds, FLAGS.calls)
  rate = {n: b * k / statistics.median(t) for n, t in times.items()}
  per_round = [o / n for o, n in zip(times["vmap_grad_then_mean"], times["grad_of_eot_mean"])]
  result = {
      "command": "python -m benchmarks.eot_grad " + " ".join(sys.argv[1:]),
      "cpu": _cpu_model(), "cpu_cores": os.cpu_count(),
      "load_average_1min": [load_before, os.getloadavg()[0]],
      "device": f"{jax.device_count()}x {jax.default_backend()}",
      "model": f"En{FLAGS.ensembles}ResNet{FLAGS.depth} widths {cfg.widths}", "image": [s, s, 1],
      "batch": b, "eot_samples": k, "rounds": FLAGS.rounds, "calls_per_round": FLAGS.calls,
      "input_gradients_per_second": rate,
      "speedup_median": rate["grad_of_eot_mean"] / rate["vmap_grad_then_mean"],
      "speedup_per_round": per_round,
      "max_abs_diff_relative": rel, "sign_agreement": sign,
  }
  print(json.dumps(result, indent=2))
  if FLAGS.out:
    with open(FLAGS.out + ".json", "w") as f:
      json.dump(result, f, indent=2)
      f.write("\n")
    with open(FLAGS.out + ".md", "w") as f:
      f.write(_markdown(result))


def _markdown(r: dict) -> str:
  rate = r["input_gradients_per_second"]
  lo, hi = min(r["speedup_per_round"]), max(r["speedup_per_round"])
  return (
      f"# EOT-{r['eot_samples']} input gradients: gradient of the EOT mean vs mean of vmapped gradients\n\n"
      f"Command: `{r['command']}`  \nHardware: {r['cpu']}, {r['cpu_cores']} cores ({r['device']}); "
      f"1-minute load average {r['load_average_1min'][0]:.1f} before and "
      f"{r['load_average_1min'][1]:.1f} after the timed rounds (a shared machine)  \n"
      f"Model: {r['model']}, {r['image'][0]}x{r['image'][1]}x1 images, batch {r['batch']}; "
      f"median of {r['rounds']} interleaved rounds of {r['calls_per_round']} calls.\n\n"
      "| variant | input gradients / s |\n|---|---|\n"
      f"| mean of vmap(grad) over the draws | {rate['vmap_grad_then_mean']:.0f} |\n"
      f"| grad of the EOT mean (enquant.attacks.core.eot_loss_grad) | {rate['grad_of_eot_mean']:.0f} |\n\n"
      f"Speed-up {r['speedup_median']:.2f}x (ratio of the median rates; per round {lo:.2f}-{hi:.2f}x, "
      f"median {statistics.median(r['speedup_per_round']):.2f}x). The gradients agree to "
      f"{r['max_abs_diff_relative']:.1e} of their largest entry; signs agree on "
      f"{100 * r['sign_agreement']:.2f} % of the entries.\n")


if __name__ == "__main__":
  app.run(main)
