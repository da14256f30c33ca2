"""ImageNet from its class folders (`source='files'`, `dataset='imagenet2012'`), no TensorFlow.

Small copies written by tests/imagenet_writer.py (3 classes of smooth gradient JPEGs); what
a complete copy must hold is patched down to their size.
"""

import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from resnet_jax import configs
from resnet_jax.data import imagenet_files
from resnet_jax.data.base import DataError

from imagenet_writer import WNIDS, expect, gradient, write_imagenet  # pylint: disable=g-bad-import-order


def _config(data_dir, **data):
  config = configs.imagenet('resnet18', batch_size=4, eval_batch_size=4)
  config.data.update(source='files', data_dir=str(data_dir), image_size=16, min_resize=18,
                     max_resize=40, eval_resize=18, num_parallel_calls=2, prefetch=0, **data)
  return config


def _source(config, **kw):
  from resnet_jax import data  # pylint: disable=g-import-not-at-top
  return data.create_data_source(config, process_index=kw.get('process_index', 0),
                                 process_count=kw.get('process_count', 1), num_devices=1)


@pytest.fixture
def copy(tmp_path, monkeypatch):
  expect(monkeypatch)
  return tmp_path, write_imagenet(tmp_path)


# ----------------------------------------------------------------------------
# The listing: folders, labels, order, and each kind of incomplete copy.


@pytest.mark.parametrize('kaggle', [False, True])
def test_both_layouts_list_every_image_with_its_class_in_sorted_order(tmp_path, monkeypatch,
                                                                       kaggle):
  expect(monkeypatch)
  written = write_imagenet(tmp_path, kaggle=kaggle)
  splits, names, where = imagenet_files.load(str(tmp_path))
  root = tmp_path / 'ILSVRC' / 'Data' / 'CLS-LOC' if kaggle else tmp_path
  assert names == WNIDS and where == str(root)
  for split in ('train', 'validation'):
    listing = splits[split]
    assert [(str(listing.path(i).relative_to(root)), int(listing.labels[i]))
            for i in range(len(listing))] == written[split]


def test_missing_folders_list_what_was_looked_for_and_two_ways_to_get_them(tmp_path):
  with pytest.raises(DataError) as e:
    imagenet_files.load(str(tmp_path))
  message = str(e.value)
  assert f'No ImageNet folders in {tmp_path}' in message
  assert str(tmp_path / 'train') in message and str(tmp_path / 'val') in message
  assert 'valprep.sh' in message and "source='tfds'" in message


def test_a_missing_class_folder_is_refused(copy):
  root, _ = copy
  os.rename(root / 'train' / WNIDS[2], root / 'elsewhere')
  with pytest.raises(DataError, match=r'train holds 2 class folders; ILSVRC-2012 has 3\.'):
    imagenet_files.load(str(root))


def test_an_incomplete_copy_is_refused_with_its_count(copy):
  root, written = copy
  os.remove(root / written['validation'][0][0])
  with pytest.raises(DataError, match=r"val holds 5 images; the validation split of ILSVRC-2012 "
                                      r"has 6, so this copy is incomplete.*'train\[:10%\]'"):
    imagenet_files.load(str(root))


def test_a_validation_class_that_training_lacks_is_named(copy):
  root, _ = copy
  os.rename(root / 'val' / WNIDS[0], root / 'val' / 'n99999999')
  with pytest.raises(DataError, match=r'n99999999 is a class folder that .*train does not have'):
    imagenet_files.load(str(root))


def test_an_unsorted_flat_val_folder_needs_labels(copy):
  root, _ = copy
  for wnid in WNIDS:
    for name in os.listdir(root / 'val' / wnid):
      os.rename(root / 'val' / wnid / name, root / 'val' / name)
    os.rmdir(root / 'val' / wnid)
  with pytest.raises(DataError, match=r'holds no class folders, so its images have no labels.*'
                                      r'valprep\.sh.*LOC_val_solution\.csv'):
    imagenet_files.load(str(root))


def test_a_damaged_image_is_named_when_it_is_read(copy):
  root, written = copy
  path = root / written['train'][0][0]
  path.write_bytes(path.read_bytes()[:200])
  stream = _source(_config(root)).train_batches(0)
  with pytest.raises(DataError, match=rf'{re.escape(str(path))} cannot be (read as an image|'
                                      r'decoded).*original archive'):
    for _ in range(3):  # one epoch: every image once
      next(stream)


