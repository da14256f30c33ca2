"""Checkpoints and fault tolerance: exact resume, signals, NaNs, damage, save errors, other devices.

ResNet-20 on 32 digits (4 steps per epoch) at batch 8, 10 steps, checkpoints
every 3 steps. "A fresh process" is a real `python -m resnet_jax.main`. The
runs share a persistent XLA compilation cache, so each process after the first
loads its executables instead of compiling them (same code, same numbers).
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from orbax.checkpoint._src.path import atomicity

import resnet_jax
from resnet_jax.training import checkpoints
from resnet_jax.weights import loading
from conftest import NanAt, digits_config  # pylint: disable=g-bad-import-order
from resnet_jax import data
from resnet_jax.training import metrics
from resnet_jax.training import loop
from resnet_jax.training import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(ROOT, 'experiments', 'digits_resnet20.py')
STEPS = 10
STEPS_PER_EPOCH = 4
SETTINGS = {'batch_size': 8, 'eval_batch_size': 40, 'log_every_steps': 1,
            'checkpoint_every_steps': 3, 'eval_every_steps': 100, 'progress_bar': False,
            'num_train_steps': STEPS, 'data.train_split': 'train[:32]',
            'data.test_split': 'test[:40]'}


def make_config(**overrides):
  """The in-process twin of the config the command-line runs of this module use."""
  return digits_config(SETTINGS, **overrides)





def cli_args(workdir, **overrides):
  settings = {**SETTINGS, **overrides}
  return [f'--config={EXPERIMENT}', f'--workdir={workdir}'] + [
      f'--config.{k}={v}' for k, v in settings.items()]


class Run:
  """`python -m resnet_jax.main` in a process of its own; `finish()` -> (exit status, console).

  With `pause_after=STEP` the run (tests/paused_main.py) holds still once it
  has logged STEP until `interrupt()` has signalled it: the signal lands in
  that step whatever the machine's speed.
  """

  def __init__(self, workdir, *, devices=1, pause_after=None, **overrides):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')  # with the session's compilation cache
    if devices > 1:  # XLA_FLAGS are part of the cache key: left alone for 1 device
      env['XLA_FLAGS'] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    self.workdir = str(workdir)
    self._ready = self.workdir + '.paused'
    command = [sys.executable, '-m', 'resnet_jax.main']
    if pause_after is not None:
      command = [sys.executable, os.path.join(ROOT, 'tests', 'paused_main.py'), str(pause_after),
                 self._ready, '--']
    self._console = tempfile.TemporaryFile('w+')  # pylint: disable=consider-using-with
    self.proc = subprocess.Popen(command + cli_args(workdir, **overrides), env=env, cwd=ROOT,  # pylint: disable=consider-using-with
                                 stdout=self._console, stderr=subprocess.STDOUT, text=True)

  def interrupt(self, signum=signal.SIGTERM):
    """Sends `signum` once the run has paused; False if it ended without pausing."""
    while not os.path.exists(self._ready):
      if self.proc.poll() is not None:
        return False
      time.sleep(0.01)
    self.proc.send_signal(signum)
    return True

  def finish(self):
    try:
      code = self.proc.wait(timeout=600)
    finally:
      if self.proc.poll() is None:
        self.proc.kill()
    self._console.seek(0)
    return code, self._console.read()


def _max_logged_step(workdir):
  path = os.path.join(workdir, 'metrics.jsonl')
  steps = [0]
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          steps.append(json.loads(line)['step'])
        except ValueError:  # a line being written
          pass
  return max(steps)


def steps_on_disk(workdir):
  return loading.steps(os.path.join(workdir, 'checkpoints'))  # pylint: disable=protected-access


def train_losses(workdir):
  return {r['step']: r['train_loss'] for r in metrics.read_metrics(workdir) if 'train_loss' in r}


def result(workdir):
  with open(os.path.join(workdir, 'result.json')) as f:
    return json.load(f)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def assert_same_run(workdir, reference):
  """Bit-identical final train state, logged losses and test error."""
  state, expected = loading.load_state(workdir), loading.load_state(reference)
  assert int(state['step']) == int(expected['step']) == STEPS
  assert_trees_equal(state, expected)  # params, batch_stats, opt_state, rng, metric sums
  assert train_losses(workdir) == train_losses(reference)
  assert sorted(train_losses(workdir)) == list(range(1, STEPS + 1))
  assert result(workdir)['test_error'] == result(reference)['test_error']


def largest_file(directory):
  files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


# The processes run two at a time (each compiles or loads on one core).


@pytest.fixture(scope='module')
def first_runs(tmp_path_factory):
  """An uninterrupted 10-step run, and a 6-step run on 8 devices, side by side."""
  runs = types.SimpleNamespace(reference=str(tmp_path_factory.mktemp('reference')),
                               eight=str(tmp_path_factory.mktemp('eight_devices')))
  reference = Run(runs.reference)
  eight = Run(runs.eight, devices=8, num_train_steps=6)
  runs.reference_status, runs.eight_status = reference.finish(), eight.finish()
  return runs


@pytest.fixture(scope='module')
def reference(first_runs):
  code, output = first_runs.reference_status
  assert code == 0, output[-3000:]
  assert steps_on_disk(first_runs.reference) == [10, 9, 6]  # every 3 steps and the end; 3 kept
  return first_runs.reference


@pytest.fixture(scope='module')
def broken_runs(tmp_path_factory, reference):
  """Runs stopped part-way and resumed by fresh processes (with a warm compilation cache).

  'split': 6 steps (a checkpoint step, mid-epoch), then the full 10.
  'interrupted': SIGTERM during step 1 (the run waits for it), with no periodic
  checkpoints (so the signal's checkpoint falls between checkpoint steps); then rerun.
  """
  del reference
  runs = types.SimpleNamespace(split=str(tmp_path_factory.mktemp('split')),
                               interrupted=str(tmp_path_factory.mktemp('interrupted')))
  split = Run(runs.split, num_train_steps=6)
  interrupted = Run(runs.interrupted, pause_after=1, checkpoint_every_steps=100)
  runs.signalled = interrupted.interrupt()
  runs.split_first, runs.interrupted_first = split.finish(), interrupted.finish()
  runs.split_steps = steps_on_disk(runs.split)
  ckpt_dir = os.path.join(runs.interrupted, 'checkpoints')
  runs.interrupted_names = sorted(os.listdir(ckpt_dir)) if os.path.isdir(ckpt_dir) else []
  runs.interrupted_steps = steps_on_disk(runs.interrupted)
  runs.interrupted_logged = _max_logged_step(runs.interrupted)
  runs.interrupted_state_step = int(loading.load_state(runs.interrupted)['step'])
  # Only the length and the console change for the resumed 'split' run.
  split, interrupted = Run(runs.split, progress_bar=True), Run(runs.interrupted)
  runs.split_second, runs.interrupted_second = split.finish(), interrupted.finish()
  return runs


# ----------------------------------------------------------------------------
# Exact resume in a fresh process.


def test_resume_from_a_checkpoint_step_mid_epoch_is_bit_identical(broken_runs, reference):
  code, output = broken_runs.split_first
  assert code == 0, output[-3000:]
  assert 6 % STEPS_PER_EPOCH and broken_runs.split_steps == [6, 3]
  code, output = broken_runs.split_second
  assert code == 0, output[-3000:]
  assert 'Resuming from the checkpoint at step 6' in output  # says so, with the step
  assert result(broken_runs.split)['resumed_from_step'] == 6
  assert_same_run(broken_runs.split, reference)


def test_sigterm_writes_a_checkpoint_and_the_rerun_is_bit_identical(broken_runs, reference):
  code, output = broken_runs.interrupted_first
  assert broken_runs.signalled, f'the run ended before it could be interrupted: {output[-3000:]}'
  assert code == 128 + signal.SIGTERM, output[-3000:]
  assert 'Interrupted by SIGTERM' in output
  [step] = broken_runs.interrupted_steps
  assert step == 1  # the step the signal came in
  assert broken_runs.interrupted_names == [str(step)]  # complete: no temporary directory
  assert broken_runs.interrupted_state_step == step  # and readable
  assert broken_runs.interrupted_logged == step  # the log stops where the checkpoint is

  code, output = broken_runs.interrupted_second
  assert code == 0, output[-3000:]
  assert result(broken_runs.interrupted)['resumed_from_step'] == step
  assert_same_run(broken_runs.interrupted, reference)


# ----------------------------------------------------------------------------
# Failures inside a run.


def test_nonfinite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(reference, tmp_path):
  del reference  # only for its warm compilation cache
  config = make_config()
  source = NanAt(data.create_data_source(config), step=4)  # the 5th step
  with pytest.raises(loop.NonFiniteError, match='Step 5: .* not finite'):
    loop.train_and_evaluate(config, str(tmp_path), source=source)
  assert steps_on_disk(tmp_path) == [3]  # nothing written past the bad step
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3']  # no save was in flight
  state = loading.load_state(str(tmp_path))
  assert int(state['step']) == 3
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state))


def test_damaged_latest_checkpoint_and_leftover_tmp_dir_are_skipped(reference, tmp_path, caplog):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  with open(largest_file(os.path.join(ckpt_dir, '10', 'state')), 'r+b') as f:
    f.truncate(os.path.getsize(f.name) // 2)
  # A crash while saving step 12 left orbax's temporary directory behind.
  shutil.copytree(os.path.join(ckpt_dir, '9'), os.path.join(ckpt_dir, '12.orbax-checkpoint-tmp'))
  shutil.rmtree(os.path.join(ckpt_dir, '12.orbax-checkpoint-tmp', 'state'))

  with caplog.at_level('WARNING'):
    out = loop.train_and_evaluate(make_config(num_train_steps=12, checkpoint_every_steps=1),
                                   workdir)
  warnings = '\n'.join(r.getMessage() for r in caplog.records if r.levelname == 'WARNING')
  assert os.path.join(ckpt_dir, '10') in warnings and 'Skipping' in warnings
  assert os.path.join(ckpt_dir, '12.orbax-checkpoint-tmp') in warnings
  assert out['resumed_from_step'] == 9  # the newest complete checkpoint
  names = os.listdir(ckpt_dir)
  assert [n for n in names if n.startswith('10.damaged-')]  # moved aside, not deleted
  assert steps_on_disk(workdir) == [12, 11, 10]  # steps 10 and 12 written again
  # Step 10 recomputed from step 9 in this process equals the reference's step 10.
  assert_trees_equal(loading.load_state(os.path.join(ckpt_dir, '10')),
                     loading.load_state(reference))
  assert train_losses(workdir)[10] == train_losses(reference)[10]


@pytest.mark.parametrize('change,message', [
    ({'model.name': 'cifar_resnet32'}, "model.name: checkpoint has 'cifar_resnet20', config has "
                                       "'cifar_resnet32'"),
    ({'batch_size': 16}, 'batch_size: checkpoint has 8, config has 16'),
])
def test_a_checkpoint_of_another_experiment_is_refused(reference, tmp_path, change, message):
  workdir = str(tmp_path / 'run')
  shutil.copytree(reference, workdir)
  before = sorted(os.listdir(workdir)), steps_on_disk(workdir), train_losses(workdir)
  with pytest.raises(checkpoints.CheckpointMismatchError) as error:
    loop.train_and_evaluate(make_config(**change), workdir)
  assert message in str(error.value) and '--workdir' in str(error.value)
  assert (sorted(os.listdir(workdir)), steps_on_disk(workdir), train_losses(workdir)) == before


def test_fingerprint_ignores_settings_that_do_not_change_what_is_trained():
  base = checkpoints.fingerprint(make_config())
  for change in ({'log_every_steps': 7}, {'eval_every_steps': 7}, {'checkpoint_every_steps': 7},
                 {'num_train_steps': 99}, {'keep_checkpoints': 1}, {'progress_bar': True},
                 {'learning_rate': 0.01}, {'model.remat': True}, {'model.conv': 'cpu_kgrad'},
                 {'eval_batch_size': 80}):
    assert checkpoints.fingerprint(make_config(**change)) == base, change
  for change in ({'model.name': 'cifar_plain20'}, {'model.shortcut': 'B'}, {'batch_size': 16},
                 {'seed': 1}, {'data.train_split': 'train[:40]'}, {'data.source': 'synthetic'}):
    assert checkpoints.fingerprint(make_config(**change)) != base, change


# ----------------------------------------------------------------------------
# Other device counts, and inference.


def test_an_8_device_checkpoint_restores_on_1_device_and_for_inference(first_runs, reference):
  del reference  # its compilation cache serves the 1-device runs below
  code, output = first_runs.eight_status
  assert code == 0, output[-3000:]
  workdir = first_runs.eight
  written = result(workdir)
  assert written['device_count'] == 8

  info = resnet_jax.checkpoint_info(workdir)
  assert (info['step'], info['model']) == (6, 'cifar_resnet20')
  assert info['path'] == os.path.join(workdir, 'checkpoints', '6')
  assert info['model_kwargs']['num_classes'] == 10
  variables = resnet_jax.load_variables(info['path'])
  assert set(variables) == {'params', 'batch_stats'}
  assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(variables))

  # A plain apply_fn call reproduces the 8-device run's own test evaluation.
  _, apply_fn = resnet_jax.functional(info['model'], **info['model_kwargs'])
  config = make_config()
  [batch] = list(data.create_data_source(config).eval_batches('test'))
  logits = jax.jit(apply_fn)(variables, batch['image'])
  loss = -jax.nn.log_softmax(logits)[np.arange(len(logits)), batch['label']].mean()
  error = 100.0 * float(jnp.mean(jnp.argmax(logits, -1) != batch['label']))
  logged = [r for r in metrics.read_metrics(workdir) if 'test_loss' in r][-1]
  assert logged['step'] == 6 and np.isclose(float(loss), logged['test_loss'], rtol=1e-4)
  assert abs(error - written['test_error']) <= 100.0 / 40 + 1e-9  # at most one tie flips

  # A 1-device run restores it exactly, and carries on training.
  out = loop.train_and_evaluate(make_config(num_train_steps=6), workdir)
  assert out['device_count'] == 1 and out['resumed_from_step'] == 6
  assert_trees_equal({'params': out['state'].params, 'batch_stats': out['state'].batch_stats},
                     variables)
  out = loop.train_and_evaluate(make_config(num_train_steps=8), workdir)
  assert out['resumed_from_step'] == 6 and steps_on_disk(workdir)[0] == 8
  assert np.isfinite(train_losses(workdir)[8])


# ----------------------------------------------------------------------------
# The Checkpointer on its own, with a small stand-in state.


def small_state(step, value=None):
  value = float(step) if value is None else value
  return state_lib.TrainState(
      step=jnp.asarray(step, jnp.int32), params={'w': jnp.full((4096,), value)},
      batch_stats={'mean': jnp.zeros((3,))}, opt_state={'m': jnp.ones((4096,))},
      rng=jax.random.PRNGKey(step), warmup_active=jnp.ones((), jnp.bool_),
      metric_sums={'loss': jnp.zeros(())})


def three_checkpoints(tmp_path):
  """Steps 1, 2 and 3 saved (and all kept) in tmp_path: (config, checkpoint dir)."""
  config = make_config(keep_checkpoints=5)
  with checkpoints.Checkpointer(str(tmp_path), config) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(small_state(step))
  return config, tmp_path / 'checkpoints'


def test_keep_best_keeps_the_lowest_validation_error_across_restarts(tmp_path):
  config = make_config(keep_checkpoints=1, keep_best_checkpoint=True)
  with checkpoints.Checkpointer(str(tmp_path), config) as ckpt:
    for step, error in [(1, 5.0), (2, 2.0), (3, None), (4, 7.0)]:
      ckpt.save(small_state(step), metrics=None if error is None else {'validation_error': error})
  assert steps_on_disk(tmp_path) == [4, 2]  # the latest, and the lowest error
  with checkpoints.Checkpointer(str(tmp_path), config) as ckpt:  # a resumed run
    for step, error in [(5, 3.0), (6, None)]:
      ckpt.save(small_state(step), metrics=None if error is None else {'validation_error': error})
  assert steps_on_disk(tmp_path) == [6, 2]
  best = resnet_jax.checkpoint_info(str(tmp_path), best=True)
  assert (best['step'], best['validation_error']) == (2, 2.0)
  assert resnet_jax.checkpoint_info(str(tmp_path))['step'] == 6


def test_a_failed_background_save_is_raised_and_leaves_earlier_checkpoints(tmp_path, caplog):
  config = make_config()
  ckpt = checkpoints.Checkpointer(str(tmp_path), config)
  ckpt.save(small_state(1))
  ckpt.wait()

  async def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')

  with mock.patch.object(atomicity.AtomicRenameTemporaryPath, 'finalize', disk_full):
    ckpt.save(small_state(2))  # returns: the files are written in the background
    with pytest.raises(checkpoints.CheckpointError, match=r'step 2 .*No space left on device'):
      ckpt.save(small_state(3))
  ckpt.close()
  assert steps_on_disk(tmp_path) == [1]
  assert '2.orbax-checkpoint-tmp' in os.listdir(tmp_path / 'checkpoints')

  # The next run removes the leftover, names it, resumes and saves that step again.
  with caplog.at_level('WARNING'), checkpoints.Checkpointer(str(tmp_path), config) as ckpt:
    assert int(ckpt.restore(small_state(0)).step) == 1
    ckpt.save(small_state(2))
  assert '2.orbax-checkpoint-tmp' in caplog.text
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '2']


def test_damaged_checkpoints_are_skipped_and_none_usable_is_an_error(tmp_path, caplog):
  config, ckpt_dir = three_checkpoints(tmp_path)
  shutil.rmtree(ckpt_dir / '3' / 'state')  # missing pieces
  with open(largest_file(ckpt_dir / '2' / 'state'), 'r+b') as f:  # truncated
    f.truncate(100)

  # Readers skip them too, with a warning.
  with caplog.at_level('WARNING'):
    assert np.all(resnet_jax.load_variables(str(tmp_path))['params']['w'] == 1.0)
  assert str(ckpt_dir / '3') in caplog.text and str(ckpt_dir / '2') in caplog.text

  with open(largest_file(ckpt_dir / '1' / 'state'), 'r+b') as f:
    f.truncate(100)
  with checkpoints.Checkpointer(str(tmp_path), config) as ckpt:
    with pytest.raises(checkpoints.CheckpointError, match='None of the checkpoints') as error:
      ckpt.restore(small_state(0))
  assert all(str(ckpt_dir / s) in str(error.value) for s in '123')
  assert sorted(os.listdir(ckpt_dir)) == ['1', '2', '3']  # nothing moved when nothing restores


def test_restore_skips_damaged_checkpoints_and_moves_them_aside(tmp_path, caplog):
  config, ckpt_dir = three_checkpoints(tmp_path)
  shutil.rmtree(ckpt_dir / '3' / 'meta')
  with open(largest_file(ckpt_dir / '2' / 'state'), 'r+b') as f:
    f.truncate(100)
  with caplog.at_level('WARNING'), checkpoints.Checkpointer(str(tmp_path), config) as ckpt:
    state = ckpt.restore(small_state(0))
    assert int(state.step) == 1 and np.all(np.asarray(state.params['w']) == 1.0)
    ckpt.save(small_state(2, value=7.0))  # the run writes the skipped steps again
  assert 'Skipping' in caplog.text and str(ckpt_dir / '3') in caplog.text
  names = os.listdir(ckpt_dir)
  assert sorted(n.split('.')[0] for n in names if '.damaged-' in n) == ['2', '3']
  assert steps_on_disk(tmp_path) == [2, 1]
  assert np.all(resnet_jax.load_variables(str(tmp_path))['params']['w'] == 7.0)


# ----------------------------------------------------------------------------
# The command line's exit status.


@pytest.mark.parametrize('error,status', [
    (loop.RunInterrupted(signal.SIGTERM, 5), 128 + signal.SIGTERM),
    (loop.RunInterrupted(signal.SIGINT, 5), 128 + signal.SIGINT),
    (loop.NonFiniteError('Step 5: loss nan'), 3),
    (checkpoints.CheckpointError('disk full'), 2),
    (checkpoints.CheckpointMismatchError('another model'), 2),
])
def test_main_exit_status_says_what_happened(monkeypatch, tmp_path, error, status):
  from resnet_jax import main  # pylint: disable=g-import-not-at-top

  def fail(*args, **kwargs):
    raise error

  monkeypatch.setattr(main.loop, 'train_and_evaluate', fail)
  flags.FLAGS(['main', f'--config={EXPERIMENT}', f'--workdir={tmp_path}'])
  try:
    with pytest.raises(SystemExit) as exit_:
      main.main(['main'])
  finally:
    flags.FLAGS.unparse_flags()
  assert exit_.value.code == status
