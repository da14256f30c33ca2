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
  # JAX's preemption service installs its own C++ SIGTERM handler, which replaces the
  # loop's (Python's) handler: a SIGTERM would then never reach the loop, and the run
  # would neither stop nor checkpoint. The loop agrees on stop requests itself
  # (loop._StopSignals), so the service is switched off before it starts.
  jax.config.update('jax_enable_preemption_service', False)
  kwargs = {}
  if explicit:
    kwargs = dict(coordinator_address=config.coordinator_address,
                  num_processes=config.num_processes or None,
                  process_id=None if config.process_id < 0 else config.process_id)
  jax.distributed.initialize(**kwargs)
  logging.info('JAX distributed: process %d of %d, %d local / %d global devices.',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def create_mesh(devices: list[Any] | None = None) -> Mesh:
  """A 1-D 'data' mesh over every device of every process.

  Built with `jax.make_mesh`, which orders the devices by the physical
  topology (TPU slices, NVLink islands). The data pipeline hands each process
  a contiguous block of rows of every global batch, so each process's devices
  must be contiguous along the axis; where the topology order is not, the
  devices are ordered by (process, id) instead, which is always valid.
  """
  if devices is None:
    try:
      # Auto axes: XLA propagates the shardings (jit with in/out shardings), as
      # with a plain Mesh; make_mesh's default, Explicit, types them instead.
      mesh = jax.make_mesh((jax.device_count(),), (DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))
    except (ValueError, NotImplementedError, TypeError) as e:  # unusual topologies
      logging.info('jax.make_mesh failed (%s); ordering devices by process.', e)
    else:
      if _process_contiguous(list(mesh.devices.flat)):
        return mesh
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def _process_contiguous(devices: list[Any]) -> bool:
  processes = [d.process_index for d in devices]
  runs = [p for i, p in enumerate(processes) if i == 0 or processes[i - 1] != p]
  return len(runs) == len(set(runs)) and runs == sorted(runs)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_sizes(config, mesh: Mesh) -> None:
  """Start-up checks: the training batch divides over the devices (evaluation
  batches are padded to a multiple of the device count, so any size works)."""
  devices, processes = mesh.size, jax.process_count()
  size = config.batch_size
  if size <= 0 or size % devices:
    below = size // devices * devices
    options = sorted({n for n in (below, below + devices, 2 * (below + devices)) if n > 0})
    raise ValueError(
        f'config.batch_size={size} cannot be split evenly over the {devices} devices '
        f'({processes} process(es)): use a multiple of {devices}, e.g. '
        + ' or '.join(f'--config.batch_size={n}' for n in options) + '.')
  if config.eval_batch_size <= 0:
    raise ValueError(f'config.eval_batch_size={config.eval_batch_size} must be positive.')
  ghost = config.model.ghost_batch_size
  per_device = size // devices
  if ghost and per_device % ghost:
    raise ValueError(f'model.ghost_batch_size={ghost} must divide the per-device batch of '
                     f'{per_device} (batch_size={size} over {devices} devices).')


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


def max_over_processes(value: int) -> int:
  """The largest of each process's `value`; `value` itself in a single-process run.

  A collective: every process must call it at the same point of the run. It
  is how the processes agree on what only some of them know (a stop request,
  the newest checkpoint all of them can read).
  """
  if jax.process_count() == 1:
    return int(value)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = multihost_utils.process_allgather(np.asarray(value, np.int32))
  return int(np.max(gathered))


def min_over_processes(value: int) -> int:
  """The smallest of each process's `value` (a collective, like `max_over_processes`)."""
  return -max_over_processes(-int(value))


def _to_host(x: Any) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if not x.sharding.is_fully_replicated:
      raise ValueError('Only replicated arrays can be read on every process.')
    x = x.addressable_data(0)  # every process holds a full copy
  return np.asarray(jax.device_get(x))


def fetch(tree: Any) -> Any:
  """Replicated or fully addressable device arrays -> numpy, on every process."""
  return jax.tree.map(_to_host, tree)
