"""The failures a long run meets, each injected: a second run on the workdir, flipped bytes in
a checkpoint, read errors while restoring, a crash before the first checkpoint, bad command
lines, a full disk, Ctrl-C during start-up, and a resume with another experiment's settings.

ResNet-20 on 64 digits at batch 16, checkpoints every 10 steps. The command-line runs are
real `python -m resnet_jax.main` processes; they share a persistent compilation cache.
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

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from absl import flags
from orbax.checkpoint._src.path import atomicity

from conftest import NanAt, digits_config  # pylint: disable=g-bad-import-order
from resnet_jax import data
from resnet_jax.training import build as build_lib
from resnet_jax.training import checkpoints, integrity, loop, metrics
from resnet_jax.training import state as state_lib
from resnet_jax.training import workdir as workdir_lib
from resnet_jax.weights import loading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPERIMENT = os.path.join(ROOT, 'experiments', 'digits_resnet20.py')
SETTINGS = {'batch_size': 16, 'eval_batch_size': 40, 'log_every_steps': 1,
            'checkpoint_every_steps': 10, 'eval_every_steps': 1000, 'progress_bar': False,
            'num_train_steps': 30, 'data.train_split': 'train[:64]',
            'data.test_split': 'test[:40]'}
DEADLINE = 600  # seconds: only against a hang, never an assertion


def make_config(**overrides):
  """The in-process twin of the config the command-line runs of this module use."""
  return digits_config(SETTINGS, **overrides)





class Cli:
  """`python -m resnet_jax.main` in its own process; `finish()` -> (exit status, console)."""

  def __init__(self, workdir, *args, **overrides):
    settings = {**SETTINGS, **overrides}
    argv = [sys.executable, '-m', 'resnet_jax.main', f'--workdir={workdir}', *args]
    if not any(a.startswith('--config=') for a in args):
      argv += [f'--config={EXPERIMENT}'] + [f'--config.{k}={v}' for k, v in settings.items()]
    self._console = tempfile.TemporaryFile('w+')  # pylint: disable=consider-using-with
    self.proc = subprocess.Popen(argv, cwd=ROOT, stdout=self._console, stderr=subprocess.STDOUT,  # pylint: disable=consider-using-with
                                 text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3'))

  def output(self):
    self._console.seek(0)
    return self._console.read()

  def wait_for(self, ready):
    """Polls until `ready()` holds; False if the process ended first."""
    deadline = time.time() + DEADLINE
    while not ready():
      if self.proc.poll() is not None or time.time() > deadline:
        return False
      time.sleep(0.02)
    return True

  def finish(self):
    try:
      code = self.proc.wait(timeout=DEADLINE)
    finally:
      if self.proc.poll() is None:
        self.proc.kill()
    return code, self.output()


def console_lines(output):
  """The console's lines, less TensorFlow's start-up notices (not ours to silence)."""
  return [l for l in output.splitlines()
          if l.strip() and 'absl::InitializeLog' not in l and 'oneDNN custom operations' not in l]


def logged_steps(workdir):
  return [r['step'] for r in metrics.read_metrics(workdir)]


def largest_file(directory):
  files = [os.path.join(r, f) for r, _, fs in os.walk(directory) for f in fs]
  return max(files, key=os.path.getsize)


def copy_run(workdir, tmp_path):
  target = str(tmp_path / 'run')
  shutil.copytree(workdir, target)
  return target


# ----------------------------------------------------------------------------
# 1. Two runs on one workdir; and a finished workdir for the tests below.


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A 30-step run that a second run tried to share while it was at step 10 (and stopped)."""
  workdir = str(tmp_path_factory.mktemp('finished'))
  first = Cli(workdir)
  reached = first.wait_for(lambda: os.path.isdir(os.path.join(workdir, 'checkpoints', '10')))
  if reached:
    first.proc.send_signal(signal.SIGSTOP)  # holds the lock, still, while the second one tries
  try:
    second = Cli(workdir).finish()
  finally:
    first.proc.send_signal(signal.SIGCONT)
  return {'workdir': workdir, 'reached': reached, 'pid': first.proc.pid, 'second': second,
          'first': first.finish()}


