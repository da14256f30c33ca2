"""Input pipelines. `create_data_source(config)` returns a `DataSource` with two iterators:

* `train_batches(start_step)`: this process's share of the global training
  batches of steps start_step, start_step + 1, ... (infinite).
* `eval_batches(role)`: one pass over an evaluation split in batches of fixed
  shape; the last batch is padded and `mask` says which rows are real.

The sources (`config.data.source`):

| source      | module           | needs TensorFlow |
|-------------|------------------|------------------|
| 'files'     | cifar_files.py   | no: CIFAR-10/100 from the official files  |
|             | imagenet_files.py | no: ImageNet from its class folders (Pillow) |
| 'digits'    | arrays.py        | no: scikit-learn's digits (offline demo)  |
| 'synthetic' | arrays.py        | no: random images of the right shapes     |
| 'tfds'      | tfds_source.py (CIFAR), imagenet.py (ImageNet, tf.data) | yes |

TensorFlow is imported only when a 'tfds' source is created. `base.py` holds
the interface, split strings and the determinism guarantees.
"""

from __future__ import annotations

from resnet_jax.data import arrays, base, cifar_files
from resnet_jax.data.arrays import (ArraySource, SyntheticSource, augment_params,
                                    cached_image_statistics, crop_and_flip, image_statistics)
from resnet_jax.data.base import DataError, DataSource, padded_eval_batch_size

SOURCES = ('files', 'tfds', 'synthetic', 'digits')
IN_MEMORY_DATASETS = ('cifar10', 'cifar100')


def create_data_source(config, *, process_index: int | None = None,
                       process_count: int | None = None,
                       num_devices: int | None = None) -> DataSource:
  """The data source `config` (a full experiment ConfigDict) describes.

  process_index/process_count/num_devices default to jax's; evaluation
  batches are padded to a multiple of num_devices.
  Raises DataError for a bad configuration or missing data.
  """
  if process_index is None or process_count is None or num_devices is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    num_devices = jax.device_count() if num_devices is None else num_devices
  check_config(config, process_index, process_count)
  d = config.data
  kw = dict(process_index=process_index, process_count=process_count, eval_shards=num_devices)
  if d.source == 'synthetic':
    return SyntheticSource(config, **kw)
  if d.source == 'digits':
    return arrays.digits_source(config, **kw)
  if d.source == 'files' and d.dataset == 'imagenet2012':
    from resnet_jax.data import imagenet_files  # pylint: disable=g-import-not-at-top
    return imagenet_files.ImageNetFilesSource(config, **kw)
  if d.source == 'files':
    return cifar_files.files_source(config, **kw)
  if d.dataset in IN_MEMORY_DATASETS:
    return _tfds_module('tfds_source', d.dataset).in_memory_source(config, **kw)
  return _tfds_module('imagenet', d.dataset).ImageNetSource(config, **kw)


def _tfds_module(name: str, dataset: str):
  """resnet_jax.data.<name>, which imports TensorFlow; a DataError naming the TensorFlow-free
  sources where TensorFlow or tensorflow-datasets is not installed."""
  import importlib  # pylint: disable=g-import-not-at-top
  try:
    return importlib.import_module(f'resnet_jax.data.{name}')
  except ImportError as e:
    if not (e.name or '').startswith('tensorflow'):
      raise
    where = ("CIFAR from the official files: --config.data.source=files "
             "--config.data.data_dir=DIR, DIR holding cifar-10-batches-py/ (what torchvision "
             "and Keras download), cifar-10-batches-bin/ or either .tar.gz" if dataset != 'imagenet2012'
             else "ImageNet from its class folders: --config.data.source=files "
                  "--config.data.data_dir=DIR, DIR holding train/<wnid>/ and val/<wnid>/")
    raise DataError(
        f"config.data.source='tfds' needs TensorFlow and tensorflow-datasets, and {e.name} is "
        f"not installed here ({e}). Either install them (pip install tensorflow-cpu "
        f"tensorflow-datasets), or read {where}; 'digits' and 'synthetic' need neither.") from e


def check_config(config, process_index: int = 0, process_count: int = 1) -> None:
  """Start-up checks of config.data and the batch sizes; no data is read."""
  d = config.data
  if d.source not in SOURCES:
    raise DataError(f'config.data.source={d.source!r}: use one of {list(SOURCES)}.')
  known = {'tfds': (*IN_MEMORY_DATASETS, 'imagenet2012'),
           'files': (*IN_MEMORY_DATASETS, 'imagenet2012'),
           'synthetic': (*IN_MEMORY_DATASETS, 'imagenet2012', 'digits'), 'digits': None}[d.source]
  if known is not None and d.dataset not in known:
    raise DataError(f'config.data.dataset={d.dataset!r} is not supported with '
                    f'source={d.source!r}; use one of {list(known)}.')
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index={process_index} is not in [0, process_count={process_count}).')
  if config.batch_size <= 0 or config.batch_size % process_count:
    size = config.batch_size
    raise DataError(
        f'config.batch_size={size} must be a positive multiple of the number of '
        f'processes ({process_count}): every process takes an equal share of '
        f'each global batch. Use e.g. batch_size={(max(size, 1) // process_count + 1) * process_count}.')
  if config.eval_batch_size <= 0:
    raise DataError(f'config.eval_batch_size={config.eval_batch_size} must be positive.')
  if d.normalization not in base.NORMALIZATIONS:
    raise DataError(f'config.data.normalization={d.normalization!r}: use one of '
                    f'{base.NORMALIZATIONS}.')
  if d.dataset == 'imagenet2012' and d.source != 'digits':
    if not d.image_size <= d.min_resize <= d.max_resize or d.eval_resize < d.image_size:
      raise DataError(
          f'ImageNet sizes must satisfy image_size <= min_resize <= max_resize and '
          f'image_size <= eval_resize; got image_size={d.image_size}, min_resize='
          f'{d.min_resize}, max_resize={d.max_resize}, eval_resize={d.eval_resize}.')
  elif d.ten_crop:
    raise DataError('config.data.ten_crop is only implemented for imagenet2012; '
                    'CIFAR-style evaluation uses the single original image.')


__all__ = ['ArraySource', 'DataError', 'DataSource', 'SyntheticSource', 'augment_params',
           'cached_image_statistics', 'check_config', 'create_data_source', 'crop_and_flip',
           'image_statistics', 'padded_eval_batch_size']
