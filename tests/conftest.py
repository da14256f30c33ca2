"""Fixtures shared by several test modules."""

import atexit
import os
import shutil
import subprocess
import sys
import tempfile

# One persistent compilation cache for the whole session, set before jax is imported so
# that every test, every subprocess a test starts (they inherit the environment) and every
# pytest-xdist worker shares it: most tests compile the same small digits networks, and a
# fresh directory per session keeps results from one session out of the next. Set
# RESNET_JAX_TEST_JAX_CACHE to keep it somewhere else, or to '' to compile everything.
if 'RESNET_JAX_TEST_JAX_CACHE' not in os.environ:
  os.environ['RESNET_JAX_TEST_JAX_CACHE'] = tempfile.mkdtemp(prefix='resnet_jax_tests_jax_cache_')
  atexit.register(shutil.rmtree, os.environ['RESNET_JAX_TEST_JAX_CACHE'], ignore_errors=True)
if os.environ['RESNET_JAX_TEST_JAX_CACHE']:
  os.environ.update(JAX_COMPILATION_CACHE_DIR=os.environ['RESNET_JAX_TEST_JAX_CACHE'],
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

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


def run_main(*args, devices=1, timeout=900):
  """`python -m resnet_jax.main ARGS` on `devices` simulated CPU devices: the CompletedProcess."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
  return subprocess.run([sys.executable, '-m', 'resnet_jax.main', *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, check=False)


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
