"""Fine-tuning (`config.init_from`): a run starts from trained weights, once.

The source is the shared 4-step digits ResNet-20 run (conftest.short_digits_run);
every fine-tuning run is a few steps of batch 16 with XLA's kernels.
"""

import json
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_jax import models
from resnet_jax.training import build as build_lib
from resnet_jax.training import init_from, loop
from resnet_jax.weights import loading, shipped
from conftest import experiment_config  # pylint: disable=g-bad-import-order


def _config(**overrides):
  config = experiment_config('digits_resnet20', **{
      'num_train_steps': 2, 'batch_size': 16, 'eval_every_steps': 100,
      'checkpoint_every_steps': 100, 'log_every_steps': 1, 'progress_bar': False, **overrides})
  config.model.conv = 'xla'
  return config


@pytest.fixture(scope='module')
def digits_run():
  """A built (untrained) digits ResNet-20 run, for calling the init function directly."""
  return build_lib.build(_config())


def _source_loss(run, variables):
  """The source model's train-mode loss on the run's first training batch (the first logged loss:
  it is computed before the first update)."""
  batch = next(iter(run.source.train_batches(0)))
  logits, _ = run.model.apply(variables, jnp.asarray(batch['image']), train=True,
                              mutable=['batch_stats'])
  return float(optax.softmax_cross_entropy_with_integer_labels(
      logits, jnp.asarray(batch['label'])).mean())


