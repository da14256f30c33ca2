"""Device-resident input (data/device.py): the same batches as the host pipeline."""

import jax
import numpy as np
import pytest

from resnet_jax import configs, data
from resnet_jax.data import device


def _config(**data_overrides):
  config = configs.digits('cifar_resnet20', batch_size=16)
  config.data.update(data_overrides)
  return config


@pytest.mark.parametrize('augment', [True, False])
def test_device_batches_are_the_host_pipelines(augment):
  source = data.create_data_source(_config(augment=augment), process_index=0, process_count=1,
                                   num_devices=1)
  inputs = device.DeviceInput(source)
  arrays = inputs.device_arrays(jax.devices()[0])
  make = jax.jit(lambda a, p: device.make_batch(a, p, pad=inputs.pad, augment=inputs.augment))
  last = source.steps_per_epoch - 1
  steps = [0, 1, last, last + 1]  # across an epoch boundary: a new permutation
  params = inputs.train_params(0)
  by_step = {}
  for step in range(last + 2):
    p = next(params)
    if step in steps:
      by_step[step] = p
  for step in steps:
    np.testing.assert_array_equal(by_step[step]['index'], inputs.step_params(step)['index'])
    host = source.train_batch(step)
    dev = jax.device_get(make(arrays, by_step[step]))
    np.testing.assert_array_equal(dev['label'], host['label'])
    np.testing.assert_allclose(dev['image'], host['image'], rtol=0, atol=1e-5)
  if augment:  # the crops and flips did something
    assert not np.allclose(host['image'], source.normalize(
        source.train_arrays[0][inputs.step_params(steps[-1])['index']]))


def test_device_input_needs_an_in_memory_source():
  config = _config(source='synthetic', dataset='cifar10')
  source = data.create_data_source(config, process_index=0, process_count=1, num_devices=1)
  with pytest.raises(data.DataError, match='device_input=True needs a dataset held in memory'):
    device.DeviceInput(source)
