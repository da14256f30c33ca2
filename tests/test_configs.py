"""Every experiment file loads, builds its model and passes the start-up checks."""

import glob
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from resnet_jax.training import optim
from resnet_jax.training import parallel
from resnet_jax import summary
from resnet_jax.training import state as state_lib
from resnet_jax.training import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENTS = sorted(glob.glob(os.path.join(ROOT, 'experiments', '*.py')))
# Training-split sizes, to derive step counts without loading the data.
TRAIN_EXAMPLES = {'cifar10': 45_000, 'imagenet2012': 1_281_167, 'digits': 1_437}
PAPER_EXPERIMENTS = (
    [f'cifar_resnet{d}' for d in (20, 32, 44, 56, 110, 1202)]
    + [f'cifar_plain{d}' for d in (20, 32, 44, 56, 110)]
    + [f'imagenet_resnet{d}' for d in (18, 34, 50, 101, 152)]
    + ['imagenet_plain18', 'imagenet_plain34', 'imagenet_resnet34_optionA',
       'imagenet_resnet34_optionC', 'digits_resnet20'])


def load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.lock()
  return module, config


def test_there_is_one_file_per_paper_experiment():
  names = {os.path.basename(p)[:-3] for p in EXPERIMENTS}
  assert set(PAPER_EXPERIMENTS) <= names


@pytest.mark.parametrize('path', EXPERIMENTS, ids=lambda p: os.path.basename(p)[:-3])
def test_experiment_loads_builds_its_model_and_passes_start_up_checks(path):
  module, config = load(path)
  assert 'python -m resnet_jax.main --config=experiments/' in module.__doc__
  # What it should reach: a number from a table, or the figure it appears in.
  assert '%' in module.__doc__ or 'Fig. 6' in module.__doc__
  build.check_config(config)
  mesh = parallel.create_mesh()
  parallel.check_batch_sizes(config, mesh)
  steps_per_epoch = TRAIN_EXAMPLES[config.data.dataset] // config.batch_size
  steps = optim.num_train_steps(config, steps_per_epoch)
  schedule = optim.create_schedule(config, steps_per_epoch)
  assert all(0 < b < steps for b in schedule.boundaries)
  model = state_lib.create_model(config, num_classes=1000 if 'imagenet' in config.data.dataset else 10)
  shape = (1, config.data.image_size, config.data.image_size, 3) if 'imagenet' in path else (1, 32, 32, 3)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape)))
  assert summary.count_params(variables['params']) > 0
  for key in ('model.name', 'data.source', 'data.data_dir', 'batch_size', 'num_train_steps',
              'eval_every_steps', 'checkpoint_every_steps', 'log_every_steps', 'seed',
              'learning_rate', 'weight_decay', 'momentum'):
    node = config
    for part in key.split('.'):
      node = node[part]


def test_cifar_experiments_follow_the_paper_recipe():
  _, config = load(os.path.join(ROOT, 'experiments', 'cifar_resnet110.py'))
  assert (config.batch_size, config.learning_rate, config.momentum, config.weight_decay) == (
      128, 0.1, 0.9, 1e-4)
  assert tuple(config.lr_boundaries_steps) == (32_000, 48_000)
  assert config.num_train_steps == 64_000 and config.warmup_steps == 400
  assert config.model.shortcut == 'A'
  assert (config.data.train_split, config.data.val_split) == ('train[:45000]', 'train[45000:]')
  _, config = load(os.path.join(ROOT, 'experiments', 'cifar_resnet56.py'))
  assert config.warmup_steps == 0


def test_a_mistyped_key_is_an_error():
  _, config = load(os.path.join(ROOT, 'experiments', 'cifar_resnet20.py'))
  with pytest.raises(AttributeError, match='batch_sise'):
    config.batch_sise = 64


def _main(*args, devices=1):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu')
  return subprocess.run([sys.executable, '-m', 'resnet_jax.main', *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=300)


def test_command_line_rejects_a_mistyped_key_and_an_indivisible_batch(tmp_path):
  out = _main('--config=experiments/digits_resnet20.py', f'--workdir={tmp_path}/a',
              '--config.batch_sise=64')
  assert out.returncode != 0 and 'batch_sise' in out.stderr
  out = _main('--config=experiments/digits_resnet20.py', f'--workdir={tmp_path}/b',
              '--config.batch_size=12', devices=8)
  assert out.returncode == 2
  assert 'batch_size=12 is not divisible by the 8 devices' in out.stderr
  assert not os.path.exists(tmp_path / 'b' / 'checkpoints')
