"""Device-side preprocessing and batching of uint8 image arrays.

:func:`to_float` converts uint8 images to float32 in [0, 1] (exactly ``x / 255``, on device);
:func:`augment` applies the CIFAR-style pad-4 random crop + horizontal flip on device as a jitted function
of a PRNG key (one image: :func:`crop_flip`); :func:`epoch_batches` gives the batch indices of an epoch as
a pure function of ``(seed, epoch)``, so a resumed run sees exactly the batches of an uninterrupted one;
:func:`class_counts` counts the examples of each class.

All of these are re-exported by :mod:`enquant.data`. This module knows nothing about models or files.
"""

import functools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from enquant import datachecks


# x / 255 correctly rounded to float32 for every uint8 x. XLA rewrites a division by a constant into a
# multiplication by its reciprocal (off by one ulp for about half the values); a 256-entry table lookup
# gives numpy's exact values on every backend.
_UINT8_TO_FLOAT = np.arange(256, dtype=np.float32) / np.float32(255)


def to_float(images) -> jax.Array:
  """uint8 images -> float32 in [0, 1], exactly ``x / 255``, as a jax array (on device; jittable).

  Raises:
    ValueError: ``images`` is not uint8.
  """
  images = jnp.asarray(images)
  if images.dtype != jnp.uint8:
    raise ValueError(f"to_float expects uint8 images, got dtype {images.dtype}")
  return jnp.asarray(_UINT8_TO_FLOAT)[images]


def crop_flip(image, dy, dx, flip, *, pad: int = 4) -> jax.Array:
  """One image's crop of its zero-padded copy, optionally mirrored left-right.

  The image ``(H, W, C)`` is padded with ``pad`` zeros on each side of H and W; the ``(H, W)`` window
  starting at row ``dy`` and column ``dx`` of the padded image is returned, flipped along W when
  ``flip`` is true. ``(dy, dx) = (pad, pad)`` and ``flip=False`` give the image back. ``dy``, ``dx`` and
  ``flip`` may be traced values; offsets outside ``[0, 2 * pad]`` are clamped by
  ``lax.dynamic_slice``.

  Args:
    image: ``(H, W, C)`` array of any dtype.
    dy: row offset in ``[0, 2 * pad]``.
    dx: column offset in ``[0, 2 * pad]``.
    flip: bool (scalar), mirror the crop along the width.
    pad: zero padding on each side.

  Returns:
    An array of ``image``'s shape and dtype.
  """
  image = jnp.asarray(image)
  if image.ndim != 3:
    raise ValueError(f"crop_flip expects one (H, W, C) image, got shape {image.shape}")
  h, w, c = image.shape
  padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  zero = jnp.zeros((), jnp.int32)
  out = lax.dynamic_slice(padded, (jnp.asarray(dy, jnp.int32), jnp.asarray(dx, jnp.int32), zero),
                          (h, w, c))
  return jnp.where(flip, out[:, ::-1, :], out)


@functools.partial(jax.jit, static_argnames=("flip", "pad"))
def augment(key: jax.Array, images: jax.Array, *, flip: bool = True, pad: int = 4) -> jax.Array:
  """Per-image random crop of the zero-padded image (+ random horizontal flip), on device.

  The CIFAR augmentation of the EnResNet/PGD-AT code (``RandomCrop(32, padding=4)`` and
  ``RandomHorizontalFlip()``): each image gets its own key (``jax.random.split(key, N)``), from which
  its offsets ``dy, dx`` are drawn uniformly from ``{0, ..., 2 * pad}`` and its flip with probability
  1/2; then :func:`crop_flip`. Same key, same output.

  Args:
    key: a PRNG key.
    images: ``(N, H, W, C)`` of any dtype (uint8 or float).
    flip: also apply random horizontal flips (``False`` for digit datasets, where mirroring changes the
      meaning).
    pad: zero padding on each side before cropping back to ``(H, W)``.

  Returns:
    Augmented images of the same shape and dtype.
  """
  if images.ndim != 4:
    raise ValueError(f"augment expects NHWC images, got shape {images.shape}")
  if pad < 0:
    raise ValueError(f"pad must be >= 0, got {pad}")

  def one(k, image):
    k_offset, k_flip = jax.random.split(k)
    dy, dx = jax.random.randint(k_offset, (2,), 0, 2 * pad + 1)
    mirror = jax.random.bernoulli(k_flip) if flip else False
    return crop_flip(image, dy, dx, mirror, pad=pad)

  return jax.vmap(one)(jax.random.split(key, images.shape[0]), images)


def _check_nonneg_int(value, what: str, minimum: int = 0) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")


def epoch_batches(num_examples: int, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
                  drop_remainder: bool = True) -> np.ndarray:
  """Example indices of every batch of one epoch, a pure function of ``(seed, epoch)``.

  The order is ``np.random.default_rng((seed, epoch)).permutation(num_examples)`` (or ``arange`` when
  ``shuffle`` is false), cut into consecutive batches, so a run resumed at ``epoch`` sees exactly the
  batches of an uninterrupted run.

  Args:
    num_examples: dataset size.
    batch_size: examples per batch (at most ``num_examples``).
    seed: non-negative run seed.
    epoch: non-negative epoch number.
    shuffle: permute the examples (else they come in order).
    drop_remainder: drop the last ``num_examples % batch_size`` examples of the order. If false, the
      last batch is completed with ``-1`` entries: callers must mask them (``idx >= 0``) and gather
      with ``np.maximum(idx, 0)``.

  Returns:
    int64 array ``(num_batches, batch_size)``.

  Raises:
    ValueError: for a non-positive size, ``batch_size > num_examples`` or negative seed/epoch.
  """
  _check_nonneg_int(num_examples, "num_examples", 1)
  _check_nonneg_int(batch_size, "batch_size", 1)
  _check_nonneg_int(seed, "seed")
  _check_nonneg_int(epoch, "epoch")
  if batch_size > num_examples:
    raise ValueError(f"batch_size {batch_size} is larger than the {num_examples} examples")
  if shuffle:
    order = np.random.default_rng((int(seed), int(epoch))).permutation(num_examples)
  else:
    order = np.arange(num_examples)
  order = order.astype(np.int64)
  num_full = num_examples // batch_size
  if drop_remainder or num_examples % batch_size == 0:
    return order[:num_full * batch_size].reshape(num_full, batch_size)
  padded = np.full(((num_full + 1) * batch_size,), -1, np.int64)
  padded[:num_examples] = order
  return padded.reshape(num_full + 1, batch_size)


def class_counts(labels, num_classes: int) -> np.ndarray:
  """Number of examples of each class.

  Args:
    labels: integer labels (any shape).
    num_classes: number of classes.

  Returns:
    int64 array ``(num_classes,)``.

  Raises:
    ValueError: a label outside ``[0, num_classes)`` or a non-integer array.
  """
  _check_nonneg_int(num_classes, "num_classes", 1)
  labels = np.asarray(labels).reshape(-1)
  if labels.size and not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  datachecks.check_labels(labels, 0, num_classes - 1, "class_counts")
  return np.bincount(labels.astype(np.int64), minlength=num_classes).astype(np.int64)
