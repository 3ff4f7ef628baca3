"""Parity of enquant's AutoAttack with the reference (PyTorch) AutoAttack on the same weights.

    python -m benchmarks.autoattack_parity --run=runs/mnist-det --n=200 --eps=0.1 \\
        --reference_dir=PATH/TO/auto-attack --out=parity.json

Needs PyTorch and the reference package (fra31/auto-attack: the folder that holds ``autoattack/``), both
optional: they are never library or test dependencies. The run's model must be deterministic
(``noise_coef = 0``; ``--force_deterministic`` drops the noise of a randomized run).

What it does:
  1. ports the run's EnResNet (its P(w) for quantized runs, BatchNorm running statistics) to a PyTorch
     module and checks that the logits agree on the images;
  2. runs the reference's standard version attack by attack, exactly as its ``run_standard_evaluation``
     loop does (each attack only on the images still robust; version "standard" settings: APGD-CE 1
     restart, APGD-T and FAB-T 9 targets, Square 5000 queries, 100 iterations);
  3. runs :func:`enquant.attacks.autoattack.evaluate` (version "standard") on the same images;
  4. prints, per attack, both robust accuracies after it, and the per-example agreement of the robust
     masks (images robust for one implementation and broken by the other, either way).
The two use different random numbers (random starts, Square's proposals), so per-example agreement is
not expected to be exact for APGD and Square; FAB-T (no random start) and the final mask should agree
closely. Timings are reported for both (the machine is shared: treat them as rough).
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging

from enquant import runtime

flags.DEFINE_string("run", None, "Run directory of the model.", required=True)
flags.DEFINE_string("reference_dir", None, "Folder holding the reference's autoattack/ package.")
flags.DEFINE_integer("n", 200, "First N test images.")
flags.DEFINE_float("eps", None, "l_inf radius (default: the run's).")
flags.DEFINE_integer("batch_size", 250, "Batch size of both implementations (the reference's bs).")
flags.DEFINE_integer("seed", 0, "Seed of both implementations.")
flags.DEFINE_bool("force_deterministic", False, "Drop the run's noise (noise_coef = 0).")
flags.DEFINE_list("attacks", ["apgd-ce", "apgd-t", "fab-t", "square"], "Attacks, in order.")
flags.DEFINE_integer("threads", 2, "PyTorch threads.")
flags.DEFINE_string("out", None, "Write the results as JSON here.")
FLAGS = flags.FLAGS


def torch_model(variables, members: int):
  """The EnResNet of ``variables`` (stacked members, no noise) as a PyTorch module on NCHW input."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  params = variables["params"]
  stats = variables["batch_stats"]

  def t(a):
    return torch.from_numpy(np.array(a, np.float32))

  def member_of(tree, m):  # conv kernels HWIO -> OIHW (contiguous: fast convolutions)
    return {k: member_of(v, m) if isinstance(v, dict) else
            (t(v[m]).permute(3, 2, 0, 1).contiguous() if v[m].ndim == 4 else t(v[m]))
            for k, v in tree.items()}

  def merge(a, b):  # parameters and BatchNorm statistics in one nested dict
    out = dict(a)
    for k, v in b.items():
      out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out

  blocks = sorted((k for k in params if k.startswith("stage")),
                  key=lambda k: tuple(int(s) for s in k.replace("stage", "").split("_block")))

  class EnResNet(torch.nn.Module):
    """Members applied one by one, logits averaged (inference mode)."""

    def __init__(self):
      super().__init__()
      self.weights = [merge(member_of(params, m), member_of(stats, m)) for m in range(members)]

    def forward(self, x):
      return torch.stack([self.member(x, w) for w in self.weights]).mean(0)

    @staticmethod
    def member(x, w):
      def conv(h, kernel, stride, pad):
        return F.conv2d(h, kernel, stride=stride, padding=pad)

      def bn(h, p):
        return F.batch_norm(h, p["mean"], p["var"], p["scale"], p["bias"], training=False, eps=1e-5)

      out = conv(x, w["stem"]["kernel"], 1, 1)
      for name in blocks:
        p = w[name]
        stride = 2 if name.endswith("_block1") and not name.startswith("stage1") else 1
        h = F.relu(bn(out, p["bn1"]))
        shortcut = conv(h, p["shortcut"]["kernel"], stride, 0) if "shortcut" in p else out
        h = conv(h, p["conv1"]["kernel"], stride, 1)
        h = conv(F.relu(bn(h, p["bn2"])), p["conv2"]["kernel"], 1, 1)
        out = h + shortcut
      out = F.relu(bn(out, w["bn_final"])).mean(dim=(2, 3))
      return out @ w["fc"]["kernel"] + w["fc"]["bias"]

  return EnResNet().eval()


