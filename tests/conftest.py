"""Fixtures shared by several test modules."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def experiment_config(name: str, **overrides):
  """`experiments/<name>.py`'s get_config() with `overrides` (as --config.KEY=VALUE would)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'experiments', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.update(overrides)
  return config


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
