"""Channel pruning: a quantized EnResNet with zero channels becomes a smaller Flax model that runs.

Ternary and 4-bit Binary-Relax training leaves many conv kernels with whole channels of exact zeros
(:mod:`enquant.sparsity`). :func:`prune` turns such a model (inference mode: BatchNorm with its running
averages) into a :class:`PrunedEnsemble`, one smaller Flax module per member, whose forward computes only
the channels that matter. What is done, and why it is exact:

* **Inner channels of a block** (between ``conv1`` and ``conv2``, the only place a block's width can
  shrink). Channel ``c``:

  - if ``conv2`` never reads it (its input slice ``conv2[:, :, c, :]`` is zero): removed from ``conv1``,
    ``bn2`` and ``conv2``. Exact.
  - if ``conv1``'s output slice ``conv1[:, :, :, c]`` is zero, the channel is ``0`` before ``bn2``, so after
    ``bn2`` it is the constant ``b_c = (0 - mean_c) * gamma_c / sqrt(var_c + eps) + beta_c`` (flax's
    formula) and after the ReLU ``r_c = max(b_c, 0)``: NOT zero in general.

    - ``r_c == 0``: removed. Exact.
    - ``r_c > 0``: its contribution to ``conv2`` is ``conv2`` applied to the constant image ``r_c``, which
      with zero padding is not constant (the border positions see fewer taps). All such channels are folded
      into ONE extra input channel: ``K[:, :, o] = sum_c r_c * conv2[:, :, c, o]`` (``conv2_const``, a
      ``3x3x1xO`` kernel), applied to an all-ones image of the block's resolution (a single image, broadcast
      over the batch). Exact up to float rounding, at ANY input resolution.

* **Output channels** of ``conv2``, of the 1x1 projection shortcut and of the stem whose filters are zero
  (and, for ``conv2``, not reached by ``conv2_const``) are not computed: the convolution produces only the
  nonzero output channels and they are scattered (``x.at[..., idx].add(y)``) into the full-width residual
  stream. The residual stream keeps its width: it is shared by all blocks, the identity shortcuts, the
  EnResNet noise (whose ``std`` is taken over the whole tensor) and ``bn_final``. Exact.
* **Input channels**: ``bn1`` normalises only the residual channels that ``conv1`` or the shortcut read
  (after the steps above), and each convolution gathers only the input channels its kernel uses. Exact.
* ``bn_final``, the global average pool and the dense layer ``fc`` are kept as they are (float, full width):
  with the noise on, no residual channel is constant, and ``fc`` is not quantized.

The EnResNet noise is reproduced: after each residual sum, ``out + coef * std(out) * z`` (the formula of
:func:`enquant.models.add_noise`, ``std`` over the full-width stream), where the draws ``z`` come from
:func:`noise_draws`: member ``i`` gets ``jax.random.split(key, n)[i]``, each block draws
``make_rng("noise")`` in a scope named ``stage{s}_block{b}``, under ``jax.vmap`` over the members, exactly
as :meth:`enquant.models.EnResNet.apply` does. The same key gives bitwise the same draws (for any PRNG
implementation), so the pruned model is the same randomized model; with ``noise_coef == 0`` it is
deterministic.

Cost model (:func:`macs`, :meth:`PrunedEnsemble.macs`): multiply-accumulates of the convolutions and the
dense layer per image, ``H_out * W_out * kh * kw * C_in * C_out`` per conv and ``in * out`` for the dense
layer; BatchNorm, ReLU, pooling, additions, the scatter and the noise are not counted. FLOPs = 2 * MACs.
The ``conv2_const`` map is computed once per batch but counted as if per image (an upper bound).
Parameter counts cover the ``params`` collection (BatchNorm running statistics are not counted, before or
after).

References:
  Li, Wang, Xin. "Robust and efficient quantized EnResNet", Sec. on the structure of sparsity (Table VII).
  He, Zhang, Sun. "Channel pruning for accelerating very deep neural networks." ICCV 2017.
"""

from collections.abc import Sequence
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from enquant.models import cost
from enquant.models import pruned
from enquant.models.cost import flops, macs  # noqa: F401  (re-exported: the cost of the unpruned model)
from enquant.models.ensemble import count_params, EnResNet, ModelConfig
from enquant.models.pruned import noise_draws, PrunedBlock, PrunedResNet  # noqa: F401  (re-exported)

Indices = pruned.Indices


# --------------------------------------------------------------------------------------- pruning


