"""Where an EOT input gradient of the strong line's model spends its time (``strong_line --profile``).

Times, in CPU seconds (median of rounds; the machine may be shared), the jitted EOT-K input gradient of
the cross-entropy as the attacks take it (:func:`enquant.attacks.core.eot_loss_grad`: the gradient of the
EOT mean, so the layers before the first noise, the stem and the first block, run once per batch) and
its parts, each alone at the shapes it has there (batch images per member before the first noise, K x
batch after it, every member): every convolution (forward + input gradient,
:func:`enquant.models.conv.conv2d`), every BatchNorm (inference, forward + gradient),
the noise (std and add, forward + gradient; the normals), and the whole model without noise (one
gradient over the K copies of the batch: the same arithmetic less the noise), and the whole gradient with
bfloat16 convolutions (its CPU seconds, and the share of the gradient's signs it keeps). Parts timed
alone do not add up exactly to the whole (fusion, scheduling); the rest is reported as
"elementwise and other" (ReLU, residual sums, pooling, the loss, copies).
"""

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from enquant import prune
from enquant.attacks import core
from enquant.attacks import objectives
from enquant.models import conv as conv_lib
from enquant.models import noise as noise_lib

ROUNDS = 3


def _cpu(fn, *args) -> float:
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(ROUNDS):
    t0 = time.process_time()
    jax.block_until_ready(fn(*args))
    times.append(time.process_time() - t0)
  return statistics.median(times)