def reference_masks(model, x, y, eps, attacks, seed, batch_size, reference_dir):
  """The reference's standard loop, attack by attack: per attack the cumulative robust mask, time."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  if reference_dir:
    sys.path.insert(0, os.path.abspath(reference_dir))
  from autoattack import AutoAttack  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  xt = torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).copy())
  yt = torch.from_numpy(y.astype(np.int64))
  with torch.no_grad():
    robust = (model(xt).argmax(1) == yt).numpy()
  masks, times = {"clean": robust.copy()}, {}
  for attack in attacks:
    t0 = time.perf_counter()
    idx = np.flatnonzero(robust)
    if len(idx):
      adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", seed=seed,
                             device="cpu", verbose=False)
      adversary.attacks_to_run = [attack]          # the standard version's settings, one attack
      x_adv = adversary.run_standard_evaluation(xt[idx], yt[idx], bs=batch_size)
      with torch.no_grad():
        ok = (model(x_adv).argmax(1) == yt[idx]).numpy()
      robust[idx[~ok]] = False
    times[attack] = time.perf_counter() - t0
    masks[attack] = robust.copy()
  return masks, times


def main(argv):
  del argv
  runtime.configure()
  logging.set_verbosity(logging.WARNING)  # orbax logs every restore at INFO
  import dataclasses  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from enquant.attacks import autoattack  # pylint: disable=g-import-not-at-top
  from enquant import data as data_lib  # pylint: disable=g-import-not-at-top
  from enquant import pipeline  # pylint: disable=g-import-not-at-top
  from enquant.models import EnResNet  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(FLAGS.threads)
  cfg, model, variables, _ = pipeline.load_run(FLAGS.run)
  if cfg.model.noise_coef:
    if not FLAGS.force_deterministic:
      raise ValueError(f"{FLAGS.run} is randomized (noise_coef={cfg.model.noise_coef}); pass "
                       "--force_deterministic to compare its noise-free variant")
    model = EnResNet(dataclasses.replace(cfg.model, noise_coef=0.0))
  variables = jax.device_get(variables)
  eps = cfg.eval.eps if FLAGS.eps is None else FLAGS.eps
  ds = data_lib.load(cfg.dataset, cfg.data_dir, source=cfg.data_source, max_test=FLAGS.n, max_train=1)
  x = ds.test_images[:FLAGS.n].astype(np.float32) / 255.0
  y = ds.test_labels[:FLAGS.n].astype(np.int32)

  tmodel = torch_model(variables, cfg.model.ensembles)
  jax_fn = jax.tree_util.Partial(model.apply_eval, variables)
  with torch.no_grad():
    t_logits = tmodel(torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).copy())).numpy()
  j_logits = np.asarray(jax.jit(jax_fn)(x, jax.random.PRNGKey(0)))
  logit_diff = float(np.abs(t_logits - j_logits).max())
  print(f"logits: max |torch - jax| = {logit_diff:.2e}, same predictions: "
        f"{np.mean(t_logits.argmax(1) == j_logits.argmax(1)):.4f}")

  ref, ref_times = reference_masks(tmodel, x, y, eps, FLAGS.attacks, FLAGS.seed, FLAGS.batch_size,
                                   FLAGS.reference_dir)
  t0 = time.perf_counter()
  acc, ours = autoattack.evaluate(jax_fn, x, y, eps=eps, key=jax.random.PRNGKey(FLAGS.seed),
                                  version="custom", attacks=FLAGS.attacks,
                                  batch_size=FLAGS.batch_size, progress=True)
  ours_time = time.perf_counter() - t0

  rows = []
  print(f"\n{cfg.model.name} on {FLAGS.n} {cfg.dataset} test images, eps {eps}\n")
  print("| after | reference | enquant | robust here, broken there | broken here, robust there |"
        " agreement |\n|---|---|---|---|---|---|")
  for name in ["clean"] + list(FLAGS.attacks):
    r, o = ref[name], ours[name]
    row = {"after": name, "reference": float(r.mean()), "enquant": float(o.mean()),
           "enquant_robust_reference_broken": int(np.sum(o & ~r)),
           "enquant_broken_reference_robust": int(np.sum(~o & r)), "agreement": float(np.mean(o == r))}
    rows.append(row)
    print(f"| {name} | {100 * row['reference']:.1f}% | {100 * row['enquant']:.1f}% | "
          f"{row['enquant_robust_reference_broken']} | {row['enquant_broken_reference_robust']} | "
          f"{100 * row['agreement']:.1f}% |")
  print(f"\ntime: reference {sum(ref_times.values()):.0f} s ({ref_times}), enquant {ours_time:.0f} s "
        "(compilation included)")
  if FLAGS.out:
    with open(FLAGS.out, "w") as f:
      json.dump({"run": os.path.abspath(FLAGS.run), "model": cfg.model.name, "n": FLAGS.n, "eps": eps,
                 "logit_max_abs_diff": logit_diff, "rows": rows, "reference_seconds": ref_times,
                 "enquant_seconds": ours_time, "enquant_accuracy": acc,
                 "torch": torch.__version__, "jax": jax.__version__}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