def _first_logged_loss(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    first = json.loads(f.readline())
  assert first['step'] == 1, first
  return first['train_loss']


def _with_head_classes(variables, n):
  params = dict(variables['params'])
  params['head'] = {'kernel': params['head']['kernel'][:, :n], 'bias': params['head']['bias'][:n]}
  return {'params': params, 'batch_stats': variables['batch_stats']}


def test_fine_tuning_starts_from_the_source_weights(short_digits_run, digits_run, tmp_path):
  source_dir, _ = short_digits_run
  source = loading.load_variables(source_dir)
  result = loop.train_and_evaluate(_config(init_from=source_dir), str(tmp_path / 'ft'))
  assert result['init_from'] == {'source': os.path.join(source_dir, 'checkpoints', '4'),
                                 'model': 'cifar_resnet20', 'step': 4, 'head': 'loaded'}
  expected = _source_loss(digits_run, source)
  fresh = digits_run.init_state()
  from_scratch = _source_loss(digits_run, {'params': fresh.params,
                                           'batch_stats': fresh.batch_stats})
  logged = _first_logged_loss(str(tmp_path / 'ft'))
  assert logged == pytest.approx(expected, rel=1e-5, abs=1e-5)
  assert abs(logged - from_scratch) > 1e-3, (logged, from_scratch)
  with open(tmp_path / 'ft' / 'result.json') as f:
    assert json.load(f)['init_from']['head'] == 'loaded'


def test_a_head_of_another_class_count_is_reinitialised(short_digits_run, digits_run, tmp_path):
  source_dir, _ = short_digits_run
  trained = loading.load_variables(source_dir)
  info = loading.checkpoint_info(source_dir)
  five = loading.write_inference_checkpoint(
      str(tmp_path / 'five'), _with_head_classes(trained, 5), 'cifar_resnet20',
      {**info['model_kwargs'], 'num_classes': 5})

  # The init function itself: body and BN statistics from the source, the head and the
  # optimiser state fresh, step 0.
  fresh = digits_run.init_state()
  fresh_host = jax.device_get(fresh)
  state, record, message = init_from.load_initial_variables(
      _RunWith(digits_run, init_from=five), digits_run.init_state())
  assert record == {'source': five, 'model': 'cifar_resnet20', 'step': 0,
                    'head': 'reinitialised'}
  assert 'head is re-initialised' in message and '5 classes' in message
  got = jax.device_get(state)
  for key, value in trained['params'].items():
    want = fresh_host.params['head'] if key == 'head' else value
    jax.tree.map(np.testing.assert_array_equal, got.params[key], want)
  jax.tree.map(np.testing.assert_array_equal, got.batch_stats, trained['batch_stats'])
  jax.tree.map(np.testing.assert_array_equal, got.opt_state,
               jax.device_get(digits_run.tx.init(got.params)))
  assert int(got.step) == 0

  # ... and through the loop: the message goes to the run's log (and the progress output;
  # its stream is bound at import, out of the test's reach) and the record to result.json.
  result = loop.train_and_evaluate(_config(init_from=five, num_train_steps=1),
                                   str(tmp_path / 'ft'))
  with open(tmp_path / 'ft' / 'logs' / 'run.log') as f:
    assert 'head is re-initialised: the source has 5 classes' in f.read()
  assert result['init_from']['head'] == 'reinitialised'


class _RunWith:
  """`run` with config.init_from replaced (the run's config is locked and shared)."""

  def __init__(self, run, *, init_from):
    self._run = run
    self.config = run.config.copy_and_resolve_references()
    with self.config.unlocked():
      self.config.init_from = init_from

  def __getattr__(self, name):
    return getattr(self._run, name)


class _StopAt:
  """A data source that sends this process SIGTERM when the training batch `index` is read."""

  def __init__(self, source, index):
    self._source, self._index = source, index

  def __getattr__(self, name):
    return getattr(self._source, name)

  def train_batches(self, start_step=0):
    for index, batch in enumerate(self._source.train_batches(start_step), start_step):
      if index == self._index:
        signal.raise_signal(signal.SIGTERM)
      yield batch


def test_a_resumed_fine_tuning_run_does_not_read_the_source_again(short_digits_run, tmp_path):
  source_dir = str(tmp_path / 'source')
  shutil.copytree(short_digits_run[0], source_dir)
  config = _config(init_from=source_dir, num_train_steps=4)
  workdir = str(tmp_path / 'ft')
  source = build_lib.build(config).source
  with pytest.raises(loop.RunInterrupted) as interrupted:
    loop.train_and_evaluate(config, workdir, source=_StopAt(source, 2))
  assert 1 <= interrupted.value.step < 4
  os.rename(source_dir, source_dir + '.moved')  # a resume that read it would fail

  result = loop.train_and_evaluate(config, workdir)
  assert result['resumed_from_step'] == interrupted.value.step
  assert result['init_from'] == {'source': os.path.join(source_dir, 'checkpoints', '4'),
                                 'model': 'cifar_resnet20', 'step': 4, 'head': 'loaded'}


def test_weights_of_another_network_are_refused(digits_run, tmp_path):
  model = models.create_model('cifar_resnet32')
  variables = jax.device_get(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                        train=False))
  deeper = loading.write_inference_checkpoint(str(tmp_path / 'r32'), variables,
                                              'cifar_resnet32', {'shortcut': 'A'})
  with pytest.raises(ValueError, match=r'stage1_block4.* not in the configured model.*trained as '
                                       r'cifar_resnet32'):
    init_from.load_initial_variables(_RunWith(digits_run, init_from=deeper),
                                     digits_run.init_state())


def test_pretrained_names_and_missing_paths_are_refused_clearly(digits_run, tmp_path):
  with pytest.raises(shipped.NotShippedError, match='no shipped weights named'):
    init_from.load_initial_variables(_RunWith(digits_run, init_from='pretrained:no_such_net'),
                                     digits_run.init_state())
  with pytest.raises(FileNotFoundError, match='config.init_from=.*pretrained:NAME'):
    init_from.load_initial_variables(_RunWith(digits_run, init_from=str(tmp_path / 'nothing')),
                                     digits_run.init_state())


def test_scanned_weights_load_into_an_unscanned_model(digits_run):
  scanned = models.create_model('cifar_resnet20', scan_blocks=True)
  variables = jax.device_get(scanned.init(jax.random.PRNGKey(1), jnp.zeros((1, 32, 32, 3)),
                                          train=False))
  fresh = jax.device_get({'params': digits_run.init_state().params,
                          'batch_stats': digits_run.init_state().batch_stats})
  merged, head_loaded = init_from.merge(variables, fresh, init_from='x', source_model='s',
                                        target_model='t')
  assert head_loaded
  jax.tree.map(np.testing.assert_array_equal, merged, models.unroll_scanned(variables))
