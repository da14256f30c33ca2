"""The named networks of the paper (presets), and the public model API: list,
create, and pure `init`/`apply` functions."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax.models.resnet import BasicBlock, BottleneckBlock, ResNet

Variables = dict[str, Any]


# --- Presets -----------------------------------------------------------------

CIFAR_DEPTHS = (20, 32, 44, 56, 110, 1202)
CIFAR_PLAIN_DEPTHS = (20, 32, 44, 56, 110)
IMAGENET_STAGES = {
    18: ((2, 2, 2, 2), BasicBlock),
    34: ((3, 4, 6, 3), BasicBlock),
    50: ((3, 4, 6, 3), BottleneckBlock),
    101: ((3, 4, 23, 3), BottleneckBlock),
    152: ((3, 8, 36, 3), BottleneckBlock),
}


def cifar_resnet(depth: int, residual: bool = True, **kwargs) -> ResNet:
  """A CIFAR network of depth 6n+2 (Section 4.2): n basic blocks per stage."""
  if depth < 8 or (depth - 2) % 6:
    valid = ', '.join(str(d) for d in CIFAR_DEPTHS)
    raise ValueError(f'A CIFAR ResNet has 6n+2 layers (n >= 1); depth {depth} is not of '
                     f'that form. The paper uses {valid}.')
  n = (depth - 2) // 6
  kwargs.setdefault('shortcut', 'A')
  return ResNet(stage_sizes=(n, n, n), block_cls=BasicBlock, stem='cifar', width=16,
                num_classes=kwargs.pop('num_classes', 10), residual=residual, **kwargs)


def imagenet_resnet(depth: int, residual: bool = True, **kwargs) -> ResNet:
  """An ImageNet network of Table 1 (depth 18, 34, 50, 101 or 152)."""
  if depth not in IMAGENET_STAGES:
    raise ValueError(f'ImageNet depths are {sorted(IMAGENET_STAGES)}; got {depth}.')
  stages, block_cls = IMAGENET_STAGES[depth]
  kwargs.setdefault('shortcut', 'B')
  return ResNet(stage_sizes=stages, block_cls=block_cls, stem='imagenet', width=64,
                num_classes=kwargs.pop('num_classes', 1000), residual=residual, **kwargs)


def _registry() -> dict[str, Callable[..., ResNet]]:
  models = {}
  for d in CIFAR_DEPTHS:
    models[f'cifar_resnet{d}'] = functools.partial(cifar_resnet, d)
  for d in CIFAR_PLAIN_DEPTHS:
    models[f'cifar_plain{d}'] = functools.partial(cifar_resnet, d, residual=False)
  for d in IMAGENET_STAGES:
    models[f'resnet{d}'] = functools.partial(imagenet_resnet, d)
  for d in (18, 34):
    models[f'plain{d}'] = functools.partial(imagenet_resnet, d, residual=False)
  return models


MODELS = _registry()


def family(name: str) -> str:
  """'cifar' or 'imagenet': which input size and stem the named model has."""
  return 'cifar' if name.startswith('cifar_') else 'imagenet'


def default_input_shape(name: str, batch: int = 1) -> tuple[int, int, int, int]:
  return (batch, 32, 32, 3) if family(name) == 'cifar' else (batch, 224, 224, 3)


def unroll_scanned(variables: dict[str, Any]) -> dict[str, Any]:
  """Variables of a `scan_blocks=True` model in the layout of the unrolled model.

  The scanned model stores blocks 2..n of stage i stacked along a leading axis
  under 'stage{i}_scan/block'; the unrolled model names them
  'stage{i}_block2' ... 'stage{i}_block{n}'. Both compute the same function.
  """
  out = {}
  for collection, tree in variables.items():
    new = {}
    for key, value in tree.items():
      if key.endswith('_scan'):
        stage = key[:-len('_scan')]
        stacked = value['block']
        length = jax.tree.leaves(stacked)[0].shape[0]
        for j in range(length):
          new[f'{stage}_block{j + 2}'] = jax.tree.map(lambda a, j=j: a[j], stacked)
      else:
        new[key] = value
    out[collection] = new
  return out


def list_models() -> list[str]:
  """Names of every network of the paper that `create_model` builds."""
  return list(MODELS)


def check_model_name(name: str) -> None:
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}. Valid names: {", ".join(list_models())}.')


DTYPES = ('float32', 'bfloat16', 'float64')  # float64: exact comparisons on the CPU


def check_dtype(dtype: Any) -> None:
  """Refuses a compute dtype this project does not build networks in."""
  try:
    name = jnp.dtype(dtype).name
  except TypeError:
    name = None
  if name not in DTYPES:
    raise ValueError(f'model.dtype={dtype!r} is not a compute dtype; use one of '
                     f'{", ".join(map(repr, DTYPES))}.')


def create_model(name: str, **overrides) -> nn.Module:
  """The named network as a `flax.linen.Module`.

  `overrides` are `models.ResNet` attributes, e.g. `shortcut='C'`,
  `dtype=jnp.bfloat16` (or 'bfloat16'), `num_classes=100`, `scan_blocks=True`,
  `conv=` one of `CONV_CHOICES` (see `resolve_conv`; the default is 'xla').
  """
  check_model_name(name)
  if 'dtype' in overrides:
    check_dtype(overrides['dtype'])
  if isinstance(overrides.get('dtype'), str):
    overrides['dtype'] = jnp.dtype(overrides['dtype'])
  if isinstance(overrides.get('conv'), str):
    overrides['conv'], _ = resolve_conv(overrides['conv'], overrides.get('dtype', jnp.float32))
  return MODELS[name](**overrides)


def from_config(model_config, num_classes: int) -> nn.Module:
  """The network an experiment config's `model` section describes."""
  m = model_config
  return create_model(
      m.name, shortcut=m.shortcut, dtype=m.dtype, bn_momentum=m.bn_momentum,
      bn_epsilon=m.bn_epsilon, ghost_batch_size=m.ghost_batch_size,
      zero_init_last_bn=m.zero_init_last_bn, stride_on_3x3=m.stride_on_3x3,
      scan_blocks=m.scan_blocks, remat=m.remat, conv=m.conv, num_classes=num_classes)


