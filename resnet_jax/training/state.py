"""The train state: everything a run needs to continue, as one pytree."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from resnet_jax import models


@flax.struct.dataclass
class TrainState:
  step: jax.Array            # iterations done
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array             # raw PRNG key; the step's key is fold_in(rng, step)
  warmup_active: jax.Array   # ResNet-110 warm-up still on (error-based warm-up)
  metric_sums: dict[str, jax.Array]  # running sums since the last logged step


METRIC_KEYS = ('loss', 'error', 'count')


def create_model(config, num_classes: int) -> nn.Module:
  """The network of an experiment config (see `models.from_config`)."""
  return models.from_config(config.model, num_classes)


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       image_shape: tuple[int, ...], seed: int) -> TrainState:
  rng = jax.random.PRNGKey(seed)
  init_rng, state_rng = jax.random.split(rng)
  variables = model.init(init_rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  params = variables['params']
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=variables['batch_stats'],
      opt_state=tx.init(params), rng=state_rng, warmup_active=jnp.ones((), jnp.bool_),
      metric_sums={k: jnp.zeros((), jnp.float32) for k in METRIC_KEYS})
