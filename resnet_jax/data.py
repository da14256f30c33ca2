"""Input pipelines: CIFAR-10 and ImageNet from TFDS, scikit-learn digits, synthetic.

`create_data_source(config)` returns a `DataSource` with two iterators:

* `train_batches(start_step)`: this process's share of the global training
  batches of steps start_step, start_step + 1, ... (infinite).
* `eval_batches(role)`: one pass over an evaluation split in batches of fixed
  shape; the last batch is padded and `mask` says which rows are real.

Determinism (the checkpoint/resume system relies on it). For the in-memory
datasets (CIFAR, digits, synthetic) the training stream is a pure function of
(seed, step): epoch e = step // steps_per_epoch reads the examples in the order
of a permutation drawn from (seed, e); step k takes the slice
[(k % steps_per_epoch) * B, ... + B) of it; crop offsets and flips are drawn
from (seed, k). Each epoch drops its remainder. So `train_batches(k)` yields
exactly the batches k, k + 1, ... of `train_batches(0)`. With P processes,
process p takes rows [p*B/P, (p+1)*B/P) of every global batch (training and
evaluation), so P processes together see exactly what one process would.

ImageNet does not fit in memory and streams through tf.data: each process reads
its own 1/P of the files (`tfds.split_for_jax_process`), in a per-epoch file
order and shuffle seeded by (seed, epoch), with deterministic tf.data options
and per-example stateless random augmentation seeded by (seed, epoch, position).
Resuming at step k rebuilds epoch k // steps_per_epoch and skips the first
k % steps_per_epoch batches (it reads, but does not decode, those records), so
the resumed stream equals the uninterrupted one; it is not the same stream as
a run with a different number of processes.

Pixel values stay on the 0..255 scale; normalisation subtracts a mean (and
optionally divides by a standard deviation) only, as in the paper.
"""

from __future__ import annotations

import itertools
import math
import os
import pathlib
import queue
import re
import shutil
import socket
import threading
import types
import urllib.parse
from typing import Iterator

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds


def _hide_gpus_from_tensorflow():
  # TF only decodes and augments; it must not grab the GPU memory JAX needs.
  try:
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError) as e:  # devices already initialised
    logging.warning('Could not hide GPUs from TensorFlow: %s', e)


_hide_gpus_from_tensorflow()


class DataError(ValueError):
  """Bad input configuration or missing data; the message says how to fix it."""


# Per-channel RGB statistics of the ImageNet training set (0..255 scale). We do
# not compute a per-pixel mean image of ImageNet (a pass over 1.28M images);
# 'pixel_mean' uses the image that is constant at these means.
IMAGENET_MEAN_RGB = (123.68, 116.78, 103.94)
IMAGENET_STD_RGB = (58.393, 57.12, 57.375)
# AlexNet PCA lighting: eigenvalues/eigenvectors of the RGB covariance of
# ImageNet pixels on a 0..1 scale (as in fb.resnet.torch). Columns are the
# eigenvectors.
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                       (-0.5808, -0.0045, -0.8140),
                       (-0.5836, -0.6948, 0.4203))

# Files that must be in tfds's manual dir to prepare these datasets.
_MANUAL_FILES = {
    'imagenet2012': ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar'),
}
_IN_MEMORY_DATASETS = ('cifar10', 'cifar100')
# Split sizes and classes, for the synthetic source (no data is read there).
_KNOWN_SPLITS = {
    'cifar10': {'train': 50_000, 'test': 10_000},
    'cifar100': {'train': 50_000, 'test': 10_000},
    'imagenet2012': {'train': 1_281_167, 'validation': 50_000},
}
_NUM_CLASSES = {'cifar10': 10, 'cifar100': 100, 'imagenet2012': 1000, 'digits': 10}
_NORMALIZATIONS = ('pixel_mean', 'channel_mean', 'channel_mean_std')

# Independent random streams derived from config.seed.
_PERMUTATION, _AUGMENT, _SYNTHETIC, _SHUFFLE = range(4)


def _seed_int(*keys: int) -> int:
  """A 63-bit integer that depends on all of `keys` (for tf seeds)."""
  state = np.random.SeedSequence([k % 2**64 for k in keys]).generate_state(2, np.uint64)
  return int(state[0] >> np.uint64(1))


def _rng(*keys: int) -> np.random.Generator:
  return np.random.default_rng([k % 2**64 for k in keys])


# ----------------------------------------------------------------------------
# The interface.