CONV_CHOICES = ('auto', 'xla', 'onednn', 'cpu_kgrad')


def resolve_conv(name: str, dtype: Any = jnp.float32) -> tuple[type[nn.Module], str]:
  """The convolution module for `model.conv` and a line saying what runs.

  'xla': flax.linen.Conv and BatchNorm, compiled by XLA (any backend).
  'onednn': oneDNN convolutions and training-mode BatchNorm inside the jitted
    step (resnet_jax/onednn.py; float32 on one CPU device; 2.5-3x XLA:CPU).
  'auto': 'onednn' where it can run (float32, one CPU device, library built),
    else 'xla'.
  'cpu_kgrad': XLA with a transpose-free kernel gradient (cpu_conv.py).
  """
  if name not in CONV_CHOICES:
    raise ValueError(f'Unknown conv {name!r}; use one of {", ".join(map(repr, CONV_CHOICES))}.')
  if name == 'xla':
    return nn.Conv, 'XLA'
  if name == 'cpu_kgrad':
    from resnet_jax.kernels import cpu_conv  # pylint: disable=g-import-not-at-top
    return cpu_conv.Conv, 'XLA with the transpose-free kernel gradient (cpu_kgrad)'
  from resnet_jax.kernels import onednn  # pylint: disable=g-import-not-at-top
  why_not = onednn.why_not_usable(dtype)
  if why_not is None:
    return onednn.Conv, 'oneDNN convolutions and BatchNorm'
  if name == 'onednn':
    raise ValueError(f"model.conv='onednn' cannot run here: {why_not}. Use conv='auto' "
                     "(oneDNN where it can run, else XLA) or conv='xla'.")
  return nn.Conv, f'XLA (oneDNN not used: {why_not})'


def functional(name: str, **overrides) -> tuple[Callable, Callable]:
  """Pure `(init_fn, apply_fn)` for the named network; both are jit-able.

    init_fn(rng, input_shape=None) -> variables          # {'params', 'batch_stats'}
    apply_fn(variables, images) -> logits                # inference, running BN statistics
    apply_fn(variables, images, train=True) -> (logits, new_batch_stats)

  `input_shape` defaults to one image of the family's size (32x32x3 for the
  CIFAR nets, 224x224x3 for the ImageNet nets).
  """
  model = create_model(name, **overrides)
  default_shape = default_input_shape(name)

  def init_fn(rng: jax.Array, input_shape: tuple[int, ...] | None = None) -> Variables:
    shape = tuple(input_shape) if input_shape is not None else default_shape
    return dict(model.init(rng, jnp.zeros(shape, jnp.float32), train=False))

  def apply_fn(variables: Variables, images: jax.Array, train: bool = False):
    if train:
      logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
      return logits, updates['batch_stats']
    return model.apply(variables, images, train=False)

  return init_fn, apply_fn
