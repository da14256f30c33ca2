"""Throughput of the input pipelines (training batches, images per second).

  python -m resnet_jax.benchmark_input                     # every offline benchmark
  python -m resnet_jax.benchmark_input --dataset digits --num_batches 500
  python -m resnet_jax.benchmark_input --config experiments/cifar_resnet20.py

Datasets: 'cifar10' (real data, must be prepared), 'cifar10_generated' (random
CIFAR-shaped uint8 data, 50k examples, through the real CIFAR code path),
'digits', 'synthetic' (the synthetic source, CIFAR shapes) and
'imagenet_synthetic_jpeg' (random 500x375 JPEGs through the tf.data ImageNet
training preprocessing: decode, scale augmentation, crop, flip, PCA lighting)
and 'imagenet_files_jpeg' (the same JPEGs, as files, through the files
source's Pillow preprocessing). Only 'imagenet_synthetic_jpeg' needs
TensorFlow, and imports it when it runs.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import itertools
import tempfile
import time

import numpy as np

from resnet_jax import configs
from resnet_jax import data

OFFLINE = ('cifar10_generated', 'digits', 'synthetic', 'imagenet_synthetic_jpeg',
           'imagenet_files_jpeg')


def _time_batches(batches, num_batches: int, warmup: int) -> dict:
  for _ in range(warmup):
    next(batches)
  start, images = time.perf_counter(), 0
  for _ in range(num_batches):
    images += len(next(batches)['label'])
  seconds = time.perf_counter() - start
  return dict(images_per_s=images / seconds, ms_per_batch=1000 * seconds / num_batches,
              num_batches=num_batches)


def pipeline_throughput(config, num_batches: int = 200, warmup: int = 10,
                        source: data.DataSource | None = None) -> dict:
  """Training-batch throughput of the source `config` describes (or `source`).

  Returns name, batch_size (per process), setup_s (creating the source),
  images_per_s, ms_per_batch, num_batches.
  """
  start = time.perf_counter()
  if source is None:
    source = data.create_data_source(config, process_index=0, process_count=1)
  setup = time.perf_counter() - start
  result = _time_batches(source.train_batches(0), num_batches, warmup)
  return dict(name=source.name, batch_size=source.local_batch_size, setup_s=setup, **result)


def generated_cifar_source(config, num_examples: int = 50_000) -> data.ArraySource:
  """The CIFAR code path (mean image, pad/crop/flip) on random uint8 data."""
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (num_examples, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, num_examples, dtype=np.int32)
  return data.ArraySource(config, name='cifar10_generated', train=(images, labels),
                          evals={'test': ('test', images[:10_000], labels[:10_000])},
                          stats=data.image_statistics(images), num_classes=10,
                          process_index=0, process_count=1)


def random_jpegs(n: int, height: int = 375, width: int = 500, seed: int = 0) -> list[bytes]:
  """Smooth random images (so they compress like photos), JPEG-encoded (Pillow)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    low = rng.uniform(0, 255, (height // 16, width // 16, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(low).resize((width, height), Image.BICUBIC), np.float32)
    image += rng.normal(0, 8, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, 'JPEG', quality=90)
    out.append(buffer.getvalue())
  return out


def jpeg_throughput(config, num_batches: int = 10, warmup: int = 2, num_images: int = 64) -> dict:
  """ImageNet training preprocessing (tf.data) over in-memory JPEGs (no disk reads)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from resnet_jax.data import imagenet as imagenet_data  # pylint: disable=g-import-not-at-top
  d = config.data
  jpegs = random_jpegs(num_images)
  records = tf.data.Dataset.from_tensor_slices((jpegs, np.zeros(len(jpegs), np.int32)))
  records = records.repeat().enumerate()
  parallel = tf.data.AUTOTUNE if d.num_parallel_calls < 0 else d.num_parallel_calls
  ds = imagenet_data.imagenet_train_map(records, d, aug_seed=config.seed, batch_size=config.batch_size,
                               num_parallel_calls=parallel)
  batches = ({'label': label} for _, label in ds.as_numpy_iterator())
  mean_kb = np.mean([len(j) for j in jpegs]) / 1024
  return dict(name=f'imagenet_synthetic_jpeg ({mean_kb:.0f} KB)', batch_size=config.batch_size,
              setup_s=0.0, **_time_batches(batches, num_batches, warmup))


def files_jpeg_throughput(config, num_batches: int = 10, warmup: int = 2,
                          num_images: int = 64) -> dict:
  """ImageNet training preprocessing of the TensorFlow-free files source (Pillow, one thread
  per core, or config.data.num_parallel_calls) over JPEG files in a temporary folder."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  from resnet_jax.data import base, imagenet_files  # pylint: disable=g-import-not-at-top
  d, size = config.data, config.batch_size
  threads = imagenet_files.decode_threads(d)
  jpegs = random_jpegs(num_images)
  with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(threads) as pool:
    paths = []
    for i, payload in enumerate(jpegs):
      paths.append(epath.Path(tmp) / f'{i}.JPEG')
      paths[-1].write_bytes(payload)
    def one(position):
      return imagenet_files.train_image(paths[position % len(paths)],
                                        base.rng(config.seed, base.AUGMENT, 0, position), d)
    def batches():
      for step in itertools.count():
        images = list(pool.map(one, range(step * size, (step + 1) * size)))
        yield {'label': np.zeros(len(images), np.int32)}
    result = _time_batches(batches(), num_batches, warmup)
  mean_kb = np.mean([len(j) for j in jpegs]) / 1024
  return dict(name=f'imagenet_files_jpeg ({mean_kb:.0f} KB, {threads} threads)', batch_size=size,
              setup_s=0.0, **result)


def benchmark(dataset: str, num_batches: int | None = None, warmup: int | None = None,
              batch_size: int | None = None) -> dict:
  """One named benchmark; see the module docstring."""
  if dataset in ('imagenet_synthetic_jpeg', 'imagenet_files_jpeg'):
    config = configs.imagenet('resnet50')
  elif dataset == 'digits':
    config = configs.digits()
  else:
    config = configs.cifar('cifar_resnet20')
    if dataset == 'synthetic':
      config.data.source = 'synthetic'
  if batch_size:
    config.batch_size = batch_size
  if dataset == 'imagenet_synthetic_jpeg':
    return jpeg_throughput(config, num_batches or 10, 2 if warmup is None else warmup)
  if dataset == 'imagenet_files_jpeg':
    return files_jpeg_throughput(config, num_batches or 10, 2 if warmup is None else warmup)
  source = generated_cifar_source(config) if dataset == 'cifar10_generated' else None
  return pipeline_throughput(config, num_batches or 300, 10 if warmup is None else warmup, source)


def _load_config(path: str):
  return configs.load(path)


def _print_table(rows: list[dict]) -> None:
  print(f'{"pipeline":<34} {"batch":>6} {"images/s":>10} {"ms/batch":>9} {"setup s":>8}')
  for r in rows:
    print(f'{r["name"]:<34} {r["batch_size"]:>6} {r["images_per_s"]:>10.0f} '
          f'{r["ms_per_batch"]:>9.2f} {r["setup_s"]:>8.1f}')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', help='an experiment file with get_config()')
  parser.add_argument('--dataset', action='append', choices=('cifar10',) + OFFLINE,
                      help='repeatable; default: all offline benchmarks')
  parser.add_argument('--num_batches', type=int)
  parser.add_argument('--warmup', type=int)
  parser.add_argument('--batch_size', type=int)
  args = parser.parse_args(argv)
  warmup = 10 if args.warmup is None else args.warmup
  rows = []
  try:
    if args.config:
      config = _load_config(args.config)
      if args.batch_size:
        config.batch_size = args.batch_size
      rows.append(pipeline_throughput(config, args.num_batches or 300, warmup))
    for dataset in args.dataset or (() if args.config else OFFLINE):
      rows.append(benchmark(dataset, args.num_batches, args.warmup, args.batch_size))
  except data.DataError as e:
    raise SystemExit(f'DataError: {e}') from e
  _print_table(rows)
  return rows


if __name__ == '__main__':
  main()
