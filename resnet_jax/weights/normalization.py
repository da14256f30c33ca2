"""How a network's input is made from uint8 RGB images, written down so it travels with the weights.

A trained network only means something with the normalisation it was trained
with. Each set of weights this package writes records it as a small JSON spec,
and `from_spec` turns the spec back into the function:

  {'kind': 'imagenet_mean_std'}       torchvision: x / 255, then per-channel
                                      (x - mean) / std with the ImageNet constants
  {'kind': 'pixel_mean'}              this project's CIFAR/digits runs: x - mean image
  {'kind': 'channel_mean'}            x - per-channel mean
  {'kind': 'channel_mean_std'}        (x - per-channel mean) / per-channel std

The last three work on the 0..255 scale, as the paper's runs do (data/arrays.py),
and take their statistics (`pixel_mean`, `channel_mean`, `channel_std` arrays)
from the training split of the run: `run_statistics(config)` recomputes them.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RUN_KINDS = ('pixel_mean', 'channel_mean', 'channel_mean_std')
STAT_KEYS = ('pixel_mean', 'channel_mean', 'channel_std')

Normalize = Callable[[np.ndarray], np.ndarray]


def _check_images(images: np.ndarray) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'Expected uint8 RGB images [N, H, W, 3]; got shape {list(images.shape)}. '
                     'Add a batch axis (images[None]) or convert to RGB first.')
  return images


def imagenet_normalize(images: np.ndarray) -> np.ndarray:
  """uint8 RGB [N, H, W, 3] -> float32 torchvision input: x / 255, minus mean, over std."""
  x = _check_images(images).astype(np.float32) / 255.0
  return (x - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)


def from_spec(spec: dict[str, Any], stats: dict[str, np.ndarray] | None = None) -> Normalize:
  """The normalisation function a spec (see the module docstring) describes.

  `stats` holds the run's statistics for the run kinds ('pixel_mean' needs
  `pixel_mean`; the channel kinds need `channel_mean`, and `channel_std`).
  """
  kind = spec.get('kind')
  if kind == 'imagenet_mean_std':
    return imagenet_normalize
  if kind not in RUN_KINDS:
    raise ValueError(f'Unknown normalisation kind {kind!r}; known: imagenet_mean_std, '
                     f'{", ".join(RUN_KINDS)}. The weights were written by a newer resnet_jax?')
  from resnet_jax.data import arrays  # pylint: disable=g-import-not-at-top
  needed = {'pixel_mean': ('pixel_mean',), 'channel_mean': ('channel_mean',),
            'channel_mean_std': ('channel_mean', 'channel_std')}[kind]
  missing = [k for k in needed if stats is None or k not in stats]
  if missing:
    raise ValueError(f'Normalisation {kind!r} needs the statistics {missing}, which were not '
                     'stored with the weights. Export them again with resnet_jax.export.')
  mean, scale = arrays.normalizer(stats, kind)

  def normalize(images: np.ndarray) -> np.ndarray:
    x = _check_images(images)
    if kind == 'pixel_mean' and x.shape[1:] != mean.shape:
      raise ValueError(f'These weights subtract a mean image of shape {list(mean.shape)}; the '
                       f'images are {list(x.shape[1:])}. Resize them to '
                       f'{mean.shape[0]}x{mean.shape[1]} first (resnet_jax.predict does).')
    return (x.astype(np.float32) - mean) * scale

  return normalize


def run_statistics(config, data_dir: str | None = None) -> dict[str, Any]:
  """A finished run's normalisation, recomputed from its training split (ImageNet runs use
  constants: nothing is read, and there is no fingerprint to compare).

  `config` is the run's config (ConfigDict or the dict a checkpoint stores);
  `data_dir` replaces `config.data.data_dir` when the data has moved. Returns
  {'spec', 'stats', 'label_names', 'fingerprint', 'source'}: `fingerprint` is
  what the data source reports of the training set, to compare with the
  checkpoint's, so statistics of other data are never used silently.
  """
  import ml_collections  # pylint: disable=g-import-not-at-top
  from resnet_jax import data  # pylint: disable=g-import-not-at-top
  if not isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(config)
  if data_dir is not None:
    config.data.data_dir = data_dir
  if config.data.dataset == 'imagenet2012' and config.data.source != 'synthetic':
    # ImageNet runs normalise with constants (data/imagenet_files.py), so no data is read.
    from resnet_jax.data import imagenet_files  # pylint: disable=g-import-not-at-top
    mean = np.asarray(imagenet_files.IMAGENET_MEAN_RGB, np.float64)
    stats = {'pixel_mean': mean, 'channel_mean': mean,
             'channel_std': np.asarray(imagenet_files.IMAGENET_STD_RGB, np.float64)}
    # The mean image is constant: 'pixel_mean' is 'channel_mean' at any image size.
    kind = {'pixel_mean': 'channel_mean'}.get(config.data.normalization,
                                              config.data.normalization)
    return {'spec': {'kind': kind}, 'stats': stats, 'label_names': None,
            'fingerprint': {}, 'source': 'imagenet2012'}
  config.data.prefetch = 0
  source = data.create_data_source(config, process_index=0, process_count=1, num_devices=1)
  if source.synthetic or not hasattr(source, 'stats'):
    raise ValueError(f'The run trained on {source.name}, which has no image statistics to '
                     'normalise with: only in-memory datasets (CIFAR, digits) are supported.')
  kind = config.data.normalization
  return {'spec': {'kind': kind}, 'stats': {k: np.asarray(source.stats[k]) for k in STAT_KEYS},
          'label_names': list(source.label_names) or None, 'fingerprint': source.fingerprint(),
          'source': source.name}


def check_fingerprint(recorded: dict[str, Any], found: dict[str, Any], where: str) -> None:
  """Raises ValueError when the data found is not the training set a checkpoint recorded."""
  recorded = {k[len('data.train.'):]: v for k, v in recorded.items() if k.startswith('data.train.')}
  diffs = [f'{k}: checkpoint {recorded[k]!r}, data {found.get(k)!r}' for k in recorded
           if k in found and recorded[k] != found[k]]
  if diffs:
    raise ValueError(f'The training data found now is not the data the run in {where} trained '
                     f'on ({"; ".join(diffs)}), so its normalisation statistics would be wrong. '
                     'Point --data_dir at the data the run used.')
