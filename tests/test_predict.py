"""python -m resnet_jax.predict on a few PNGs written here, one of them corrupt.

Networks: a 4-step digits run (its workdir and its exported weights) and a
converted torchvision-layout ResNet-18 built from random numpy arrays (no
torch, nothing downloaded).
"""

import re

import jax
import numpy as np
import pytest
from PIL import Image

import resnet_jax
from resnet_jax import data, export, predict
from resnet_jax.weights import loading
from resnet_jax.weights import from_torchvision
from resnet_jax.weights import torchvision as tv

from conftest import experiment_config  # pylint: disable=g-bad-import-order

_LINE = re.compile(r'^  +(\d+\.\d\d)%  (.+)$')


def _parse(stdout):
  """{image path: [(probability, class name), ...]} from predict's output."""
  out, current = {}, None
  for line in stdout.splitlines()[1:]:  # the first line names the network
    m = _LINE.match(line)
    if m:
      out[current].append((float(m.group(1)) / 100, m.group(2)))
    else:
      current = line
      out[current] = []
  return out


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
  """Three digits test images as PNGs (one enlarged to 64x48), and a corrupt PNG."""
  folder = tmp_path_factory.mktemp('images')
  images, _ = data.create_data_source(experiment_config('digits_resnet20')).eval_arrays('test')
  Image.fromarray(images[0]).save(folder / 'a.png')
  Image.fromarray(images[1]).save(folder / 'b.png')
  Image.fromarray(images[2]).resize((64, 48)).save(folder / 'c.png')
  (folder / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'\x00' * 40)
  (folder / 'notes.txt').write_text('not an image')
  return folder


@pytest.fixture(scope='module')
def weights_dir(short_digits_run, tmp_path_factory):
  out = str(tmp_path_factory.mktemp('weights'))
  assert export.main(['--workdir', short_digits_run[0], '--name', 'digits', '--out_dir', out]) == 0
  return out


def test_pretrained_top5_per_image_and_the_corrupt_one_reported(image_folder, weights_dir, capsys):
  rc = predict.main(['--pretrained=digits', f'--weights_dir={weights_dir}', str(image_folder)])
  captured = capsys.readouterr()
  assert rc == 1
  assert 'corrupt.png' in captured.err and 'cannot read it as an image' in captured.err
  assert 'notes.txt' not in captured.out + captured.err
  results = _parse(captured.out)
  assert sorted(p.rsplit('/', 1)[1] for p in results) == ['a.png', 'b.png', 'c.png']
  net = resnet_jax.pretrained('digits', directory=weights_dir)
  for path, top in results.items():
    assert len(top) == 5
    assert all(name in [str(i) for i in range(10)] for _, name in top)
    probs = [p for p, _ in top]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-3
    # The same numbers as the network applied to the image as prepared (32x32).
    image = predict.prepare(path, 'cifar')
    assert image.shape == (32, 32, 3)
    expected = predict.classify(net, image[None])[0]
    best = int(np.argmax(expected))
    assert top[0] == (pytest.approx(expected[best], abs=6e-5), str(best))


def test_workdir_normalises_with_the_run_s_statistics(short_digits_run, image_folder,
                                                      weights_dir, capsys):
  files = [str(image_folder / n) for n in ('a.png', 'b.png', 'c.png')]
  assert predict.main(['--pretrained=digits', f'--weights_dir={weights_dir}', *files]) == 0
  from_file = _parse(capsys.readouterr().out)
  assert predict.main([f'--workdir={short_digits_run[0]}', *files]) == 0
  from_workdir = _parse(capsys.readouterr().out)
  assert from_workdir == from_file and len(from_file) == 3
  # Printed to 0.01%, a barely trained net can hide a wrong input: compare the inputs too.
  images = np.stack([predict.prepare(f, 'cifar') for f in files])
  run_net = predict.load_network(workdir=short_digits_run[0])
  file_net = resnet_jax.pretrained('digits', directory=weights_dir)
  np.testing.assert_allclose(run_net['normalize'](images), file_net['normalize'](images),
                             atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, run_net['variables'], file_net['variables'])


def test_best_without_a_recorded_validation_error_is_an_error(short_digits_run, image_folder,
                                                             capsys):
  assert predict.main([f'--workdir={short_digits_run[0]}', '--best',
                       str(image_folder / 'a.png')]) == 2
  assert 'recorded validation error' in capsys.readouterr().err


def _numpy_torchvision_state_dict(num_classes, seed=0):
  """A random state dict in torchvision's layout (OIHW convs, (out, in) fc), without torch."""
  rng = np.random.default_rng(seed)
  state = {}
  for key, (path, shape) in tv._expected('resnet18', num_classes).items():  # pylint: disable=protected-access
    torch_shape = tv._torch_shape(shape, path[-1])  # pylint: disable=protected-access
    scale = 0.05 if path[-1] == 'kernel' else 0.1
    value = rng.normal(size=torch_shape) * scale
    state[key] = np.abs(value) + 0.5 if path[-1] == 'var' else value.astype(np.float32)
  return state


def test_converted_checkpoint_uses_imagenet_preprocessing(tmp_path, capsys):
  converted = from_torchvision('resnet18', _numpy_torchvision_state_dict(7))
  out = tmp_path / 'converted'
  loading.write_inference_checkpoint(
      str(out), converted['variables'], converted['model'], converted['model_kwargs'],
      {'normalize': converted['normalize_spec'], 'label_names': None, 'source': {}})
  rng = np.random.default_rng(0)
  wide = rng.integers(0, 256, size=(256, 512, 3), dtype=np.uint8)  # already 256 on the short side
  Image.fromarray(wide).save(tmp_path / 'wide.png')
  Image.fromarray(rng.integers(0, 256, size=(300, 260, 3), dtype=np.uint8)).save(tmp_path / 'tall.png')
  # Shorter side 256 (unchanged here), then the centre 224x224.
  np.testing.assert_array_equal(predict.prepare(str(tmp_path / 'wide.png'), 'imagenet'),
                                wide[16:240, 144:368])
  assert predict.prepare(str(tmp_path / 'tall.png'), 'imagenet').shape == (224, 224, 3)

  missing = str(tmp_path / 'missing.png')
  rc = predict.main([f'--checkpoint={out}', str(tmp_path / 'wide.png'), missing,
                     str(tmp_path / 'tall.png')])
  captured = capsys.readouterr()
  assert rc == 1 and f'{missing}: no such file' in captured.err
  results = _parse(captured.out)
  assert len(results) == 2
  net = predict.load_network(checkpoint=str(out))
  expected = predict.classify(net, predict.prepare(str(tmp_path / 'wide.png'), 'imagenet')[None])[0]
  top = results[str(tmp_path / 'wide.png')]
  assert [name for _, name in top] == [f'class {k}' for k in np.argsort(-expected)[:5]]
  jax.tree.map(np.testing.assert_array_equal, net['variables'], converted['variables'])


def test_one_network_must_be_named(image_folder, capsys):
  assert predict.main([str(image_folder / 'a.png')]) == 2
  assert 'Name exactly one network' in capsys.readouterr().err
