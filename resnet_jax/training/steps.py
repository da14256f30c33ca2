"""The pure train and eval steps: functions of (state, batch), jit-compiled once by the loop."""

from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from resnet_jax.training import optim
from resnet_jax.training.state import TrainState


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
               tx: optax.GradientTransformation, schedule: optim.Schedule,
               log_every: int) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD iteration on a global batch. Pure; compiled once with the state donated."""
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits, updates = model.apply({'params': params, 'batch_stats': state.batch_stats},
                                  batch['image'], train=True, mutable=['batch_stats'],
                                  rngs={'dropout': rng})
    loss = _cross_entropy(logits, batch['label']).mean()
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  error = jnp.mean(jnp.argmax(logits, -1) != batch['label'])
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

  lr = schedule(state.step, state.warmup_active)
  opt_state = optim.set_learning_rate(state.opt_state, lr)
  updates, opt_state = tx.update(grads, opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  # A non-finite step leaves the state as it was; the loop then stops the run.
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  params, batch_stats, opt_state = keep((params, batch_stats, opt_state),
                                        (state.params, state.batch_stats, state.opt_state))

  warmup_active = state.warmup_active
  if schedule.warmup_until_train_error > 0:
    warmup_active = warmup_active & (error >= schedule.warmup_until_train_error)
  fresh = (state.step % log_every) == 0
  sums = {k: jnp.where(fresh, 0.0, v) for k, v in state.metric_sums.items()}
  sums = {'loss': sums['loss'] + loss, 'error': sums['error'] + error, 'count': sums['count'] + 1}
  new_state = state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                            opt_state=opt_state, warmup_active=warmup_active, metric_sums=sums)
  return new_state, {'loss': loss, 'error': error, 'grad_norm': grad_norm,
                     'learning_rate': lr, 'finite': finite}


def train_steps(state: TrainState, batches, *, step_fn: Callable) -> tuple[TrainState, dict]:
  """`step_fn` (a `train_step` with its options bound) over k batches stacked on a
  leading axis, in one `lax.scan`: k SGD iterations in one dispatch.

  Returns the last step's metrics, except 'finite', which is True only if every
  step was finite (a non-finite step leaves the state unchanged, and the loop
  stops the run at the end of the chunk, before any checkpoint past it). The
  running sums in `state.metric_sums` restart at every multiple of log_every,
  as they do step by step, so the loop's logged averages are the same.
  """
  state, metrics = jax.lax.scan(step_fn, state, batches)
  last = jax.tree.map(lambda x: x[-1], metrics)
  return state, {**last, 'finite': jnp.all(metrics['finite'])}


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module) -> dict[str, jax.Array]:
  """Sums over the real (mask=True) examples of a padded batch; 10-crop batches average softmax scores."""
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  images = batch['image']
  if images.ndim == 5:  # [batch, crops, H, W, C]
    b, k = images.shape[:2]
    logits = model.apply(variables, images.reshape((b * k,) + images.shape[2:]), train=False)
    probs = jax.nn.softmax(logits).reshape(b, k, -1).mean(1)
    log_probs = jnp.log(jnp.maximum(probs, 1e-30))
  else:
    log_probs = jax.nn.log_softmax(model.apply(variables, images, train=False))
  labels, mask = batch['label'], batch['mask'].astype(jnp.float32)
  loss = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
  top5 = jax.lax.top_k(log_probs, min(5, log_probs.shape[-1]))[1]
  return {'loss': jnp.sum(loss * mask),
          'correct': jnp.sum((jnp.argmax(log_probs, -1) == labels) * mask),
          'correct_top5': jnp.sum(jnp.any(top5 == labels[:, None], -1) * mask),
          'count': jnp.sum(mask)}
