"""The paper's optimiser and schedules, at the paper's boundaries."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import configs
from resnet_jax.training import optim


def _lr(schedule, step, warmup_active=True):
  return float(schedule(jnp.asarray(step), jnp.asarray(warmup_active)))


def test_resnet110_schedule_at_the_paper_boundaries():
  config = configs.cifar('cifar_resnet110', warmup_steps=400)
  schedule = optim.create_schedule(config, steps_per_epoch=45_000 // 128)
  expected = {0: 0.01, 399: 0.01, 400: 0.1, 31_999: 0.1, 32_000: 0.01, 47_999: 0.01,
              48_000: 0.001, 63_999: 0.001}
  for step, lr in expected.items():
    assert _lr(schedule, step) == pytest.approx(lr, rel=1e-6), step
  assert optim.num_train_steps(config, 351) == 64_000


def test_other_cifar_nets_have_no_warmup():
  schedule = optim.create_schedule(configs.cifar('cifar_resnet56'), steps_per_epoch=351)
  expected = {0: 0.1, 399: 0.1, 400: 0.1, 31_999: 0.1, 32_000: 0.01, 48_000: 0.001}
  for step, lr in expected.items():
    assert _lr(schedule, step) == pytest.approx(lr, rel=1e-6), step


def test_error_based_warmup_follows_the_flag_not_the_step():
  config = configs.cifar('cifar_resnet110', warmup_until_train_error=0.8)
  schedule = optim.create_schedule(config, 351)
  assert _lr(schedule, 1000, warmup_active=True) == pytest.approx(0.01)
  assert _lr(schedule, 5, warmup_active=False) == pytest.approx(0.1)


def test_imagenet_epochs_convert_to_iterations_in_one_place():
  config = configs.imagenet('resnet50')
  steps_per_epoch = 1_281_167 // 256
  assert optim.num_train_steps(config, steps_per_epoch) == 90 * steps_per_epoch
  schedule = optim.create_schedule(config, steps_per_epoch)
  assert schedule.boundaries == (30 * steps_per_epoch, 60 * steps_per_epoch)
  assert _lr(schedule, 30 * steps_per_epoch - 1) == pytest.approx(0.1)
  assert _lr(schedule, 30 * steps_per_epoch) == pytest.approx(0.01)


def test_learning_rate_per_256_scales_with_the_batch():
  config = configs.imagenet('resnet50', batch_size=1024, learning_rate_per_256=True)
  assert optim.base_learning_rate(config) == pytest.approx(0.4)


def test_zero_steps_and_conflicting_durations_are_clear_errors():
  config = configs.cifar('cifar_resnet20', num_train_steps=-1, num_epochs=0.001)
  with pytest.raises(ValueError, match='0 training steps'):
    optim.num_train_steps(config, steps_per_epoch=100)
  config = configs.cifar('cifar_resnet20', num_epochs=10.0)
  with pytest.raises(ValueError, match='exactly one'):
    optim.num_train_steps(config, steps_per_epoch=100)


def _two_steps(config, params, grads):
  tx = optim.create_optimizer(config)
  state = tx.init(params)
  for g in grads:
    state = optim.set_learning_rate(state, jnp.float32(0.5))
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_sgd_matches_pytorch_semantics_with_l2_before_momentum():
  config = configs.cifar('cifar_resnet20')
  params = {'conv': {'kernel': jnp.array([1.0, -2.0])}, 'bn': {'scale': jnp.array([3.0])}}
  grads = [jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)] * 2
  got = _two_steps(config, params, grads)
  lr, m, wd = 0.5, 0.9, 1e-4
  for path in (('conv', 'kernel'), ('bn', 'scale')):
    p = np.asarray(params[path[0]][path[1]], np.float64)
    buf = 0.1 + wd * p            # torch.optim.SGD: d_p = g + wd * p; buf = d_p
    p = p - lr * buf
    buf = m * buf + 0.1 + wd * p  # buf = m * buf + d_p
    p = p - lr * buf
    np.testing.assert_allclose(got[path[0]][path[1]], p, rtol=1e-6)


def test_weight_decay_mask_excludes_bn_and_biases_when_asked():
  config = configs.cifar('cifar_resnet20', weight_decay=0.1, weight_decay_on_bn_and_bias=False)
  params = {'conv': {'kernel': jnp.ones(2)}, 'bn': {'scale': jnp.ones(1), 'bias': jnp.ones(1)}}
  zero = [jax.tree.map(jnp.zeros_like, params)]
  got = _two_steps(config, params, zero)
  assert float(got['conv']['kernel'][0]) < 1.0
  assert float(got['bn']['scale'][0]) == 1.0 and float(got['bn']['bias'][0]) == 1.0


def test_nesterov_changes_the_update():
  params = {'k': {'kernel': jnp.ones(1)}}
  grads = [{'k': {'kernel': jnp.ones(1)}}] * 2
  plain = _two_steps(configs.cifar('cifar_resnet20'), params, grads)
  nesterov = _two_steps(configs.cifar('cifar_resnet20', nesterov=True), params, grads)
  assert not np.allclose(plain['k']['kernel'], nesterov['k']['kernel'])
