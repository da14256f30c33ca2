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
  `conv='cpu_kgrad'` (a convolution that trains faster on CPU).
  """
  check_model_name(name)
  if isinstance(overrides.get('dtype'), str):
    overrides['dtype'] = jnp.dtype(overrides['dtype'])
  if isinstance(overrides.get('conv'), str):
    overrides['conv'] = _conv_module(overrides['conv'])
  return models.MODELS[name](**overrides)


def _conv_module(name: str) -> type[nn.Module]:
  if name == 'xla':
    return nn.Conv
  if name == 'cpu_kgrad':
    from resnet_jax import cpu_conv  # pylint: disable=g-import-not-at-top
    return cpu_conv.Conv
  raise ValueError(f"Unknown conv {name!r}; use 'xla' (flax.linen.Conv) or 'cpu_kgrad'.")


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
