"""Probes of trained networks: the layer responses of the paper's Fig. 7.

Fig. 7 of the paper plots "the standard deviations (std) of layer responses on
CIFAR-10. The responses are the outputs of each 3x3 layer, after BN and before
nonlinearity" (and, in a residual block, before the addition). Here, precisely:

* the response of a 3x3 layer is its BatchNorm output in inference mode
  (running statistics), the value every block sows as `conv{k}_response`;
* its std is taken per channel over all examples and all spatial positions
  (examples x H x W), and the channel stds are then averaged: one number per
  layer. With BN in inference mode a channel's std is |gamma| times the ratio
  of the test-time to the running std of the conv output, so the number says
  how strongly the layer's learned scale lets it change the signal;
* the layers come in network order, stem excluded: both 3x3 convs of every
  basic block (6n values for a CIFAR net of depth 6n+2), or the middle 3x3 conv
  of every bottleneck block.

Statistics are accumulated over batches (per-batch means and centred sums of
squares, merged in float64 on the host), so the whole 10k-image test set goes
through in fixed-size batches with one compilation.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from typing import Any, Iterable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnet_jax import data, models
from resnet_jax.weights import loading

RESPONSES_FILE = 'layer_responses.json'

_BLOCK = re.compile(r'^stage(\d+)_block(\d+)$')
_RESPONSE = re.compile(r'^conv(\d+)_response$')


@dataclasses.dataclass(frozen=True)
class LayerResponses:
  """The std of each 3x3 layer's response, in network order.

  Attributes:
    names: 'stage{i}_block{j}/conv{k}' for each 3x3 layer, in network order.
    std: float64 [num_layers]; channel-averaged std of the layer's BN output.
    num_examples: images the statistics were computed over.
  """
  names: tuple[str, ...]
  std: np.ndarray
  num_examples: int

  def __len__(self) -> int:
    return len(self.names)

  def sorted(self) -> np.ndarray:
    """The stds ranked in descending order (Fig. 7, bottom)."""
    return np.sort(self.std)[::-1]

  def to_dict(self) -> dict[str, Any]:
    return {'names': list(self.names), 'std': [float(x) for x in self.std],
            'num_examples': self.num_examples}

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> 'LayerResponses':
    return cls(tuple(d['names']), np.asarray(d['std'], np.float64), int(d['num_examples']))


def mean_responses(responses: list[LayerResponses]) -> LayerResponses:
  """The layer-by-layer mean of several runs of the same network (e.g. seeds)."""
  if not responses:
    raise ValueError('mean_responses needs at least one LayerResponses.')
  names = responses[0].names
  if any(r.names != names for r in responses):
    raise ValueError('Cannot average layer responses of different networks.')
  return LayerResponses(names, np.mean([r.std for r in responses], axis=0),
                        sum(r.num_examples for r in responses))


def three_by_three_layers(variables: dict[str, Any]) -> list[str]:
  """'stage{i}_block{j}/conv{k}' of every 3x3 conv of the blocks, in network order.

  Works on arrays or shapes (`jax.eval_shape`), scanned or unrolled.
  """
  blocks = {}  # (stage, block) -> that block's params (kernels may carry a scan axis)
  for key, tree in variables['params'].items():
    match = _BLOCK.match(key)
    if match:
      blocks[tuple(int(x) for x in match.groups())] = tree
    elif key.endswith('_scan') and key.startswith('stage'):
      stage = int(key[len('stage'):-len('_scan')])
      length = jax.tree.leaves(tree['block'])[0].shape[0]
      blocks.update({(stage, j + 2): tree['block'] for j in range(length)})
  layers = []
  for (stage, block), tree in sorted(blocks.items()):
    convs = sorted((k for k in tree if re.fullmatch(r'conv\d+', k)), key=lambda k: int(k[4:]))
    layers += [f'stage{stage}_block{block}/{c}' for c in convs
               if tuple(tree[c]['kernel'].shape[-4:-2]) == (3, 3)]
  return layers


def _responses(intermediates: dict[str, Any]) -> dict[str, jax.Array]:
  """'stage{i}_block{j}/conv{k}' -> the sown BN output of that conv (scanned stages unrolled)."""
  unrolled = models.unroll_scanned({'intermediates': intermediates})['intermediates']
  out = {}
  for block, sown in unrolled.items():
    if not _BLOCK.match(block):
      continue
    for key, values in sown.items():
      match = _RESPONSE.match(key)
      if match:
        out[f'{block}/conv{match.group(1)}'] = values[0]  # sow stores a tuple
  return out


@functools.partial(jax.jit, static_argnums=(0, 1))
def _batch_moments(model: nn.Module, layers: tuple[str, ...], variables: dict[str, Any],
                   images: jax.Array, mask: jax.Array) -> dict[str, tuple[jax.Array, ...]]:
  """Per layer and channel: (count, mean, centred sum of squares) over the real rows of a batch."""
  _, state = model.apply(variables, images, train=False, mutable=['intermediates'])
  responses = _responses(state['intermediates'])
  out = {}
  for name in layers:
    y = responses[name].astype(jnp.float32)
    m = mask.astype(jnp.float32).reshape((-1,) + (1,) * (y.ndim - 1))
    count = jnp.sum(m) * np.prod(y.shape[1:-1])
    mean = jnp.sum(y * m, axis=tuple(range(y.ndim - 1))) / jnp.maximum(count, 1.0)
    m2 = jnp.sum(jnp.square((y - mean) * m), axis=tuple(range(y.ndim - 1)))
    out[name] = (count, mean, m2)
  return out


def _merge(a: tuple[float, np.ndarray, np.ndarray] | None,
           b: tuple[float, np.ndarray, np.ndarray]) -> tuple[float, np.ndarray, np.ndarray]:
  """Chan et al.'s pairwise update of (count, mean, M2)."""
  if a is None:
    return b
  na, ma, m2a = a
  nb, mb, m2b = b
  n = na + nb
  if n == 0:
    return a
  delta = mb - ma
  return n, ma + delta * (nb / n), m2a + m2b + delta**2 * (na * nb / n)