def _nonzero(mask: np.ndarray) -> Indices:
  return tuple(int(i) for i in np.flatnonzero(mask))


def _outputs(kernel: np.ndarray) -> np.ndarray:
  return np.any(kernel != 0, axis=(0, 1, 2))


def _inputs(kernel: np.ndarray) -> np.ndarray:
  return np.any(kernel != 0, axis=(0, 1, 3))


def _bn_constant(scale, bias, mean, var) -> np.ndarray:
  """What flax's BatchNorm (inference) outputs for an all-zero input channel."""
  scale, bias, mean, var = (jnp.asarray(a, jnp.float32) for a in (scale, bias, mean, var))
  return np.asarray((jnp.zeros_like(mean) - mean) * (jax.lax.rsqrt(var + pruned.EPS) * scale) + bias)


def _positions(sub: Indices, within: Indices) -> Indices:
  where = {c: i for i, c in enumerate(within)}
  return tuple(where[c] for c in sub)


def _shortcut_channels(p) -> tuple[Indices, Indices]:
  """(outputs, inputs) of a block's 1x1 projection shortcut that its kernel ``p["shortcut"]`` uses."""
  ks = np.asarray(p["shortcut"]["kernel"])
  sc_out = _nonzero(_outputs(ks))
  sc_in = _nonzero(_inputs(ks[..., list(sc_out)])) if sc_out else ()
  return sc_out, sc_in


def _bn_slices(params, stats, channels: Indices) -> tuple[dict, dict]:
  """A BatchNorm's ``(params, batch_stats)`` restricted to ``channels``."""
  return ({k: np.asarray(params[k])[list(channels)] for k in ("scale", "bias")},
          {k: np.asarray(stats[k])[list(channels)] for k in ("mean", "var")})


def _prune_block(p, s, features, strides, projection, noise_coef):
  """Plans and slices one block; returns (PrunedBlock fields, params, batch_stats, counts)."""
  k1, k2 = np.asarray(p["conv1"]["kernel"]), np.asarray(p["conv2"]["kernel"])
  conv1_zero = ~_outputs(k1)
  read = _inputs(k2)
  const = np.maximum(_bn_constant(p["bn2"]["scale"], p["bn2"]["bias"], s["bn2"]["mean"],
                                  s["bn2"]["var"]), 0.0)
  keep = read & ~conv1_zero
  fold = read & conv1_zero & (const > 0)
  mid = _nonzero(keep)
  k2_kept = k2[:, :, list(mid), :]
  folded_kernel = np.einsum("hwcf,c->hwf", k2[:, :, fold, :].astype(np.float32),
                            const[fold].astype(np.float32))
  out2 = _outputs(k2_kept) | (np.any(folded_kernel != 0, axis=(0, 1)) if fold.any() else False)
  conv2_outputs = _nonzero(out2)
  if not conv2_outputs:
    mid = ()
  k1_kept = k1[..., list(mid)]
  conv1_in = _nonzero(_inputs(k1_kept)) if mid else ()

  sc_out, sc_in = _shortcut_channels(p) if projection else ((), ())
  bn1 = tuple(sorted(set(conv1_in) | set(sc_in)))

  params, stats = {}, {}
  if bn1:
    params["bn1"], stats["bn1"] = _bn_slices(p["bn1"], s["bn1"], bn1)
  if mid:
    params["conv1"] = {"kernel": k1_kept[:, :, list(conv1_in), :]}
    params["bn2"], stats["bn2"] = _bn_slices(p["bn2"], s["bn2"], mid)
    params["conv2"] = {"kernel": k2_kept[..., list(conv2_outputs)]}
  folded = bool(fold.any() and conv2_outputs)
  if folded:
    params["conv2_const"] = {"kernel": folded_kernel[:, :, None, list(conv2_outputs)]}
  if sc_out:
    params["shortcut"] = {"kernel": np.asarray(p["shortcut"]["kernel"])[:, :, list(sc_in), :][
        ..., list(sc_out)]}

  fields = (("features", features), ("strides", strides), ("projection", projection),
            ("bn1_channels", bn1), ("conv1_inputs", _positions(conv1_in, bn1)), ("mid", len(mid)),
            ("conv2_outputs", conv2_outputs), ("folded", folded),
            ("shortcut_inputs", _positions(sc_in, bn1)), ("shortcut_outputs", sc_out),
            ("noise_coef", float(noise_coef)))
  width = k1.shape[-1]
  counts = {
      "inner_channels": width,
      "inner_kept": len(mid),
      "inner_folded": int(fold.sum()) if folded else 0,
      "inner_zero_constant": int((read & conv1_zero & ~(const > 0)).sum()),
      "inner_unread": int((~read).sum()),
      "outputs_skipped": (features - len(conv2_outputs)) + (features - len(sc_out) if projection else 0),
  }
  # Inner channels that were kept but write nothing (no conv2 output left) also go.
  counts["inner_removed"] = width - len(mid)
  return fields, params, stats, counts


