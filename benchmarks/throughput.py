"""Throughput of the train step (natural / PGD-AT / trade-off, float / Binary-Relax) and of PGD evaluation.

    python -m benchmarks.throughput                                   # MNIST-shaped, ResNet20 + En2ResNet20
    python -m benchmarks.throughput --shape=32,32,3 --batch=128 --cases=natural,at10 --steps=5

Prints images/second (median of --rounds timed rounds of --steps steps each, after a compile/warm-up call)
and the ratio to the baseline (the first case: natural float ResNet20) measured in the same run.
Writes a JSON file with the numbers if --out is given.
"""

import json
import statistics
import time

from absl import app
from absl import flags

from enquant import runtime

flags.DEFINE_list("models", ["1", "2"], "Ensemble sizes (ResNet of --depth).")
flags.DEFINE_integer("depth", 20, "ResNet depth.")
flags.DEFINE_list("shape", ["28", "28", "1"], "Image shape H,W,C.")
flags.DEFINE_integer("batch", 128, "Batch size.")
flags.DEFINE_list("cases", ["natural", "natural-br", "at10", "pgd20-eval"],
                  "natural | natural-br | at<K> (PGD-K AT) | tradeoff<K> | pgd<K>-eval (attack only).")
flags.DEFINE_integer("steps", 3, "Steps per timed round.")
flags.DEFINE_integer("rounds", 3, "Timed rounds (median reported).")
flags.DEFINE_string("out", None, "Write the results as JSON here.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  runtime.configure()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from enquant import attacks, config, data, losses, train  # pylint: disable=g-import-not-at-top
  from enquant.models import EnResNet, ModelConfig  # pylint: disable=g-import-not-at-top

  shape = tuple(int(s) for s in FLAGS.shape)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (FLAGS.batch,) + shape, dtype=np.uint8)
  labels = rng.integers(0, 10, FLAGS.batch).astype(np.int32)
  mesh = train.data_mesh()
  repl, batch = train.shardings(mesh)
  results, baseline = [], None
  for n in FLAGS.models:
    model = EnResNet(ModelConfig(depth=FLAGS.depth, ensembles=int(n), noise_coef=0.1))
    for case in FLAGS.cases:
      qcfg = config.QuantConfig(mode="br" if case.endswith("-br") else "float")
      tcfg = config.TrainConfig(epochs=1, batch_size=FLAGS.batch)
      tx, _ = train.make_optimizer(tcfg, qcfg, 100)
      state = train.create_train_state(model, tx, jax.random.PRNGKey(0), data.to_float(images[:1]))
      state = jax.device_put(state, repl)
      x, y = jax.device_put(images, batch), jax.device_put(labels, batch)
      if case.endswith("-eval"):
        k = int(case[3:-5])
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        fn = jax.jit(lambda v, xx, yy, key, k=k, model=model: attacks.pgd(
            model.logits_fn(v), data.to_float(xx), yy, eps=8 / 255, step_size=2 / 255, steps=k,
            key=key, random_start=False))
        run = lambda: fn(variables, x, y, jax.random.PRNGKey(1)).block_until_ready()
      else:
        kind = case.split("-")[0]
        lcfg = (losses.LossConfig(kind="natural") if kind == "natural" else
                losses.LossConfig(kind="at" if kind.startswith("at") else "tradeoff",
                                  steps=int(kind.lstrip("atradeof"))))
        step = train.make_train_step(model, tx, losses.make_objective(lcfg), augment=shape[0] == 32,
                                     mesh=mesh)
        holder = [state]

        def run(step=step, holder=holder):
          holder[0], m = step(holder[0], x, y)
          jax.block_until_ready(m)
      t0 = time.perf_counter()
      run()
      compile_s = time.perf_counter() - t0
      times = []
      for _ in range(FLAGS.rounds):
        t0 = time.perf_counter()
        for _ in range(FLAGS.steps):
          run()
        times.append(time.perf_counter() - t0)
      ips = FLAGS.steps * FLAGS.batch / statistics.median(times)
      baseline = baseline or ips
      row = dict(model=model.config.name, case=case, images_per_second=ips, ratio=ips / baseline,
                 compile_seconds=compile_s, batch=FLAGS.batch, shape=shape,
                 devices=f"{jax.device_count()}x {jax.devices()[0].device_kind}")
      results.append(row)
      print(f"{row['model']:>14} {case:>12}: {ips:8.1f} images/s  ratio {ips / baseline:5.2f}  "
            f"(first call {compile_s:.1f} s)", flush=True)
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
