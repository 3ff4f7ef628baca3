"""Throughput of train steps (natural / PGD-AT / trade-off, float / Binary-Relax) and of PGD evaluation.

    python -m benchmarks.throughput                                   # MNIST-shaped, ResNet20 + En2ResNet20
    python -m benchmarks.throughput --models=1,2 --cases=natural,at10 --torch   # PyTorch eager side by side
    python -m benchmarks.throughput --suite=paper                     # CIFAR-shaped paper runs, projections

Prints images/second (median of --rounds timed rounds of --steps steps, after a compile/warm-up call; the
compile time is estimated as that first call minus one timed step), the ratio to the baseline measured in the
same run (the first row; with --torch, each row's PyTorch eager twin, timed in interleaved rounds), the
achieved GFLOP/s and, with --suite=paper, the time per epoch and of a 200-epoch run. FLOPs per image are counted from the network's multiply-adds (F = one forward of all
members): a training forward+backward 3F, one attack step (forward + input gradient) 2F; so natural = 3F,
at<K> = (2K + 3)F, tradeoff<K> = (2K + 6)F, pgd<K>-eval = 2KF.
Writes the rows as JSON with --out.
"""

import json
import os
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
flags.DEFINE_bool("torch", False, "Also time PyTorch eager on the same model and case (interleaved).")
flags.DEFINE_enum("suite", None, ["paper"], "paper: En1/En2/En5 ResNet20 on 32x32x3, natural and PGD-10 "
                  "AT, with epoch and 200-epoch projections (overrides --models/--shape/--cases).")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"], "Convolution compute dtype.")
flags.DEFINE_enum("conv_grad", "layout", ["layout", "lax"], "enquant's conv gradient or JAX's stock one.")
flags.DEFINE_enum("noise_rng", "hash", ["hash", "threefry"], "Generator of the noise's normals.")
flags.DEFINE_string("out", None, "Write the results as JSON here.")
FLAGS = flags.FLAGS

_EPOCH_IMAGES = {32: 50_000, 28: 60_000}


def _flop_factor(case: str) -> float:
  kind = case.split("-")[0].rstrip("0123456789")
  k = int("".join(ch for ch in case.split("-")[0] if ch.isdigit()) or 0)
  return {"natural": 3.0, "at": 2 * k + 3.0, "tradeoff": 2 * k + 6.0, "pgd": 2.0 * k}[kind]


def _time(run, rounds, steps):
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(steps):
      run()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv):
  del argv
  runtime.configure()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from enquant import attacks, config, data, losses, prune, train  # pylint: disable=g-import-not-at-top
  from enquant.models import EnResNet, ModelConfig  # pylint: disable=g-import-not-at-top

  models, shape, cases = FLAGS.models, tuple(int(s) for s in FLAGS.shape), FLAGS.cases
  if FLAGS.suite == "paper":
    models, shape, cases = ["1", "2", "5"], (32, 32, 3), ["natural", "at10"]
  if FLAGS.torch:
    from benchmarks import torch_enresnet  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(os.cpu_count() or 1)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (FLAGS.batch,) + shape, dtype=np.uint8)
  labels = rng.integers(0, 10, FLAGS.batch).astype(np.int32)
  mesh = train.data_mesh()
  repl, batch = train.shardings(mesh)
  device = f"{jax.device_count()}x {jax.devices()[0].device_kind}"
  results, baseline = [], None
  for n in models:
    mcfg = ModelConfig(depth=FLAGS.depth, ensembles=int(n), noise_coef=0.1,
                       compute_dtype=FLAGS.compute_dtype, noise_rng=FLAGS.noise_rng)
    model = EnResNet(mcfg, conv_grad=FLAGS.conv_grad)
    forward_flops = prune.flops(mcfg, shape)
    for case in cases:
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
        run = lambda fn=fn, v=variables, x=x, y=y: fn(v, x, y, jax.random.PRNGKey(1)).block_until_ready()
      else:
        kind = case.split("-")[0]
        lcfg = (losses.LossConfig(kind="natural") if kind == "natural" else
                losses.LossConfig(kind="at" if kind.startswith("at") else "tradeoff",
                                  steps=int(kind.lstrip("atradeof"))))
        step = train.make_train_step(model, tx, losses.make_objective(lcfg), augment=shape[0] == 32,
                                     mesh=mesh)
        holder = [state]

        def run(step=step, holder=holder, x=x, y=y):
          holder[0], m = step(holder[0], x, y)
          jax.block_until_ready(m)
      t0 = time.perf_counter()
      run()
      compile_s = time.perf_counter() - t0
      torch_run = None
      if FLAGS.torch:
        torch_run = torch_enresnet.make_step(case.replace("-br", ""), members=int(n), depth=FLAGS.depth,
                                             shape=shape, batch=FLAGS.batch)
        torch_run()  # warm-up
      jax_t, torch_t = [], []
      for _ in range(FLAGS.rounds):  # interleaved: both see the same machine load
        jax_t.append(_time(run, 1, FLAGS.steps))
        if torch_run is not None:
          torch_t.append(_time(torch_run, 1, FLAGS.steps))
      ips = FLAGS.steps * FLAGS.batch / statistics.median(jax_t)
      gflops = ips * forward_flops * _flop_factor(case) / 1e9
      step_s = statistics.median(jax_t) / FLAGS.steps
      row = dict(model=mcfg.name, case=case, images_per_second=ips, gflops_per_second=gflops,
                 first_call_seconds=compile_s, compile_seconds=max(0.0, compile_s - step_s),
                 batch=FLAGS.batch, shape=shape, device=device,
                 compute_dtype=FLAGS.compute_dtype, conv_grad=FLAGS.conv_grad, noise_rng=FLAGS.noise_rng,
                 forward_flops_per_image=forward_flops)
      if torch_t:
        row["torch_images_per_second"] = FLAGS.steps * FLAGS.batch / statistics.median(torch_t)
        row["ratio_to_torch"] = ips / row["torch_images_per_second"]
      baseline = baseline or ips
      row["ratio_to_first_row"] = ips / baseline
      epoch = _EPOCH_IMAGES.get(shape[0], 50_000) / ips
      row["epoch_seconds"] = epoch
      results.append(row)
      line = (f"{row['model']:>14} {case:>12}: {ips:8.1f} img/s  {gflops:7.1f} GFLOP/s  "
              f"ratio {row['ratio_to_first_row']:5.2f}  (first call {compile_s:.1f} s, "
              f"compile ~{row['compile_seconds']:.1f} s)")
      if torch_t:
        line += f"  | torch eager {row['torch_images_per_second']:7.1f} img/s, jax/torch {row['ratio_to_torch']:.2f}"
      if FLAGS.suite == "paper":
        line += f"  | epoch {epoch / 60:.1f} min, 200 epochs {200 * epoch / 3600:.1f} h"
      print(line, flush=True)
      if FLAGS.out:  # after every row: a run cut short keeps what it measured
        with open(FLAGS.out, "w") as f:
          json.dump(results, f, indent=2)


if __name__ == "__main__":
  app.run(main)
