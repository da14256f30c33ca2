"""An opt-in convolution whose kernel gradient needs no transposes (faster on XLA:CPU).

Use with `model.conv='cpu_kgrad'` (or `create_model(name, conv='cpu_kgrad')`); the
default is Flax's `nn.Conv`. Forward pass and parameters are identical.

Why: XLA:CPU lowers the kernel-gradient of an NHWC conv to a canonical conv on
x as (C,H,W,N) and dy as (H,W,N,O). The transposes that produce those operands get the
BN/ReLU/residual producers fused into them and run ~4x slower than plain copies
(~50% of a ResNet-20 train step; see docs/cpu_speed_investigation.md). Measured with
`python -m resnet_jax.benchmark`: the CIFAR train step is 1.35-1.6x faster on a 2-core CPU.
On GPU/TPU keep the default.

What: the same sum, dW[kh,kw,ci,co] = sum_{n,h,w} xpad[n, s*h+kh, s*w+kw, ci] * dy[n,h,w,co],
written as ONE ordinary conv on free (bitcast) reshapes of the NHWC buffers:
  lhs = xpad viewed as (1, N*Hp, Wp*Ci, 1)       -- batch folded into rows, channels into columns
  rhs = dy (rows zero-padded to Hp/s) viewed as (N*Hp/s, Wo, 1, Co)   -- the whole dy is the "window"
  window dilation (s, s*Ci);  output (1, >=KH, >=KW*Ci, Co) -> slice -> (KH, KW, Ci, Co).
No transpose of x or dy is needed, so nothing is fused into a strided loop; YNNPACK runs the
conv. YNNPACK (jaxlib 0.10.2) only takes this conv when Co > 16, so narrower convs fold
`fold` adjacent dy columns into the feature axis (free reshape, ~1.33x MACs for fold 2);
`fold_narrow=False` keeps the stock `lax` kernel gradient for them instead. The batch is
processed in chunks of `batch_chunk` examples (a smaller window is 1.5-2x faster in YNNPACK).
1x1 kernels and non-float32 dtypes use the stock rule.

Exact same math as jax's rule; float32 results differ only by summation order (~1e-6 rel).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
import flax.linen as nn

_DN = ('NHWC', 'HWIO', 'NHWC')


def _conv(x, k, strides, padding):
  return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=_DN)


def kernel_grad_folded(x, dy, kshape, strides, padding, fold=1, batch_chunk=16):
  """Sum of `_kernel_grad_folded` over batch chunks of `batch_chunk` examples.

  Smaller "windows" (rows = chunk * padded height) run 1.5-2x faster in YNNPACK than one
  conv over the whole batch (measured: 128x32x32x16, 16x16x32, 8x8x64).
  """
  n = x.shape[0]
  if not batch_chunk or n <= batch_chunk:
    return _kernel_grad_folded(x, dy, kshape, strides, padding, fold)
  dw = None
  for i in range(0, n, batch_chunk):
    part = _kernel_grad_folded(x[i:i + batch_chunk], dy[i:i + batch_chunk], kshape, strides, padding, fold)
    dw = part if dw is None else dw + part
  return dw


def _kernel_grad_folded(x, dy, kshape, strides, padding, fold=1):
  """dW of `_conv(x, k, strides, padding)` for output cotangent dy, transpose-free.

  `fold` > 1 also views `fold` adjacent dy columns as extra output features
  (dy (.., Wo, Co) -> (.., Wo/fold, fold*Co), still a free reshape), so that narrow
  convs (Co <= 16, which YNNPACK declines) become Co*fold wide; the `fold` partial
  results are then added at their column offsets.
  """
  kh, kw, ci, co = kshape
  sh, sw = strides
  n, ho, wo, _ = dy.shape
  (pt, pb), (pl, pr) = padding
  hp = x.shape[1] + pt + pb
  rows = -(-hp // sh)                       # dy rows per sample after zero padding
  extra_h = rows * sh - hp                  # make the padded height a multiple of sh
  wo_f = -(-wo // fold) * fold              # dy width padded to a multiple of fold
  wp = x.shape[2] + pl + pr
  extra_w = max(0, sw * wo_f - sw + kw - wp)   # columns the folded taps may reach
  xp = jnp.pad(x, ((0, 0), (pt, pb + extra_h), (pl, pr + extra_w), (0, 0)))
  hp += extra_h
  wp = xp.shape[2]
  lhs = xp.reshape(1, n * hp, wp * ci, 1)
  lhs = jnp.pad(lhs, ((0, 0), (0, kh - 1), (0, 0), (0, 0)))
  rhs = jnp.pad(dy, ((0, 0), (0, rows - ho), (0, wo_f - wo), (0, 0)))
  rhs = rhs.reshape(n * rows, wo_f // fold, 1, fold * co)
  out = lax.conv_general_dilated(lhs, rhs, (1, 1), 'VALID', rhs_dilation=(sh, sw * fold * ci),
                                   dimension_numbers=_DN)
  out = out[0, :kh].reshape(kh, -1, fold, co)
  dw = None
  for p in range(fold):
    part = out[:, sw * p * ci: sw * p * ci + kw * ci, p, :]
    dw = part if dw is None else dw + part
  return dw.reshape(kh, kw, ci, co)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def conv2d_(x, kernel, strides, padding, min_features, fold_narrow, batch_chunk):
  return _conv(x, kernel, strides, padding)


def _fwd(x, kernel, strides, padding, min_features, fold_narrow, batch_chunk):
  return _conv(x, kernel, strides, padding), (x, kernel)


def _bwd(strides, padding, min_features, fold_narrow, batch_chunk, res, dy):
  x, kernel = res
  _, vjp_x = jax.vjp(lambda a: _conv(a, kernel, strides, padding), x)
  dx, = vjp_x(dy)
  co = kernel.shape[-1]
  use = min_features > 0 and kernel.shape[0] * kernel.shape[1] > 1 and x.dtype == jnp.float32
  if use and (co >= min_features or fold_narrow):
    fold = 1 if co >= min_features else -(-min_features // co)
    dk = kernel_grad_folded(x, dy, kernel.shape, strides, padding, fold, batch_chunk)
  else:
    _, vjp_k = jax.vjp(lambda k: _conv(x, k, strides, padding), kernel)
    dk, = vjp_k(dy)
  return dx, dk.astype(kernel.dtype)


conv2d_.defvjp(_fwd, _bwd)


def conv2d(x, kernel, strides=(1, 1), padding=((1, 1), (1, 1)), min_features=32, fold_narrow=True,
           batch_chunk=16):
  return conv2d_(x, kernel, tuple(strides), tuple(tuple(p) for p in padding), min_features, fold_narrow,
                   batch_chunk)


class Conv(nn.Module):
  """flax.linen.Conv-compatible (2-D, NHWC, explicit or 'SAME'/'VALID' padding, no groups/dilation)."""
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Any = 'SAME'
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  min_features: int = 32
  fold_narrow: bool = True
  batch_chunk: int = 16

  @nn.compact
  def __call__(self, x):
    ks = tuple(self.kernel_size)
    strides = tuple(self.strides) if self.strides is not None else (1, 1)
    kernel = self.param('kernel', self.kernel_init, ks + (x.shape[-1], self.features), self.param_dtype)
    pad = self.padding
    if isinstance(pad, str):
      pad = lax.padtype_to_pads(x.shape[1:3], ks, strides, pad)
    pad = tuple(tuple(p) for p in pad)
    dtype = self.dtype or jnp.result_type(x, kernel)
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    y = self._convolve(x, kernel, strides, pad)
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,), self.param_dtype).astype(dtype)
    return y

  def _convolve(self, x, kernel, strides, padding):
    return conv2d(x, kernel, strides, padding, self.min_features, self.fold_narrow, self.batch_chunk)