def layer_responses_from_batches(model: nn.Module, variables: dict[str, Any],
                                 batches: Iterable[dict[str, np.ndarray]]) -> LayerResponses:
  """`layer_responses` over {'image', 'mask' (optional)} batches, e.g. a data source's eval batches.

  Rows with mask False (padding) are left out. Batches of one fixed shape
  compile once.
  """
  variables = {k: variables[k] for k in ('params', 'batch_stats') if k in variables}
  layers = tuple(three_by_three_layers(variables))
  if not layers:
    raise ValueError('The model has no 3x3 convolutions in residual/plain blocks.')
  totals: dict[str, Any] = {name: None for name in layers}
  num_examples = 0
  for batch in batches:
    images = np.asarray(batch['image'])
    mask = np.asarray(batch['mask'], bool) if 'mask' in batch else np.ones(len(images), bool)
    num_examples += int(mask.sum())
    moments = jax.device_get(_batch_moments(model, layers, variables, images, mask))
    for name, (count, mean, m2) in moments.items():
      totals[name] = _merge(totals[name], (float(count), np.asarray(mean, np.float64),
                                           np.asarray(m2, np.float64)))
  if num_examples == 0:
    raise ValueError('No images: layer responses need at least one (unmasked) image.')
  std = [np.sqrt(totals[name][2] / totals[name][0]).mean() for name in layers]
  return LayerResponses(layers, np.asarray(std, np.float64), num_examples)


