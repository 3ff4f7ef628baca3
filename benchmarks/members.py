"""How to apply an ensemble's members on an accelerator: vmap vs one grouped convolution, f32 vs bf16.

    python -m benchmarks.members --out=members.json                  # En5ResNet20, 32x32x3, batch 128/512
    python -m benchmarks.members --smoke                             # tiny, seconds on a CPU

For every (batch, compute dtype, member map) it times two jitted steps on random images and fresh
weights, after a warm-up call (the compile, reported separately): ``attack`` = one input gradient of the
cross-entropy (a PGD step, 2 forward-equivalents F), ``train`` = one parameter gradient with BatchNorm in
training mode (3F). Prints one JSON row per case (images/second, achieved GFLOP/s, the ratio to vmap f32
at the same batch) and stops starting new cases when ``--budget_s`` is nearly spent.
"""

import dataclasses
import json
import statistics
import time

from absl import app
from absl import flags

from enquant import runtime

flags.DEFINE_integer("members", 5, "Ensemble size n of En_n.")
flags.DEFINE_integer("depth", 20, "ResNet depth.")
flags.DEFINE_list("shape", ["32", "32", "3"], "Image shape H,W,C.")
flags.DEFINE_list("batches", ["128", "512"], "Batch sizes.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Convolution compute dtypes.")
flags.DEFINE_list("member_maps", ["vmap", "grouped"], "Member maps (vmap, grouped, unrolled).")
flags.DEFINE_list("steps", ["attack", "train"], "attack: input gradient; train: parameter gradient.")
flags.DEFINE_integer("rounds", 5, "Timed rounds (median reported).")
flags.DEFINE_integer("repeat", 5, "Calls per timed round.")
flags.DEFINE_float("budget_s", 480.0, "Start no new case after this many seconds.")
flags.DEFINE_bool("smoke", False, "Tiny model and batch, one round: checks the script on any machine.")
flags.DEFINE_string("out", None, "Write the rows as JSON here.")
FLAGS = flags.FLAGS


def _step_fn(model, variables, kind):
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  def loss(v, x, y, key, train):
    out = model.apply(v, x, key, train=train)
    logits = out[0] if train else out
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  if kind == "attack":
    return jax.jit(lambda x, y, key: jax.grad(loss, argnums=1)(variables, x, y, key, False))
  return jax.jit(lambda x, y, key: jax.grad(lambda p: loss(
      {"params": p, "batch_stats": variables["batch_stats"]}, x, y, key, True))(variables["params"]))


def _time(fn, *args) -> tuple[float, float]:
  import jax  # pylint: disable=g-import-not-at-top
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(FLAGS.rounds):
    t0 = time.perf_counter()
    for _ in range(FLAGS.repeat):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / FLAGS.repeat)
  return compile_s, statistics.median(times)


def _cases():
  batches = [int(b) for b in FLAGS.batches]
  return [(b, d, m, s) for b in batches for d in FLAGS.dtypes for s in FLAGS.steps
          for m in FLAGS.member_maps]


def main(argv):
  del argv
  runtime.configure()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from enquant import prune  # pylint: disable=g-import-not-at-top
  from enquant.models import EnResNet, ModelConfig  # pylint: disable=g-import-not-at-top

  if FLAGS.smoke:
    FLAGS.members, FLAGS.depth, FLAGS.shape = 2, 8, ["8", "8", "3"]
    FLAGS.rounds, FLAGS.repeat, FLAGS.batches = 1, 1, ["4"]
  shape = tuple(int(s) for s in FLAGS.shape)
  t_start = time.perf_counter()
  rows, base = [], {}
  widths = (4, 8, 8) if FLAGS.smoke else (16, 32, 64)
  base_cfg = ModelConfig(depth=FLAGS.depth, widths=widths, ensembles=FLAGS.members, noise_coef=0.1)
  # The float32 parameters serve every case (compute dtype and member map change no parameter).
  variables = EnResNet(base_cfg).init(jax.random.PRNGKey(0), np.zeros((1,) + shape, np.float32))
  device = f"{jax.device_count()}x {jax.devices()[0].device_kind}"
  for batch, dtype, member_map, kind in _cases():
    if time.perf_counter() - t_start > FLAGS.budget_s:
      print(json.dumps({"stopped": "budget spent", "after_s": round(time.perf_counter() - t_start)}))
      break
    cfg = dataclasses.replace(base_cfg, compute_dtype=dtype)
    model = EnResNet(cfg, member_map=member_map)
    rng = np.random.default_rng(0)
    x = jax.numpy.asarray(rng.uniform(0, 1, (batch,) + shape), jax.numpy.float32)
    y = jax.numpy.asarray(rng.integers(0, 10, batch), jax.numpy.int32)
    compile_s, seconds = _time(_step_fn(model, variables, kind), x, y, jax.random.PRNGKey(1))
    flops = prune.flops(cfg, shape) * batch * (2 if kind == "attack" else 3)
    row = {"device": device, "model": cfg.name, "shape": shape, "batch": batch, "dtype": dtype,
           "member_map": member_map, "step": kind, "images_per_second": round(batch / seconds, 1),
           "gflops": round(flops / seconds / 1e9, 2), "compile_s": round(compile_s, 2)}
    key = (batch, kind)
    if dtype == "float32" and member_map == "vmap":
      base[key] = row["images_per_second"]
    if key in base:
      row["vs_vmap_f32"] = round(row["images_per_second"] / base[key], 3)
    rows.append(row)
    print(json.dumps(row), flush=True)
    if FLAGS.out:
      with open(FLAGS.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
  app.run(main)