class DataSource:
  """Batches for one process. See the module docstring for the guarantees.

  Attributes:
    name: 'cifar10', 'imagenet2012', 'digits', or 'synthetic:<dataset>'.
    synthetic: True for random data.
    image_shape: (H, W, C) of one model input.
    num_classes: number of labels.
    num_train_examples: global size of the training split.
    steps_per_epoch: num_train_examples // batch_size.
    eval_splits: role ('validation', 'test') -> (split string, num examples).
    batch_size, local_batch_size: global and per-process training batch.
    eval_batch_size, local_eval_batch_size: the same for evaluation.
  """

  def __init__(self, config, *, name: str, synthetic: bool,
               image_shape: tuple[int, int, int], num_classes: int,
               num_train_examples: int, eval_splits: dict[str, tuple[str, int]],
               process_index: int, process_count: int):
    self.name = name
    self.synthetic = synthetic
    self.image_shape = tuple(image_shape)
    self.num_classes = num_classes
    self.num_train_examples = num_train_examples
    self.eval_splits = dict(eval_splits)
    self.process_index = process_index
    self.process_count = process_count
    self.seed = config.seed
    self.batch_size = config.batch_size
    self.eval_batch_size = config.eval_batch_size
    self.local_batch_size = self.batch_size // process_count
    self.local_eval_batch_size = self.eval_batch_size // process_count
    self.steps_per_epoch = num_train_examples // self.batch_size
    if self.steps_per_epoch < 1:
      raise DataError(
          f'The training split of {name} has {num_train_examples} examples, fewer '
          f'than one batch (config.batch_size={self.batch_size}). Use a smaller '
          'batch size or a larger config.data.train_split.')
    self._prefetch = config.data.prefetch

  def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """{'image': float32 [B_local, H, W, C], 'label': int32 [B_local]} for
    global steps start_step, start_step + 1, ... (infinite)."""
    raise NotImplementedError

  def eval_batches(self, role: str) -> Iterator[dict[str, np.ndarray]]:
    """One pass over `eval_splits[role]`: {'image', 'label', 'mask'} batches of
    fixed shape [E_local, ...]; padding rows are zero with mask False."""
    raise NotImplementedError

  def num_eval_batches(self, role: str) -> int:
    return math.ceil(self._eval_split(role)[1] / self.eval_batch_size)

  def _eval_split(self, role: str) -> tuple[str, int]:
    if role not in self.eval_splits:
      raise DataError(f'No evaluation split with role {role!r} in {self.name}; '
                      f'the roles are {sorted(self.eval_splits)}. Set '
                      'config.data.val_split / config.data.test_split.')
    return self.eval_splits[role]

  def _local(self, global_size: int) -> slice:
    """This process's contiguous rows of a global batch of `global_size`."""
    n = global_size // self.process_count
    return slice(self.process_index * n, (self.process_index + 1) * n)

  def _eval_positions(self, num_examples: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(indices, mask) of this process's rows of each padded global eval batch."""
    rows = np.arange(self.eval_batch_size)[self._local(self.eval_batch_size)]
    for b in range(math.ceil(num_examples / self.eval_batch_size)):
      pos = b * self.eval_batch_size + rows
      mask = pos < num_examples
      yield np.where(mask, pos, 0), mask

  def __repr__(self):
    return (f'{type(self).__name__}(name={self.name!r}, image_shape={self.image_shape}, '
            f'num_classes={self.num_classes}, num_train_examples={self.num_train_examples}, '
            f'steps_per_epoch={self.steps_per_epoch}, eval_splits={self.eval_splits}, '
            f'process={self.process_index}/{self.process_count})')


def create_data_source(config, *, process_index: int | None = None,
                       process_count: int | None = None) -> DataSource:
  """The data source `config` (a full experiment ConfigDict) describes.

  process_index/process_count default to jax.process_index()/process_count().
  Raises DataError for a bad configuration or missing data.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  _check_config(config, process_index, process_count)
  d = config.data
  kw = dict(process_index=process_index, process_count=process_count)
  if d.source == 'synthetic':
    return SyntheticSource(config, **kw)
  if d.source == 'digits':
    return _digits_source(config, **kw)
  if d.dataset in _IN_MEMORY_DATASETS:
    return _tfds_in_memory_source(config, **kw)
  return ImageNetSource(config, **kw)


def _check_config(config, process_index, process_count):
  d = config.data
  if d.source not in ('tfds', 'synthetic', 'digits'):
    raise DataError(f"config.data.source={d.source!r}: use 'tfds', 'synthetic' or 'digits'.")
  known = (*_IN_MEMORY_DATASETS, 'imagenet2012') + (('digits',) if d.source != 'tfds' else ())
  if d.source != 'digits' and d.dataset not in known:
    raise DataError(f'config.data.dataset={d.dataset!r} is not supported with '
                    f'source={d.source!r}; use one of {list(known)}.')
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index={process_index} is not in [0, process_count={process_count}).')
  for key in ('batch_size', 'eval_batch_size'):
    size = config[key]
    if size <= 0 or size % process_count:
      raise DataError(
          f'config.{key}={size} must be a positive multiple of the number of '
          f'processes ({process_count}): every process takes an equal share of '
          f'each global batch. Use e.g. {key}={(size // process_count + 1) * process_count}.')
  if d.normalization not in _NORMALIZATIONS:
    raise DataError(f'config.data.normalization={d.normalization!r}: use one of {_NORMALIZATIONS}.')
  if d.dataset == 'imagenet2012' and d.source != 'digits':
    if not d.image_size <= d.min_resize <= d.max_resize or d.eval_resize < d.image_size:
      raise DataError(
          f'ImageNet sizes must satisfy image_size <= min_resize <= max_resize and '
          f'image_size <= eval_resize; got image_size={d.image_size}, min_resize='
          f'{d.min_resize}, max_resize={d.max_resize}, eval_resize={d.eval_resize}.')
  elif d.ten_crop:
    raise DataError('config.data.ten_crop is only implemented for imagenet2012; '
                    'CIFAR-style evaluation uses the single original image.')


# ----------------------------------------------------------------------------
# In-memory datasets (CIFAR, digits): uint8 arrays, batches built in numpy.


def augment_params(rng: np.random.Generator, batch: int,
                   pad: int) -> tuple[np.ndarray, np.ndarray]:
  """Random crop corners in [0, 2*pad] (padded coordinates) and flip flags."""
  offsets = rng.integers(0, 2 * pad + 1, size=(batch, 2))
  flips = rng.random(batch) < 0.5
  return offsets, flips


def crop_and_flip(images: np.ndarray, pad: int, offsets: np.ndarray,
                  flips: np.ndarray) -> np.ndarray:
  """Pads `images` [B, H, W, C] with `pad` zeros on every side, crops H x W at
  the top-left corners `offsets` [B, 2] of the padded image, flips where
  `flips` [B]. Same result as np.pad + slicing, but copies only the part of
  the crop that overlaps the image (3x faster than materialising the padding).
  """
  out = np.zeros_like(images)
  _, h, w, _ = images.shape
  for i, ((oy, ox), flip) in enumerate(zip(offsets - pad, flips)):
    # The crop shows image rows [oy, oy + h) and columns [ox, ox + w).
    src = images[i, max(oy, 0):h + min(oy, 0), max(ox, 0):w + min(ox, 0)]
    rows = slice(max(-oy, 0), h - max(oy, 0))
    if flip:  # output column j shows crop column w - 1 - j
      out[i, rows, max(ox, 0):w - max(-ox, 0)] = src[:, ::-1]
    else:
      out[i, rows, max(-ox, 0):w - max(ox, 0)] = src
  return out


def image_statistics(images: np.ndarray) -> dict[str, np.ndarray]:
  """Mean image, per-channel mean and std of uint8 `images` [N, H, W, C]."""
  total = np.zeros(images.shape[1:], np.float64)
  total_sq = np.zeros(images.shape[-1], np.float64)
  for chunk in range(0, len(images), 4096):  # bounded temporaries
    x = images[chunk:chunk + 4096].astype(np.float64)
    total += x.sum(0)
    total_sq += np.square(x).sum((0, 1, 2))
  n = len(images)
  pixel_mean = total / n
  channel_mean = pixel_mean.mean((0, 1))
  mean_sq = total_sq / (n * np.prod(images.shape[1:3]))
  channel_std = np.sqrt(np.maximum(mean_sq - channel_mean**2, 0))
  return dict(pixel_mean=pixel_mean, channel_mean=channel_mean,
              channel_std=channel_std, num_examples=np.array(n))


def cached_image_statistics(images: np.ndarray,
                            path: str | os.PathLike | None) -> dict[str, np.ndarray]:
  """`image_statistics`, loaded from / saved to `path` (an .npz) when given."""
  if path is not None and os.path.exists(path):
    with np.load(path) as f:
      stats = dict(f)
    if int(stats['num_examples']) == len(images):
      return stats
    logging.warning('Ignoring %s: it was computed on a different split.', path)
  stats = image_statistics(images)
  if path is not None:
    try:  # write-then-rename, so a crash never leaves a truncated cache
      os.makedirs(os.path.dirname(path), exist_ok=True)
      tmp = f'{path}.tmp{os.getpid()}.npz'
      np.savez(tmp, **stats)
      os.replace(tmp, path)
    except OSError as e:  # e.g. a read-only shared data dir
      logging.warning('Could not cache image statistics at %s: %s', path, e)
  return stats


def _normalizer(stats: dict[str, np.ndarray], mode: str) -> tuple[np.ndarray, np.ndarray]:
  """(mean, scale) so that normalised = (image - mean) * scale."""
  if mode == 'pixel_mean':
    return stats['pixel_mean'].astype(np.float32), np.ones((), np.float32)
  mean = stats['channel_mean'].astype(np.float32)
  if mode == 'channel_mean':
    return mean, np.ones((), np.float32)
  return mean, (1.0 / np.maximum(stats['channel_std'], 1e-6)).astype(np.float32)


class ArraySource(DataSource):
  """A dataset held in memory as uint8 arrays (CIFAR, digits).

  Training: per-pixel (or per-channel) mean subtraction, then pad with zeros,
  random crop and random horizontal flip (the paper's CIFAR augmentation; the
  zeros are added after the mean subtraction, as in the reference Torch code,
  so the border is "average colour", not black).
  Evaluation: the normalised original images.
  """

  def __init__(self, config, *, name: str, train: tuple[np.ndarray, np.ndarray],
               evals: dict[str, tuple[str, np.ndarray, np.ndarray]],
               stats: dict[str, np.ndarray], num_classes: int, **kw):
    images, labels = train
    super().__init__(
        config, name=name, synthetic=False, image_shape=images.shape[1:],
        num_classes=num_classes, num_train_examples=len(images),
        eval_splits={role: (split, len(x)) for role, (split, x, _) in evals.items()}, **kw)
    self._train = (images, labels.astype(np.int32))
    self._evals = {role: (x, y.astype(np.int32)) for role, (_, x, y) in evals.items()}
    self._mean, self._scale = _normalizer(stats, config.data.normalization)
    self._augment = config.data.augment
    self._pad = config.data.pad_pixels
    if not 0 <= self._pad < min(images.shape[1:3]):
      raise DataError(f'config.data.pad_pixels={self._pad} must be in '
                      f'[0, {min(images.shape[1:3])}).')

  def normalize(self, images: np.ndarray) -> np.ndarray:
    return (images.astype(np.float32) - self._mean) * self._scale

  def permutation(self, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` reads the training split."""
    return _rng(self.seed, _PERMUTATION, epoch).permutation(self.num_train_examples)

  def train_batch(self, step: int, permutation: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """This process's share of the global training batch of `step`."""
    epoch, i = divmod(step, self.steps_per_epoch)
    if permutation is None:
      permutation = self.permutation(epoch)
    rows = self._local(self.batch_size)
    idx = permutation[i * self.batch_size:(i + 1) * self.batch_size][rows]
    images = self.normalize(self._train[0][idx])
    if self._augment:
      # Drawn for the whole global batch, so any process count sees the same.
      offsets, flips = augment_params(_rng(self.seed, _AUGMENT, step), self.batch_size, self._pad)
      images = crop_and_flip(images, self._pad, offsets[rows], flips[rows])
    return {'image': images, 'label': self._train[1][idx]}

  def train_batches(self, start_step: int = 0):
    def batches():
      epoch, permutation = None, None
      for step in itertools.count(start_step):
        if step // self.steps_per_epoch != epoch:
          epoch = step // self.steps_per_epoch
          permutation = self.permutation(epoch)
        yield self.train_batch(step, permutation)
    return _prefetch(batches(), self._prefetch)

  def eval_batches(self, role: str):
    self._eval_split(role)
    images, labels = self._evals[role]
    def batches():
      for idx, mask in self._eval_positions(len(images)):
        x = self.normalize(images[idx])
        x[~mask] = 0
        yield {'image': x, 'label': np.where(mask, labels[idx], 0).astype(np.int32), 'mask': mask}
    return _prefetch(batches(), self._prefetch)


def _tfds_in_memory_source(config, **kw) -> ArraySource:
  d = config.data
  builder = _builder(d)
  mocked = _tfds_is_mocked()
  if not mocked:  # under tfds.testing.mock_data nothing is ever prepared
    ensure_prepared(builder, manual_dir=d.manual_dir or None)
  train = _load_arrays(builder, d.train_split, 'train_split')
  # Never cache statistics of mock data where real statistics would be looked for.
  cache = None if mocked else os.path.join(
      os.fspath(builder.data_dir_root), 'resnet_jax_stats',
      f'{builder.name}-{builder.version}-{re.sub(r"[^A-Za-z0-9_.%-]+", "_", d.train_split)}.npz')
  evals = {role: (split, *_load_arrays(builder, split, key))
           for role, split, key in _eval_roles(d)}
  return ArraySource(config, name=builder.name, train=train, evals=evals,
                     stats=cached_image_statistics(train[0], cache),
                     num_classes=builder.info.features['label'].num_classes, **kw)


def _eval_roles(d) -> list[tuple[str, str, str]]:
  """(role, split, config key) of the configured evaluation splits."""
  return [(role, d[key], key) for role, key in (('validation', 'val_split'), ('test', 'test_split'))
          if d[key]]


def _load_arrays(builder, split: str, key: str) -> tuple[np.ndarray, np.ndarray]:
  """A whole split as uint8 images [N, H, W, C] and labels [N], in file order."""
  try:
    ds = builder.as_dataset(split=split, read_config=tfds.ReadConfig(try_autocache=False))
  except (ValueError, KeyError) as e:
    raise DataError(f'config.data.{key}={split!r} is not a valid split of {builder.name}: {e}. '
                    'See https://www.tensorflow.org/datasets/splits for the syntax.') from e
  # batch_size=-1 in as_dataset needs split metadata that mock data lacks.
  images, labels = [], []
  for batch in tfds.as_numpy(ds.batch(8192)):
    images.append(batch['image'])
    labels.append(batch['label'])
  if not images:
    raise DataError(f'config.data.{key}={split!r} of {builder.name} is empty.')
  return np.concatenate(images), np.concatenate(labels).astype(np.int32)


def _resolve_split(split: str, arrays: dict[str, tuple[np.ndarray, np.ndarray]], key: str):
  """tfds split syntax ('train[:90%]', 'train+test') over in-memory arrays."""
  sizes = {name: types.SimpleNamespace(num_examples=len(x)) for name, (x, _) in arrays.items()}
  try:
    parts = tfds.core.ReadInstruction.from_spec(split).to_absolute(sizes)
  except (ValueError, AssertionError) as e:
    raise DataError(f'config.data.{key}={split!r}: {e}. The splits are {list(arrays)}.') from e
  return tuple(np.concatenate([arrays[p.splitname][i][p.from_:p.to] for p in parts])
               for i in range(2))


def _digits_arrays(test_fraction: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """scikit-learn's 8x8 digits as 32x32x3 uint8, split into 'train'/'test'.

  The split is stratified and fixed (it does not depend on config.seed), so
  the held-out set is the same for every run.
  """
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
  if not 0 < test_fraction < 1:
    raise DataError(f'config.data.digits_test_fraction={test_fraction} must be in (0, 1).')
  digits = datasets.load_digits()
  images = digits.images.astype(np.float32)[..., None] * (255.0 / 16.0)  # 0..16 -> 0..255
  images = tf.image.resize(images, (32, 32), method='bilinear').numpy()
  images = np.repeat(np.clip(np.round(images), 0, 255).astype(np.uint8), 3, axis=-1)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      images, digits.target.astype(np.int32), test_size=test_fraction,
      stratify=digits.target, random_state=0)
  return {'train': (x_train, y_train), 'test': (x_test, y_test)}


def _digits_source(config, **kw) -> ArraySource:
  d = config.data
  arrays = _digits_arrays(d.digits_test_fraction)
  train = _resolve_split(d.train_split, arrays, 'train_split')
  evals = {role: (split, *_resolve_split(split, arrays, key))
           for role, split, key in _eval_roles(d)}
  # Tiny: the statistics are recomputed each time rather than cached on disk.
  return ArraySource(config, name='digits', train=train, evals=evals,
                     stats=image_statistics(train[0]), num_classes=10, **kw)


# ----------------------------------------------------------------------------
# Synthetic data.


class SyntheticSource(DataSource):
  """Random images with the shapes of config.data.dataset, for benchmarks and
  smoke runs. Cycles through `synthetic_examples` pre-generated examples; the
  split sizes (and so steps_per_epoch) are those of the real dataset."""

  def __init__(self, config, **kw):
    d = config.data
    if d.dataset == 'imagenet2012':
      shape, sizes = (d.image_size, d.image_size, 3), _KNOWN_SPLITS['imagenet2012']
    elif d.dataset == 'digits':
      shape = (32, 32, 3)
      sizes = {k: len(v[0]) for k, v in _digits_arrays(d.digits_test_fraction).items()}
    else:
      shape, sizes = (32, 32, 3), _KNOWN_SPLITS[d.dataset]
    fake = {k: (np.empty(n, np.bool_), np.empty(n, np.bool_)) for k, n in sizes.items()}
    n_train = len(_resolve_split(d.train_split, fake, 'train_split')[0])
    evals = {role: (split, len(_resolve_split(split, fake, key)[0]))
             for role, split, key in _eval_roles(d)}
    super().__init__(config, name=f'synthetic:{d.dataset}', synthetic=True, image_shape=shape,
                     num_classes=_NUM_CLASSES[d.dataset], num_train_examples=n_train,
                     eval_splits=evals, **kw)
    rng = _rng(self.seed, _SYNTHETIC)
    n = max(1, d.synthetic_examples)
    self._images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    self._labels = rng.integers(0, self.num_classes, size=n, dtype=np.int32)
    self._ten_crop = d.ten_crop

  def _batch(self, positions: np.ndarray) -> dict[str, np.ndarray]:
    idx = positions % len(self._images)
    images = (self._images[idx].astype(np.float32) - 127.5) * (1 / 64)  # roughly unit scale
    return {'image': images, 'label': self._labels[idx]}

  def train_batches(self, start_step: int = 0):
    rows = np.arange(self.batch_size)[self._local(self.batch_size)]
    return _prefetch((self._batch(step * self.batch_size + rows)
                      for step in itertools.count(start_step)), self._prefetch)

  def eval_batches(self, role: str):
    _, n = self._eval_split(role)
    def batches():
      for idx, mask in self._eval_positions(n):
        batch = self._batch(idx)
        batch['image'][~mask] = 0
        batch['label'] = np.where(mask, batch['label'], 0).astype(np.int32)
        if self._ten_crop:
          batch['image'] = np.repeat(batch['image'][:, None], 10, axis=1)
        yield {**batch, 'mask': mask}
    return _prefetch(batches(), self._prefetch)


# ----------------------------------------------------------------------------
# ImageNet: tf.data decoding and augmentation.


def _source_crop_size(hw: tf.Tensor, resize_to, size: int) -> tf.Tensor:
  """Side, in source pixels, of the square that becomes a size x size crop
  after resizing the image's shorter side to `resize_to`."""
  shorter = tf.cast(tf.reduce_min(hw), tf.float32)
  side = tf.round(size * shorter / tf.cast(resize_to, tf.float32))
  return tf.cast(tf.clip_by_value(side, 1.0, shorter), tf.int32)


def _decode_crop_resize(image_bytes: tf.Tensor, y, x, side, size: int) -> tf.Tensor:
  """Decodes only the source square [y, y + side) x [x, x + side) of a JPEG and
  resizes it to size x size (float32). Equal, up to rounding the square to
  whole pixels, to resizing the whole image and then cropping, at a fraction
  of the cost (ImageNet's scale augmentation resizes to up to 640x480 only to
  keep 224x224 of it). Bilinear without antialiasing, like the reference
  Caffe/Torch pipelines."""
  image = tf.image.decode_and_crop_jpeg(image_bytes, tf.stack([y, x, side, side]), channels=3)
  return tf.image.resize(image, [size, size], method='bilinear')


def pca_lighting(seed: tf.Tensor, std: float) -> tf.Tensor:
  """AlexNet colour augmentation: an RGB offset (0..255 scale) along the
  principal components of ImageNet pixels, with N(0, std) coefficients."""
  alpha = tf.random.stateless_normal([3], seed, stddev=std)
  eigvec = tf.constant(IMAGENET_PCA_EIGVEC, tf.float32)
  return 255.0 * tf.linalg.matvec(eigvec, alpha * tf.constant(IMAGENET_PCA_EIGVAL, tf.float32))


def imagenet_normalizer(mode: str) -> tuple[np.ndarray, np.ndarray]:
  """(mean, scale) for ImageNet; 'pixel_mean' uses the constant mean image."""
  mean = np.asarray(IMAGENET_MEAN_RGB, np.float32)
  if mode == 'channel_mean_std':
    return mean, 1.0 / np.asarray(IMAGENET_STD_RGB, np.float32)
  return mean, np.ones((), np.float32)


def imagenet_train_image(image_bytes: tf.Tensor, seed: tf.Tensor, d) -> tf.Tensor:
  """Decode a JPEG, resize its shorter side to a random size in
  [min_resize, max_resize], take a random image_size crop, flip at random,
  add PCA lighting noise and normalise. `seed`: int64 [2] (stateless)."""
  seeds = tf.random.experimental.stateless_split(seed, 5)
  hw = tf.image.extract_jpeg_shape(image_bytes)[:2]
  resize_to = tf.random.stateless_uniform([], seeds[0], d.min_resize, d.max_resize + 1, tf.int32)
  side = _source_crop_size(hw, resize_to, d.image_size)
  y, x = (tf.random.stateless_uniform([], seeds[i + 1], 0, hw[i] - side + 1, tf.int32)
          for i in range(2))
  image = _decode_crop_resize(image_bytes, y, x, side, d.image_size)
  image = tf.image.stateless_random_flip_left_right(image, seeds[3])
  if d.pca_lighting > 0:
    image += pca_lighting(seeds[4], d.pca_lighting)
  mean, scale = imagenet_normalizer(d.normalization)
  return (image - mean) * scale


def imagenet_eval_image(image_bytes: tf.Tensor, d) -> tf.Tensor:
  """Shorter side to eval_resize, then the centre crop [S, S, 3], or with
  ten_crop the 4 corner + centre crops and their flips [10, S, S, 3]."""
  hw = tf.image.extract_jpeg_shape(image_bytes)[:2]
  side = _source_crop_size(hw, d.eval_resize, d.image_size)
  h, w = hw[0] - side, hw[1] - side  # the largest corner offsets
  if d.ten_crop:
    image = tf.io.decode_jpeg(image_bytes, channels=3)
    crops = tf.stack([image[y:y + side, x:x + side] for y, x in
                      ((0, 0), (0, w), (h, 0), (h, w), (h // 2, w // 2))])
    crops = tf.image.resize(crops, [d.image_size] * 2, method='bilinear')
    image = tf.concat([crops, tf.reverse(crops, axis=[2])], axis=0)
  else:
    image = _decode_crop_resize(image_bytes, h // 2, w // 2, side, d.image_size)
  mean, scale = imagenet_normalizer(d.normalization)
  return (image - mean) * scale


def _deterministic_options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


def imagenet_train_map(ds: tf.data.Dataset, d, *, aug_seed: int, batch_size: int,
                       num_parallel_calls: int) -> tf.data.Dataset:
  """(position in epoch, (jpeg bytes, label)) records -> prefetched batches of
  augmented images; an example's randomness is seeded by (aug_seed, position)."""
  def preprocess(i, record):
    image_bytes, label = record
    seed = tf.stack([tf.constant(aug_seed, tf.int64), i])
    return imagenet_train_image(image_bytes, seed, d), label
  ds = ds.map(preprocess, num_parallel_calls=num_parallel_calls, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(d.prefetch)
  return ds.with_options(_deterministic_options())


class ImageNetSource(DataSource):
  """ImageNet (tfds imagenet2012) streamed through tf.data; see the module
  docstring for how sharding, shuffling and resuming work."""

  def __init__(self, config, **kw):
    d = config.data
    self._d = d
    self._builder = _builder(d)
    if not _tfds_is_mocked():
      ensure_prepared(self._builder, manual_dir=d.manual_dir or None)
    n_train = self._count(d.train_split, 'train_split')
    evals = {role: (split, self._count(split, key)) for role, split, key in _eval_roles(d)}
    super().__init__(config, name=self._builder.name, synthetic=False,
                     image_shape=(d.image_size, d.image_size, 3),
                     num_classes=self._builder.info.features['label'].num_classes,
                     num_train_examples=n_train, eval_splits=evals, **kw)
    self._parallel = tf.data.AUTOTUNE if d.num_parallel_calls < 0 else d.num_parallel_calls
    self._cached_train = None

  def _read(self, split, shuffle_seed: int | None = None) -> tf.data.Dataset:
    """(jpeg bytes, int32 label) records, in a file order seeded by shuffle_seed."""
    ds = self._builder.as_dataset(
        split=split, shuffle_files=shuffle_seed is not None,
        decoders={'image': tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False,
                                    options=_deterministic_options()))
    return ds.map(lambda ex: (ex['image'], tf.cast(ex['label'], tf.int32)))

  def _count(self, split: str, key: str) -> int:
    try:
      n = int(self._read(split).cardinality())
    except (ValueError, KeyError) as e:
      raise DataError(f'config.data.{key}={split!r} is not a valid split of '
                      f'{self._builder.name}: {e}') from e
    if n < 0:
      raise DataError(f'Cannot tell the size of split {split!r} of {self._builder.name}.')
    return n

  def _train_epoch(self, epoch: int, skip_batches: int) -> tf.data.Dataset:
    d, local = self._d, self.local_batch_size
    split = tfds.split_for_jax_process(d.train_split, process_index=self.process_index,
                                       process_count=self.process_count, drop_remainder=True)
    epoch_seed = _seed_int(self.seed, _SHUFFLE, epoch)
    if d.cache:  # fixed file order, read once; the shuffle buffer still reshuffles
      if self._cached_train is None:
        self._cached_train = self._read(split).cache()
        # Fill the cache in one full pass: epochs stop early (each drops its
        # remainder) and tf.data discards a cache that was not read to the end.
        self._cached_train.reduce(np.int64(0), lambda n, _: n + 1)
      ds = self._cached_train
    else:
      ds = self._read(split, shuffle_seed=epoch_seed % 2**31)
    ds = ds.shuffle(d.shuffle_buffer, seed=epoch_seed, reshuffle_each_iteration=False)
    # Skipping before the augmentation reads the skipped records without decoding them.
    ds = ds.take(self.steps_per_epoch * local).enumerate().skip(skip_batches * local)
    return imagenet_train_map(ds, d, aug_seed=_seed_int(self.seed, _AUGMENT, epoch),
                              batch_size=local, num_parallel_calls=self._parallel)

  def train_batches(self, start_step: int = 0):
    epoch, skip = divmod(start_step, self.steps_per_epoch)
    while True:
      for image, label in self._train_epoch(epoch, skip).as_numpy_iterator():
        yield {'image': image, 'label': label}
      epoch, skip = epoch + 1, 0

  def eval_batches(self, role: str):
    split, n = self._eval_split(role)
    d, size, local = self._d, self.eval_batch_size, self.local_eval_batch_size
    ds = self._read(split).map(lambda x, y: (x, y, True))
    padding = (math.ceil(n / size) * size) - n
    ds = ds.concatenate(tf.data.Dataset.from_tensors((tf.constant(b''), 0, False)).repeat(padding))
    # This process's rows of every global batch (records are read by every
    # process, but each decodes only its own).
    ds = ds.enumerate().filter(lambda i, _: (i % size) // local == self.process_index)
    shape = (10,) * d.ten_crop + self.image_shape
    def preprocess(i, record):
      image_bytes, label, mask = record
      image = tf.cond(mask, lambda: imagenet_eval_image(image_bytes, d), lambda: tf.zeros(shape))
      return {'image': image, 'label': label, 'mask': mask}
    ds = ds.map(preprocess, num_parallel_calls=self._parallel, deterministic=True)
    ds = ds.batch(local).prefetch(d.prefetch).with_options(_deterministic_options())
    return ds.as_numpy_iterator()


# ----------------------------------------------------------------------------
# TFDS: preparedness, offline detection, clean failure.


def _builder(d):
  return tfds.builder(d.dataset, data_dir=d.data_dir or None)


def _tfds_is_mocked() -> bool:
  """True inside tfds.testing.mock_data, which patches download_and_prepare."""
  fn = tfds.core.DatasetBuilder.download_and_prepare
  return getattr(fn, '__name__', '') == 'mock_download_and_prepare'


def can_reach(host: str, port: int = 443, timeout: float = 3.0) -> bool:
  """Whether a TCP connection to host:port opens within `timeout` seconds.

  Run in a thread because DNS resolution ignores socket timeouts and can hang
  for much longer on a machine without network.
  """
  result = []
  def connect():
    try:
      socket.create_connection((host, port), timeout=timeout).close()
      result.append(True)
    except OSError:
      pass
  thread = threading.Thread(target=connect, daemon=True)
  thread.start()
  thread.join(timeout)
  return bool(result)


def ensure_prepared(builder, *, manual_dir: str | None = None) -> None:
  """Prepares `builder`'s dataset if needed, or raises DataError quickly.

  * Already prepared: nothing to do.
  * Datasets that need manual files (ImageNet): those files must be in the
    manual dir, checked before anything else.
  * Otherwise the archive tfds would download may be placed in the manual dir
    (tfds then uses it, checksum-verified, without network); failing that, a
    quick connectivity probe decides whether downloading can work at all, so an
    offline machine gets a clear error in seconds instead of after tfds's
    download retries.
  A failed preparation removes what it wrote.
  """
  if builder.is_prepared():
    return
  data_dir = pathlib.Path(builder.data_dir_root)
  manual = pathlib.Path(manual_dir) if manual_dir else data_dir / 'downloads' / 'manual'
  name, version = builder.name, builder.version
  prepare_cmd = (f'python -c "import tensorflow_datasets as tfds; tfds.builder({name!r}, '
                 f'data_dir={str(data_dir)!r}).download_and_prepare()"  (or: tfds build '
                 f'{name} --data_dir={data_dir})')
  if name in _MANUAL_FILES:
    missing = [f for f in _MANUAL_FILES[name] if not (manual / f).is_file()]
    if missing:
      raise DataError(
          f'{name} is not prepared in {data_dir} (no {data_dir / name / str(version)}), and '
          f'preparing it needs the original archives, which must be downloaded by hand from '
          f'https://image-net.org/ (free registration). Missing from the manual dir '
          f'{manual}: {", ".join(missing)}. Put {" and ".join(_MANUAL_FILES[name])} in '
          f'{manual} (or set config.data.manual_dir to the directory holding them) and '
          f'run again; preparing then takes a few hours. Alternatively prepare it elsewhere '
          f'with {prepare_cmd} and copy {data_dir / name} here, or use '
          "config.data.source='synthetic' to benchmark without data.")
  else:
    urls = builder.url_infos or {}
    archives = [info.filename for info in urls.values() if info.filename]
    if not (archives and all((manual / a).is_file() for a in archives)):
      hosts = sorted({urllib.parse.urlparse(u).hostname for u in urls})
      if not all(can_reach(h) for h in hosts):
        raise DataError(
            f'{name} is not prepared in {data_dir} (no {data_dir / name / str(version)}) '
            f'and this machine cannot reach {", ".join(hosts)} to download it. Either:\n'
            f'  1. on a machine with network run {prepare_cmd}\n'
            f'     and copy the resulting directory {name}/ into {data_dir} here; or\n'
            f'  2. copy the original archive {", ".join(archives)} ({", ".join(urls)}) into '
            f'the manual dir {manual} (or set config.data.manual_dir) and run again: tfds '
            f'prepares it from there without network; or\n'
            "  3. work offline with config.data.source='digits' (scikit-learn's bundled "
            "digits) or 'synthetic'.\n"
            'config.data.data_dir sets the data directory ($TFDS_DATA_DIR by default).')
  _download_and_prepare(builder, data_dir, manual)


def _download_and_prepare(builder, data_dir: pathlib.Path, manual: pathlib.Path) -> None:
  """builder.download_and_prepare(), removing what it wrote if it fails."""
  downloads = data_dir / 'downloads'
  new_dirs = [p for p in (data_dir, data_dir / builder.name, downloads, downloads / 'extracted')
              if not p.exists()]
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=os.fspath(manual), try_download_gcs=False))
  except Exception as e:  # pylint: disable=broad-except
    for p in new_dirs:  # everything below a directory this attempt created is ours
      shutil.rmtree(p, ignore_errors=True)
    for parent in (data_dir / builder.name, downloads, downloads / 'extracted'):
      for p in parent.glob('*incomplete*') if parent.is_dir() else ():
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    raise DataError(f'Preparing {builder.name} in {data_dir} failed ({type(e).__name__}: '
                    f'{e}); its partial files were removed. Fix the cause and run again.') from e


# ----------------------------------------------------------------------------


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error


_END = object()


def _prefetch(iterator: Iterator, size: int) -> Iterator:
  """Runs `iterator` in a background thread up to `size` items ahead, so that
  batch assembly (numpy, which mostly releases the GIL) overlaps the step."""
  if size <= 0:
    yield from iterator
    return
  items: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        items.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def work():
    try:
      for item in iterator:
        if not put(item):
          return
      put(_END)
    except BaseException as e:  # pylint: disable=broad-except
      put(_Failure(e))

  threading.Thread(target=work, daemon=True).start()
  try:
    while True:
      item = items.get()
      if item is _END:
        return
      if isinstance(item, _Failure):
        raise item.error
      yield item
  finally:
    stop.set()
