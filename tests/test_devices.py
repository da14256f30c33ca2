"""Any device count, several hosts: the mesh, the public command line on 8
devices, and a stop request or a damaged checkpoint that reaches one host of two."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import types

import jax
import numpy as np
import pytest

from resnet_jax.training import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, 'tests', 'run_worker.py')


def _fake_devices(processes):
  """Fake devices with ids 0.. and the given process of each."""
  return [types.SimpleNamespace(id=i, process_index=p) for i, p in enumerate(processes)]


def test_process_contiguous():
  contiguous = parallel._process_contiguous  # pylint: disable=protected-access
  assert contiguous(_fake_devices([0, 0, 1, 1]))
  assert contiguous(_fake_devices([0]))
  assert not contiguous(_fake_devices([0, 1, 0, 1]))    # interleaved
  assert not contiguous(_fake_devices([1, 1, 0, 0]))    # process 1's rows first
  assert not contiguous(_fake_devices([0, 0, 1, 1, 0]))  # process 0 split in two


@pytest.mark.parametrize('topology', ['interleaved', 'make_mesh_fails', 'contiguous'])
def test_create_mesh_orders_devices_by_process_unless_the_topology_order_is_contiguous(
    monkeypatch, topology):
  devices = _fake_devices([0, 1, 0, 1, 0, 1, 0, 1])  # ids 0..7
  topology_order = {'interleaved': devices,
                    'contiguous': sorted(devices, key=lambda d: (d.process_index, -d.id))}

  def make_mesh(shape, names, **kwargs):
    del shape, kwargs
    if topology == 'make_mesh_fails':
      raise ValueError('unusual topology')
    return types.SimpleNamespace(devices=np.asarray(topology_order[topology]), axis_names=names)

  monkeypatch.setattr(jax, 'make_mesh', make_mesh)
  monkeypatch.setattr(jax, 'devices', lambda: list(devices))
  monkeypatch.setattr(jax, 'device_count', lambda: len(devices))
  monkeypatch.setattr(parallel, 'Mesh', lambda devs, names, **kwargs: types.SimpleNamespace(
      devices=np.asarray(devs), axis_names=names))
  mesh = parallel.create_mesh()
  order = [(d.process_index, d.id) for d in mesh.devices.flat]
  if topology == 'contiguous':  # the topology's own order is kept
    assert order == [(0, 6), (0, 4), (0, 2), (0, 0), (1, 7), (1, 5), (1, 3), (1, 1)]
  else:
    assert order == [(0, 0), (0, 2), (0, 4), (0, 6), (1, 1), (1, 3), (1, 5), (1, 7)]
  assert mesh.axis_names == (parallel.DATA_AXIS,)


def _env(devices):
  return dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
              XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')


# Offline and short: 2 steps, one evaluation and one checkpoint at step 2. The
# 301-example test split is not a multiple of the device count, so the last
# evaluation batch is padded.
_SHORT = {'num_train_steps': 2, 'eval_every_steps': 2, 'checkpoint_every_steps': 2,
          'log_every_steps': 1, 'progress_bar': False}
# On simulated devices a ResNet-110 step of 128 images takes about a minute on two
# CPU cores: batch 16 (2 images per device) and evaluation batches of 64 (the last of
# 301 padded) keep the test short; the network, optimiser and data pipeline are the
# experiment's own. `model.scan_blocks` computes the same network with the same
# parameters (test_models checks it) and compiles faster.
_SYNTHETIC_CIFAR = {**_SHORT, 'data.source': 'synthetic', 'data.synthetic_examples': 64,
                    'data.val_split': '', 'data.test_split': 'test[:301]',
                    'batch_size': 16, 'eval_batch_size': 64, 'model.scan_blocks': True}
# ResNet-50 at batch 256 and 224 pixels would take the better part of an hour on
# two CPU cores: the batch and the image size (32: stage 4 works on 1x1 maps) are
# the only other overrides.
_SYNTHETIC_IMAGENET = {**_SHORT, 'num_epochs': -1, 'data.source': 'synthetic', 'data.synthetic_examples': 32,
                       'data.test_split': 'validation[:21]', 'data.image_size': 32,
                       'batch_size': 16, 'eval_batch_size': 16, 'model.scan_blocks': True}


def _main(experiment, workdir, devices, overrides):
  args = [sys.executable, '-m', 'resnet_jax.main', f'--config=experiments/{experiment}',
          f'--workdir={workdir}'] + [f'--config.{k}={v}' for k, v in overrides.items()]
  out = subprocess.run(args, env=_env(devices), cwd=ROOT, capture_output=True, text=True,
                       timeout=900, check=False)
  assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
  return json.loads((workdir / 'result.json').read_text())


@pytest.mark.slow
@pytest.mark.parametrize('experiment,overrides,test_examples', [
    ('digits_resnet20.py', _SHORT, 360),
    ('cifar_resnet110.py', _SYNTHETIC_CIFAR, 301),
    ('imagenet_resnet50.py', _SYNTHETIC_IMAGENET, 21),
])
def test_experiments_run_unchanged_on_8_devices(tmp_path, experiment, overrides, test_examples):
  result = _main(experiment, tmp_path, 8, overrides)
  assert result['device_count'] == 8 and result['steps'] == 2
  assert result['test_examples'] == test_examples
  assert result['config']['batch_size'] % 8 == 0
  assert (tmp_path / 'checkpoints' / '2').is_dir()


@pytest.mark.parametrize('devices', [1, 2, 4])
def test_digits_runs_on_1_2_and_4_devices(tmp_path, devices):
  result = _main('digits_resnet20.py', tmp_path, devices, _SHORT)
  assert result['device_count'] == devices and result['test_examples'] == 360


# --- Two processes, a SIGTERM to one of them -------------------------------------------

def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


_RUN = ['batch_size=16', 'eval_batch_size=200', 'eval_every_steps=1000', 'log_every_steps=1',
        'checkpoint_every_steps=1000', 'learning_rate=0.01']


def _worker(out, workdir, args, devices, env=(), **distributed):
  extra = [f'{k}={v!r}' for k, v in distributed.items()]
  return subprocess.Popen([sys.executable, WORKER, str(out), str(workdir), *args, *extra],
                          env={**_env(devices), **dict(env)}, cwd=ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _two_processes(out, workdir, args, envs=((), ())):
  port = _free_port()
  return [_worker(out, workdir, args, 1, env=envs[i], distributed='yes',
                  coordinator_address=f'127.0.0.1:{port}', num_processes=2, process_id=i)
          for i in range(2)]


def _logged_step(workdir):
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return 0
  steps = [0]
  for line in path.read_text().splitlines():
    try:
      steps.append(json.loads(line)['step'])
    except ValueError:  # a line being written
      pass
  return max(steps)


def _wait(procs, timeout=900):
  """(exit code, console) of each process; a hang fails the test rather than the suite.

  On a timeout every process is killed (not only the one waited for), so that
  no worker outlives the test, and the consoles so far are in the failure.
  """
  deadline = time.time() + timeout
  try:
    for p in procs:
      p.wait(timeout=max(0.0, deadline - time.time()))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    consoles = [p.communicate()[0][-3000:] for p in procs]
    pytest.fail(f'Still running after {timeout} s (a hang or a stop request that was '
                f'never acted on):\n' + '\n---\n'.join(consoles))
  return [(p.returncode, p.stdout.read()) for p in procs]


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step_and_resumes_exactly(
    tmp_path):
  workdir = tmp_path / 'two'
  procs = _two_processes(tmp_path / 'unused.npz', workdir, [*_RUN, 'num_train_steps=100000'])
  deadline = time.time() + 900
  while _logged_step(workdir) < 2:  # handshake: both processes are past a step
    assert all(p.poll() is None for p in procs) and time.time() < deadline, _wait(procs, 30)
    time.sleep(0.05)
  procs[1].send_signal(signal.SIGTERM)  # the non-lead process: process 0 only learns of it
  # At most STOP_CHECK_EVERY_STEPS steps (about a second each here) and one save.
  outs = _wait(procs, timeout=300)
  assert [code for code, _ in outs] == [128 + signal.SIGTERM] * 2, outs
  saved = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert len(saved) == 1, saved
  stop = saved[0]
  for _, console in outs:  # both processes stopped after the step that was saved
    assert f'after step {stop};' in console, console[-2000:]
  assert stop % 10 == 0

  # Resume both processes for two more steps, and compare with the same pair run
  # without a stop. Not with one process: a 1-device and a 2x1-device run differ
  # in the order of float reductions, which these batch-16 steps amplify to
  # percents of the loss by step 10 (test_train compares the layouts over 4 steps).
  final = stop + 2
  resumed = _two_processes(tmp_path / 'resumed.npz', workdir, [*_RUN, f'num_train_steps={final}'])
  reference = _two_processes(tmp_path / 'straight.npz', tmp_path / 'straight',
                             [*_RUN, f'num_train_steps={final}'])
  for code, console in _wait([*resumed, *reference]):
    assert code == 0, console[-4000:]
  # Same layout, same reduction order: a resumed run is bit for bit the run
  # that never stopped (losses, parameters, BN statistics, optimiser state).
  a, b = np.load(tmp_path / 'straight.npz'), np.load(tmp_path / 'resumed.npz')
  assert len(a['losses']) == final and set(a.files) == set(b.files)
  for k in a.files:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_sigterm_to_one_of_two_processes_during_start_up_stops_both_writing_nothing(tmp_path):
  workdir = tmp_path / 'two'
  # Process 1 signals itself right after building the run (its data, mesh and step
  # functions), before any state exists; process 0 only learns of it from process 1.
  procs = _two_processes(tmp_path / 'unused.npz', workdir, [*_RUN, 'num_train_steps=100'],
                         envs=((), {'RUN_WORKER_SIGTERM_AFTER_BUILD': '1'}))
  (code0, console0), (code1, console1) = _wait(procs, timeout=300)
  assert (code0, code1) == (128 + signal.SIGTERM,) * 2, (console0[-3000:], console1[-3000:])
  for console in (console0, console1):
    assert 'during start-up (after building the run)' in console, console[-3000:]
  assert 'SIGTERM (sent to another process of the run)' in console0, console0[-3000:]
  assert 'another process' not in console1, console1[-3000:]
  assert not (workdir / 'checkpoints').exists() and not (workdir / 'metrics.jsonl').exists()


@pytest.mark.slow
def test_a_checkpoint_damaged_as_one_process_reads_it_is_skipped_by_both(tmp_path):
  workdir = tmp_path / 'two'
  args = [*_RUN, 'checkpoint_every_steps=2']
  outs = _wait(_two_processes(tmp_path / 'first.npz', workdir, [*args, 'num_train_steps=4']))
  assert [code for code, _ in outs] == [0, 0], '\n---\n'.join(c[-4000:] for _, c in outs)
  # Flip bytes in a state file of the newest checkpoint, not in its meta: only process 0
  # checks the checksums, so process 1 alone would read step 4 and restore it.
  largest = max((p for p in (workdir / 'checkpoints' / '4' / 'state').rglob('*') if p.is_file()),
                key=lambda p: p.stat().st_size)
  data = bytearray(largest.read_bytes())
  middle = len(data) // 2
  data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
  largest.write_bytes(bytes(data))

  outs = _wait(_two_processes(tmp_path / 'resumed.npz', workdir, [*args, 'num_train_steps=6']),
               timeout=600)
  assert [code for code, _ in outs] == [0, 0], '\n---\n'.join(c[-4000:] for _, c in outs)
  skipped = f'Skipping the checkpoint {workdir}/checkpoints/4, which cannot be restored'
  for _, console in outs:
    assert skipped in console, console[-4000:]
  assert 'does not match its checksum' in outs[0][1], outs[0][1][-4000:]  # what process 0 read
  assert 'damaged as read by another process' in outs[1][1], outs[1][1][-4000:]
  assert 'Moved the damaged checkpoint' in outs[0][1], outs[0][1][-4000:]
  names = sorted(p.name for p in (workdir / 'checkpoints').iterdir())
  assert [n for n in names if n.isdigit()] == ['2', '4', '6'], names  # 4 and 6 written again
  assert len([n for n in names if n.startswith('4.damaged-')]) == 1, names
  logged = [json.loads(line)['step'] for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert logged == [1, 2, 3, 4, 5, 6], logged  # resumed after step 2, each step logged once
  assert json.loads((workdir / 'result.json').read_text())['resumed_from_step'] == 2
