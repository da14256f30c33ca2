"""The residual and plain networks of He et al. (2016), in Flax Linen.

One parameterised `ResNet` module covers every network of the paper: the CIFAR
family (6n+2 layers, 3x3 stem, three stages of 16/32/64 filters) and the
ImageNet family (7x7/2 stem + 3x3/2 max pool, four stages of 64..512 base
filters, basic or bottleneck blocks). The named presets (`cifar_resnet20`,
`resnet50`, `plain34`, ...) are `functools.partial`s of it.

Faithfulness notes (see PAPER.md):
- "v1" blocks: conv -> BN -> ReLU, ..., conv -> BN, add the shortcut, ReLU.
- Explicit symmetric padding as in the reference Caffe/Torch code: 3x3 convs
  pad 1 on every side (also at stride 2), the 7x7 stem pads 3, the max pool
  pads 1. Flax's 'SAME' would pad asymmetrically at stride 2.
- He (fan-in, normal) initialisation of every convolution.
- Shortcuts: 'A' subsample + zero-pad channels (no parameters), 'B' 1x1
  projection + BN only where the shape changes, 'C' projection everywhere.
- Bottleneck stride on the first 1x1 conv (v1); `stride_on_3x3=True` gives v1.5.

Every block sows the response of each conv after its BN (before the ReLU or
the addition) into the 'intermediates' collection; that is the quantity of the
paper's Fig. 7. The stem, stage outputs and pre-logits features are sown too.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any
Dtype = Any

# He et al. (2015) "MSRA" initialisation: N(0, 2 / fan_in).
he_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')


def _pad(kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
  p = (kernel - 1) // 2
  return ((p, p), (p, p))


class GhostBatchNorm(nn.Module):
  """BatchNorm whose training statistics come from groups of `group_size` examples.

  Reproduces the paper's per-GPU BN (statistics over 64 images when a batch of
  128 is split over 2 GPUs) on any number of devices. Parameter and statistic
  names match `nn.BatchNorm`, so checkpoints are interchangeable. The running
  averages are updated with the mean of the groups' statistics. `group_size=0`
  is ordinary BatchNorm over the whole batch.
  """
  group_size: int = 0
  use_running_average: bool = False
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  scale_init: Callable = nn.initializers.ones
  bias_init: Callable = nn.initializers.zeros

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = self.param('scale', self.scale_init, (features,), self.param_dtype)
    bias = self.param('bias', self.bias_init, (features,), self.param_dtype)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32))
    if self.use_running_average:
      y = (x.astype(jnp.float32) - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
      return (y * scale + bias).astype(self.dtype or x.dtype)
    y, mean, var = self.normalize_batch(x, scale, bias)
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * mean
      ra_var.value = m * ra_var.value + (1 - m) * var
    return y.astype(self.dtype or x.dtype)

  def normalize_batch(self, x, scale, bias):
    """(normalised x in float32, mean, biased variance), the statistics averaged over groups."""
    n = x.shape[0]
    group = self.group_size or n
    if n % group:
      raise ValueError(f'Batch of {n} examples does not split into ghost batches of '
                       f'{group}; make model.ghost_batch_size divide the batch.')
    xf = x.reshape((n // group, group) + x.shape[1:]).astype(jnp.float32)
    axes = tuple(range(1, xf.ndim - 1))
    mean = xf.mean(axes, keepdims=True)
    var = jnp.maximum((xf * xf).mean(axes, keepdims=True) - mean * mean, 0.0)
    y = (xf - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    features = x.shape[-1]
    return (y.reshape(x.shape), mean.reshape(-1, features).mean(0),
            var.reshape(-1, features).mean(0))


class Shortcut(nn.Module):
  """The shortcut of a residual block: identity, option A, or a projection."""
  features: int
  strides: int
  option: str
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x):
    in_features = x.shape[-1]
    reshape = self.strides != 1 or in_features != self.features
    if self.option == 'C' or (self.option == 'B' and reshape):
      x = self.conv(self.features, (1, 1), (self.strides, self.strides),
                    padding=((0, 0), (0, 0)), name='proj_conv')(x)
      return self.norm(name='proj_bn')(x)
    if not reshape:
      return x
    if self.option not in ('A', 'B'):
      raise ValueError(f"Unknown shortcut option {self.option!r}; use 'A', 'B' or 'C'.")
    # Option A: subsample spatially and pad the new channels with zeros,
    # split between both ends as in the widely used Torch/PyTorch code.
    x = x[:, ::self.strides, ::self.strides, :]
    extra = self.features - in_features
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class BasicBlock(nn.Module):
  """Two 3x3 convolutions (ResNet-18/34 and the CIFAR nets)."""
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  shortcut: str = 'A'
  residual: bool = True
  zero_init_last_bn: bool = False
  stride_on_3x3: bool = True  # unused: both convs are 3x3
  expansion = 1

  @nn.compact
  def __call__(self, x):
    s = (self.strides, self.strides)
    y = self.conv(self.features, (3, 3), s, padding=_pad(3), name='conv1')(x)
    y = self.norm(name='bn1')(y)
    self.sow('intermediates', 'conv1_response', y)
    y = nn.relu(y)
    y = self.conv(self.features, (3, 3), (1, 1), padding=_pad(3), name='conv2')(y)
    last_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
    y = self.norm(name='bn2', scale_init=last_init)(y)
    self.sow('intermediates', 'conv2_response', y)
    if self.residual:
      y = y + Shortcut(self.features, self.strides, self.shortcut, self.conv, self.norm,
                       name='shortcut')(x)
    return nn.relu(y)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3, 1x1 expand (x4) (ResNet-50/101/152)."""
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  shortcut: str = 'B'
  residual: bool = True
  zero_init_last_bn: bool = False
  stride_on_3x3: bool = False
  expansion = 4

  @nn.compact
  def __call__(self, x):
    s1, s3 = (1, self.strides) if self.stride_on_3x3 else (self.strides, 1)
    y = self.conv(self.features, (1, 1), (s1, s1), padding=_pad(1), name='conv1')(x)
    y = self.norm(name='bn1')(y)
    self.sow('intermediates', 'conv1_response', y)
    y = nn.relu(y)
    y = self.conv(self.features, (3, 3), (s3, s3), padding=_pad(3), name='conv2')(y)
    y = self.norm(name='bn2')(y)
    self.sow('intermediates', 'conv2_response', y)
    y = nn.relu(y)
    out = self.features * self.expansion
    y = self.conv(out, (1, 1), (1, 1), padding=_pad(1), name='conv3')(y)
    last_init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
    y = self.norm(name='bn3', scale_init=last_init)(y)
    self.sow('intermediates', 'conv3_response', y)
    if self.residual:
      y = y + Shortcut(out, self.strides, self.shortcut, self.conv, self.norm,
                       name='shortcut')(x)
    return nn.relu(y)


