"""The train step and the run loop, end to end, on tiny models and data."""

import functools
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from resnet_jax import configs
from resnet_jax import models
from resnet_jax.training import optim
from resnet_jax.training import parallel
from resnet_jax.training import loop
from resnet_jax.training import state as state_lib
from resnet_jax.training import steps
from resnet_jax.training import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, 'tests', 'run_worker.py')


def _tiny_config(**overrides):
  config = configs.digits('cifar_resnet20', batch_size=16, eval_batch_size=200,
                          num_train_steps=6, eval_every_steps=3, checkpoint_every_steps=3,
                          log_every_steps=2, progress_bar=False)
  config.update(overrides)
  return config


def test_loss_falls_on_a_fixed_batch():
  model = models.cifar_resnet(8)
  config = configs.cifar('cifar_resnet20', learning_rate=0.05, lr_boundaries_steps=())
  tx = optim.create_optimizer(config)
  schedule = optim.create_schedule(config, steps_per_epoch=1)
  state = state_lib.create_train_state(model, tx, (32, 32, 3), seed=0)
  batch = {'image': jax.random.normal(jax.random.key(0), (16, 32, 32, 3)),
           'label': jnp.arange(16) % 10}
  step = jax.jit(functools.partial(steps.train_step, model=model, tx=tx, schedule=schedule,
                                   log_every=10), donate_argnums=0)
  losses = []
  for _ in range(30):
    state, m = step(state, batch)
    losses.append(float(m['loss']))
  assert losses[-1] < 0.5 * losses[0], losses
  assert int(state.step) == 30


def test_nonfinite_step_leaves_the_state_unchanged():
  model = models.cifar_resnet(8)
  config = configs.cifar('cifar_resnet20')
  tx = optim.create_optimizer(config)
  state = state_lib.create_train_state(model, tx, (32, 32, 3), seed=0)
  batch = {'image': jnp.full((4, 32, 32, 3), jnp.nan), 'label': jnp.zeros(4, jnp.int32)}
  new, m = jax.jit(functools.partial(steps.train_step, model=model, tx=tx,
                                     schedule=optim.create_schedule(config, 1), log_every=1))(state, batch)
  assert not bool(m['finite'])
  jax.tree.map(np.testing.assert_array_equal, new.params, state.params)


def test_train_and_evaluate_writes_documented_files_and_compiles_each_step_once(tmp_path):
  result = loop.train_and_evaluate(_tiny_config(), str(tmp_path))
  # 6 steps, evaluation at steps 3 and 6: still one compilation of each step.
  assert result['compilations'] == {'train_step': 1, 'eval_step': 1}
  records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [r['step'] for r in records] == [2, 3, 4, 6]
  for r in records:
    if r['step'] % 2 == 0:
      assert {'train_loss', 'train_error', 'learning_rate', 'images_per_second'} <= set(r)
      assert 0 <= r['train_error'] <= 100
  evals = [r for r in records if 'test_error' in r]
  assert [r['step'] for r in evals] == [3, 6]
  assert all(r['test_examples'] == 360 and r['test_split'] == 'test' for r in evals)
  saved = json.load(open(tmp_path / 'result.json'))
  for key in ('test_error', 'best_validation_error', 'wall_time_seconds', 'device_kind',
              'device_count', 'versions', 'git_commit', 'config', 'seed', 'data'):
    assert key in saved, key
  assert saved['test_error'] == evals[-1]['test_error']
  assert saved['versions']['jax'] == jax.__version__
  assert os.listdir(tmp_path / 'tensorboard')
  assert json.load(open(tmp_path / 'config.json'))['model']['name'] == 'cifar_resnet20'


def test_result_names_the_commit_checked_out_when_the_run_started(tmp_path, monkeypatch):
  """A long run records the code it imported, not a commit made while it trained."""
  def fake_git(args, **kwargs):
    del kwargs
    started = not (tmp_path / 'metrics.jsonl').exists()
    out = ('a' * 40 if started else 'b' * 40) if 'rev-parse' in args else ''
    return subprocess.CompletedProcess(args, 0, stdout=out + '\n', stderr='')
  loop._git_commit.cache_clear()
  monkeypatch.setattr(loop.subprocess, 'run', fake_git)
  try:
    loop.train_and_evaluate(_tiny_config(), str(tmp_path))
  finally:
    loop._git_commit.cache_clear()
  assert json.load(open(tmp_path / 'result.json'))['git_commit'] == 'a' * 40


def test_train_and_evaluate_on_tfds_cifar10(tmp_path):
  """The real tfds loading code, on tfds's mock data."""
  config = _tiny_config(num_train_steps=4, eval_every_steps=4, log_every_steps=2)
  config.data.source = 'tfds'
  config.data.dataset = 'cifar10'
  config.data.train_split = 'train[:48]'
  config.data.val_split = 'train[48:]'
  config.data.data_dir = str(tmp_path / 'data')
  config.eval_batch_size = 16
  with tfds.testing.mock_data(num_examples=64):
    result = loop.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['data'] == 'cifar10' and not result['synthetic']
  assert result['test_examples'] == 64
  assert result['best_validation_error'] is not None


