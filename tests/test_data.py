"""Tests of resnet_jax.data: mock tfds data, generated archives, no network."""

import io
import itertools
import os
import socket
import subprocess
import sys
import tarfile
import threading

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import checksums

from resnet_jax import benchmark_input
from resnet_jax import configs
from resnet_jax import data
from resnet_jax.data import arrays, imagenet, tfds_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

N = 40  # examples per mock split: 5 steps per epoch at batch 8


def cifar_config(**data_overrides):
  c = configs.cifar('cifar_resnet20')
  c.batch_size = 8
  c.eval_batch_size = 7
  c.data.update(data_overrides)
  return c


def imagenet_config(**data_overrides):
  c = configs.imagenet('resnet50')
  c.batch_size = 4
  c.eval_batch_size = 6
  c.data.update(dict(image_size=16, min_resize=18, max_resize=24, eval_resize=18,
                     shuffle_buffer=8, **data_overrides))
  return c


def create(config, index=0, count=1):
  return data.create_data_source(config, process_index=index, process_count=count)


@pytest.fixture
def mock_cifar():
  with tfds.testing.mock_data(num_examples=N):
    yield


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def concat_batches(*batches):
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# ---------------------------------------------------------------------------
# Augmentation on a known image.


def test_crop_and_flip_equals_zero_padding_then_slicing():
  image = np.arange(32 * 32 * 3, dtype=np.float32).reshape(1, 32, 32, 3) + 1
  padded = np.pad(image[0], ((4, 4), (4, 4), (0, 0)))
  for oy, ox, flip in itertools.product(range(9), range(9), (False, True)):
    out = data.crop_and_flip(image, 4, np.array([[oy, ox]]), np.array([flip]))[0]
    expected = padded[oy:oy + 32, ox:ox + 32]
    np.testing.assert_array_equal(out, expected[:, ::-1] if flip else expected)


def test_random_crops_lie_within_padded_image_and_flip_half_the_time():
  image = np.arange(32 * 32 * 3, dtype=np.float32).reshape(32, 32, 3) + 1  # 0 = padding
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  offsets, flips = data.augment_params(np.random.default_rng(0), 400, 4)
  assert offsets.min() == 0 and offsets.max() == 8
  assert 0.4 < flips.mean() < 0.6
  outs = data.crop_and_flip(np.repeat(image[None], 400, 0), 4, offsets, flips)
  windows = {}
  for oy, ox, f in itertools.product(range(9), range(9), (False, True)):
    window = padded[oy:oy + 32, ox:ox + 32]
    windows[oy, ox, f] = window[:, ::-1] if f else window
  seen_flips = []
  for out in outs:  # every crop is one of the windows of the padded image
    matches = [k for k, w in windows.items() if np.array_equal(out, w)]
    assert len(matches) == 1
    seen_flips.append(matches[0][2])
  assert 0.4 < np.mean(seen_flips) < 0.6


# ---------------------------------------------------------------------------
# CIFAR through tfds (mock data).


