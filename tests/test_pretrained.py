"""Shipped weights: the exporter writes them from a finished run, `pretrained` loads them.

Exercised on a 4-step digits run (conftest.short_digits_run), exported to a
temporary folder, never to the package's.
"""

import configparser
import glob
import json
import os

import numpy as np
import pytest

import resnet_jax
from resnet_jax import data, export
from resnet_jax.weights import shipped

from conftest import ROOT, experiment_config  # pylint: disable=g-bad-import-order


@pytest.fixture(scope='module')
def exported(short_digits_run, tmp_path_factory):
  workdir, _ = short_digits_run
  out_dir = str(tmp_path_factory.mktemp('weights'))
  package_files = sorted(os.listdir(shipped.FILES_DIR)) if os.path.isdir(shipped.FILES_DIR) else []
  assert export.main(['--workdir', workdir, '--name', 'digits_resnet20', '--out_dir', out_dir,
                      '--data_label', 'digits test split (360 images)']) == 0
  now = sorted(os.listdir(shipped.FILES_DIR)) if os.path.isdir(shipped.FILES_DIR) else []
  assert now == package_files  # the package itself is untouched
  return out_dir


def test_cifar_resnet20_is_not_shipped_yet(tmp_path):
  with pytest.raises(shipped.NotShippedError, match=r'cifar_resnet20 are not shipped yet.*'
                                                    r'Shipped: none yet.*resnet_jax\.export'):
    resnet_jax.pretrained('cifar_resnet20', directory=str(tmp_path))
  assert resnet_jax.pretrained.available(str(tmp_path)) == []
  if 'cifar_resnet20' not in resnet_jax.pretrained.available():  # until the run is exported
    with pytest.raises(shipped.NotShippedError, match='not shipped yet'):
      resnet_jax.pretrained('cifar_resnet20')
  with pytest.raises(shipped.NotShippedError, match="no shipped weights named 'nonsense'"):
    resnet_jax.pretrained('nonsense', directory=str(tmp_path))
  with pytest.raises(ValueError, match='is not a weights name'):
    resnet_jax.pretrained('../cifar_resnet20')


def test_exported_weights_are_the_run_s_and_carry_its_result(short_digits_run, exported):
  workdir, result = short_digits_run
  assert resnet_jax.pretrained.available(exported) == ['digits_resnet20']
  net = resnet_jax.pretrained('digits_resnet20', directory=exported)
  with open(os.path.join(workdir, 'result.json')) as f:
    recorded = json.load(f)
  assert net['test_error'] == recorded['test_error'] == result['test_error']
  assert net['data'] == 'digits test split (360 images)'
  assert net['label_names'] == [str(i) for i in range(10)]
  assert net['model'] == 'cifar_resnet20'
  info = resnet_jax.checkpoint_info(workdir)
  assert net['source']['step'] == info['step'] == 4
  import jax  # pylint: disable=g-import-not-at-top
  jax.tree.map(np.testing.assert_array_equal, net['variables'],
               resnet_jax.load_variables(workdir))


def test_normalisation_and_test_error_reproduce_the_run(short_digits_run, exported):
  """The stored mean image normalises as the run did; the run's test error follows."""
  workdir, _ = short_digits_run
  net = resnet_jax.pretrained('digits_resnet20', directory=exported)
  config = experiment_config('digits_resnet20', batch_size=16)
  source = data.create_data_source(config)
  images, labels = source.eval_arrays('test')
  np.testing.assert_allclose(net['normalize'](images), source.normalize(images), atol=1e-5)
  _, apply_fn = resnet_jax.functional(net['model'], **net['model_kwargs'])
  logits = np.asarray(apply_fn(net['variables'], net['normalize'](images)))
  error = 100.0 * float(np.mean(logits.argmax(-1) != labels))
  assert error == pytest.approx(net['test_error'], abs=1e-6)
  assert net['normalize_spec'] == {'kind': 'pixel_mean'}
  mean_image = source.stats['pixel_mean']
  assert not np.allclose(mean_image, mean_image.mean())  # a real image, not one number


def test_export_refuses_what_it_cannot_vouch_for(short_digits_run, exported, tmp_path, capsys):
  workdir, _ = short_digits_run
  # An existing file is kept unless --overwrite.
  assert export.main(['--workdir', workdir, '--name', 'digits_resnet20',
                      '--out_dir', exported]) == 2
  assert 'pass --overwrite' in capsys.readouterr().err
  # No result.json: not a finished run.
  assert export.main(['--workdir', str(tmp_path), '--name', 'x', '--out_dir', str(tmp_path)]) == 2
  assert 'export only a finished run' in capsys.readouterr().err
  assert os.listdir(tmp_path) == []


def test_damaged_file_is_reported(tmp_path):
  (tmp_path / 'broken.npz').write_bytes(b'PK\x03\x04 not really a zip')
  with pytest.raises(ValueError, match='broken.npz is not a readable weights file'):
    resnet_jax.pretrained('broken', directory=str(tmp_path))


def test_package_data_ships_the_weight_files():
  setup = configparser.ConfigParser()
  setup.read(os.path.join(ROOT, 'setup.cfg'))
  patterns = setup['options.package_data']['resnet_jax.weights'].split()
  assert 'files/*.npz' in patterns


def test_every_shipped_file_loads_and_states_its_committed_result():
  """Each weights file in the package: builds, gives finite logits, and states the test
  error of the result.json committed under docs/ for it (docs/*/NAME/result.json); the
  README names it. With none shipped, the README must say so."""
  with open(os.path.join(ROOT, 'README.md')) as f:
    readme = f.read()
  names = resnet_jax.pretrained.available()
  if not names:
    assert 'None is shipped yet' in readme
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), np.uint8)
  for name in names:
    net = resnet_jax.pretrained(name)
    _, apply_fn = resnet_jax.functional(net['model'], **net['model_kwargs'])
    logits = np.asarray(apply_fn(net['variables'], net['normalize'](images)))
    assert logits.shape == (4, len(net['label_names'])) and np.isfinite(logits).all(), name
    results = glob.glob(os.path.join(ROOT, 'docs', '*', name, 'result.json'))
    assert len(results) == 1, f'commit the result.json of {name} as docs/<topic>/{name}/result.json'
    with open(results[0]) as f:
      result = json.load(f)
    assert net['test_error'] == result['test_error'], name
    assert net['source']['step'] == result['steps'], name
    assert f"pretrained('{name}')" in readme or f'--pretrained={name}' in readme, name