def test_a_second_run_on_a_workdir_in_use_is_refused(finished):
  assert finished['reached'], finished['first'][1][-3000:]
  code, output = finished['second']
  assert code == 2, output[-3000:]
  [line] = console_lines(output)
  assert line.startswith('error: ') and 'is in use by another run' in line
  assert f"pid {finished['pid']} on host" in line
  code, output = finished['first']
  assert code == 0, output[-3000:]
  assert logged_steps(finished['workdir']) == list(range(1, 31))
  with open(os.path.join(finished['workdir'], workdir_lib.LOCK_FILE)) as f:
    assert f.read() == ''  # released on exit: no holder named


def test_a_lock_left_by_a_process_that_ended_is_taken_over(tmp_path):
  with open(tmp_path / workdir_lib.LOCK_FILE, 'w') as f:
    f.write('999999999 somehost 2020-01-01T00:00:00\n')  # no lock held: its process is gone
  with workdir_lib.WorkdirLock(str(tmp_path)):
    with pytest.raises(workdir_lib.WorkdirInUseError, match=f'pid {os.getpid()} on host'):
      workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  workdir_lib.WorkdirLock(str(tmp_path)).acquire().release()  # free again


# ----------------------------------------------------------------------------
# 7. Resuming with settings the checkpoints cannot continue.


@pytest.mark.parametrize('change,message', [
    ({'num_train_steps': 20}, 'past the 20 steps this config asks for'),
    ({'data.digits_test_fraction': 0.5},
     'data.digits_test_fraction: checkpoint has 0.2, config has 0.5'),
])
def test_a_finished_workdir_refuses_what_it_cannot_continue(finished, tmp_path, change, message):
  workdir = copy_run(finished['workdir'], tmp_path)
  before = sorted(os.listdir(os.path.join(workdir, 'checkpoints'))), logged_steps(workdir)
  code, output = Cli(workdir, **change).finish()
  assert code == 2, output[-3000:]
  errors = [l for l in console_lines(output) if l.startswith('error: ')]
  assert errors and message in '\n'.join(console_lines(output))
  assert (sorted(os.listdir(os.path.join(workdir, 'checkpoints'))), logged_steps(workdir)) == before


# ----------------------------------------------------------------------------
# 2. Flipped bytes.


def test_flipped_bytes_are_refused_on_load_and_skipped_on_resume(finished, tmp_path):
  workdir = copy_run(finished['workdir'], tmp_path)
  newest = os.path.join(workdir, 'checkpoints', '30')
  target = largest_file(os.path.join(newest, 'state'))
  with open(target, 'r+b') as f:
    f.seek(os.path.getsize(target) // 2)
    chunk = f.read(64)
    f.seek(-len(chunk), 1)
    f.write(bytes(b ^ 0xFF for b in chunk))

  with pytest.raises(loading.CorruptCheckpointError, match='does not match its checksum'):
    loading.load_variables(newest)

  code, output = Cli(workdir).finish()
  assert code == 0, output[-3000:]
  assert f'Skipping the checkpoint {newest}' in output  # the warning, on the console
  assert 'Traceback' not in output
  with open(os.path.join(workdir, 'result.json')) as f:
    assert json.load(f)['resumed_from_step'] == 20
  assert [n for n in os.listdir(os.path.join(workdir, 'checkpoints')) if n.startswith('30.damaged-')]
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(loading.load_variables(newest)))
  assert logged_steps(workdir) == list(range(1, 31))


def test_checkpoints_without_checksums_still_load_and_restore(finished, tmp_path):
  workdir = copy_run(finished['workdir'], tmp_path)
  for step in loading.steps(os.path.join(workdir, 'checkpoints')):
    os.remove(os.path.join(workdir, 'checkpoints', str(step), loading.MANIFEST))  # older code
  variables = loading.load_variables(workdir)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables['params']))
  assert loading.checkpoint_info(workdir)['step'] == 30


# ----------------------------------------------------------------------------
# 3. A read error is not damage. (The Checkpointer with a small stand-in state.)