# ----------------------------------------------------------------------------
# Geometry: the crops are the paper's, checked against resizing the whole image.


def _reference_crop(array, resize_to, size, y, x):
  """Resizes the whole image's shorter side to `resize_to` (Pillow, bilinear; the longer side
  truncated), then crops size x size at (y, x); 'centre' and 'end' mean what torchvision's
  crops take."""
  h, w = array.shape[:2]
  scale = resize_to / min(h, w)
  big = np.asarray(Image.fromarray(array).resize((int(w * scale), int(h * scale)),
                                                 Image.BILINEAR), np.float32)
  def at(value, length):
    return {'centre': int(round((length - size) / 2)), 'end': length - size}.get(value, value)
  y, x = at(y, big.shape[0]), at(x, big.shape[1])
  return big[y:y + size, x:x + size]


def _assert_close(a, b):
  """Equal up to Pillow's rounding to whole levels (each side rounds once)."""
  assert np.abs(a - b).max() <= 1.0, np.abs(a - b).max()


@pytest.mark.parametrize('width,height', [(40, 30), (30, 50), (160, 120)])
def test_evaluation_crops_equal_resizing_the_whole_image_then_cropping(tmp_path, width, height):
  array = gradient(width, height, seed=1)
  path = tmp_path / 'image.png'  # lossless: only the geometry and the resampling count
  Image.fromarray(array).save(path)
  from etils import epath  # pylint: disable=g-import-not-at-top
  config = _config(tmp_path)
  centre = imagenet_files.eval_image(epath.Path(path), config.data)
  assert centre.shape == (16, 16, 3) and centre.dtype == np.float32
  _assert_close(centre, _reference_crop(array, 18, 16, 'centre', 'centre'))
  config.data.ten_crop = True
  ten = imagenet_files.eval_image(epath.Path(path), config.data)
  assert ten.shape == (10, 16, 16, 3)
  for k, (y, x) in enumerate([(0, 0), (0, 'end'), ('end', 0), ('end', 'end'),
                              ('centre', 'centre')]):
    _assert_close(ten[k], _reference_crop(array, 18, 16, y, x))
    np.testing.assert_array_equal(ten[5 + k], ten[k][:, ::-1])
  # A wrong corner is far off: the comparison can tell the crops apart.
  assert np.abs(ten[1] - _reference_crop(array, 18, 16, 0, 0)).mean() > 10


def test_a_large_jpeg_decoded_at_a_reduced_scale_gives_nearly_the_same_crop(tmp_path):
  array = gradient(400, 300, seed=2)
  path = tmp_path / 'large.JPEG'
  Image.fromarray(array).save(path, quality=95)
  from etils import epath  # pylint: disable=g-import-not-at-top
  reduced = imagenet_files.crops(epath.Path(path), (24, 32), [(3, 10)], 16)[0].astype(np.float32)
  full = _reference_crop(np.asarray(Image.open(path).convert('RGB')), 24, 16, 3, 10)
  # Red and green are smooth ramps; blue's ripple is near the Nyquist limit at 1/12.5 scale,
  # where the two ways of shrinking alias differently.
  assert np.abs(reduced - full)[..., :2].mean() < 1.0
  assert np.abs(reduced - _reference_crop(array, 24, 16, 3, 11))[..., :2].mean() > 2.0


def test_training_images_are_random_crops_flips_and_lighting_drawn_from_the_rng(tmp_path):
  array = gradient(60, 40, seed=3)
  path = tmp_path / 'image.png'
  Image.fromarray(array).save(path)
  from etils import epath  # pylint: disable=g-import-not-at-top
  d = _config(tmp_path).data
  images = [imagenet_files.train_image(epath.Path(path), np.random.default_rng(s), d)
            for s in range(24)]
  again = imagenet_files.train_image(epath.Path(path), np.random.default_rng(5), d)
  np.testing.assert_array_equal(again, images[5])
  assert all(x.shape == (16, 16, 3) for x in images)
  # The red channel grows left to right, so a flip shows as a falling red gradient; PCA
  # lighting adds a constant, which leaves the sign alone.
  rising = [float(np.mean(x[:, -1, 0] - x[:, 0, 0])) > 0 for x in images]
  assert 4 <= sum(rising) <= 20
  # Without lighting: a crop of the image resized to the drawn size, flipped as drawn.
  d.pca_lighting = 0.0
  for seed in range(6):
    plain = imagenet_files.train_image(epath.Path(path), np.random.default_rng(seed), d)
    rng = np.random.default_rng(seed)
    resize_to = int(rng.integers(18, 41))
    height, width = resize_to, int(60 * resize_to / 40)
    y, x = int(rng.integers(0, height - 15)), int(rng.integers(0, width - 15))
    flip = rng.random() < 0.5
    _assert_close(plain[:, ::-1] if flip else plain, _reference_crop(array, resize_to, 16, y, x))


