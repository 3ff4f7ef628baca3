"""Analytic cost of an En_n ResNet: multiply-accumulates and FLOPs per image, and its block layout."""

from collections.abc import Sequence
import os

from enquant.models.ensemble import ModelConfig


def out_size(size: int, strides: int) -> int:
  """Spatial output of a 3x3/pad-1 or 1x1/valid conv with the given stride (they agree)."""
  return (size - 1) // strides + 1


def image_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
  shape = tuple(int(d) for d in input_shape)
  if len(shape) == 4:
    shape = shape[1:]
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(f"input_shape must be (H, W, C) or (N, H, W, C) with positive sizes, got "
                     f"{tuple(input_shape)}")
  return shape


def block_layout(config: ModelConfig):
  """``(name, in_width, width, strides, projection)`` for every block, as ResNet builds them."""
  layout, in_width = [], config.widths[0]
  for stage, (blocks, width) in enumerate(zip(config.block_stages, config.widths)):
    for block in range(blocks):
      strides = 2 if stage > 0 and block == 0 else 1
      layout.append((f"stage{stage + 1}_block{block + 1}", in_width, width, strides,
                     strides != 1 or in_width != width))
      in_width = width
  return layout


def macs(model_config: ModelConfig, input_shape: Sequence[int]) -> int:
  """Multiply-accumulates per image of the unpruned En_n ResNet (all members), counted analytically.

  Convolutions: ``H_out * W_out * kh * kw * C_in * C_out`` each; the dense layer ``in * out``. BatchNorm,
  ReLU, pooling, additions and the noise are not counted.

  Args:
    model_config: the model.
    input_shape: ``(H, W, C)`` or ``(N, H, W, C)`` (the batch size is ignored).

  Returns:
    MACs per image.
  """
  h, w, c = image_shape(input_shape)
  total = h * w * 9 * c * model_config.widths[0]
  for _, in_width, width, strides, projection in block_layout(model_config):
    h, w = out_size(h, strides), out_size(w, strides)
    total += h * w * 9 * (in_width * width + width * width)
    if projection:
      total += h * w * in_width * width
  total += model_config.widths[-1] * model_config.num_classes
  return total * model_config.ensembles


def flops(model_config: ModelConfig, input_shape: Sequence[int]) -> int:
  """``2 * macs(model_config, input_shape)``: FLOPs per image of the unpruned model."""
  return 2 * macs(model_config, input_shape)


def activation_floats(model_config: ModelConfig, input_shape: Sequence[int]) -> int:
  """Floats per image of the conv outputs of all members (each block's two, projections, the stem)."""
  h, w, _ = image_shape(input_shape)
  total = h * w * model_config.widths[0]
  for _, _, width, strides, projection in block_layout(model_config):
    h, w = out_size(h, strides), out_size(w, strides)
    total += h * w * width * (3 if projection else 2)
  return total * model_config.ensembles


def train_memory_bytes(model_config: ModelConfig, input_shape: Sequence[int], batch_size: int,
                       num_params: int | None = None) -> int:
  """A lower bound on the memory one training step needs (float32).

  The activations a backward pass keeps (each conv output and its BatchNorm output, for every member and
  image of the batch) plus the parameters with their gradient, momentum and float copy (4 copies).
  XLA needs more (temporaries, attack steps), so a run whose bound exceeds the device's memory cannot fit.

  Args:
    model_config: the model.
    input_shape: ``(H, W, C)`` or ``(N, H, W, C)``.
    batch_size: images per step on one device.
    num_params: parameters, if known (else counted from :func:`macs`' layout).

  Returns:
    Bytes.
  """
  if num_params is None:
    _, _, c = image_shape(input_shape)
    per_member = 9 * c * model_config.widths[0] + model_config.widths[-1] * model_config.num_classes
    for _, in_width, width, _, projection in block_layout(model_config):
      per_member += 9 * (in_width * width + width * width) + (in_width * width if projection else 0)
    num_params = per_member * model_config.ensembles
  return 4 * (2 * batch_size * activation_floats(model_config, input_shape) + 4 * num_params)


def memory_limit_bytes(device) -> int | None:
  """The memory ``device`` can hold: its allocator's limit, or the host's RAM for a CPU (None: unknown)."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  if device.platform == "cpu" and hasattr(os, "sysconf"):
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  return None


def check_train_memory(model_config: ModelConfig, input_shape: Sequence[int], batch_size: int, device, *,
                       num_params: int | None = None) -> None:
  """Refuses, before anything is compiled, a model whose training step cannot fit on ``device``.

  Raises:
    ValueError: naming the estimate (:func:`train_memory_bytes`), the memory and the flags to lower.
  """
  need = train_memory_bytes(model_config, input_shape, max(1, batch_size), num_params)
  limit = memory_limit_bytes(device)
  if limit is not None and need > limit:
    raise ValueError(f"{model_config.name} (--ensembles={model_config.ensembles}) needs at least "
                     f"{need / 2**30:.1f} GiB per training step at batch {batch_size} (estimate of "
                     f"enquant.models.cost.train_memory_bytes), more than the {limit / 2**30:.1f} GiB of "
                     f"{device.platform} memory; use fewer --ensembles, a smaller --batch_size or --width")
