"""What an input gradient of a small EnResNet costs on this machine: the noise's normals and the convolutions.

    python -m benchmarks.noise_cost                      # the demo's En2ResNet8 (width 8), batch 2000 (EOT-10 x 200)
    python -m benchmarks.noise_cost --width=16 --depth=20 --batch=256

Prints, interleaved in one process (median of --rounds):
  * normals per second of ``jax.random.normal`` (threefry) and of enquant's hash generator;
  * input gradients per second of the model with threefry noise, hash noise and no noise;
  * GFLOP/s of one 3x3 convolution (forward, and its input gradient) at each stage's shape, XLA's
    convolution against a sum of nine shifted matmuls (the arithmetic floor of narrow layers).
"""

import statistics
import time

from absl import app
from absl import flags

from enquant import runtime

flags.DEFINE_integer("depth", 8, "ResNet depth.")
flags.DEFINE_integer("width", 8, "Stem width (stages: width, 2 width, 4 width).")
flags.DEFINE_integer("ensembles", 2, "Members.")
flags.DEFINE_integer("batch", 2000, "Images per gradient.")
flags.DEFINE_integer("size", 28, "Image height and width (1 channel).")
flags.DEFINE_integer("rounds", 5, "Timed rounds (median reported).")
FLAGS = flags.FLAGS


def _median_seconds(fns: dict, args: dict, rounds: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  for name, fn in fns.items():
    jax.block_until_ready(fn(*args[name]))  # compile and warm up
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args[name]))
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def main(argv):
  del argv
  runtime.configure()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from enquant.models import EnResNet, ModelConfig  # pylint: disable=g-import-not-at-top
  from enquant.models import noise  # pylint: disable=g-import-not-at-top

  b, s, w = FLAGS.batch, FLAGS.size, FLAGS.width
  widths = (w, 2 * w, 4 * w)
  key = jax.random.PRNGKey(0)
  count = b * FLAGS.ensembles * sum(c * (s // 2**i) ** 2 for i, c in enumerate(widths))
  t = _median_seconds({"threefry": jax.jit(lambda k: jax.random.normal(k, (count,))),
                       "hash": jax.jit(lambda k: noise.hash_normal(k, (count,)))},
                      {"threefry": (key,), "hash": (key,)}, FLAGS.rounds)
  print(f"normals ({count / 1e6:.1f} M, one forward's worth): "
        + ", ".join(f"{k} {count / v / 1e6:.0f} M/s" for k, v in t.items()))

  x = jnp.full((b, s, s, 1), 0.5)
  y = jnp.zeros((b,), jnp.int32)
  fns = {}
  for name, coef, rng in (("threefry noise", 0.1, "threefry"), ("hash noise", 0.1, "hash"),
                          ("no noise", 0.0, "hash")):
    model = EnResNet(ModelConfig(depth=FLAGS.depth, widths=widths, ensembles=FLAGS.ensembles,
                                 noise_coef=coef, noise_rng=rng))
    variables = model.init(key, x[:1])

    def loss(x, k, model=model, variables=variables):
      logits = model.apply_eval(variables, x, k)
      return -jnp.sum(jax.nn.log_softmax(logits)[jnp.arange(b), y])

    fns[name] = jax.jit(jax.grad(loss))
  t = _median_seconds(fns, {k: (x, key) for k in fns}, FLAGS.rounds)
  base = t["threefry noise"]
  print(f"input gradient of En{FLAGS.ensembles}ResNet{FLAGS.depth} width {w}, batch {b}: "
        + ", ".join(f"{k} {b / v:.0f} img/s ({base / v:.2f}x)" for k, v in t.items()))

  dims = ("NHWC", "HWIO", "NHWC")

  def xla_conv(x, k):
    return jax.lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dims)

  def shifted_matmuls(x, k):
    h, wd = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(xp[:, i:i + h, j:j + wd, :] @ k[i, j] for i in range(3) for j in range(3))

  for i, c in enumerate(widths):
    hw = s // 2**i
    xs = jax.random.normal(key, (b, hw, hw, c))
    ks = jax.random.normal(key, (3, 3, c, c)) * 0.1
    fns, args = {}, {}
    for name, conv in (("xla", xla_conv), ("shifted", shifted_matmuls)):
      fns[name] = jax.jit(conv)
      fns[name + " dx"] = jax.jit(jax.grad(lambda x, k, g, conv=conv: jnp.sum(conv(x, k) * g)))
      args[name], args[name + " dx"] = (xs, ks), (xs, ks, xs)
    t = _median_seconds(fns, args, FLAGS.rounds)
    flops = 2 * b * hw * hw * c * c * 9
    print(f"3x3 conv {hw}x{hw}x{c} -> {c}, batch {b}: "
          + ", ".join(f"{k} {flops / v / 1e9:.1f} GFLOP/s" for k, v in t.items()))


if __name__ == "__main__":
  app.run(main)