def test_imagenets_odd_files_cmyk_greyscale_and_png_named_jpeg_become_rgb(tmp_path):
  """ImageNet's training set holds CMYK and greyscale JPEGs and a PNG named .JPEG."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  rgb = Image.fromarray(gradient(40, 30, seed=5))
  d = _config(tmp_path).data
  for name, image, fmt in (('cmyk.JPEG', rgb.convert('CMYK'), 'JPEG'),
                           ('grey.JPEG', rgb.convert('L'), 'JPEG'),
                           ('png.JPEG', rgb, 'PNG')):
    image.save(tmp_path / name, fmt, **({'quality': 95} if fmt == 'JPEG' else {}))
    out = imagenet_files.eval_image(epath.Path(tmp_path / name), d)
    assert out.shape == (16, 16, 3), name
    reference = _reference_crop(np.asarray(image.convert('RGB')), 18, 16, 'centre', 'centre')
    assert np.abs(out - reference).mean() < 2.0, name
    if name == 'grey.JPEG':
      np.testing.assert_array_equal(out[..., 0], out[..., 2])
    assert imagenet_files.train_image(epath.Path(tmp_path / name), np.random.default_rng(0),
                                      d).shape == (16, 16, 3)


def test_multi_scale_testing_sees_the_whole_image_at_each_scale(tmp_path):
  array = gradient(40, 30, seed=4)
  path = tmp_path / 'image.png'
  Image.fromarray(array).save(path)
  from etils import epath  # pylint: disable=g-import-not-at-top
  whole = imagenet_files.whole_image(epath.Path(path), 32, multiple=16)
  # 30 -> 32 on the shorter side; 40 -> 42.7, to the nearest multiple of 16: 48.
  assert whole.shape == (32, 48, 3)
  _assert_close(whole, np.asarray(Image.fromarray(array).resize((48, 32), Image.BILINEAR),
                                  np.float32))
  assert imagenet_files.whole_image(epath.Path(path), 32, multiple=1).shape == (32, 42, 3)
  assert imagenet_files.PAPER_TEST_SCALES == (224, 256, 384, 480, 640)


# ----------------------------------------------------------------------------
# The source: batches, determinism, processes, evaluation.


def test_batches_are_normalised_labelled_and_a_function_of_seed_and_step(copy):
  root, written = copy
  source = _source(_config(root))
  assert (source.num_train_examples, source.steps_per_epoch, source.num_classes) == (12, 3, 1000)
  assert source.eval_splits == {'test': ('validation', 6)}
  stream = source.train_batches(0)
  batches = [next(stream) for _ in range(5)]
  assert batches[0]['image'].shape == (4, 16, 16, 3) and batches[0]['image'].dtype == np.float32
  assert -130 < batches[0]['image'].min() and batches[0]['image'].max() < 160
  epoch = np.concatenate([b['label'] for b in batches[:3]])
  assert sorted(epoch.tolist()) == sorted(label for _, label in written['train'])
  resumed = source.train_batches(4)  # a resumed run reads nothing before its step
  np.testing.assert_array_equal(next(resumed)['image'], batches[4]['image'])
  other_seed = _config(root)
  other_seed.seed = 1
  assert not np.array_equal(next(_source(other_seed).train_batches(0))['image'],
                            batches[0]['image'])


def test_two_processes_read_the_halves_of_the_one_process_batches(copy):
  root, _ = copy
  config = _config(root)
  whole = next(_source(config).train_batches(2))
  halves = [next(_source(config, process_index=p, process_count=2).train_batches(2))
            for p in range(2)]
  for key in ('image', 'label'):
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])


def test_evaluation_covers_every_image_once_with_padding_masked(copy):
  root, written = copy
  config = _config(root, ten_crop=True)
  config.eval_batch_size = 4
  source = _source(config)
  batches = list(source.eval_batches('test'))
  assert len(batches) == 2 and batches[0]['image'].shape == (4, 10, 16, 16, 3)
  mask = np.concatenate([b['mask'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  assert mask.tolist() == [True] * 6 + [False] * 2
  assert labels[:6].tolist() == [label for _, label in written['validation']]
  assert not batches[1]['image'][2:].any()


def test_split_strings_select_in_the_sorted_order(copy):
  root, written = copy
  config = _config(root, train_split='train[:50%]', val_split='train[50%:]',
                   test_split='validation[:2]+validation[-1:]')
  source = _source(config)
  assert source.num_train_examples == 6
  assert source.eval_splits == {'validation': ('train[50%:]', 6), 'test': (
      'validation[:2]+validation[-1:]', 3)}
  test = next(iter(source.eval_batches('test')))
  expected = [written['validation'][i][1] for i in (0, 1, 5)]
  assert test['label'][:3].tolist() == expected
  # The fingerprint a checkpoint records follows the training files, and only them.
  before = source.fingerprint()
  os.rename(root / written['validation'][0][0], root / 'val' / WNIDS[0] / 'renamed.JPEG')
  assert _source(config).fingerprint() == before
  os.rename(root / written['train'][0][0], root / 'train' / WNIDS[0] / 'renamed.JPEG')
  assert _source(config).fingerprint() != before


# ----------------------------------------------------------------------------
# python -m resnet_jax.evaluate on the folders.


def test_evaluate_gives_the_top1_and_top5_error_of_an_imagenet_network(copy, tmp_path, capsys):
  """A ResNet-18 whose head ignores the image (kernel 0) and ranks the classes by its bias:
  0, 1, 3, 4, 5 first, class 2 last. The validation labels are 0, 0, 1, 1, 2, 2, so the top-1
  error is 4/6 and the top-5 error 2/6, whatever the pixels."""
  import jax  # pylint: disable=g-import-not-at-top
  from resnet_jax import evaluate, models  # pylint: disable=g-import-not-at-top
  from resnet_jax.weights import loading  # pylint: disable=g-import-not-at-top
  root, written = copy
  assert [label for _, label in written['validation']] == [0, 0, 1, 1, 2, 2]
  init_fn, _ = models.functional('resnet18')
  variables = jax.tree.map(np.asarray, init_fn(jax.random.key(0), (1, 32, 32, 3)))
  bias = np.zeros(1000, np.float32)
  bias[[0, 1, 3, 4, 5, 2]] = [10, 9, 8, 7, 6, -10]
  variables['params']['head'] = {'kernel': np.zeros((512, 1000), np.float32), 'bias': bias}
  checkpoint = loading.write_inference_checkpoint(
      str(tmp_path / 'net'), variables, 'resnet18', {'num_classes': 1000},
      {'normalize': {'kind': 'imagenet_mean_std'}, 'label_names': None, 'source': {}})
  out = tmp_path / 'evaluation.json'
  for flags, evaluation in (([], 'centre crop'), (['--ten_crop'], '10-crop'),
                            (['--scales=32,48'], 'multi-scale 32/48')):
    assert evaluate.main([f'--checkpoint={checkpoint}', f'--data_dir={root}', f'--out={out}',
                          '--batch_size=20', *flags]) == 0
    measured = json.loads(out.read_text())
    assert (measured['dataset'], measured['split'], measured['examples']) == (
        'imagenet2012', 'validation', 6)
    assert measured['error'] == pytest.approx(100 * 4 / 6)
    assert measured['top5_error'] == pytest.approx(100 * 2 / 6)
    assert measured['evaluation'] == evaluation
    assert measured['per_class_error'] == {WNIDS[0]: 0.0, WNIDS[1]: 100.0, WNIDS[2]: 100.0}
  assert 'top-5 error 33.33% (multi-scale 32/48)' in capsys.readouterr().out
  # A CIFAR split string for an ImageNet network is a clear error, status 2.
  assert evaluate.main([f'--checkpoint={checkpoint}', f'--data_dir={root}',
                        '--split=test']) == 2
  assert "there is no split 'test'" in capsys.readouterr().err
