"""Device-resident input for in-memory datasets (`config.data.device_input=True`).

The uint8 training images and labels are copied to the devices once
(replicated). Each step the host sends only what decides the batch, three
small integer arrays, and the jitted step builds the images itself:

    params = {'index':  int32 [B]     rows of the training arrays,
              'offset': int32 [B, 2]  crop corners in padded coordinates,
              'flip':   bool  [B]     horizontal flips}
    batch = make_batch(arrays, params, pad=..., augment=...)

The parameters are exactly those of the host pipeline: `index` is
`ArraySource.train_indices(step)` (the epoch's `permutation`), `offset` and
`flip` are `ArraySource.augment_params(step)`, both functions of (seed, step).
`make_batch` then does what `ArraySource.train_batch` does in numpy: gather,
(x - mean) * scale in float32, pad with zeros, crop, flip. So the device path
feeds the network the same images as the host path (tests/test_device_input.py
checks it) and resuming stays bit-exact: the position in the stream is the step.

Evaluation stays on the host path (padded and masked batches).
"""

from __future__ import annotations

from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax.data import base
from resnet_jax.data.arrays import ArraySource


class DeviceInput:
  """The host side of device-resident input for an `ArraySource`."""

  def __init__(self, source: base.DataSource):
    if not isinstance(source, ArraySource):
      raise base.DataError(
          f'config.data.device_input=True needs a dataset held in memory (CIFAR from '
          f"source='files' or 'tfds', or source='digits'); {source.name} is read by "
          f'{type(source).__name__}. Set config.data.device_input=False.')
    self.source = source
    self.pad = source.pad
    self.augment = bool(source.augment)

  def step_params(self, step: int, permutation: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """This process's rows of the parameters of the global batch of `step`."""
    s = self.source
    rows = s._local(s.batch_size)  # pylint: disable=protected-access
    index = s.train_indices(step, permutation)[rows].astype(np.int32)
    if self.augment:
      offsets, flips = s.augment_params(step)
      offsets, flips = offsets[rows].astype(np.int32), flips[rows]
    else:
      offsets = np.full((len(index), 2), self.pad, np.int32)
      flips = np.zeros(len(index), bool)
    return {'index': index, 'offset': offsets, 'flip': flips}

  def train_params(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """`step_params` of steps start_step, start_step + 1, ... (infinite)."""
    for step, permutation in self.source.steps_and_permutations(start_step):
      yield self.step_params(step, permutation)

  def host_arrays(self) -> dict[str, np.ndarray]:
    """What `make_batch` reads, to be placed on the devices once (replicated)."""
    images, labels = self.source.train_arrays
    return {'images': images, 'labels': labels, 'mean': self.source.mean,
            'scale': self.source.scale}

  def device_arrays(self, sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    return jax.tree.map(lambda x: jax.device_put(np.asarray(x), sharding), self.host_arrays())


def make_batch(arrays: dict[str, jax.Array], params: dict[str, jax.Array], *, pad: int,
               augment: bool) -> dict[str, jax.Array]:
  """{'image', 'label'} of one step from the resident arrays and the step's parameters.

  The same arithmetic as `ArraySource.train_batch`: float32 (x - mean) * scale,
  then zero padding (after the mean subtraction), crop and flip.
  """
  index = params['index']
  images = (arrays['images'][index].astype(jnp.float32) - arrays['mean']) * arrays['scale']
  if augment and pad:
    _, h, w, c = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    crop = lambda x, o: jax.lax.dynamic_slice(x, (o[0], o[1], 0), (h, w, c))
    images = jax.vmap(crop)(padded, params['offset'])
  if augment:
    images = jnp.where(params['flip'][:, None, None, None], images[:, :, ::-1], images)
  return {'image': images, 'label': arrays['labels'][index]}