def _member_variables(variables, index: int):
  return jax.tree.map(lambda a: np.asarray(a[index]), variables)


def _prune_member(config: ModelConfig, variables):
  p, s = variables["params"], variables["batch_stats"]
  stem = np.asarray(p["stem"]["kernel"])
  stem_out = _nonzero(_outputs(stem))
  stem_in = _nonzero(_inputs(stem[..., list(stem_out)])) if stem_out else ()
  params: dict[str, Any] = {}
  stats: dict[str, Any] = {}
  if stem_out:
    params["stem"] = {"kernel": stem[:, :, list(stem_in), :][..., list(stem_out)]}
  blocks, counts = [], {}
  for name, _, width, strides, projection in cost.block_layout(config):
    if ("shortcut" in p[name]) != projection:
      raise ValueError(f"{name}: the parameters {'lack' if projection else 'have'} a projection shortcut "
                       f"but the config {config} says otherwise")
    fields, bp, bs, bc = _prune_block(p[name], s[name], width, strides, projection, config.noise_coef)
    blocks.append((name, fields))
    params[name], stats[name] = bp, bs
    for k, v in bc.items():
      counts[k] = counts.get(k, 0) + v
  counts["outputs_skipped"] = counts.get("outputs_skipped", 0) + config.widths[0] - len(stem_out)
  params["bn_final"] = {k: np.asarray(p["bn_final"][k]) for k in ("scale", "bias")}
  stats["bn_final"] = {k: np.asarray(s["bn_final"][k]) for k in ("mean", "var")}
  params["fc"] = {k: np.asarray(p["fc"][k]) for k in ("kernel", "bias")}
  module = pruned.PrunedResNet(num_classes=config.num_classes, stem_width=config.widths[0],
                        stem_inputs=stem_in, stem_outputs=stem_out, blocks=tuple(blocks))
  return module, {"params": params, "batch_stats": stats}, counts


def _check_shapes(module: pruned.PrunedResNet, variables, config: ModelConfig, input_shape, name: str) -> None:
  """The sliced variables must be exactly what the module declares (catches any planning mistake)."""

  def init(x):
    noise = None
    if config.noise_coef:
      noise = tuple(d[0] for d in pruned.noise_draws(config, x.shape, jax.random.PRNGKey(0)))
    return module.init(jax.random.PRNGKey(0), x, noise)

  expected = jax.eval_shape(init, jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32))
  got = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), variables)
  same_tree = jax.tree.structure(expected) == jax.tree.structure(got)
  if not same_tree or jax.tree.leaves(expected) != jax.tree.leaves(got):
    raise ValueError(f"internal error: pruned variables of {name} do not match the pruned module "
                     f"({jax.tree.structure(got)} vs {jax.tree.structure(expected)})")


