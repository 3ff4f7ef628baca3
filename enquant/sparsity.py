"""Weight and channel sparsity of conv kernels, the M_t bound, and how many values a kernel really uses.

Reports are flat dicts keyed by ``/``-joined parameter paths (as ``flax.traverse_util.flatten_dict`` with
``sep="/"`` writes them, e.g. ``"stage1_block1/conv1/kernel/weight_sparsity"``) plus ``total/...`` keys,
with plain Python numbers (they go into ``results.json``).

Conventions:

* A conv kernel is HWIO; any axes before the last four are member axes (ensembles stack their parameters
  along axis 0, ``(n, H, W, I, O)``). Counts are over all members: a stacked En_n kernel of ``n`` members
  counts ``n * O`` output channels.
* A weight is zero when it is exactly ``0.0`` (quantized weights are ``scale * code``, exact zeros for
  code 0).
* **Output channel** ``o`` of a member's kernel is zero when the whole slice ``w[:, :, :, o]`` (``H x W x I``
  weights, one filter) is zero. These are the channels that channel pruning can remove
  (:mod:`enquant.prune`): ``channel_sparsity`` is the fraction of zero output channels.
* **Input channel** ``i`` is zero when the slice ``w[:, :, i, :]`` (``H x W x O`` weights) is zero.
  This is the count the paper's Table VII uses: "16 out of 627 channels" of ResNet20 is the sum of the
  INPUT channels of its 19 3x3 convolutions, ``3 + 6*16 + (16 + 5*32) + (32 + 5*64) = 627``, and its
  "0.268M" conv weights are those of the same 19 kernels (267,696; the two 1x1 projection shortcuts add
  2,560 weights, 48 input and 96 output channels). Their output channels would number 688. Use
  ``mask=spatial_conv_mask`` to count like the paper (3x3 kernels only); the default mask
  (:func:`enquant.quant.conv_kernel_mask`) counts every quantized conv kernel, shortcuts included.

References:
  Li, Wang, Xin. "Robust and efficient quantized EnResNet" (Table IV: the bound M; Table VII: sparsity).
"""

import math
from typing import Any, Callable, Union

import jax
import numpy as np

from enquant import quant
from enquant.quant import conv_kernel_mask

MaskOrFn = Union[Any, Callable[[Any], Any]]


path_names = quant.path_names  # re-exported: the mask and the report name leaves alike


def spatial_conv_mask(params) -> Any:
  """Conv kernels with a spatial extent (``H * W > 1``): the paper's counting, 1x1 shortcuts left out.

  Args:
    params: a parameter pytree.

  Returns:
    A pytree of Python bools with the structure of ``params``.
  """
  base = conv_kernel_mask(params)
  return jax.tree.map(lambda m, leaf: bool(m and np.shape(leaf)[-4] * np.shape(leaf)[-3] > 1),
                      base, params)


def conv_kernels(params, mask: MaskOrFn | None = None) -> dict[str, np.ndarray]:
  """The selected conv kernels as ``{path: array of shape (members, H, W, I, O)}`` (host numpy).

  Args:
    params: a parameter pytree (stacked or not).
    mask: pytree of bools or ``params -> pytree``; ``None`` selects every conv kernel
      (:func:`enquant.quant.conv_kernel_mask`).

  Returns:
    Ordered dict path -> kernel with the member axes flattened into one leading axis (1 when unstacked).

  Raises:
    ValueError: when the mask does not match ``params`` or selects a leaf with fewer than 4 axes.
  """
  tree = quant.resolve_mask(mask, params)
  selected = {}
  flat_mask = jax.tree.leaves(tree)
  for (path, leaf), keep in zip(jax.tree_util.tree_flatten_with_path(params)[0], flat_mask):
    if not keep:
      continue
    name = "/".join(path_names(path))
    arr = np.asarray(leaf)
    if arr.ndim < 4:
      raise ValueError(f"{name}: a conv kernel needs >= 4 axes (..., H, W, I, O), got shape {arr.shape}")
    selected[name] = arr.reshape((-1,) + arr.shape[-4:])
  return selected


