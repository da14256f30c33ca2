"""Fixtures shared by several test modules."""

import os

import jax
import numpy as np
from jax.experimental.compilation_cache import compilation_cache

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment_config(name: str, **overrides):
  """`experiments/<name>.py`'s config (as the command line loads it) with `overrides`."""
  from resnet_jax import configs  # pylint: disable=g-import-not-at-top
  config = configs.load(name)
  config.update(overrides)
  return config


def digits_config(settings: dict, **overrides):
  """The digits ResNet-20 config with dotted-key `settings` and `overrides` applied."""
  from resnet_jax import configs  # pylint: disable=g-import-not-at-top
  c = configs.digits('cifar_resnet20')
  for key, value in {**settings, **overrides}.items():
    *parents, leaf = key.split('.')
    node = c
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


@pytest.fixture(scope='module')
def jax_cache(tmp_path_factory):
  """A persistent compilation cache shared by this module's runs, in and out of process."""
  path = str(tmp_path_factory.mktemp('jax_cache'))
  names = ('jax_compilation_cache_dir', 'jax_persistent_cache_min_compile_time_secs',
           'jax_persistent_cache_min_entry_size_bytes')
  saved = {n: getattr(jax.config, n) for n in names}
  for name, value in zip(names, (path, 0.0, 0)):
    jax.config.update(name, value)
  compilation_cache.reset_cache()
  yield {n.upper(): str(v) for n, v in zip(names, (path, 0, 0))}
  for name, value in saved.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@pytest.fixture(scope='session')
def short_digits_run(tmp_path_factory):
  """(workdir, result) of a 4-step digits ResNet-20 run: a finished run's files, in seconds."""
  from resnet_jax.training import loop  # pylint: disable=g-import-not-at-top
  config = experiment_config('digits_resnet20', num_train_steps=4, batch_size=16,
                             eval_every_steps=4, checkpoint_every_steps=4, log_every_steps=2,
                             progress_bar=False)
  config.model.conv = 'xla'
  workdir = str(tmp_path_factory.mktemp('digits_run'))
  result = loop.train_and_evaluate(config, workdir)
  result.pop('state')
  return workdir, result


class NanAt:
  """A data source whose training batch at step index `step` is all NaN."""

  def __init__(self, source, step):
    self._source, self._step = source, step

  def __getattr__(self, name):
    return getattr(self._source, name)

  def train_batches(self, start_step=0):
    for step, batch in enumerate(self._source.train_batches(start_step), start_step):
      yield {**batch, 'image': np.full_like(batch['image'], np.nan)} if step == self._step else batch
