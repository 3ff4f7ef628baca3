"""Analytic cost of an En_n ResNet: multiply-accumulates and FLOPs per image, and its block layout."""

from collections.abc import Sequence

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
