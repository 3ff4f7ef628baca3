"""A 2-D convolution whose input gradient is itself a plain convolution (fast inside XLA:CPU loops).

Why: JAX differentiates ``lax.conv_general_dilated`` with respect to its input by a convolution that reads
the kernel with input and output channels swapped (dimension numbers ``01oi``). Outside a loop XLA:CPU
rewrites that into an explicit kernel transpose plus its fast convolution library call; inside the body of a
``while`` loop (a rolled ``lax.fori_loop``: PGD, APGD, CW, TRADES) it does not, and the input-gradient
convolutions run as generic loops, about 4x slower (measured on PGD-20, jax-ml/jax#12868). Here the input
gradient is written as an ordinary ``NHWC x HWIO`` convolution of the (dilated) output gradient with the
explicitly flipped and transposed kernel: the same arithmetic, in the layout every backend runs fast, so
attack loops can stay rolled (short compiles) at unrolled speed. The kernel gradient is JAX's own.

Values and gradients equal ``lax.conv_general_dilated`` (tested, strided and 1x1 included).
"""

from collections.abc import Sequence
import functools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

_DIMS = ("NHWC", "HWIO", "NHWC")
Padding = tuple[tuple[int, int], tuple[int, int]]


def _plain(x, w, strides, padding, precision=None):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DIMS,
                                  precision=precision)


def _transpose_padding(size: int, k: int, stride: int, pad: tuple[int, int]) -> tuple[int, int]:
  """Padding of the input-gradient convolution (on the stride-dilated output gradient)."""
  lo, hi = pad
  rest = (size + lo + hi - k) % stride  # input rows the forward's last window did not reach
  return (k - 1 - lo, k - 1 - hi + rest)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def conv2d(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: Padding,
           precision=None) -> jax.Array:
  """``lax.conv_general_dilated(x, w, strides, padding)`` in NHWC/HWIO with a layout-friendly VJP.

  Args:
    x: ``(N, H, W, C_in)`` input.
    w: ``(kh, kw, C_in, C_out)`` kernel.
    strides: ``(sh, sw)``.
    padding: explicit ``((top, bottom), (left, right))``.
    precision: passed to ``lax.conv_general_dilated``.

  Returns:
    ``(N, H', W', C_out)``.
  """
  return _plain(x, w, strides, padding, precision)


def _fwd(x, w, strides, padding, precision):
  return _plain(x, w, strides, padding, precision), (x, w)


def _bwd(strides, padding, precision, res, g):
  x, w = res
  kh, kw = w.shape[:2]
  pads = tuple(_transpose_padding(x.shape[1 + i], (kh, kw)[i], strides[i], padding[i]) for i in range(2))
  # Flip spatially and swap in/out channels, materialised in HWIO: a forward-layout kernel.
  w_t = jnp.transpose(jnp.flip(w, (0, 1)), (0, 1, 3, 2))
  dx = lax.conv_general_dilated(g.astype(w_t.dtype), w_t, (1, 1), pads, lhs_dilation=strides,
                                dimension_numbers=_DIMS, precision=precision).astype(x.dtype)
  _, vjp_w = jax.vjp(lambda kernel: _plain(x, kernel, strides, padding, precision), w)
  (dw,) = vjp_w(g)
  return dx, dw


conv2d.defvjp(_fwd, _bwd)


def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class Conv(nn.Module):
  """A bias-free 2-D convolution (NHWC) with the same parameter (``"kernel"``, HWIO) as ``nn.Conv``.

  Attributes:
    features: output channels.
    kernel_size: ``(kh, kw)``.
    strides: int or ``(sh, sw)``.
    padding: explicit ``((top, bottom), (left, right))`` or ``"VALID"``.
    kernel_init: initializer of the kernel.
    compute_dtype: dtype of the convolution's inputs (e.g. ``jnp.bfloat16``); the kernel parameter stays
      float32 and the output is cast back to the input's dtype. ``None``: no cast.
  """

  features: int
  kernel_size: Sequence[int]
  strides: int | Sequence[int] = 1
  padding: str | Sequence[Sequence[int]] = "VALID"
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  compute_dtype: jnp.dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features))
    padding = ((0, 0), (0, 0)) if self.padding == "VALID" else tuple(tuple(p) for p in self.padding)
    if self.compute_dtype is None:
      return conv2d(x, kernel, _pair(self.strides), padding)
    y = conv2d(x.astype(self.compute_dtype), kernel.astype(self.compute_dtype), _pair(self.strides),
               padding)
    return y.astype(x.dtype)
