"""Datasets held in memory as uint8 arrays: CIFAR (from tfds or the official
files), scikit-learn's digits, and synthetic images. Batches are built in numpy;
nothing here needs TensorFlow.

Pixel values stay on the 0..255 scale; normalisation subtracts a mean (and
optionally divides by a standard deviation) only, as in the paper.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import re

from absl import logging
import numpy as np

from resnet_jax.data import base
from resnet_jax.data.base import DataError

# Split sizes of the real datasets, for the synthetic source (no data is read there).
KNOWN_SPLITS = {
    'cifar10': {'train': 50_000, 'test': 10_000},
    'cifar100': {'train': 50_000, 'test': 10_000},
    'imagenet2012': {'train': 1_281_167, 'validation': 50_000},
}


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


def cache_name(*parts: str) -> str:
  """A file name for a statistics cache: the parts joined by '-', unsafe characters as '_'."""
  return '-'.join(re.sub(r'[^A-Za-z0-9_.%-]+', '_', str(p)) for p in parts) + '.npz'


def content_hash(images: np.ndarray) -> str:
  """A short digest of the pixels, so cached statistics never belong to other data."""
  return hashlib.blake2b(np.ascontiguousarray(images).data, digest_size=12).hexdigest()


def cached_image_statistics(images: np.ndarray, path=None) -> dict[str, np.ndarray]:
  """`image_statistics`, loaded from / saved to `path` (an .npz, any epath) when given.

  The cache records the digest of the images it was computed on and is
  recomputed when they differ.
  """
  from etils import epath  # pylint: disable=g-import-not-at-top
  digest = content_hash(images)
  path = epath.Path(path) if path is not None else None
  if path is not None and path.exists():
    with path.open('rb') as f, np.load(f) as npz:
      stats = dict(npz)
    if (int(stats['num_examples']) == len(images)
        and str(stats.get('content_hash', digest)) == digest):
      return stats
    logging.warning('Ignoring %s: it was computed on different images.', path)
  stats = {**image_statistics(images), 'content_hash': np.array(digest)}
  if path is not None:
    try:  # write-then-rename, so a crash never leaves a truncated cache
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.parent / f'{path.name}.tmp{os.getpid()}'
      with tmp.open('wb') as f:
        np.savez(f, **stats)
      tmp.replace(path)
    except OSError as e:  # e.g. a read-only shared data dir
      logging.warning('Could not cache image statistics at %s: %s', path, e)
  return stats


def normalizer(stats: dict[str, np.ndarray], mode: str) -> tuple[np.ndarray, np.ndarray]:
  """(mean, scale) so that normalised = (image - mean) * scale."""
  if mode == 'pixel_mean':
    return stats['pixel_mean'].astype(np.float32), np.ones((), np.float32)
  mean = stats['channel_mean'].astype(np.float32)
  if mode == 'channel_mean':
    return mean, np.ones((), np.float32)
  return mean, (1.0 / np.maximum(stats['channel_std'], 1e-6)).astype(np.float32)


class ArraySource(base.DataSource):
  """A dataset held in memory as uint8 arrays (CIFAR, digits).

  Training: per-pixel (or per-channel) mean subtraction, then pad with zeros,
  random crop and random horizontal flip (the paper's CIFAR augmentation; the
  zeros are added after the mean subtraction, as in the reference Torch code,
  so the border is "average colour", not black).
  Evaluation: the normalised original images.
  """

  def __init__(self, config, *, name: str, train: tuple[np.ndarray, np.ndarray],
               evals: dict[str, tuple[str, np.ndarray, np.ndarray]],
               stats: dict[str, np.ndarray], num_classes: int,
               label_names: tuple[str, ...] = (), **kw):
    images, labels = train
    super().__init__(
        config, name=name, synthetic=False, image_shape=images.shape[1:],
        num_classes=num_classes, num_train_examples=len(images),
        eval_splits={role: (split, len(x)) for role, (split, x, _) in evals.items()}, **kw)
    self.label_names = tuple(label_names)
    self.train_arrays = (images, labels.astype(np.int32))
    self._evals = {role: (x, y.astype(np.int32)) for role, (_, x, y) in evals.items()}
    self.stats = stats
    self.mean, self.scale = normalizer(stats, config.data.normalization)
    self.augment = config.data.augment
    self.pad = config.data.pad_pixels
    if not 0 <= self.pad < min(images.shape[1:3]):
      raise DataError(f'config.data.pad_pixels={self.pad} must be in '
                      f'[0, {min(images.shape[1:3])}).')

  def fingerprint(self) -> dict[str, object]:
    digest = self.stats.get('content_hash')
    digest = str(digest) if digest is not None else content_hash(self.train_arrays[0])
    return {'examples': self.num_train_examples, 'digest': digest}

  def normalize(self, images: np.ndarray) -> np.ndarray:
    return (images.astype(np.float32) - self.mean) * self.scale

  def train_indices(self, step: int, permutation: np.ndarray | None = None) -> np.ndarray:
    """Rows of the training arrays in the global batch of `step`."""
    epoch, i = divmod(step, self.steps_per_epoch)
    if permutation is None:
      permutation = self.permutation(epoch)
    return permutation[i * self.batch_size:(i + 1) * self.batch_size]

  def augment_params(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Crop corners and flips of the whole global batch of `step` (any process count sees the same)."""
    return augment_params(base.rng(self.seed, base.AUGMENT, step), self.batch_size, self.pad)

  def train_batch(self, step: int, permutation: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """This process's share of the global training batch of `step`."""
    rows = self._local(self.batch_size)
    idx = self.train_indices(step, permutation)[rows]
    images = self.normalize(self.train_arrays[0][idx])
    if self.augment:
      offsets, flips = self.augment_params(step)
      images = crop_and_flip(images, self.pad, offsets[rows], flips[rows])
    return {'image': images, 'label': self.train_arrays[1][idx]}

  def train_batches(self, start_step: int = 0):
    return base.prefetch((self.train_batch(step, permutation)
                          for step, permutation in self.steps_and_permutations(start_step)),
                         self._prefetch)

  def eval_arrays(self, role: str) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images and int32 labels of an evaluation split."""
    self._eval_split(role)
    return self._evals[role]

  def eval_batches(self, role: str):
    images, labels = self.eval_arrays(role)
    def batches():
      for idx, mask in self._eval_positions(len(images)):
        x = self.normalize(images[idx])
        x[~mask] = 0
        yield {'image': x, 'label': np.where(mask, labels[idx], 0).astype(np.int32), 'mask': mask}
    return base.prefetch(batches(), self._prefetch)


# ----------------------------------------------------------------------------
# scikit-learn's digits.


def upsample_bilinear(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear upsampling with half-pixel centres (what tf.image.resize and
  jax.image.resize do), float32 [N, H, W, C] -> [N, *size, C]."""
  import jax  # pylint: disable=g-import-not-at-top
  with jax.default_device(jax.local_devices(backend='cpu')[0]):
    out = jax.image.resize(images, (len(images), *size, images.shape[-1]), method='linear',
                           antialias=False)
  return np.asarray(out)


def digits_arrays(test_fraction: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """scikit-learn's 8x8 digits as 32x32x3 uint8, split into 'train'/'test'.

  The split is stratified and fixed (it does not depend on config.seed), so
  the held-out set is the same for every run.
  """
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
  if not 0 < test_fraction < 1:
    raise DataError(f'config.data.digits_test_fraction={test_fraction} must be in (0, 1).')
  digits = datasets.load_digits()
  images = digits.images.astype(np.float32)[..., None] * (255.0 / 16.0)  # 0..16 -> 0..255
  images = upsample_bilinear(images, (32, 32))
  images = np.repeat(np.clip(np.round(images), 0, 255).astype(np.uint8), 3, axis=-1)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      images, digits.target.astype(np.int32), test_size=test_fraction,
      stratify=digits.target, random_state=0)
  return {'train': (x_train, y_train), 'test': (x_test, y_test)}


def digits_source(config, **kw) -> ArraySource:
  d = config.data
  arrays = digits_arrays(d.digits_test_fraction)
  train = base.resolve_split(d.train_split, arrays, 'train_split')
  evals = {role: (split, *base.resolve_split(split, arrays, key))
           for role, split, key in base.eval_roles(d)}
  # Tiny: the statistics are recomputed each time rather than cached on disk.
  return ArraySource(config, name='digits', train=train, evals=evals,
                     stats=image_statistics(train[0]), num_classes=10,
                     label_names=tuple(str(i) for i in range(10)), **kw)


# ----------------------------------------------------------------------------
# Synthetic data.


class SyntheticSource(base.DataSource):
  """Random images with the shapes of config.data.dataset, for benchmarks and
  smoke runs. Cycles through `synthetic_examples` pre-generated examples; the
  split sizes (and so steps_per_epoch) are those of the real dataset."""

  def __init__(self, config, **kw):
    d = config.data
    if d.dataset == 'imagenet2012':
      shape, sizes = (d.image_size, d.image_size, 3), KNOWN_SPLITS['imagenet2012']
    elif d.dataset == 'digits':
      shape = (32, 32, 3)
      sizes = {k: len(v[0]) for k, v in digits_arrays(d.digits_test_fraction).items()}
    else:
      shape, sizes = (32, 32, 3), KNOWN_SPLITS[d.dataset]
    n_train = base.split_size(d.train_split, sizes, 'train_split')
    evals = {role: (split, base.split_size(split, sizes, key))
             for role, split, key in base.eval_roles(d)}
    super().__init__(config, name=f'synthetic:{d.dataset}', synthetic=True, image_shape=shape,
                     num_classes=base.NUM_CLASSES[d.dataset], num_train_examples=n_train,
                     eval_splits=evals, **kw)
    rng = base.rng(self.seed, base.SYNTHETIC)
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
    return base.prefetch((self._batch(step * self.batch_size + rows)
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
    return base.prefetch(batches(), self._prefetch)