class _ScanBody(nn.Module):
  """Adapts a block to `nn.scan`'s (carry, input) -> (carry, output) signature."""
  block: ModuleDef

  @nn.compact
  def __call__(self, x, _):
    return self.block(name='block')(x), None


class ResNet(nn.Module):
  """A residual (or plain) network of the paper.

  Attributes:
    stage_sizes: blocks per stage, e.g. (3, 3, 3) for CIFAR ResNet-20.
    block_cls: `BasicBlock` or `BottleneckBlock`.
    stem: 'cifar' (3x3 conv, 16 filters) or 'imagenet' (7x7/2 conv + 3x3/2 max pool).
    width: filters of the first stage; doubled at each later stage.
    num_classes: outputs of the final dense layer.
    shortcut: 'A', 'B' or 'C' (ignored when `residual` is False).
    residual: False builds the plain counterpart (no shortcuts, no addition).
    stride_on_3x3: bottleneck stride on the 3x3 conv (v1.5) instead of the first 1x1.
    zero_init_last_bn: initialise the last BN scale of each block to zero.
    bn_momentum, bn_epsilon: BatchNorm running-average momentum and epsilon.
    ghost_batch_size: BN statistics over groups of this many examples (0: whole batch).
    dtype: compute dtype; parameters and BN statistics are always float32.
    scan_blocks: run the identical blocks 2..n of each stage with `nn.scan`
      (same function, much faster compile for deep nets; parameters stacked).
    remat: rematerialise each block's activations in the backward pass.
    conv: the convolution module (a `flax.linen.Conv`-compatible class).
  """
  stage_sizes: Sequence[int]
  block_cls: ModuleDef
  stem: str = 'cifar'
  width: int = 16
  num_classes: int = 10
  shortcut: str = 'A'
  residual: bool = True
  stride_on_3x3: bool = False
  zero_init_last_bn: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  ghost_batch_size: int = 0
  dtype: Dtype = jnp.float32
  scan_blocks: bool = False
  remat: bool = False
  conv: ModuleDef = nn.Conv

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.shortcut not in ('A', 'B', 'C'):
      raise ValueError(f"Unknown shortcut option {self.shortcut!r}; use 'A', 'B' or 'C'.")
    conv = functools.partial(self.conv, use_bias=False, kernel_init=he_normal,
                             dtype=self.dtype, param_dtype=jnp.float32)
    # Training-mode BN in the convolution's library where it has one (oneDNN).
    train_norm = getattr(self.conv, 'train_batch_norm', GhostBatchNorm)
    if train and (self.ghost_batch_size or train_norm is not GhostBatchNorm):
      norm = functools.partial(train_norm, group_size=self.ghost_batch_size,
                               use_running_average=False, momentum=self.bn_momentum,
                               epsilon=self.bn_epsilon, dtype=self.dtype)
    else:
      norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                               momentum=self.bn_momentum, epsilon=self.bn_epsilon,
                               dtype=self.dtype, param_dtype=jnp.float32)

    x = jnp.asarray(x, self.dtype)
    if self.stem == 'cifar':
      x = conv(self.width, (3, 3), (1, 1), padding=_pad(3), name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
    elif self.stem == 'imagenet':
      x = conv(self.width, (7, 7), (2, 2), padding=_pad(7), name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      raise ValueError(f"Unknown stem {self.stem!r}; use 'cifar' or 'imagenet'.")
    self.sow('intermediates', 'stem', x)

    block_cls = nn.remat(self.block_cls) if self.remat else self.block_cls
    block = functools.partial(block_cls, conv=conv, norm=norm, shortcut=self.shortcut,
                              residual=self.residual, stride_on_3x3=self.stride_on_3x3,
                              zero_init_last_bn=self.zero_init_last_bn)
    for i, num_blocks in enumerate(self.stage_sizes):
      features = self.width * 2**i
      strides = 1 if i == 0 else 2
      x = block(features, strides, name=f'stage{i + 1}_block1')(x)
      if self.scan_blocks and num_blocks > 2:
        body = functools.partial(_ScanBody, block=functools.partial(block, features, 1))
        scanned = nn.scan(body, variable_axes={'params': 0, 'batch_stats': 0, 'intermediates': 0},
                          split_rngs={'params': True}, length=num_blocks - 1)
        x, _ = scanned(name=f'stage{i + 1}_scan')(x, None)
      else:
        for j in range(1, num_blocks):
          x = block(features, 1, name=f'stage{i + 1}_block{j + 1}')(x)
      self.sow('intermediates', f'stage{i + 1}', x)

    x = jnp.mean(x, axis=(1, 2))
    self.sow('intermediates', 'pre_logits', x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32, name='head')(x)
    return jnp.asarray(x, jnp.float32)