def test_synthetic_runs_are_labelled_in_every_record(tmp_path):
  config = _tiny_config(num_train_steps=2, eval_every_steps=2, log_every_steps=1)
  config.data.source = 'synthetic'
  config.data.dataset = 'cifar10'
  config.data.test_split = 'test[:32]'  # not CIFAR's 10,000 test images: 32 are enough to label
  result = loop.train_and_evaluate(config, str(tmp_path))
  assert result['synthetic'] is True and result['test_examples'] == 32
  records = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert records and all(r['synthetic'] is True for r in records)


def test_error_based_warmup_ends_when_a_batch_error_drops_below_the_threshold(tmp_path):
  config = _tiny_config(num_train_steps=4, log_every_steps=1, eval_every_steps=4,
                        warmup_until_train_error=1.01)  # every batch error is < 101%
  result = loop.train_and_evaluate(config, str(tmp_path))
  assert not bool(result['state'].warmup_active)
  lrs = [json.loads(l)['learning_rate'] for l in open(tmp_path / 'metrics.jsonl')]
  assert lrs[0] == pytest.approx(0.01) and lrs[1] == pytest.approx(0.1)


def test_start_up_checks_name_the_problem():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices() * 1), ('data',))
  config = _tiny_config()
  config.model.ghost_batch_size = 5
  with pytest.raises(ValueError, match='ghost_batch_size=5'):
    parallel.check_batch_sizes(config, mesh)

  class EightDevices:
    size = 8
  with pytest.raises(ValueError, match='batch_size=12 cannot be split evenly over the 8 devices'):
    parallel.check_batch_sizes(_tiny_config(batch_size=12), EightDevices())
  with pytest.raises(ValueError, match='log_every_steps'):
    build.check_config(_tiny_config(log_every_steps=0))


def _run(args, devices, env_extra=None, timeout=600):
  env = dict(os.environ, XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
             JAX_PLATFORMS='cpu', **(env_extra or {}))
  return subprocess.Popen([sys.executable, WORKER, *args], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc, timeout=600):
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-4000:]


def _relative_difference(a, b, prefix):
  keys = [k for k in a.files if k.startswith(prefix)]
  diff = sum(float(((a[k] - b[k]) ** 2).sum()) for k in keys)
  return np.sqrt(diff / sum(float((a[k] ** 2).sum()) for k in keys))


def _assert_same_run(path_a, path_b):
  """Same losses and weights up to the order of float reductions.

  Measured here: 1 vs 8 devices differ by ~4e-5 (params, relative norm), 8
  devices vs 2 processes by ~2e-4; per-device BN statistics instead of global
  ones (a real semantic change) gives 4e-3 after 4 steps and a 2% different
  first loss. Individual BN-bias gradients are sums that nearly cancel, so
  leaves are compared through the norm of the whole tree.
  """
  a, b = np.load(path_a), np.load(path_b)
  assert set(a.files) == set(b.files)
  np.testing.assert_allclose(a['losses'], b['losses'], rtol=1e-4)
  assert _relative_difference(a, b, 'params/') < 1e-3
  assert _relative_difference(a, b, 'batch_stats/') < 1e-3


# A gentle learning rate: at 0.1 the first steps of a batch-16 run are chaotic
# and amplify float-reduction-order differences between device layouts.
RUN_ARGS = ['batch_size=16', 'eval_batch_size=200', 'num_train_steps=4', 'eval_every_steps=4',
            'log_every_steps=1', 'checkpoint_every_steps=100', 'learning_rate=0.01']


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_one_device_eight_devices_and_two_processes_agree(tmp_path):
  """1 device vs 8 simulated devices vs 2 processes x 4 devices: the same run."""
  port = _free_port()
  procs = [_run([str(tmp_path / 'one.npz'), str(tmp_path / 'one'), *RUN_ARGS], devices=1),
           _run([str(tmp_path / 'eight.npz'), str(tmp_path / 'eight'), *RUN_ARGS], devices=8)]
  procs += [_run([str(tmp_path / 'two.npz'), str(tmp_path / 'two'), *RUN_ARGS, 'distributed="yes"',
                  f'coordinator_address="127.0.0.1:{port}"', 'num_processes=2', f'process_id={i}'],
                 devices=4) for i in range(2)]
  for p in procs:
    _finish(p)
  # Same global batches and synchronised BN, so the same run.
  _assert_same_run(tmp_path / 'one.npz', tmp_path / 'eight.npz')
  _assert_same_run(tmp_path / 'eight.npz', tmp_path / 'two.npz')
