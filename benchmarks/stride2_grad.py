"""The input gradient of stride-2 convolutions: as a stride-dilated convolution or by output phases.

    python -m benchmarks.stride2_grad                 # EOT-10 input gradient of the demo's En2ResNet8
    python -m benchmarks.stride2_grad --rounds=3 --out=results/bench/stride2_grad.json

:func:`enquant.models.conv.conv2d` takes the input gradient of a stride-2 convolution as an ordinary
convolution of the output gradient dilated by 2 (``lhs_dilation``): three quarters of the products it
computes are with inserted zeros (4x the forward's arithmetic for a 3x3 kernel). Split by the parity of
the input row and column, the same gradient is one stride-1 2x2 convolution of the undilated output
gradient with ``4 * C_in`` output channels (each 3x3 kernel tap placed at its phase and offset; 16 taps
instead of 36), followed by a depth-to-space reshape. This benchmark times the EOT-10 input gradient
the attacks run (:func:`enquant.attacks.core.eot_loss_grad`) with conv2d's VJP as it is and with the
phase form swapped in (each variant in a fresh process, interleaved, CPU seconds of the process), and
checks that the gradients agree. It measures a lever of the model's convolution; it changes nothing in
the package.
"""

import json
import os
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

flags.DEFINE_enum("variant", None, ["dilated", "phases"], "Run one variant (a subprocess).")
flags.DEFINE_integer("batch", 64, "Images per gradient.")
flags.DEFINE_integer("eot", 10, "EOT samples.")
flags.DEFINE_integer("calls", 6, "Timed calls per process.")
flags.DEFINE_integer("rounds", 2, "Interleaved rounds (fresh processes).")
flags.DEFINE_string("out", "", "Write the record to this JSON file.")
FLAGS = flags.FLAGS

_TAPS = {3: ({0: 1}, {0: 2, 1: 0}), 1: ({0: 0}, {})}  # kernel size -> per phase {offset: kernel tap}


def phase_input_grad(g, w, height: int, width: int):
  """Input gradient of a stride-2 convolution (3x3 pad 1 or 1x1 pad 0) of ``w`` by output phases."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax import lax  # pylint: disable=g-import-not-at-top
  k, _, c_in, c_out = w.shape
  kernel = jnp.zeros((2, 2, c_out, 2, 2, c_in), w.dtype)
  for a, taps_a in enumerate(_TAPS[k]):
    for b, taps_b in enumerate(_TAPS[k]):
      for t, ki in taps_a.items():
        for u, kj in taps_b.items():
          kernel = kernel.at[t, u, :, a, b, :].set(w[ki, kj].T)
  out = lax.conv_general_dilated(g, kernel.reshape(2, 2, c_out, 4 * c_in), (1, 1), ((0, 1), (0, 1)),
                                 dimension_numbers=("NHWC", "HWIO", "NHWC"))
  n, h, wd, _ = out.shape
  out = out.reshape(n, h, wd, 2, 2, c_in).transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * wd, c_in)
  return out[:, :height, :width]


def _swap_in_phases() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  from enquant.models import conv as conv_lib  # pylint: disable=g-import-not-at-top
  stock = conv_lib._bwd  # pylint: disable=protected-access

  def bwd(strides, padding, precision, res, g):
    x, w = res
    k = w.shape[0]
    if tuple(strides) == (2, 2) and tuple(padding) == ((k // 2, k // 2),) * 2 and k in _TAPS:
      plain = conv_lib._plain  # pylint: disable=protected-access
      _, vjp_w = jax.vjp(lambda kernel: plain(x, kernel, strides, padding, precision), w)
      return phase_input_grad(g, w, x.shape[1], x.shape[2]), vjp_w(g)[0]
    return stock(strides, padding, precision, res, g)
  conv_lib.conv2d.defvjp(conv_lib._fwd, bwd)  # pylint: disable=protected-access


def _one(variant: str) -> dict:
  from enquant import runtime  # pylint: disable=g-import-not-at-top
  runtime.configure()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if variant == "phases":
    _swap_in_phases()
  from enquant.attacks import core, objectives  # pylint: disable=g-import-not-at-top
  from enquant.models import EnResNet, ModelConfig  # pylint: disable=g-import-not-at-top
  model = EnResNet(ModelConfig(num_classes=10, depth=8, widths=(8, 16, 32), ensembles=2,
                               noise_coef=0.1, noise_rng="hash"))
  x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (FLAGS.batch, 28, 28, 1)), jnp.float32)
  y = jnp.asarray(np.arange(FLAGS.batch) % 10, jnp.int32)
  fn = jax.tree_util.Partial(model.apply_eval, model.init(jax.random.PRNGKey(0), x[:1]))
  grad = jax.jit(core.eot_loss_grad(fn, objectives.cross_entropy, FLAGS.eot))
  key = jax.random.PRNGKey(1)
  g = np.asarray(grad(x, y, key)[0])
  start = time.process_time()
  for _ in range(FLAGS.calls):
    jax.block_until_ready(grad(x, y, key))
  return {"variant": variant, "cpu_s_per_gradient": (time.process_time() - start) / FLAGS.calls,
          "grad_sum_abs": float(np.abs(g).sum()), "grad_head": g.ravel()[:4096].tolist()}


def main(argv):
  del argv
  if FLAGS.variant:
    print(json.dumps(_one(FLAGS.variant)))
    return
  rows = []
  for _ in range(FLAGS.rounds):
    for variant in ("dilated", "phases"):
      cmd = [sys.executable, "-m", "benchmarks.stride2_grad", f"--variant={variant}",
             f"--batch={FLAGS.batch}", f"--eot={FLAGS.eot}", f"--calls={FLAGS.calls}"]
      out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
      rows.append(json.loads(out.strip().splitlines()[-1]))
  cpu = {v: statistics.median(r["cpu_s_per_gradient"] for r in rows if r["variant"] == v)
         for v in ("dilated", "phases")}
  heads = [r["grad_head"] for r in rows[:2]]
  scale = max(abs(v) for v in heads[0])
  record = {"command": "python -m benchmarks.stride2_grad " + " ".join(sys.argv[1:]),
            "load_average": os.getloadavg()[0], "batch": FLAGS.batch, "eot_samples": FLAGS.eot,
            "cpu_s_per_gradient": cpu, "dilated/phases": cpu["dilated"] / cpu["phases"],
            "max_rel_diff": max(abs(a - b) for a, b in zip(*heads)) / scale,
            "rows": [{k: v for k, v in r.items() if k != "grad_head"} for r in rows]}
  print(json.dumps(record, indent=1))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(record, f, indent=1)


if __name__ == "__main__":
  app.run(main)
