"""ImageNet (tfds imagenet2012) streamed through tf.data.

ImageNet does not fit in memory: each process reads its own 1/P of the files
(`tfds.split_for_jax_process`), in a per-epoch file order and shuffle seeded by
(seed, epoch), with deterministic tf.data options and per-example stateless
random augmentation seeded by (seed, epoch, position). Resuming at step k
rebuilds epoch k // steps_per_epoch and skips the first k % steps_per_epoch
batches (it reads, but does not decode, those records), so the resumed stream
equals the uninterrupted one; it is not the same stream as a run with a
different number of processes.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from resnet_jax.data import base, tfds_source
from resnet_jax.data.base import DataError
# The constants and the normaliser are shared with the TensorFlow-free pipeline.
from resnet_jax.data.imagenet_files import (IMAGENET_MEAN_RGB, IMAGENET_PCA_EIGVAL,  # pylint: disable=unused-import
                                             IMAGENET_PCA_EIGVEC, IMAGENET_STD_RGB,
                                             imagenet_normalizer)


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


class ImageNetSource(base.DataSource):
  """ImageNet (tfds imagenet2012) streamed through tf.data; see the module
  docstring for how sharding, shuffling and resuming work."""

  def __init__(self, config, **kw):
    d = config.data
    self._d = d
    self._builder = tfds_source.builder(d)
    if not tfds_source.tfds_is_mocked():
      tfds_source.ensure_prepared(self._builder, manual_dir=d.manual_dir or None)
    n_train = self._count(d.train_split, 'train_split')
    evals = {role: (split, self._count(split, key)) for role, split, key in base.eval_roles(d)}
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
    epoch_seed = base.seed_int(self.seed, base.SHUFFLE, epoch)
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
    return imagenet_train_map(ds, d, aug_seed=base.seed_int(self.seed, base.AUGMENT, epoch),
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