def _layers(cfg, shape):
  """``(name, (H, W, C_in), C_out, k, stride)`` of every convolution, and the noise/BN shapes."""
  h, w, c = shape
  convs, norms, noises = [("stem", (h, w, c), cfg.widths[0], 3, 1)], [], []
  c = cfg.widths[0]
  for s, (blocks, width) in enumerate(zip(cfg.block_stages, cfg.widths)):
    for b in range(blocks):
      stride = 2 if s > 0 and b == 0 else 1
      name = f"stage{s + 1}_block{b + 1}"
      norms.append((h, w, c))
      if stride != 1 or c != width:
        convs.append((f"{name}/shortcut", (h, w, c), width, 1, stride))
      convs.append((f"{name}/conv1", (h, w, c), width, 3, stride))
      h, w = -(-h // stride), -(-w // stride)
      norms.append((h, w, width))
      convs.append((f"{name}/conv2", (h, w, width), width, 3, 1))
      noises.append((h, w, width))
      c = width
  norms.append((h, w, c))
  return convs, norms, noises


def _conv_cost(n, hwc, cout, k, stride) -> float:
  x = jnp.ones((n,) + hwc, jnp.float32)
  kernel = jnp.ones((k, k, hwc[2], cout), jnp.float32) * 0.1
  pad = ((k // 2, k // 2),) * 2
  fn = jax.jit(lambda x: jax.grad(lambda x: jnp.sum(conv_lib.conv2d(x, kernel, (stride, stride),
                                                                     pad) ** 2))(x))
  return _cpu(fn, x)


def _norm_cost(n, hwc) -> float:
  x = jnp.ones((n,) + hwc, jnp.float32)
  stats = [jnp.full(hwc[2:], v, jnp.float32) for v in (0.1, 2.0, 1.5, 0.3)]

  def bn(x):
    mean, var, scale, bias = stats
    return (x - mean) * (jax.lax.rsqrt(var + 1e-5) * scale) + bias
  return _cpu(jax.jit(lambda x: jax.grad(lambda x: jnp.sum(bn(x) ** 2))(x)), x)


def _noise_cost(n, hwc, k_eot, members, rng) -> tuple[float, float]:
  x = jnp.ones((n,) + hwc, jnp.float32)
  normals = jax.jit(lambda key: noise_lib.normal(key, (n,) + hwc, jnp.float32, rng))
  z = normals(jax.random.PRNGKey(0))
  std_add = jax.jit(lambda x: jax.grad(lambda x: jnp.sum((x + 0.1 * jnp.std(x) * z) ** 2))(x))
  per = n // (k_eot * members)  # one draw per (EOT sample, member) of `per` images
  draws = jax.jit(lambda key: jax.vmap(lambda k: noise_lib.normal(k, (per,) + hwc, jnp.float32, rng))(
      jax.random.split(key, k_eot * members)))
  return _cpu(std_add, x), _cpu(draws, jax.random.PRNGKey(1))


def profile(model, images, eot_samples: int) -> dict:
  """The table of :mod:`benchmarks.strong_line_profile` for ``model`` on ``images`` (uint8 NHWC)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from enquant.models import EnResNet  # pylint: disable=g-import-not-at-top
  cfg = model.config
  x = jnp.asarray(images, jnp.float32) / 255.0
  y = jnp.zeros(x.shape[0], jnp.int32)
  variables = model.init(jax.random.PRNGKey(0), x[:1])
  grad_fn = core.eot_loss_grad(jax.tree_util.Partial(model.apply_eval, variables),
                                objectives.cross_entropy, eot_samples)
  whole_fn = jax.jit(lambda xx: grad_fn(xx, y, jax.random.PRNGKey(1))[0])
  whole = _cpu(whole_fn, x)
  # The same gradient with bfloat16 convolutions (float32 parameters, noise, BatchNorm and loss).
  bf16_model = EnResNet(dataclasses.replace(cfg, compute_dtype="bfloat16"))
  bf16_fn = jax.jit(lambda xx: core.eot_loss_grad(jax.tree_util.Partial(
      bf16_model.apply_eval, variables), objectives.cross_entropy, eot_samples)(
          xx, y, jax.random.PRNGKey(1))[0])
  bf16 = _cpu(bf16_fn, x)
  g32, g16 = whole_fn(x), bf16_fn(x)
  bf16_signs = float(jnp.mean(jnp.sign(g32) == jnp.sign(g16)))
  # Without noise the keys no longer matter (vmap would compute one sample): the same work is one
  # gradient over the K copies of the batch.
  quiet_model = EnResNet(dataclasses.replace(cfg, noise_coef=0.0))
  tiled, y_tiled = jnp.tile(x, (eot_samples, 1, 1, 1)), jnp.tile(y, eot_samples)
  quiet = _cpu(jax.jit(jax.grad(lambda xx: -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(
      quiet_model.apply(variables, xx, None)), y_tiled[:, None], axis=1)))), tiled)
  n = eot_samples * x.shape[0] * cfg.ensembles  # images through each layer after the first noise
  once = x.shape[0] * cfg.ensembles  # before it (stem, first block): once per batch
  convs, norms, noises = _layers(cfg, tuple(x.shape[1:]))
  before_noise = lambda name: name == "stem" or name.startswith("stage1_block1/")
  conv_rows = {name: _conv_cost(once if before_noise(name) else n, hwc, cout, k, s)
               for name, hwc, cout, k, s in convs}
  norm_total = sum(_norm_cost(once if i < 2 else n, hwc) for i, hwc in enumerate(norms))
  noise_parts = [_noise_cost(n, hwc, eot_samples, cfg.ensembles, cfg.noise_rng) for hwc in noises]
  std_total, normals_total = sum(p[0] for p in noise_parts), sum(p[1] for p in noise_parts)
  conv_total = sum(conv_rows.values())
  flops = 2 * prune.flops(cfg, tuple(x.shape[1:])) * eot_samples * x.shape[0]  # K full gradients
  parts = {"convolutions": conv_total, "batchnorm": norm_total, "noise std and add": std_total,
           "noise normals": normals_total}
  parts["elementwise and other"] = max(0.0, whole - sum(parts.values()))
  return {
      "model": cfg.name, "images": int(x.shape[0]), "eot_samples": eot_samples,
      "eot_gradient_cpu_s": round(whole, 4), "without_noise_cpu_s": round(quiet, 4),
      "bfloat16_convolutions_cpu_s": round(bf16, 4), "bfloat16_sign_agreement": round(bf16_signs, 4),
      "gflop": round(flops / 1e9, 3), "gflop_per_cpu_s": round(flops / 1e9 / whole, 2),
      "convolutions_by_layer_cpu_s": {k: round(v, 4) for k, v in conv_rows.items()},
      "parts_cpu_s": {k: round(v, 4) for k, v in parts.items()},
      "parts_share_of_whole": {k: round(v / whole, 3) for k, v in parts.items()},
  }
