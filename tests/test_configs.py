"""Every experiment file loads, builds its model and passes the start-up checks."""

import ast
import glob
import os
import types

import jax
import jax.numpy as jnp
import pytest
from absl import flags

from resnet_jax.training import optim
from resnet_jax.training import parallel
from resnet_jax import configs, summary
from resnet_jax import sweep
from resnet_jax.training import state as state_lib
from resnet_jax.training import build

from conftest import ROOT, run_main  # pylint: disable=g-bad-import-order

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
  """(the file's docstring, its config as `python -m resnet_jax.main` loads it)."""
  with open(path) as f:
    doc = ast.get_docstring(ast.parse(f.read()))
  return types.SimpleNamespace(__doc__=doc), configs.load(path)


# torchvision's parameter counts of the option-B ImageNet ResNets.
TORCHVISION_PARAMS = {'resnet18': 11_689_512, 'resnet34': 21_797_672, 'resnet50': 25_557_032,
                      'resnet101': 44_549_160, 'resnet152': 60_192_808}


def expected_params(name, shortcut):
  """The parameter count of an experiment's network, derived from the paper's architecture."""
  if name.startswith('cifar_'):  # option A and plain nets: no shortcut parameters
    n = (int(name.split('resnet')[-1].split('plain')[-1]) - 2) // 6
    # ResNet-20 (n=3) has 269,722; each further n adds one block (2 3x3 convs, 2 BNs) per stage.
    per_n = sum(2 * (9 * w * w + 2 * w) for w in (16, 32, 64))
    return 269_722 + (n - 3) * per_n
  # Basic-block nets: B projects at the 3 downsampling blocks (1x1 conv + BN), A and plain never,
  # C at every block (the identity ones included).
  projection = lambda c_in, c_out: c_in * c_out + 2 * c_out
  downsampling = sum(projection(c, 2 * c) for c in (64, 128, 256))
  base = TORCHVISION_PARAMS[name.replace('plain', 'resnet')]
  if name.startswith('plain') or shortcut == 'A':
    return base - downsampling
  if shortcut == 'C':
    identity_blocks = {64: 3, 128: 3, 256: 5, 512: 2}  # resnet34: (3, 4, 6, 3) blocks
    return base + sum(k * projection(c, c) for c, k in identity_blocks.items())
  return base


def test_there_is_one_file_per_paper_experiment():
  names = {os.path.basename(p)[:-3] for p in EXPERIMENTS}
  assert set(PAPER_EXPERIMENTS) <= names


@pytest.mark.parametrize('path', EXPERIMENTS, ids=lambda p: os.path.basename(p)[:-3])
def test_experiment_loads_builds_its_model_and_passes_start_up_checks(path):
  module, config = load(path)
  assert 'python -m resnet_jax.main --config=experiments/' in module.__doc__
  # What it should reach: a number from a table, or the figure it appears in.
  assert any(s in module.__doc__ for s in ('resnet_jax/paper.py', 'Fig. 6', 'Offline demo'))
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
  assert summary.count_params(variables['params']) == expected_params(config.model.name,
                                                                     config.model.shortcut)
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


def test_the_command_line_hands_the_run_a_locked_config(monkeypatch, tmp_path):
  """A mistyped key set anywhere in the run (not only on the command line) is an error."""
  from resnet_jax import main  # pylint: disable=g-import-not-at-top
  seen = []
  monkeypatch.setattr(main.loop, 'train_and_evaluate',
                      lambda config, workdir: seen.append(config) or {})
  flags.FLAGS(['main', f'--config={ROOT}/experiments/cifar_resnet20.py', f'--workdir={tmp_path}'])
  try:
    main.main(['main'])
  finally:
    flags.FLAGS.unparse_flags()
  [config] = seen
  with pytest.raises(AttributeError, match='batch_sise'):
    config.batch_sise = 64
  config.batch_size = 64  # existing keys stay settable
  # The sweep's configs are the same.
  config = sweep.parse_config(os.path.join(ROOT, 'experiments', 'cifar_resnet20.py'))
  with pytest.raises(AttributeError, match='batch_sise'):
    config.batch_sise = 64


def test_command_line_rejects_a_mistyped_key_and_an_indivisible_batch(tmp_path):
  out = run_main('--config=experiments/digits_resnet20.py', f'--workdir={tmp_path}/a',
              '--config.batch_sise=64')
  assert out.returncode != 0 and 'batch_sise' in out.stderr
  out = run_main('--config=experiments/digits_resnet20.py', f'--workdir={tmp_path}/b',
              '--config.batch_size=12', devices=8)
  assert out.returncode == 2
  assert 'batch_size=12 cannot be split evenly over the 8 devices' in out.stderr
  assert not os.path.exists(tmp_path / 'b' / 'checkpoints')
