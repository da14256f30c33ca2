"""The notebooks run end to end on the CPU in their short mode (digits data, a few steps)."""

import json
import os
import sys

import nbclient
import nbformat
import pytest

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'notebooks')


@pytest.fixture(scope='module')
def kernel_name(tmp_path_factory):
  """A kernelspec that runs this interpreter (this venv), found through JUPYTER_PATH."""
  root = tmp_path_factory.mktemp('jupyter')
  spec_dir = root / 'kernels' / 'resnet_jax_test'
  os.makedirs(spec_dir)
  with open(spec_dir / 'kernel.json', 'w') as f:
    json.dump({'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
               'display_name': 'resnet_jax tests', 'language': 'python'}, f)
  old = os.environ.get('JUPYTER_PATH')
  os.environ['JUPYTER_PATH'] = os.pathsep.join([str(root)] + ([old] if old else []))
  yield 'resnet_jax_test'
  if old is None:
    del os.environ['JUPYTER_PATH']
  else:
    os.environ['JUPYTER_PATH'] = old


def _execute(name, parameters, workdir, kernel_name):
  """Runs notebooks/<name> with its 'parameters' cell replaced; returns the executed notebook."""
  nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  cells = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(cells) == 1, f'{name} must have exactly one cell tagged "parameters"'
  cells[0].source = '\n'.join(f'{k} = {v!r}' for k, v in parameters.items())
  client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=600,
                                   resources={'metadata': {'path': str(workdir)}})
  client.execute()
  return nb


def _outputs(nb, output_type=None):
  return [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs
          if output_type is None or o.output_type == output_type]


def _images(nb):
  return [o for o in _outputs(nb) if 'image/png' in o.get('data', {})]


def _text(nb):
  return '\n'.join(o.get('text', '') for o in _outputs(nb, 'stream'))


@pytest.mark.slow
def test_colab_notebook_trains_and_plots(tmp_path, kernel_name):
  nb = _execute('colab_train_cifar.ipynb', {
      'REPO_URL': 'unused: the package is installed', 'EXPERIMENT': 'cifar_resnet20',
      'DATA_SOURCE': 'digits', 'NUM_STEPS': 6, 'SEED': 0, 'WORKDIR': str(tmp_path / 'run'),
      'EXTRA_SETTINGS': [], 'SHORT': True}, tmp_path, kernel_name)
  text = _text(nb)
  assert 'on [CpuDevice' in text
  assert 'cifar_resnet20: test error' in text and 'digits test images after 6 steps' in text
  assert os.path.exists(tmp_path / 'run' / 'result.json')
  assert len(_images(nb)) == 2  # Fig. 6 and Fig. 7 style plots
  table = [o for o in _outputs(nb, 'display_data') if 'text/markdown' in o.data]
  assert 'DEMONSTRATION' in table[0].data['text/markdown']


@pytest.mark.slow
def test_functional_api_tour_runs(tmp_path, kernel_name):
  nb = _execute('functional_api_tour.ipynb', {
      'REPO_URL': 'unused: the package is installed', 'MODEL': 'cifar_resnet20',
      'CHECKPOINT_DIR': '', 'TRAIN_STEPS': 6, 'SHORT': True}, tmp_path, kernel_name)
  text = _text(nb)
  assert 'logits (8, 10) | parameters 269722' in text
  assert '18 layers: stage1_block1/conv1' in text
  assert 'model cifar_resnet20 at step 6' in text and 'accuracy on 360 test digits' in text
  assert os.path.exists(tmp_path / 'workdirs' / 'tour_cifar_resnet20' / 'result.json')
  assert len(_images(nb)) == 1


def test_notebooks_hold_only_calls_into_the_package():
  for name in sorted(os.listdir(NOTEBOOKS)):
    if name.endswith('.ipynb'):
      nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
      source = '\n'.join(c.source for c in nb.cells if c.cell_type == 'code')
      assert 'def ' not in source and 'class ' not in source, name
      assert all(not c.get('outputs') for c in nb.cells if c.cell_type == 'code'), \
          f'{name} is stored with outputs'