# total/<key> of weight_report -> the per-layer entry it sums.
_TOTALS = (("zero_weights", "zeros"), ("conv_weights", "size"), ("zero_channels", "zero_channels"),
           ("channels", "channels"), ("zero_in_channels", "zero_in_channels"), ("in_channels", "in_channels"))


def _layer_stats(w: np.ndarray, is_zero: np.ndarray, layer_chi2: float, layer_channels: int
                 ) -> dict[str, float]:
  """The per-layer entries of :func:`weight_report` for one stacked kernel ``(members, H, W, I, O)``."""
  zeros, size = int(is_zero.sum()), int(w.size)
  zero_out = int(is_zero.all(axis=(1, 2, 3)).sum())  # (members, O)
  zero_in = int(is_zero.all(axis=(1, 2, 4)).sum())  # (members, I)
  channels, in_channels = w.shape[0] * w.shape[-1], w.shape[0] * w.shape[-2]
  return {
      "zeros": zeros,
      "size": size,
      "weight_sparsity": zeros / size if size else 0.0,
      "channels": channels,
      "zero_channels": zero_out,
      "channel_sparsity": zero_out / channels if channels else 0.0,
      "in_channels": in_channels,
      "zero_in_channels": zero_in,
      "in_channel_sparsity": zero_in / in_channels if in_channels else 0.0,
      "mean_abs": float(np.abs(w.astype(np.float64)).mean(axis=(1, 2, 3, 4)).max()) if size else 0.0,
      "zero_dispersion": layer_chi2 / layer_channels if layer_channels else 0.0,
  }


def weight_report(params, mask: MaskOrFn | None = None) -> dict[str, float]:
  """Per-layer and total weight / channel sparsity of the conv kernels.

  Per selected kernel ``<path>`` (all members together):
  ``<path>/zeros``, ``<path>/size``, ``<path>/weight_sparsity`` (= zeros / size);
  ``<path>/channels``, ``<path>/zero_channels``, ``<path>/channel_sparsity`` (output channels, see the
  module docstring); ``<path>/in_channels``, ``<path>/zero_in_channels``, ``<path>/in_channel_sparsity``
  (input channels, the paper's count); ``<path>/mean_abs`` (the largest member's mean ``|w|``);
  ``<path>/zero_dispersion`` (:func:`zero_dispersion` over the layer's input channels).

  Totals: ``total/zero_weights``, ``total/conv_weights``, ``total/weight_sparsity``,
  ``total/zero_channels``, ``total/channels``, ``total/channel_sparsity``, ``total/zero_in_channels``,
  ``total/in_channels``, ``total/in_channel_sparsity``, ``total/m_bound`` (:func:`m_bound`),
  ``total/zero_dispersion`` (pooled over the layers: the mean of every input channel's standardised squared
  deviation, over the layers that have both zero and nonzero weights), ``total/dispersion_channels`` (the
  input channels of those layers: what the pooled index averages).

  Args:
    params: a parameter pytree (stacked ensembles: leading member axis).
    mask: which leaves are conv kernels to count (default: every conv kernel).

  Returns:
    A flat dict of Python ints and floats.
  """
  report: dict[str, float] = {}
  totals = dict(zero_weights=0, conv_weights=0, zero_channels=0, channels=0, zero_in_channels=0,
                in_channels=0)
  bound, chi2, dispersed_channels = 0.0, 0.0, 0
  for name, w in conv_kernels(params, mask).items():
    is_zero = w == 0
    layer_chi2, layer_channels = _zero_chi2(is_zero)
    chi2, dispersed_channels = chi2 + layer_chi2, dispersed_channels + layer_channels
    layer = _layer_stats(w, is_zero, layer_chi2, layer_channels)
    report.update({f"{name}/{k}": v for k, v in layer.items()})
    for total, key in _TOTALS:
      totals[total] += layer[key]
    bound = max(bound, layer["mean_abs"])

  def ratio(a, b):
    return totals[a] / totals[b] if totals[b] else 0.0

  report.update({f"total/{k}": v for k, v in totals.items()})
  report["total/weight_sparsity"] = ratio("zero_weights", "conv_weights")
  report["total/channel_sparsity"] = ratio("zero_channels", "channels")
  report["total/in_channel_sparsity"] = ratio("zero_in_channels", "in_channels")
  report["total/m_bound"] = bound
  report["total/zero_dispersion"] = chi2 / dispersed_channels if dispersed_channels else 0.0
  report["total/dispersion_channels"] = dispersed_channels
  return report


