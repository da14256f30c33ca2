"""The public model API: list, create, and pure `init`/`apply` functions."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_jax import models

Variables = dict[str, Any]


def list_models() -> list[str]:
  """Names of every network of the paper that `create_model` builds."""
  return list(models.MODELS)


def check_model_name(name: str) -> None:
  if name not in models.MODELS:
    raise ValueError(f'Unknown model {name!r}. Valid names: {", ".join(list_models())}.')


def create_model(name: str, **overrides) -> nn.Module:
  """The named network as a `flax.linen.Module`.

  `overrides` are `models.ResNet` attributes, e.g. `shortcut='C'`,
  `dtype=jnp.bfloat16` (or 'bfloat16'), `num_classes=100`, `scan_blocks=True`,
  `conv=` one of `CONV_CHOICES` (see `resolve_conv`; the default is 'xla').
  """
  check_model_name(name)
  if isinstance(overrides.get('dtype'), str):
    overrides['dtype'] = jnp.dtype(overrides['dtype'])
  if isinstance(overrides.get('conv'), str):
    overrides['conv'], _ = resolve_conv(overrides['conv'], overrides.get('dtype', jnp.float32))
  return models.MODELS[name](**overrides)


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
    from resnet_jax import cpu_conv  # pylint: disable=g-import-not-at-top
    return cpu_conv.Conv, 'XLA with the transpose-free kernel gradient (cpu_kgrad)'
  from resnet_jax import onednn  # pylint: disable=g-import-not-at-top
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
  default_shape = models.default_input_shape(name)

  def init_fn(rng: jax.Array, input_shape: tuple[int, ...] | None = None) -> Variables:
    shape = tuple(input_shape) if input_shape is not None else default_shape
    return dict(model.init(rng, jnp.zeros(shape, jnp.float32), train=False))

  def apply_fn(variables: Variables, images: jax.Array, train: bool = False):
    if train:
      logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])
      return logits, updates['batch_stats']
    return model.apply(variables, images, train=False)

  return init_fn, apply_fn
