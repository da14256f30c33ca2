"""Training, its outputs and the commands need no TensorFlow: runs in processes
where `import tensorflow` and `import tensorflow_datasets` fail, as if they were
not installed."""

import json
import os
import struct
import subprocess
import sys

import pytest

from cifar_writer import official_size, write_form  # pylint: disable=g-bad-import-order
from conftest import ROOT  # pylint: disable=g-bad-import-order

# None in sys.modules: `import tensorflow` raises ImportError and
# importlib.util.find_spec('tensorflow') says it is not installed.
_NO_TF = ("import sys\n"
          "sys.modules['tensorflow'] = None\n"
          "sys.modules['tensorflow_datasets'] = None\n")


def _python(code, timeout=900):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  out = subprocess.run([sys.executable, '-c', _NO_TF + code], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout, check=False)
  assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
  return out.stdout


def _python_fails(code, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.run([sys.executable, '-c', _NO_TF + code], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout, check=False)


def _main(*args):
  return _python(f"import runpy; sys.argv = ['resnet_jax.main', *{list(args)!r}]\n"
                 "runpy.run_module('resnet_jax.main', run_name='__main__')")


def test_the_blocker_blocks():
  with pytest.raises(AssertionError, match='halted'):
    _python('import tensorflow')


def test_the_commands_and_the_package_import_without_tensorflow():
  modules = ['resnet_jax', 'resnet_jax.data', 'resnet_jax.data.cifar_files',
             'resnet_jax.data.imagenet_files', 'resnet_jax.training.loop', 'resnet_jax.main',
             'resnet_jax.sweep', 'resnet_jax.report', 'resnet_jax.benchmark',
             'resnet_jax.benchmark_input', 'resnet_jax.benchmark_gpu', 'resnet_jax.analysis',
             'resnet_jax.summary', 'resnet_jax.predict', 'resnet_jax.evaluate',
             'resnet_jax.export', 'resnet_jax.convert']
  out = _python('import importlib\n' + ''.join(f'importlib.import_module({m!r})\n' for m in modules)
                + "print('imported')")
  assert 'imported' in out


def _event_scalars(directory):
  """{tag: [(step, value)]} from the TensorBoard event files (TFRecord framing)."""
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  scalars = {}
  for name in sorted(os.listdir(directory)):
    data = (directory / name).read_bytes()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack('<Q', data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return scalars


def test_training_on_the_official_cifar_files_writes_every_output(tmp_path):
  write_form(tmp_path / 'data', 'cifar-10-batches-bin', official_size())
  workdir = tmp_path / 'run'
  _main('--config=experiments/cifar_resnet20.py', f'--workdir={workdir}',
        '--config.data.source=files', f"--config.data.data_dir={tmp_path / 'data'}",
        '--config.data.val_split=train[49900:]', '--config.data.test_split=test[:100]',
        '--config.batch_size=16', '--config.eval_batch_size=100', '--config.num_train_steps=4',
        '--config.log_every_steps=2', '--config.eval_every_steps=4',
        '--config.checkpoint_every_steps=2', '--config.progress_bar=False')
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in records] == [2, 4]
  result = json.loads((workdir / 'result.json').read_text())
  assert result['steps'] == 4 and result['test_examples'] == 100 and result['data'] == 'cifar10'
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  scalars = _event_scalars(workdir / 'tensorboard')
  for tag in ('train_loss', 'train_error', 'learning_rate', 'grad_norm', 'images_per_second'):
    assert [step for step, _ in scalars[tag]] == [2, 4], tag
    assert [v for _, v in scalars[tag]] == pytest.approx([r[tag] for r in records], rel=1e-6)
  assert scalars['test_error'] == [(4, pytest.approx(records[-1]['test_error'], rel=1e-6))]
  assert scalars['validation_error'][0][0] == 4


def test_the_digits_demo_runs_without_tensorflow(tmp_path):
  _main('--config=experiments/digits_resnet20.py', f'--workdir={tmp_path}',
        '--config.num_train_steps=2', '--config.eval_every_steps=2',
        '--config.checkpoint_every_steps=2', '--config.progress_bar=False')
  assert json.loads((tmp_path / 'result.json').read_text())['test_examples'] == 360


def test_training_on_imagenet_class_folders_writes_every_output(tmp_path):
  from imagenet_writer import write_imagenet  # pylint: disable=g-import-not-at-top
  write_imagenet(tmp_path / 'data')
  workdir = tmp_path / 'run'
  args = ['--config=experiments/imagenet_resnet18.py', f'--workdir={workdir}',
          '--config.data.source=files', f"--config.data.data_dir={tmp_path / 'data'}",
          '--config.data.image_size=32', '--config.data.min_resize=36',
          '--config.data.max_resize=48', '--config.data.eval_resize=36',
          '--config.num_epochs=-1', '--config.batch_size=4', '--config.eval_batch_size=4',
          '--config.num_train_steps=2', '--config.log_every_steps=1',
          '--config.eval_every_steps=2', '--config.checkpoint_every_steps=2',
          '--config.progress_bar=False']
  # A complete copy of ILSVRC-2012 patched down to the 3 classes written here; then the
  # evaluate command on the run's workdir.
  evaluation = tmp_path / 'evaluation.json'
  _python("import runpy\n"
          "from resnet_jax.data import imagenet_files\n"
          "from resnet_jax import evaluate\n"
          "imagenet_files._EXPECTED = {'classes': 3, 'train': 12, 'validation': 6}\n"
          f"sys.argv = ['resnet_jax.main', *{args!r}]\n"
          "try:\n"
          "  runpy.run_module('resnet_jax.main', run_name='__main__')\n"
          "except SystemExit as e:\n"
          "  assert not e.code, e.code\n"
          f"assert evaluate.main(['--workdir={workdir}', \"--data_dir={tmp_path / 'data'}\", "
          f"'--out={evaluation}']) == 0\n")
  result = json.loads((workdir / 'result.json').read_text())
  assert (result['steps'], result['data'], result['test_examples']) == (2, 'imagenet2012', 6)
  # The run's own validation images and normalisation: its own test error.
  measured = json.loads(evaluation.read_text())
  assert (measured['split'], measured['examples']) == ('validation', 6)
  assert measured['error'] == pytest.approx(result['test_error'], abs=1e-9)
  assert [json.loads(l)['step'] for l in (workdir / 'metrics.jsonl').read_text().splitlines()
          if 'train_loss' in json.loads(l)] == [1, 2]
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2']


@pytest.mark.parametrize('experiment,names', [
    ('cifar_resnet20.py', 'cifar-10-batches-py/'), ('imagenet_resnet50.py', 'train/<wnid>/')])
def test_the_tfds_source_without_tensorflow_is_one_error_line_naming_the_files_source(
    tmp_path, experiment, names):
  workdir = tmp_path / 'run'
  out = _python_fails("import runpy\n"
                      f"sys.argv = ['resnet_jax.main', '--config=experiments/{experiment}', "
                      f"'--workdir={workdir}']\n"
                      "runpy.run_module('resnet_jax.main', run_name='__main__')")
  assert out.returncode == 2, (out.stdout + out.stderr)[-3000:]
  assert 'Traceback' not in out.stderr, out.stderr[-3000:]
  assert "config.data.source='tfds' needs TensorFlow and tensorflow-datasets" in out.stderr
  assert '--config.data.source=files' in out.stderr and names in out.stderr
  assert not workdir.exists()


def test_the_imagenet_benchmark_measures_the_pillow_pipeline_without_tensorflow():
  out = _python("from resnet_jax import benchmark, configs\n"
                "c = configs.imagenet('resnet50', batch_size=4)\n"
                "c.data.update(image_size=16, min_resize=18, max_resize=24)\n"
                "r = benchmark._pipeline(c)\n"
                "print(r['name'], r['batch_size'])")
  assert 'imagenet files preprocessing (Pillow) on generated JPEGs 4' in out
