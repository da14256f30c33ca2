"""Several train steps per dispatch (`config.steps_per_dispatch=k`), on the same boundaries.

The loop asks for chunks (step, n, inputs): n steps starting after `step`
steps, with their inputs on the devices. A chunk never crosses a multiple of
log_every_steps, eval_every_steps or checkpoint_every_steps, nor the end of
the run, so logging, evaluation and checkpoints fall on the same steps as
with k = 1 (and SIGTERM is seen after every chunk). A chunk is k steps where
k steps fit before the next boundary, else a single step; so at most two
variants compile (k and 1 steps) whatever the intervals. Where k divides
every interval and the run length, every chunk is k steps.

With k = 1 the inputs are not stacked and `run.train_step` runs them, exactly
as before this module existed.
"""

from __future__ import annotations

import collections
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from resnet_jax.training import parallel


def plan(start: int, stop: int, k: int, intervals: Sequence[int]) -> Iterator[tuple[int, int]]:
  """(first step, number of steps) of each chunk from `start` to `stop`."""
  step = start
  while step < stop:
    room = min([stop - step] + [iv - step % iv for iv in intervals])
    n = k if k <= room else 1
    yield step, n
    step += n


def boundaries(config) -> tuple[int, ...]:
  return (config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps)


def stack(trees: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def host_chunks(inputs: Iterator[Any], start: int, stop: int, k: int,
                intervals: Sequence[int]) -> Iterator[tuple[int, int, Any]]:
  """(step, n, host inputs) of each chunk; inputs stacked on a leading axis when k > 1."""
  for step, n in plan(start, stop, k, intervals):
    if k == 1:
      yield step, n, next(inputs)
    else:
      yield step, n, stack([next(inputs) for _ in range(n)])


def to_devices(chunks: Iterator[tuple[int, int, Any]], sharding: jax.sharding.Sharding,
               size: int = 2) -> Iterator[tuple[int, int, Any]]:
  """The chunks with their inputs transferred `size` chunks ahead of the step."""
  queue = collections.deque()
  put = lambda c: queue.append((c[0], c[1], parallel.shard_batch(c[2], sharding)))
  for chunk in chunks:
    put(chunk)
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def dispatches(run, start: int, stop: int,
               extra_intervals: Sequence[int] = ()) -> Iterator[tuple[int, int, Any]]:
  """What the loop runs: (step, n, device inputs) chunks from `start` to `stop`.

  `extra_intervals`: more boundaries the loop acts on (e.g. the steps at
  which several processes agree on a stop request).
  """
  k = run.steps_per_dispatch
  sharding = run.input_sharding(0) if k > 1 else run.input_sharding()
  intervals = (*boundaries(run.config), *extra_intervals)
  chunks = host_chunks(iter(run.train_inputs(start)), start, stop, k, intervals)
  return to_devices(chunks, sharding)


def train(run, state, inputs):
  """Runs one chunk: `run.train_steps` on stacked inputs (k > 1), else `run.train_step`."""
  return (run.train_steps if run.steps_per_dispatch > 1 else run.train_step)(state, inputs)