class PrunedEnsemble:
  """The pruned En_n ResNet: one :class:`PrunedResNet` per member (their widths differ), logits averaged.

  Attributes:
    config: the unpruned model's config.
    input_channels: channels of the images it takes.
    modules: one Flax module per member.
    variables: one ``{"params", "batch_stats"}`` per member (numpy arrays).
    counts: channel bookkeeping summed over members (see :func:`prune`).
  """

  def __init__(self, config: ModelConfig, input_channels: int, modules, variables, counts):
    self.config = config
    self.input_channels = int(input_channels)
    self.modules = tuple(modules)
    self.variables = tuple(variables)
    self.counts = dict(counts)
    self._device_variables = jax.tree.map(jnp.asarray, list(self.variables))

    def forward(variables, x, key):
      noise = [None] * len(self.modules)
      if config.noise_coef:
        draws = pruned.noise_draws(config, x.shape, key)
        noise = [tuple(d[i] for d in draws) for i in range(len(self.modules))]
      logits = [m.apply(v, x, z) for m, v, z in zip(self.modules, variables, noise)]
      return jnp.mean(jnp.stack(logits), axis=0)

    self._forward = jax.jit(forward)

  @property
  def members(self) -> int:
    return len(self.modules)

  def apply(self, x: jax.Array, key: jax.Array) -> jax.Array:
    """Averaged logits, as ``EnResNet.apply(variables, x, key, train=False)``.

    Args:
      x: float32 images in [0, 1], NHWC.
      key: noise key, split into one per member exactly as :meth:`EnResNet.apply` does.

    Returns:
      ``(N, num_classes)`` logits.

    Raises:
      ValueError: for images that are not ``(N, H, W, input_channels)``.
    """
    if np.ndim(x) != 4 or np.shape(x)[-1] != self.input_channels:
      raise ValueError(f"x must be (N, H, W, {self.input_channels}) images, got shape {np.shape(x)}")
    return self._forward(self._device_variables, jnp.asarray(x, jnp.float32), key)

  def logits_fn(self):
    """``(x, key) -> logits`` (what attacks and :func:`enquant.evaluate.evaluate` take)."""
    return self.apply

  @property
  def num_params(self) -> int:
    """Scalars in the ``params`` collections of all members (BatchNorm statistics not counted)."""
    return sum(count_params(v["params"]) for v in self.variables)

  def macs(self, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates per image actually computed (all members; see the module docstring)."""
    return sum(pruned.member_macs(m, input_shape) for m in self.modules)

  def flops(self, input_shape: Sequence[int]) -> int:
    """``2 * macs(input_shape)``."""
    return 2 * self.macs(input_shape)


def prune(model_config: ModelConfig, variables, input_shape: Sequence[int] | None = None) -> PrunedEnsemble:
  """Removes every channel that exact zeros (and BatchNorm constants) make removable.

  Args:
    model_config: the config of the (unpruned) EnResNet.
    variables: its stacked ``{"params", "batch_stats"}`` (leading member axis), typically with the conv
      kernels quantized (``P(w)``); float kernels prune nothing and work too.
    input_shape: ``(H, W, C)`` or ``(N, H, W, C)`` of the images, used to check the pruned modules
      (``None``: ``(8, 8, C)`` with ``C`` from the stem kernel). The pruned model runs at any resolution.

  Returns:
    A :class:`PrunedEnsemble`. Its ``counts`` hold, summed over members and blocks: ``inner_channels``,
    ``inner_kept``, ``inner_removed`` (= ``inner_folded`` + ``inner_zero_constant`` + ``inner_unread``
    + kept channels that write no output), ``outputs_skipped`` (stem, conv2 and shortcut output channels
    not computed).

  Raises:
    ValueError: when ``variables`` do not match ``model_config``.
  """
  if not isinstance(model_config, ModelConfig):
    raise ValueError(f"model_config must be a ModelConfig, got {model_config!r}")
  if not isinstance(variables, dict) or set(variables) != {"params", "batch_stats"}:
    raise ValueError("variables must be a dict with exactly 'params' and 'batch_stats', got "
                     f"{type(variables).__name__} with keys {list(getattr(variables, 'keys', list)())}")
  try:
    stem = variables["params"]["stem"]["kernel"]
  except (KeyError, TypeError):
    raise ValueError("variables['params'] has no stem/kernel: not an EnResNet") from None
  sizes = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(variables)}
  if sizes != {model_config.ensembles}:
    raise ValueError(f"every leaf must have a leading member axis of size {model_config.ensembles} "
                     f"(config.ensembles), got leading sizes {sorted(map(str, sizes))}")
  expected = jax.eval_shape(lambda: EnResNet(model_config).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, np.shape(stem)[-2]))))
  got = jax.tree.map(lambda a: tuple(np.shape(a)), variables)
  want = jax.tree.map(lambda a: tuple(a.shape), expected)
  if got != want:
    raise ValueError(f"variables do not match {model_config}: shapes {got} vs expected {want}")
  if input_shape is None:
    input_shape = (8, 8, np.shape(stem)[-2])
  input_shape = cost.image_shape(input_shape)
  if input_shape[-1] != np.shape(stem)[-2]:
    raise ValueError(f"input_shape {input_shape} has {input_shape[-1]} channels, the stem expects "
                     f"{np.shape(stem)[-2]}")

  modules, member_vars, counts = [], [], {}
  for i in range(model_config.ensembles):
    module, v, c = _prune_member(model_config, _member_variables(variables, i))
    _check_shapes(module, v, model_config, input_shape, f"member {i}")
    modules.append(module)
    member_vars.append(v)
    for k, n in c.items():
      counts[k] = counts.get(k, 0) + n
  return PrunedEnsemble(model_config, np.shape(stem)[-2], modules, member_vars, counts)


# ---------------------------------------------------------------------------------------- report


@functools.lru_cache(maxsize=16)
def unpruned_logits_fn(model_config: ModelConfig):
  """``jax.jit`` of ``EnResNet(model_config).apply(variables, x, key, train=False)``, cached per config.

  Returns:
    A function ``(variables, x, key) -> logits``; the variables are an argument, so new weights of the
    same model reuse the compiled function.
  """
  return jax.jit(functools.partial(EnResNet(model_config).apply, train=False))


def _to_float(batch: np.ndarray) -> np.ndarray:
  if batch.dtype == np.uint8:
    return batch.astype(np.float32) / np.float32(255.0)
  return batch.astype(np.float32)


def _compare_predictions(unpruned_fn, variables, pruned: PrunedEnsemble, images: np.ndarray,
                         labels: np.ndarray, key: jax.Array, batch_size: int) -> tuple[int, int, int, float]:
  """Both models on the same batches and noise keys (batch ``b``: ``fold_in(key, b)``).

  Returns:
    ``(correct_before, correct_after, agreeing_predictions, max_abs_logit_diff)`` over all examples.
  """
  correct_before = correct_after = agree = 0
  max_diff = 0.0
  for b, start in enumerate(range(0, images.shape[0], batch_size)):
    x = jnp.asarray(_to_float(images[start:start + batch_size]))
    y = labels[start:start + batch_size]
    batch_key = jax.random.fold_in(key, b)
    before = np.asarray(unpruned_fn(variables, x, batch_key))
    after = np.asarray(pruned.apply(x, batch_key))
    max_diff = max(max_diff, float(np.max(np.abs(before - after))))
    pred_before, pred_after = before.argmax(-1), after.argmax(-1)
    correct_before += int((pred_before == y).sum())
    correct_after += int((pred_after == y).sum())
    agree += int((pred_before == pred_after).sum())
  return correct_before, correct_after, agree, max_diff


def pruning_report(model_config: ModelConfig, variables, images, labels, key: jax.Array,
                   batch_size: int = 256, pruned: PrunedEnsemble | None = None) -> dict[str, float]:
  """Size, cost and accuracy of the model before and after :func:`prune`, measured on the same data.

  Both models see the same batches with the same noise keys (batch ``b`` uses ``fold_in(key, b)``;
  the last batch may be smaller and is not padded, so no example is counted twice).

  Args:
    model_config: the unpruned model's config.
    variables: its stacked variables (the quantized ``P(w)`` ones, as evaluated).
    images: ``(N, H, W, C)`` uint8 (scaled by 1/255) or float in [0, 1].
    labels: ``(N,)`` integer labels.
    key: noise key.
    batch_size: examples per forward pass.
    pruned: an already pruned model (``None``: ``prune(model_config, variables, images.shape)``).

  Returns:
    ``params_before/after``, ``macs_before/after``, ``flops_before/after`` (per image), ``flops_ratio``
    (after / before), the channel counts of :func:`prune`, ``accuracy_before/after``,
    ``prediction_agreement`` (fraction of identical argmax), ``max_abs_logit_diff`` and ``examples``.

  Raises:
    ValueError: for mismatched images/labels or a bad batch size.
  """
  images, labels = np.asarray(images), np.asarray(labels)
  if images.ndim != 4 or labels.shape != (images.shape[0],) or not images.shape[0]:
    raise ValueError(f"images must be (N, H, W, C) and labels (N,) with N > 0, got {images.shape} and "
                     f"{labels.shape}")
  if images.dtype != np.uint8 and not np.issubdtype(images.dtype, np.floating):
    raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}")
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
  if pruned is None:
    pruned = prune(model_config, variables, images.shape)
  correct_before, correct_after, agree, max_diff = _compare_predictions(
      unpruned_logits_fn(model_config), variables, pruned, images, labels, key, batch_size)

  n = images.shape[0]
  params_before = count_params(variables["params"])
  macs_before, macs_after = macs(model_config, images.shape), pruned.macs(images.shape)
  report = {
      "params_before": params_before,
      "params_after": pruned.num_params,
      "macs_before": macs_before,
      "macs_after": macs_after,
      "flops_before": 2 * macs_before,
      "flops_after": 2 * macs_after,
      "flops_ratio": macs_after / macs_before,
      "accuracy_before": correct_before / n,
      "accuracy_after": correct_after / n,
      "prediction_agreement": agree / n,
      "max_abs_logit_diff": max_diff,
      "examples": n,
  }
  report.update({f"channels/{k}": v for k, v in pruned.counts.items()})
  return report