def _zero_chi2(is_zero: np.ndarray) -> tuple[float, int]:
  """``(sum over input channels of ((f_c - p)^2 / (p (1 - p) / k)), number of channels)`` of one stacked
  kernel ``(members, H, W, I, O)``: ``f_c`` the zero fraction of input channel ``c`` (its ``k = H W O``
  weights, per member), ``p`` the layer's zero fraction. ``(0.0, 0)`` when ``p`` is 0 or 1."""
  k = is_zero.shape[1] * is_zero.shape[2] * is_zero.shape[4]
  p = float(is_zero.mean())
  if p in (0.0, 1.0) or k == 0:
    return 0.0, 0
  f = is_zero.mean(axis=(1, 2, 4), dtype=np.float64)  # (members, I)
  return float(((f - p) ** 2).sum() * k / (p * (1.0 - p))), int(f.size)


def zero_dispersion(params, mask: MaskOrFn | None = None) -> float:
  """How much the zero weights crowd into some input channels: ``total/zero_dispersion`` of
  :func:`weight_report`, the dispersion index of the channels' zero fractions against the binomial.

  1 (in expectation, up to ``(C - 1) / C``) when every weight of a layer is zero independently with the
  layer's rate ``p`` (unstructured sparsity); ``k = H W O`` when each channel is either all zero or has no
  zero (fully structured: whole zero channels). A graded measure of the structure the paper's channel
  sparsity counts only once whole channels are zero. 0.0 when no layer has both zero and nonzero weights.
  """
  return weight_report(params, mask)["total/zero_dispersion"]


def m_bound(params, mask: MaskOrFn | None = None) -> float:
  """``M_t = max over conv layers (and ensemble members) of mean |w|`` (the paper's Table IV, Fig. 2).

  The mean is over one member's kernel (``H * W * I * O`` weights), computed in float64.

  Args:
    params: a parameter pytree (the float weights ``w``, or ``P(w)``: say which when logging).
    mask: which leaves are conv kernels (default: every conv kernel).

  Returns:
    ``M_t`` as a Python float (0.0 when no kernel is selected).
  """
  kernels = conv_kernels(params, mask)
  return max((float(np.abs(w.astype(np.float64)).mean(axis=(1, 2, 3, 4)).max())
              for w in kernels.values() if w.size), default=0.0)


def distinct_values(params, mask: MaskOrFn | None = None) -> dict[str, int]:
  """Number of distinct values in each conv kernel (the largest over members): 2 for binary, <= 3 for
  ternary, <= 2^bits - 1 for m-bit weights; about the kernel's size for float weights.

  Args:
    params: a parameter pytree.
    mask: which leaves are conv kernels (default: every conv kernel).

  Returns:
    ``{path: count}``.
  """
  return {name: max(int(np.unique(member).size) for member in w)
          for name, w in conv_kernels(params, mask).items()}


def bits_per_weight(params, mask: MaskOrFn | None = None) -> dict[str, float]:
  """Bits a fixed-length code needs per weight: ``ceil(log2(distinct values))`` per kernel.

  ``<path>`` -> bits of that kernel (its most diverse member); ``total/bits_per_weight`` is the average
  over all selected weights (weighted by size); ``total/max_bits`` the largest. A binary model gives 1,
  ternary 2, 4-bit 4 (or fewer if not all levels are used); float kernels give ~log2(size).

  Args:
    params: a parameter pytree.
    mask: which leaves are conv kernels (default: every conv kernel).

  Returns:
    A flat dict of Python numbers.
  """
  kernels = conv_kernels(params, mask)
  counts = distinct_values(params, mask)
  report: dict[str, float] = {}
  weighted, size = 0.0, 0
  for name, count in counts.items():
    bits = math.ceil(math.log2(count)) if count > 1 else 0
    report[name] = bits
    weighted += bits * kernels[name].size
    size += kernels[name].size
  report["total/bits_per_weight"] = weighted / size if size else 0.0
  report["total/max_bits"] = max((v for k, v in report.items() if not k.startswith("total/")), default=0)
  return report
