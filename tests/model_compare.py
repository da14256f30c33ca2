"""Shared by the tests that check an alternative convolution trains like nn.Conv."""

import jax
import optax


def train_loss_and_grads(model, variables, x, y):
  """((loss, BN updates), parameter gradients) of one jit-compiled training batch."""
  def loss(params):
    logits, updates = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                                  train=True, mutable=['batch_stats'])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates
  return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
