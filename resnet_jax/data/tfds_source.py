"""tensorflow-datasets: preparing a dataset (offline detection, clean failure) and
reading CIFAR into memory. Imports TensorFlow; only the 'tfds' source loads it."""

from __future__ import annotations

import os
import pathlib
import shutil
import socket
import threading
import urllib.parse

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from resnet_jax.data import arrays, base
from resnet_jax.data.base import DataError


def hide_gpus_from_tensorflow():
  # TF only decodes and augments; it must not grab the GPU memory JAX needs.
  try:
    tf.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError) as e:  # devices already initialised
    logging.warning('Could not hide GPUs from TensorFlow: %s', e)


hide_gpus_from_tensorflow()

# Files that must be in tfds's manual dir to prepare these datasets.
MANUAL_FILES = {
    'imagenet2012': ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar'),
}


def builder(d):
  return tfds.builder(d.dataset, data_dir=d.data_dir or None)


def tfds_is_mocked() -> bool:
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
  if name in MANUAL_FILES:
    missing = [f for f in MANUAL_FILES[name] if not (manual / f).is_file()]
    if missing:
      raise DataError(
          f'{name} is not prepared in {data_dir} (no {data_dir / name / str(version)}), and '
          f'preparing it needs the original archives, which must be downloaded by hand from '
          f'https://image-net.org/ (free registration). Missing from the manual dir '
          f'{manual}: {", ".join(missing)}. Put {" and ".join(MANUAL_FILES[name])} in '
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
            "  3. if you have the official CIFAR files (what torchvision and Keras download), "
            "read them without tfds: config.data.source='files' and config.data.data_dir=DIR; "
            "or work offline with config.data.source='digits' (scikit-learn's bundled "
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


def in_memory_source(config, **kw) -> arrays.ArraySource:
  """CIFAR-10/100 from tfds, read whole into memory."""
  d = config.data
  b = builder(d)
  mocked = tfds_is_mocked()
  if not mocked:  # under tfds.testing.mock_data nothing is ever prepared
    ensure_prepared(b, manual_dir=d.manual_dir or None)
  train = load_arrays(b, d.train_split, 'train_split')
  # Never cache statistics of mock data where real statistics would be looked for.
  cache = None if mocked else os.path.join(
      os.fspath(b.data_dir_root), 'resnet_jax_stats',
      arrays.cache_name(b.name, b.version, d.train_split))
  evals = {role: (split, *load_arrays(b, split, key))
           for role, split, key in base.eval_roles(d)}
  label = b.info.features['label']
  return arrays.ArraySource(config, name=b.name, train=train, evals=evals,
                            stats=arrays.cached_image_statistics(train[0], cache),
                            num_classes=label.num_classes, label_names=tuple(label.names), **kw)


def load_arrays(builder, split: str, key: str) -> tuple[np.ndarray, np.ndarray]:
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
