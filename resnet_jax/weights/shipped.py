"""Weights trained by this project, shipped inside the package so they work offline.

    net = resnet_jax.pretrained('cifar_resnet20')
    _, apply_fn = resnet_jax.functional(net['model'], **net['model_kwargs'])
    logits = apply_fn(net['variables'], net['normalize'](uint8_images))   # [N, 32, 32, 3]
    net['test_error'], net['data']         # what the run measured, and on what
    resnet_jax.pretrained.available()      # the names shipped

Each is one file, `files/<name>.npz`, written by `python -m resnet_jax.export`
from a finished run: the variables (`params/...`, `batch_stats/...`), the
run's normalisation statistics (`stats/pixel_mean`, ...: the mean image of its
training split) and `__meta__`, a JSON string with the model, its
constructor arguments, the class names, the result (test error, data) and
where it came from. `np.load` reads it without pickle.
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from typing import Any

import numpy as np

from resnet_jax.weights import normalization

FILES_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'files')
FORMAT = 1
META_KEY = '__meta__'
_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]*$')


class NotShippedError(FileNotFoundError):
  """The named weights are not in this copy of the package."""


def check_name(name: str) -> None:
  if not isinstance(name, str) or not _NAME.match(name) or name.endswith('.npz'):
    raise ValueError(f'{name!r} is not a weights name: use letters, digits, _ . - (e.g. '
                     "'cifar_resnet20'), without a directory or the .npz suffix.")


def path_of(name: str, directory: str | None = None) -> str:
  check_name(name)
  return os.path.join(directory or FILES_DIR, f'{name}.npz')


def available(directory: str | None = None) -> list[str]:
  """Names of the shipped weights (of `directory` if given, else the package's)."""
  directory = directory or FILES_DIR
  if not os.path.isdir(directory):
    return []
  return sorted(n[:-len('.npz')] for n in os.listdir(directory)
                if n.endswith('.npz') and not n.startswith('.'))


def pretrained(name: str, *, directory: str | None = None) -> dict[str, Any]:
  """The shipped weights `name`: a dict with

    model, model_kwargs   build it with resnet_jax.functional(model, **model_kwargs)
    variables             {'params', 'batch_stats'} as numpy arrays
    normalize             uint8 RGB [N, 32, 32, 3] -> network input (the run's mean image)
    normalize_spec        what `normalize` does, as recorded (normalization.py)
    label_names           class names, index = logit
    test_error            percent, as the run's result.json reported it
    data                  what test_error was measured on
    source                the run it came from (step, config, commit, ...)

  `directory` reads another folder of exported weights instead of the package's.
  Raises NotShippedError when there is no such file (see `available()`).
  """
  path = path_of(name, directory)
  if not os.path.exists(path):
    shipped = available(directory)
    shipped_text = ', '.join(shipped) if shipped else 'none yet'
    from resnet_jax import models  # pylint: disable=g-import-not-at-top
    if name in models.list_models():
      why = (f'The trained weights of {name} are not shipped yet ({path} does not exist): its '
             'training run has not been exported.')
    else:
      why = f'There are no shipped weights named {name!r} ({path} does not exist).'
    raise NotShippedError(f'{why} Shipped: {shipped_text}. To ship weights, train the model '
                          'and run python -m resnet_jax.export --workdir WORKDIR --name NAME.')
  return read(path)


def read(path: str) -> dict[str, Any]:
  """Reads one exported weights file (see the module docstring)."""
  try:
    with np.load(path, allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f'{path} is not a readable weights file ({type(e).__name__}: {e}); it '
                     'is probably truncated. Export it again with python -m resnet_jax.export.') from e
  if META_KEY not in arrays:
    raise ValueError(f'{path} has no {META_KEY} entry, so it was not written by '
                     'resnet_jax.export. Export it again.')
  meta = json.loads(str(arrays.pop(META_KEY)))
  if meta.get('format') != FORMAT:
    raise ValueError(f'{path} has format {meta.get("format")!r}; this resnet_jax reads format '
                     f'{FORMAT}. Upgrade resnet_jax or export the weights again.')
  variables: dict[str, Any] = {'params': {}, 'batch_stats': {}}
  stats = {}
  for key, value in arrays.items():
    collection, _, rest = key.partition('/')
    if collection == 'stats':
      stats[rest] = value
      continue
    node = variables.setdefault(collection, {})
    *parents, leaf = rest.split('/')
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return {'model': meta['model'], 'model_kwargs': meta['model_kwargs'], 'variables': variables,
          'normalize': normalization.from_spec(meta['normalize'], stats),
          'normalize_spec': meta['normalize'], 'label_names': meta.get('label_names'),
          'test_error': meta['test_error'], 'data': meta['data'], 'source': meta.get('source'),
          'name': meta.get('name')}


def write(path: str, *, variables: dict[str, Any], stats: dict[str, np.ndarray],
          meta: dict[str, Any]) -> str:
  """Writes one weights file atomically (a temporary file renamed into place)."""
  arrays = {}
  for collection in ('params', 'batch_stats'):
    _flatten(variables[collection], collection, arrays)
  for key, value in stats.items():
    arrays[f'stats/{key}'] = np.asarray(value)
  arrays[META_KEY] = np.array(json.dumps({'format': FORMAT, **meta}, sort_keys=True))
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f'.{os.path.basename(path)}.tmp{os.getpid()}')
  try:
    with open(tmp, 'wb') as f:
      np.savez_compressed(f, **arrays)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def _flatten(tree: dict[str, Any], prefix: str, out: dict[str, np.ndarray]) -> None:
  for key, value in tree.items():
    if '/' in key:
      raise ValueError(f'Variable name {key!r} contains "/", which the weights file uses as '
                       'its separator.')
    if isinstance(value, dict):
      _flatten(value, f'{prefix}/{key}', out)
    else:
      out[f'{prefix}/{key}'] = np.asarray(value)


pretrained.available = available