def test_cifar_shapes_and_dtypes(mock_cifar):
  src = create(cifar_config())
  assert (src.name, src.synthetic, src.image_shape, src.num_classes) == (
      'cifar10', False, (32, 32, 3), 10)
  assert src.num_train_examples == N and src.steps_per_epoch == N // 8
  assert set(src.eval_splits) == {'validation', 'test'}
  assert src.eval_splits['test'] == ('test', N)
  batch = next(src.train_batches())
  assert batch['image'].shape == (8, 32, 32, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  assert 0 <= batch['label'].min() and batch['label'].max() < 10
  ev = next(src.eval_batches('test'))
  assert ev['image'].shape == (7, 32, 32, 3) and ev['image'].dtype == np.float32
  assert ev['label'].dtype == np.int32 and ev['mask'].dtype == np.bool_ and ev['mask'].shape == (7,)


@pytest.mark.parametrize('normalization', ['pixel_mean', 'channel_mean', 'channel_mean_std'])
def test_normalised_training_split_has_zero_mean(mock_cifar, normalization):
  src = create(cifar_config(augment=False, normalization=normalization))
  epoch = np.concatenate([b['image'] for b in take(src.train_batches(), src.steps_per_epoch)])
  assert len(epoch) == N
  if normalization == 'pixel_mean':
    np.testing.assert_allclose(epoch.mean(0), 0, atol=1e-3)
  else:
    np.testing.assert_allclose(epoch.mean((0, 1, 2)), 0, atol=1e-3)
  if normalization == 'channel_mean_std':
    np.testing.assert_allclose(epoch.std((0, 1, 2)), 1, atol=1e-3)


def test_order_is_a_function_of_seed_and_epoch(mock_cifar):
  a, b = create(cifar_config()), create(cifar_config())
  c = cifar_config()
  c.seed = 1
  other = create(c)
  for x, y in zip(take(a.train_batches(), 7), take(b.train_batches(), 7)):
    assert_batches_equal(x, y)
  assert not np.array_equal(next(a.train_batches())['image'], next(other.train_batches())['image'])
  # Every epoch reads every example once, in a new order.
  assert sorted(a.permutation(0)) == list(range(N))
  assert not np.array_equal(a.permutation(0), a.permutation(1))
  assert not np.array_equal(a.permutation(0), other.permutation(0))


def test_resume_yields_the_uninterrupted_stream(mock_cifar):
  src = create(cifar_config())
  spe = src.steps_per_epoch
  stream = take(src.train_batches(0), 2 * spe + 2)
  for k in (2, spe - 1, spe, spe + 1, 2 * spe):  # mid-epoch and across boundaries
    for got, want in zip(take(src.train_batches(k), 2), stream[k:k + 2]):
      assert_batches_equal(got, want)


def test_eval_sees_every_example_once_with_padding_masked(mock_cifar):
  src = create(cifar_config())  # 40 examples in batches of 7: 6 batches, 2 padding rows
  batches = list(src.eval_batches('test'))
  assert len(batches) == src.num_eval_batches('test') == 6
  assert all(b['image'].shape == (7, 32, 32, 3) for b in batches)
  mask = np.concatenate([b['mask'] for b in batches])
  assert mask.sum() == N and not mask[N:].any()
  images = np.concatenate([b['image'] for b in batches])
  labels = np.concatenate([b['label'] for b in batches])
  assert not images[~mask].any() and not labels[~mask].any()
  raw = next(iter(tfds.as_numpy(tfds.builder('cifar10').as_dataset(split='test').batch(N))))
  np.testing.assert_allclose(images[mask], src.normalize(raw['image']), rtol=0, atol=1e-4)
  np.testing.assert_array_equal(labels[mask], raw['label'])


def test_two_processes_split_each_global_batch(mock_cifar):
  c = cifar_config()
  c.eval_batch_size = 6  # 40 = 6 * 6 + 4: process 1's last rows are partly padding
  single, p0, p1 = create(c), create(c, 0, 2), create(c, 1, 2)
  assert p0.local_batch_size == 4 and p0.local_eval_batch_size == 3
  n = single.steps_per_epoch + 2
  for s, a, b in zip(take(single.train_batches(), n), take(p0.train_batches(), n),
                     take(p1.train_batches(), n)):
    assert a['image'].shape == (4, 32, 32, 3)
    assert_batches_equal(concat_batches(a, b), s)
  evals = list(zip(single.eval_batches('test'), p0.eval_batches('test'), p1.eval_batches('test')))
  assert len(evals) == 7
  for s, a, b in evals:
    assert_batches_equal(concat_batches(a, b), s)
  assert sum(a['mask'].sum() + b['mask'].sum() for _, a, b in evals) == N


def test_bad_batch_sizes_and_roles_are_clear_errors(mock_cifar):
  with pytest.raises(data.DataError, match='batch_size=8 must be a positive multiple'):
    create(cifar_config(), 0, 3)
  c = cifar_config(val_split='')
  src = create(c)
  assert set(src.eval_splits) == {'test'}
  with pytest.raises(data.DataError, match='validation'):
    src.eval_batches('validation')
  with pytest.raises(data.DataError, match='normalization'):
    create(cifar_config(normalization='zca'))


def test_statistics_cache(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
  path = tmp_path / 'stats' / 'x.npz'
  first = data.cached_image_statistics(images, path)
  assert path.exists()
  np.testing.assert_allclose(first['pixel_mean'], images.mean(0))
  np.testing.assert_allclose(first['channel_std'], images.reshape(-1, 3).std(0))
  # The same images read the file back (marked here, to tell reading from recomputing).
  with np.load(path) as f:
    marked = {**dict(f), 'pixel_mean': np.full((4, 4, 3), 7.0)}
  np.savez(path, **marked)
  np.testing.assert_array_equal(data.cached_image_statistics(images, path)['pixel_mean'], 7.0)
  # Other images of the same size, or another split, are recomputed and re-cached.
  other = images[::-1] // 2
  np.testing.assert_allclose(data.cached_image_statistics(other, path)['pixel_mean'], other.mean(0))
  fresh = data.cached_image_statistics(images[:5], path)
  np.testing.assert_allclose(fresh['pixel_mean'], images[:5].mean(0))
  with np.load(path) as f:
    np.testing.assert_allclose(f['pixel_mean'], images[:5].mean(0))
  assert sorted(os.listdir(path.parent)) == ['x.npz']  # no temporary files left


# ---------------------------------------------------------------------------
# Missing data and offline machines.


def test_imagenet_without_manual_files_names_dir_and_files(tmp_path):
  with pytest.raises(data.DataError) as e:
    create(imagenet_config(data_dir=str(tmp_path)))
  msg = str(e.value)
  assert str(tmp_path / 'downloads' / 'manual') in msg
  assert 'ILSVRC2012_img_train.tar' in msg and 'ILSVRC2012_img_val.tar' in msg
  assert os.listdir(tmp_path) == []
  manual = tmp_path / 'elsewhere'
  with pytest.raises(data.DataError, match=str(manual)):
    create(imagenet_config(data_dir=str(tmp_path), manual_dir=str(manual)))


def test_offline_failure_is_clear_and_tries_no_download(tmp_path, monkeypatch):
  probed = []
  monkeypatch.setattr(tfds_source, 'can_reach', lambda host, *a, **k: probed.append(host) or False)
  def no_download(*args, **kwargs):
    raise AssertionError('download_and_prepare must not run when the probe fails')
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', no_download)
  with pytest.raises(data.DataError) as e:
    create(cifar_config(data_dir=str(tmp_path)))
  assert probed == ['www.cs.toronto.edu']  # the quick probe decided, before any download
  msg = str(e.value)
  for part in (str(tmp_path), 'tfds build cifar10', 'download_and_prepare',
               'cifar-10-binary.tar.gz', str(tmp_path / 'downloads' / 'manual'), 'digits'):
    assert part in msg
  assert os.listdir(tmp_path) == []  # nothing half-written


def test_connectivity_probe_gives_up_on_a_host_that_never_answers(monkeypatch):
  # A fake connection that hangs (as DNS or an unroutable address does), so
  # no traffic leaves the machine; the probe must return False, not wait.
  release = threading.Event()
  calls = []
  def hanging_connection(address, timeout=None):
    calls.append((address, timeout))
    release.wait()
    raise OSError('released')
  monkeypatch.setattr(tfds_source.socket, 'create_connection', hanging_connection)
  try:
    assert tfds_source.can_reach('unreachable.invalid', port=443, timeout=0.2) is False
  finally:
    release.set()
  assert calls == [(('unreachable.invalid', 443), 0.2)]


def test_connectivity_probe_on_local_sockets():
  with socket.socket() as server:
    server.bind(('127.0.0.1', 0))
    server.listen(1)
    assert tfds_source.can_reach('127.0.0.1', port=server.getsockname()[1], timeout=5.0) is True
  with socket.socket() as closed:  # bound, not listening: refused at once
    closed.bind(('127.0.0.1', 0))
    assert tfds_source.can_reach('127.0.0.1', port=closed.getsockname()[1], timeout=5.0) is False


def _fake_cifar_archive(path, per_file=4):
  """A cifar-10-binary.tar.gz in the original layout, with random images."""
  rng = np.random.default_rng(0)
  with tarfile.open(path, 'w:gz') as tar:
    def add(name, payload):
      info = tarfile.TarInfo(f'cifar-10-batches-bin/{name}')
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
    add('batches.meta.txt', '\n'.join(f'class{i}' for i in range(10)).encode())
    for name in [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']:
      labels = rng.integers(0, 10, (per_file, 1))
      records = np.concatenate([labels, rng.integers(0, 256, (per_file, 3072))], 1)
      add(name, records.astype(np.uint8).tobytes())


def test_archive_in_manual_dir_prepares_cifar_offline(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_source, 'can_reach', lambda *args, **kwargs: False)
  manual = tmp_path / 'downloads' / 'manual'
  manual.mkdir(parents=True)
  archive = manual / 'cifar-10-binary.tar.gz'
  _fake_cifar_archive(archive)
  # Register the fake archive's checksum in place of the real one.
  info = checksums.compute_url_info(archive)
  url = 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz'
  monkeypatch.setattr(tfds.builder_cls('cifar10'), 'url_infos', {
      url: checksums.UrlInfo(size=info.size, checksum=info.checksum, filename=archive.name)})
  c = cifar_config(data_dir=str(tmp_path), train_split='train[:16]', val_split='train[16:]')
  src = create(c)
  assert src.num_train_examples == 16 and src.eval_splits == {
      'validation': ('train[16:]', 4), 'test': ('test', 4)}
  assert (tmp_path / 'cifar10' / '3.0.2' / 'dataset_info.json').exists()
  stats = list((tmp_path / 'resnet_jax_stats').iterdir())
  assert [p.name for p in stats] == ['cifar10-3.0.2-train_16_.npz']
  again = create(c)  # prepared data and cached mean are reused
  assert_batches_equal(next(src.train_batches(3)), next(again.train_batches(3)))


def test_failed_preparation_leaves_nothing_behind(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_source, 'can_reach', lambda *args, **kwargs: False)
  manual = tmp_path / 'downloads' / 'manual'
  manual.mkdir(parents=True)
  (manual / 'cifar-10-binary.tar.gz').write_bytes(b'not the real archive')  # wrong checksum
  with pytest.raises(data.DataError, match='failed'):
    create(cifar_config(data_dir=str(tmp_path)))
  left = sorted(os.path.relpath(os.path.join(r, f), tmp_path)
                for r, dirs, files in os.walk(tmp_path) for f in dirs + files)
  assert left == ['downloads', 'downloads/manual', 'downloads/manual/cifar-10-binary.tar.gz']


# ---------------------------------------------------------------------------
# Digits and synthetic sources.


def test_digits_source():
  raw = arrays.digits_arrays(0.2)
  assert len(raw['train'][0]) + len(raw['test'][0]) == 1797 and len(raw['test'][0]) == 360
  for images, labels in raw.values():
    assert images.shape[1:] == (32, 32, 3) and images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 255
    np.testing.assert_array_equal(images[..., 0], images[..., 2])
    assert set(labels) == set(range(10))
  c = configs.digits(batch_size=16, eval_batch_size=50)
  src = create(c)
  assert (src.name, src.synthetic, src.num_train_examples) == ('digits', False, 1437)
  assert src.eval_splits == {'test': ('test', 360)}
  batch = next(src.train_batches())
  assert batch['image'].shape == (16, 32, 32, 3) and batch['image'].dtype == np.float32
  assert np.isfinite(batch['image']).all() and np.abs(batch['image']).max() <= 255
  assert sum(b['mask'].sum() for b in src.eval_batches('test')) == 360


def test_synthetic_sources():
  c = cifar_config(source='synthetic')
  c.eval_batch_size = 500
  src = create(c)
  assert (src.name, src.synthetic, src.image_shape, src.num_classes) == (
      'synthetic:cifar10', True, (32, 32, 3), 10)
  assert src.num_train_examples == 45_000 and src.eval_splits['test'] == ('test', 10_000)
  a, b = next(src.train_batches(5)), next(create(c).train_batches(5))
  assert_batches_equal(a, b)
  assert a['image'].shape == (8, 32, 32, 3) and a['image'].dtype == np.float32
  assert a['label'].dtype == np.int32
  assert sum(e['mask'].sum() for e in src.eval_batches('test')) == 10_000
  src = create(imagenet_config(source='synthetic', ten_crop=True))
  assert (src.name, src.num_classes, src.image_shape) == (
      'synthetic:imagenet2012', 1000, (16, 16, 3))
  assert next(src.eval_batches('test'))['image'].shape == (6, 10, 16, 16, 3)


# ---------------------------------------------------------------------------
# ImageNet (mock data, tiny images).


def _jpeg(value=None, height=40, width=30):
  rng = np.random.default_rng(0)
  image = (np.full((height, width, 3), value) if value is not None
           else rng.integers(0, 256, (height, width, 3))).astype(np.uint8)
  return tf.io.encode_jpeg(image, quality=100)


def test_imagenet_preprocessing_functions():
  d = imagenet_config(pca_lighting=0.0).data
  seed = tf.constant([1, 2], tf.int64)
  image = imagenet.imagenet_train_image(_jpeg(), seed, d)
  assert image.shape == (16, 16, 3) and image.dtype == tf.float32
  np.testing.assert_array_equal(image, imagenet.imagenet_train_image(_jpeg(), seed, d))
  assert not np.array_equal(image, imagenet.imagenet_train_image(_jpeg(), seed + 1, d))
  # A grey image stays grey: only the mean is subtracted.
  grey = imagenet.imagenet_train_image(_jpeg(128), seed, d).numpy()
  expected = np.broadcast_to(128 - np.array(imagenet.IMAGENET_MEAN_RGB), grey.shape)
  np.testing.assert_allclose(grey, expected, atol=2)
  lit = imagenet.imagenet_train_image(_jpeg(128), seed, imagenet_config(pca_lighting=0.1).data).numpy()
  shift = (lit - grey).reshape(-1, 3)
  assert np.ptp(shift, axis=0).max() < 1e-3 and np.abs(shift[0]).max() > 0  # one RGB offset
  assert imagenet.imagenet_eval_image(_jpeg(), d).shape == (16, 16, 3)
  crops = imagenet.imagenet_eval_image(_jpeg(), imagenet_config(ten_crop=True).data).numpy()
  assert crops.shape == (10, 16, 16, 3)
  np.testing.assert_array_equal(crops[5:], crops[:5, :, ::-1])


@pytest.mark.parametrize('cache', [False, True])
def test_imagenet_pipeline_on_mock_data(cache):
  with tfds.testing.mock_data(num_examples=22):
    src = create(imagenet_config(cache=cache))
    assert (src.name, src.image_shape, src.num_train_examples, src.steps_per_epoch) == (
        'imagenet2012', (16, 16, 3), 22, 5)
    stream = take(src.train_batches(0), 7)
    assert stream[0]['image'].shape == (4, 16, 16, 3) and stream[0]['image'].dtype == np.float32
    assert stream[0]['label'].dtype == np.int32
    for k in (3, 5):  # mid-epoch, and the first batch of epoch 1
      assert_batches_equal(next(src.train_batches(k)), stream[k])
    evals = list(src.eval_batches('test'))  # 22 in batches of 6: 4 batches, 2 padding rows
    assert len(evals) == 4 and all(b['image'].shape == (6, 16, 16, 3) for b in evals)
    assert sum(b['mask'].sum() for b in evals) == 22
    assert not evals[-1]['image'][~evals[-1]['mask']].any()
    halves = zip(create(imagenet_config(), 0, 2).eval_batches('test'),
                 create(imagenet_config(), 1, 2).eval_batches('test'))
    for (a, b), s in zip(halves, evals):
      assert_batches_equal(concat_batches(a, b), s)


def _images_timed(result):
  """The images the benchmark counted (rate x time): exact whatever the clock says."""
  return result['images_per_s'] * result['ms_per_batch'] * result['num_batches'] / 1000


def test_benchmarks_run():
  result = benchmark_input.pipeline_throughput(configs.digits(batch_size=16), num_batches=3, warmup=1)
  assert result['name'] == 'digits' and result['num_batches'] == 3
  assert _images_timed(result) == pytest.approx(3 * 16)
  c = imagenet_config()
  result = benchmark_input.jpeg_throughput(c, num_batches=2, warmup=1, num_images=3)
  assert result['batch_size'] == 4 and _images_timed(result) == pytest.approx(2 * 4)
  result = benchmark_input.files_jpeg_throughput(c, num_batches=2, warmup=1, num_images=3)
  assert result['batch_size'] == 4 and _images_timed(result) == pytest.approx(2 * 4)


HIDE_GPUS = """
import tensorflow as tf
calls = []
tf.config.set_visible_devices = lambda devices, kind: calls.append((devices, kind))
from resnet_jax.data import tfds_source
print(calls)
"""


def test_reading_with_tensorflow_hides_the_gpus_from_it():
  """TF only decodes and augments: importing the tfds source keeps it off the GPUs JAX needs."""
  out = subprocess.run([sys.executable, '-c', HIDE_GPUS], capture_output=True, text=True,
                       timeout=300, check=False, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().splitlines()[-1] == "[([], 'GPU')]"


def test_hiding_the_gpus_too_late_is_a_warning_not_an_error(monkeypatch, caplog):
  def initialised(devices, kind):
    raise RuntimeError('Visible devices cannot be modified after being initialized')
  monkeypatch.setattr(tf.config, 'set_visible_devices', initialised)
  tfds_source.hide_gpus_from_tensorflow()
  assert 'Could not hide GPUs from TensorFlow' in caplog.text