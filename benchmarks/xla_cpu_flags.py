"""XLA:CPU library flags against the EOT-10 input gradient of the demo's En2ResNet8.

    python -m benchmarks.xla_cpu_flags                      # every flag set of FLAG_SETS, one process each
    python -m benchmarks.xla_cpu_flags --out=results/bench/xla_cpu_flags.json

Each flag set runs in a fresh process (XLA reads ``XLA_FLAGS`` once), on top of
:data:`enquant.runtime.CPU_FAST_FLAGS`: the jitted EOT-10 input gradient the attacks run
(:func:`enquant.attacks.core.eot_loss_grad`, batch 64, 28x28x1), CPU seconds per call of the process, the
number of convolutions left as plain ``convolution`` instructions in the compiled program and the
number of library fusions (oneDNN/XNNPACK/YNNPACK ``kind=kCustom``), and the gradient's largest
difference from the default's.
"""

import json
import os
import re
import subprocess
import sys
import time

from absl import app
from absl import flags

from enquant import runtime

FLAG_SETS = (
    "",
    "--xla_cpu_use_xnnpack=true",
    "--xla_cpu_experimental_xnn_fusion_type=individual_convolution",
    "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "--xla_cpu_experimental_onednn_fusion_type=individual_convolution",
    "--xla_cpu_use_onednn=true",
    "--xla_cpu_multi_thread_eigen=false",
)
flags.DEFINE_string("one", None, "Run one flag set (a subprocess).")
flags.DEFINE_integer("calls", 5, "Timed calls per process.")
flags.DEFINE_string("out", "", "Write the record to this JSON file.")
FLAGS = flags.FLAGS


def _one(extra: str) -> dict:
  os.environ["XLA_FLAGS"] = f"{runtime.CPU_FAST_FLAGS} {extra}".strip()
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from enquant.attacks import core, objectives  # pylint: disable=g-import-not-at-top
  from enquant.models import EnResNet, ModelConfig  # pylint: disable=g-import-not-at-top
  model = EnResNet(ModelConfig(num_classes=10, depth=8, widths=(8, 16, 32), ensembles=2,
                               noise_coef=0.1, noise_rng="hash"))
  x = jnp.asarray(np.random.default_rng(0).uniform(0, 1, (64, 28, 28, 1)), jnp.float32)
  y = jnp.asarray(np.arange(64) % 10, jnp.int32)
  fn = jax.tree_util.Partial(model.apply_eval, model.init(jax.random.PRNGKey(0), x[:1]))
  grad = jax.jit(core.eot_loss_grad(fn, objectives.cross_entropy, 10))
  key = jax.random.PRNGKey(1)
  hlo = grad.lower(x, y, key).compile().as_text()
  g = np.asarray(grad(x, y, key)[0])
  start = time.process_time()
  for _ in range(FLAGS.calls):
    jax.block_until_ready(grad(x, y, key))
  return {"flags": extra, "cpu_s_per_gradient": round((time.process_time() - start) / FLAGS.calls, 4),
          "plain_convolutions": len(re.findall(r" convolution\(", hlo)),
          "library_fusions": hlo.count("kind=kCustom"), "grad_head": g.ravel()[:4096].tolist()}


def main(argv):
  del argv
  if FLAGS.one is not None:
    print(json.dumps(_one(FLAGS.one)))
    return
  rows = []
  for extra in FLAG_SETS:
    cmd = [sys.executable, "-m", "benchmarks.xla_cpu_flags", f"--one={extra}", f"--calls={FLAGS.calls}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows.append(json.loads(out.strip().splitlines()[-1]))
  ref = rows[0].pop("grad_head")
  scale = max(abs(v) for v in ref)
  for row in rows[1:]:
    row["max_rel_diff"] = max(abs(a - b) for a, b in zip(row.pop("grad_head"), ref)) / scale
  record = {"command": "python -m benchmarks.xla_cpu_flags " + " ".join(sys.argv[1:]),
            "load_average": os.getloadavg()[0], "rows": rows}
  print(json.dumps(record, indent=1))
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump(record, f, indent=1)


if __name__ == "__main__":
  app.run(main)