def small_state(step, value=None):
  value = float(step) if value is None else value
  return state_lib.TrainState(
      step=jnp.asarray(step, jnp.int32), params={'w': jnp.full((64,), value)},
      batch_stats={'mean': jnp.zeros((3,))}, opt_state={'m': jnp.ones((64,))},
      rng=jax.random.PRNGKey(step), warmup_active=jnp.ones((), jnp.bool_),
      metric_sums={'loss': jnp.zeros(())})


def two_checkpoints(tmp_path, value=None):
  config = make_config(keep_checkpoints=5)
  with checkpoints.Checkpointer(str(tmp_path), config) as ckpt:
    for step in (1, 2):
      ckpt.save(small_state(step, value))
  return config, tmp_path / 'checkpoints'


@pytest.mark.parametrize('error', [PermissionError(errno.EACCES, 'Permission denied'),
                                   OSError(errno.EIO, 'Input/output error'),
                                   OSError(errno.ETIMEDOUT, 'Connection timed out')])
def test_a_read_error_while_restoring_stops_the_run_and_moves_nothing(tmp_path, monkeypatch,
                                                                      error):
  config, ckpt_dir = two_checkpoints(tmp_path)
  real_restore = ocp.CheckpointManager.restore

  def restore(self, step, *args, **kwargs):
    if 'state' in kwargs.get('args', {}):  # the arrays; the meta still reads
      raise RuntimeError('tensorstore read failed') from error
    return real_restore(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'restore', restore)
  with checkpoints.Checkpointer(str(tmp_path), config) as ckpt:
    with pytest.raises(checkpoints.CheckpointError, match=f'{error.strerror}.*not damage'):
      ckpt.restore(small_state(0))
  assert sorted(os.listdir(ckpt_dir)) == ['1', '2']


def test_non_finite_values_count_as_damage(tmp_path):
  config, ckpt_dir = two_checkpoints(tmp_path)
  with checkpoints.Checkpointer(str(tmp_path), config) as ckpt:
    ckpt.save(small_state(3, value=np.nan))
  with checkpoints.Checkpointer(str(tmp_path), config) as ckpt:
    assert int(ckpt.restore(small_state(0)).step) == 2
  assert [n for n in os.listdir(ckpt_dir) if n.startswith('3.damaged-')]
  with pytest.raises(loading.CorruptCheckpointError, match='non-finite'):
    loading.load_variables(str(ckpt_dir / [n for n in os.listdir(ckpt_dir) if '3.' in n][0]))


@pytest.mark.parametrize('error,expected', [
    (FileNotFoundError(errno.ENOENT, 'No such file'), integrity.DAMAGED),
    (ValueError('DATA_LOSS: truncated record'), integrity.DAMAGED),
    (loading.CorruptCheckpointError('checksum'), integrity.DAMAGED),
    (PermissionError(errno.EACCES, 'Permission denied'), integrity.READ_ERROR),
    (ValueError('PERMISSION_DENIED: open failed'), integrity.READ_ERROR),
])
def test_verdict_tells_damage_from_a_failed_read(error, expected):
  assert integrity.verdict(error) == expected
  assert integrity.agree(expected) == expected  # one process: its own verdict


# ----------------------------------------------------------------------------
# 4. A crash before the first checkpoint.


def test_a_rerun_after_a_crash_before_the_first_checkpoint_logs_each_step_once(tmp_path):
  config = make_config(num_train_steps=5, batch_size=8)
  source = NanAt(data.create_data_source(config), step=3)
  with pytest.raises(loop.NonFiniteError):
    loop.train_and_evaluate(config, str(tmp_path), source=source)
  assert logged_steps(str(tmp_path)) == [1, 2, 3]  # the aborted attempt's log
  assert not loading.steps(str(tmp_path / 'checkpoints'))

  out = loop.train_and_evaluate(config, str(tmp_path))
  assert out['resumed_from_step'] is None
  assert logged_steps(str(tmp_path)) == [1, 2, 3, 4, 5]
  names = os.listdir(tmp_path)
  assert [n for n in names if n.startswith('metrics.jsonl.aborted-')]
  assert [n for n in names if n.startswith('tensorboard.aborted-')]


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path):
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.write('{"step": 1, "train_loss": 2.0}\n{"step": 2, "train_loss": 1.9}\n{"step": 3, "tra')
  assert logged_steps(str(tmp_path)) == [1, 2]
  metrics.truncate_metrics(str(tmp_path), 2)
  metrics.MetricWriter(str(tmp_path), tensorboard=False).write(3, {'train_loss': 1.8})
  assert logged_steps(str(tmp_path)) == [1, 2, 3]


