"""The paper's optimiser (SGD + momentum + L2) and its step-decay schedules.

All durations are converted to iterations here, in one place: the paper gives
the CIFAR schedule in iterations (0.1, /10 at 32k and 48k, stop at 64k) and
the ImageNet one in terms of the error plateau (here fixed epochs).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Learning-rate schedule in iterations, with the ResNet-110 warm-up."""
  base_learning_rate: float
  boundaries: tuple[int, ...]
  decay_factor: float
  warmup_steps: int
  warmup_learning_rate: float
  warmup_until_train_error: float  # > 0: warm up until a batch's error < this

  def __call__(self, step: jax.Array, warmup_active: jax.Array | bool = True) -> jax.Array:
    """The learning rate for iteration `step` (0-based)."""
    step = jnp.asarray(step)
    decays = sum((step >= b).astype(jnp.int32) for b in self.boundaries) if self.boundaries else 0
    lr = self.base_learning_rate * jnp.power(self.decay_factor, decays)
    if self.warmup_until_train_error > 0:
      in_warmup = jnp.asarray(warmup_active)
    else:
      in_warmup = step < self.warmup_steps
    return jnp.where(in_warmup, self.warmup_learning_rate, lr).astype(jnp.float32)


def _epochs_to_steps(epochs: float, steps_per_epoch: int) -> int:
  return int(round(epochs * steps_per_epoch))


def num_train_steps(config, steps_per_epoch: int) -> int:
  """`config.num_train_steps`, or `config.num_epochs` converted to iterations."""
  if (config.num_train_steps > 0) == (config.num_epochs > 0):
    raise ValueError('Give exactly one of num_train_steps and num_epochs as a positive number '
                     f'(got num_train_steps={config.num_train_steps}, num_epochs={config.num_epochs}).')
  steps = (config.num_train_steps if config.num_train_steps > 0
           else _epochs_to_steps(config.num_epochs, steps_per_epoch))
  if steps <= 0:
    raise ValueError(f'The run has {steps} training steps (num_epochs={config.num_epochs} x '
                     f'{steps_per_epoch} steps per epoch); increase num_epochs or set num_train_steps.')
  return steps


def base_learning_rate(config) -> float:
  """The peak learning rate, scaled linearly with the batch when given per 256 examples."""
  if config.learning_rate_per_256:
    return config.learning_rate * config.batch_size / 256
  return config.learning_rate


def create_schedule(config, steps_per_epoch: int) -> Schedule:
  if config.lr_boundaries_steps and config.lr_boundaries_epochs:
    raise ValueError('Give the learning-rate boundaries either in steps (lr_boundaries_steps) '
                     'or in epochs (lr_boundaries_epochs), not both.')
  boundaries = tuple(int(b) for b in config.lr_boundaries_steps) or tuple(
      _epochs_to_steps(e, steps_per_epoch) for e in config.lr_boundaries_epochs)
  warmup_lr = config.warmup_learning_rate
  if config.learning_rate_per_256:
    warmup_lr = warmup_lr * config.batch_size / 256
  return Schedule(base_learning_rate=base_learning_rate(config), boundaries=boundaries,
                  decay_factor=config.lr_decay_factor, warmup_steps=config.warmup_steps,
                  warmup_learning_rate=warmup_lr,
                  warmup_until_train_error=config.warmup_until_train_error)


def check_config(config) -> None:
  """Refuses optimiser settings that make no sense, naming the key."""
  checks = (
      ('learning_rate', config.learning_rate > 0, 'a positive number (the paper: 0.1)'),
      ('warmup_learning_rate', config.warmup_learning_rate > 0 or not config.warmup_steps,
       'a positive number (the paper: 0.01)'),
      ('momentum', 0 <= config.momentum < 1, 'in [0, 1) (the paper: 0.9)'),
      ('weight_decay', config.weight_decay >= 0, '>= 0 (the paper: 1e-4)'),
      ('lr_decay_factor', 0 < config.lr_decay_factor <= 1, 'in (0, 1] (the paper: 0.1)'),
      ('warmup_steps', config.warmup_steps >= 0, '>= 0'),
      ('warmup_until_train_error', config.warmup_until_train_error >= 0,
       '>= 0 (a fraction: 0.8 ends the warm-up once a batch error is below 80%)'),
  )
  for key, ok, want in checks:
    if not ok:
      raise ValueError(f'config.{key}={config[key]!r} must be {want}.')


def _decay_mask(params: Any) -> Any:
  """True for convolution and dense kernels; False for BN scales/offsets and biases."""
  flat = traverse_util.flatten_dict(params)
  return traverse_util.unflatten_dict({k: k[-1] == 'kernel' for k in flat})


def create_optimizer(config) -> optax.GradientTransformation:
  """SGD with momentum and L2 weight decay, as PyTorch/Caffe implement it.

  The decay is added to the gradient before the momentum (L2 regularisation,
  the paper's "weight decay"). The learning rate is an injected
  hyperparameter: `train_step` sets it every iteration from the `Schedule`, so
  it lives in the optimiser state and is checkpointed with it.
  """
  def sgd(learning_rate):
    mask = None if config.weight_decay_on_bn_and_bias else _decay_mask
    return optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=mask),
        optax.sgd(learning_rate, momentum=config.momentum or None, nesterov=config.nesterov),
    )
  return optax.inject_hyperparams(sgd)(learning_rate=base_learning_rate(config))


def set_learning_rate(opt_state: Any, learning_rate: jax.Array) -> Any:
  """`opt_state` of `create_optimizer` with its learning rate replaced."""
  hyperparams = dict(opt_state.hyperparams, learning_rate=learning_rate)
  return opt_state._replace(hyperparams=hyperparams)