def _padded_batches(images: np.ndarray, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-shape batches of `images`, the last one padded with zeros and masked."""
  for start in range(0, len(images), batch_size):
    chunk = np.asarray(images[start:start + batch_size], np.float32)
    mask = np.ones(batch_size, bool)
    if len(chunk) < batch_size:
      mask[len(chunk):] = False
      chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:],
                                              np.float32)])
    yield {'image': chunk, 'mask': mask}


def layer_responses(model: nn.Module, variables: dict[str, Any], images: np.ndarray, *,
                    batch_size: int = 500) -> LayerResponses:
  """The std of each 3x3 layer's response (after BN, before ReLU/addition) over `images`.

  See the module docstring for the exact definition. `model` is the Flax
  module (scanned or not), `variables` its {'params', 'batch_stats'}, `images`
  [N, H, W, C] already normalised as the model was trained on them.
  """
  if batch_size <= 0:
    raise ValueError(f'batch_size must be positive, not {batch_size}.')
  return layer_responses_from_batches(model, variables, _padded_batches(images, batch_size))


# --- Trained runs -----------------------------------------------------------


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (from result.json, else config.json)."""
  for name, key in (('result.json', 'config'), ('config.json', None)):
    path = os.path.join(workdir, name)
    if os.path.exists(path):
      with open(path) as f:
        d = json.load(f)
      return ml_collections.ConfigDict(d[key] if key else d)
  raise FileNotFoundError(f'{workdir} holds neither result.json nor config.json: '
                          'not a run directory.')


def run_layer_responses(workdir: str, *, role: str = 'test',
                        source: Any = None) -> LayerResponses:
  """Layer responses of a trained run (its latest checkpoint) on its own `role` split.

  The images are the run's evaluation batches (for CIFAR the 10k test
  images, for the digits demo its 360 held-out digits), normalised as in
  training. `source` may be passed to reuse an existing data source.
  """
  config = load_run_config(workdir)
  source = source or data.create_data_source(config, process_index=0, process_count=1)
  model = models.from_config(config.model, source.num_classes)
  variables = loading.load_variables(workdir)
  return layer_responses_from_batches(model, variables, source.eval_batches(role))


def wanted(model_name: str) -> bool:
  """Fig. 7 is a CIFAR figure: the run loop computes responses for CIFAR networks only."""
  return models.family(model_name) == 'cifar'


def write_responses(workdir: str, responses: LayerResponses, *, role: str, step: int) -> str:
  """Writes WORKDIR/layer_responses.json (written whole, then renamed into place)."""
  path = os.path.join(workdir, RESPONSES_FILE)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump({**responses.to_dict(), 'role': role, 'step': step}, f, indent=1)
  os.replace(tmp, path)
  return path


def read_responses(workdir: str) -> LayerResponses | None:
  """The responses the run loop wrote at the end of training; None if there are none."""
  path = os.path.join(workdir, RESPONSES_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return LayerResponses.from_dict(json.load(f))


def main(argv: list[str] | None = None) -> None:
  """python -m resnet_jax.analysis WORKDIR...: layer responses of finished runs that lack them
  (runs written before the loop computed them), into each WORKDIR/layer_responses.json."""
  import argparse  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument('workdirs', nargs='+')
  parser.add_argument('--role', default='test', help="evaluation split: 'test' or 'validation'")
  parser.add_argument('--force', action='store_true', help='recompute existing files too')
  args = parser.parse_args(argv)
  failed = 0
  for workdir in args.workdirs:
    if read_responses(workdir) is not None and not args.force:
      print(f'{workdir}: has {RESPONSES_FILE} (use --force to recompute)')
      continue
    try:
      info = loading.checkpoint_info(workdir)
      responses = run_layer_responses(workdir, role=args.role)
    except Exception as e:  # pylint: disable=broad-except
      print(f'{workdir}: error: {type(e).__name__}: {e}', file=sys.stderr)
      failed += 1
      continue
    path = write_responses(workdir, responses, role=args.role, step=info['step'])
    print(f'{workdir}: {len(responses)} layers over {responses.num_examples} images -> {path}')
  sys.exit(1 if failed else 0)


if __name__ == '__main__':
  main()