# ----------------------------------------------------------------------------
# 5. Errors: one line, exit status 2.


@pytest.mark.parametrize('args,names', [
    ((f'--config={EXPERIMENT}', '--config.batch_sise=64'), 'Did you mean "batch_size"'),
    (('--config=experiments/no_such_experiment.py',), 'experiments/no_such_experiment.py'),
    (('--config={syntax_error}',), 'syntax error at line 1'),
    ((f'--config={EXPERIMENT}', '--config.model.dtype=float17'), "'float17'"),
])
def test_a_bad_command_line_is_one_line_and_exit_2(tmp_path, args, names):
  bad = tmp_path / 'bad_config.py'
  bad.write_text('def get_config(:\n')
  args = [a.format(syntax_error=bad) for a in args]
  code, output = Cli(str(tmp_path / 'run'), *args).finish()
  assert code == 2, output[-3000:]
  lines = console_lines(output)
  assert len(lines) <= 5 and lines[-1].startswith('error: ') and names in lines[-1], output
  assert '\\n' not in output and 'Traceback' not in output


def test_a_full_disk_at_start_up_is_one_line_and_leaves_no_empty_config(tmp_path, monkeypatch,
                                                                        capsys):
  from resnet_jax import main  # pylint: disable=g-import-not-at-top

  class FullDisk:
    def __init__(self, path, mode='r'):
      self._f = open(path, mode)  # pylint: disable=consider-using-with

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self._f.close()

    def write(self, text):
      raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(workdir_lib, 'open', FullDisk, raising=False)
  flags.FLAGS(['main', f'--config={EXPERIMENT}', f'--workdir={tmp_path}'])
  try:
    flags.FLAGS.config.update_from_flattened_dict({**SETTINGS, 'batch_size': 8})
    with pytest.raises(SystemExit) as exit_:
      main.main(['main'])
  finally:
    flags.FLAGS.unparse_flags()
  assert exit_.value.code == 2
  [line] = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert line.startswith('error: ') and 'config.json' in line and 'No space left on device' in line
  assert not [n for n in os.listdir(tmp_path) if n.startswith('config.json')]


def test_a_failed_background_save_is_reported_at_the_next_step(tmp_path, monkeypatch):
  async def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, 'No space left on device')

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, 'finalize', disk_full)
  with checkpoints.Checkpointer(str(tmp_path), make_config()) as ckpt:
    ckpt.save(small_state(1))
    deadline = time.time() + 120  # a small save fails within seconds; no step waits for it
    with pytest.raises(checkpoints.CheckpointError, match='step 1 .*No space left on device'):
      while time.time() < deadline:  # what the loop does after each step
        ckpt.poll()


# ----------------------------------------------------------------------------
# 6. Ctrl-C during start-up.


def test_ctrl_c_during_start_up_exits_130_without_a_traceback(tmp_path):
  run = Cli(str(tmp_path), progress_bar=True)
  started = run.wait_for(lambda: 'parameters;' in run.output())  # printed before the first step
  run.proc.send_signal(signal.SIGINT)
  code, output = run.finish()
  assert started, output[-3000:]
  assert code == 130, output[-3000:]
  assert 'Interrupted by SIGINT' in output and 'Traceback' not in output


def test_a_signal_during_build_stops_at_the_next_safe_point_writing_nothing(tmp_path,
                                                                            monkeypatch):
  real_build = build_lib.build

  def build_then_ctrl_c(*args, **kwargs):
    run = real_build(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGINT)  # arrives while start-up is still going
    return run

  monkeypatch.setattr(build_lib, 'build', build_then_ctrl_c)
  with pytest.raises(loop.RunInterrupted, match='during start-up .after building the run') as e:
    loop.train_and_evaluate(make_config(batch_size=8), str(tmp_path))
  assert e.value.signum == signal.SIGINT
  assert not os.path.exists(tmp_path / 'checkpoints') and not os.path.exists(tmp_path / 'metrics.jsonl')
