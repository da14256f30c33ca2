"""Devices, meshes and shardings: data parallelism over every device of every host.

The train step is one `jax.jit` over a `Mesh` with a single 'data' axis: the
batch is sharded along it, parameters and optimiser state are replicated, and
XLA inserts the gradient all-reduce and the synchronised BatchNorm reductions.
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
from typing import Any, Iterable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'

_CLUSTER_ENV = ('SLURM_JOB_ID', 'TPU_WORKER_HOSTNAMES', 'MEGASCALE_COORDINATOR_ADDRESS',
                'JAX_COORDINATOR_ADDRESS', 'OMPI_COMM_WORLD_SIZE')


def initialize_distributed(config) -> None:
  """Starts JAX's multi-process runtime when the config or the environment asks for it.

  `config.distributed`: 'no' never; 'yes' always (with `coordinator_address`,
  `num_processes`, `process_id` when given, else auto-detected from SLURM or
  the TPU environment); 'auto' when a cluster environment or an explicit
  coordinator address is present. Must run before anything touches a device.
  """
  mode = config.distributed
  if mode not in ('auto', 'yes', 'no'):
    raise ValueError(f"config.distributed must be 'auto', 'yes' or 'no', not {mode!r}.")
  explicit = bool(config.coordinator_address)
  if mode == 'no' or (mode == 'auto' and not explicit
                      and not any(v in os.environ for v in _CLUSTER_ENV)):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if explicit:
    kwargs = dict(coordinator_address=config.coordinator_address,
                  num_processes=config.num_processes or None,
                  process_id=None if config.process_id < 0 else config.process_id)
  jax.distributed.initialize(**kwargs)
  logging.info('JAX distributed: process %d of %d, %d local / %d global devices.',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def create_mesh() -> Mesh:
  """A 1-D mesh over every device of every process."""
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_sizes(config, mesh: Mesh) -> None:
  """Start-up checks: every global batch divides over devices and processes."""
  devices, processes = mesh.size, jax.process_count()
  for key in ('batch_size', 'eval_batch_size'):
    size = config[key]
    if size <= 0 or size % devices:
      raise ValueError(
          f'config.{key}={size} is not divisible by the {devices} devices '
          f'({processes} process(es)); choose a multiple of {devices}, e.g. '
          f'--config.{key}={max(devices, size // devices * devices or devices)}.')
  ghost = config.model.ghost_batch_size
  per_device = config.batch_size // devices
  if ghost and per_device % ghost:
    raise ValueError(f'model.ghost_batch_size={ghost} must divide the per-device batch of '
                     f'{per_device} (batch_size={config.batch_size} over {devices} devices).')


def shard_batch(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's share of a batch -> one global array per key, sharded over 'data'."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)


def device_prefetch(batches: Iterable[dict[str, np.ndarray]], sharding: NamedSharding,
                    size: int = 2) -> Iterator[dict[str, jax.Array]]:
  """Transfers batches to the devices `size` steps ahead, so the step never waits for a copy."""
  queue = collections.deque()
  iterator = iter(batches)
  for batch in itertools.islice(iterator, size):
    queue.append(shard_batch(batch, sharding))
  while queue:
    yield queue.popleft()
    for batch in itertools.islice(iterator, 1):
      queue.append(shard_batch(batch, sharding))


def _to_host(x: Any) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.sharding.is_fully_replicated:
      raise ValueError('Only replicated arrays can be read on every process.')
    x = x.addressable_data(0)  # every process holds a full copy
  return np.asarray(jax.device_get(x))


def fetch(tree: Any) -> Any:
  """Replicated or fully addressable device arrays -> numpy, on every process."""
  return jax.tree.map(_to_host, tree)
