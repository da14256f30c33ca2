"""The data-source interface, split strings, evaluation padding, seeds and prefetching.

Nothing here needs TensorFlow.

Determinism (the checkpoint/resume system relies on it). For the in-memory
datasets (CIFAR, digits, synthetic) the training stream is a pure function of
(seed, step): epoch e = step // steps_per_epoch reads the examples in the order
of a permutation drawn from (seed, e); step k takes the slice
[(k % steps_per_epoch) * B, ... + B) of it; crop offsets and flips are drawn
from (seed, k). Each epoch drops its remainder. So `train_batches(k)` yields
exactly the batches k, k + 1, ... of `train_batches(0)`. With P processes,
process p takes rows [p*B/P, (p+1)*B/P) of every global batch (training and
evaluation), so P processes together see exactly what one process would.

Evaluation batches have a fixed global shape: `eval_batch_size` rounded up to
a multiple of the device count (so that every device gets an equal share);
the last batch is padded and `mask` says which rows are real, so padding never
changes a number.
"""

from __future__ import annotations

import itertools
import math
import queue
import re
import threading
from typing import Iterator

import numpy as np


class DataError(ValueError):
  """Bad input configuration or missing data; the message says how to fix it."""


# Independent random streams derived from config.seed.
PERMUTATION, AUGMENT, SYNTHETIC, SHUFFLE = range(4)

NORMALIZATIONS = ('pixel_mean', 'channel_mean', 'channel_mean_std')
NUM_CLASSES = {'cifar10': 10, 'cifar100': 100, 'imagenet2012': 1000, 'digits': 10}


def seed_int(*keys: int) -> int:
  """A 63-bit integer that depends on all of `keys` (for tf seeds)."""
  state = np.random.SeedSequence([k % 2**64 for k in keys]).generate_state(2, np.uint64)
  return int(state[0] >> np.uint64(1))


def rng(*keys: int) -> np.random.Generator:
  return np.random.default_rng([k % 2**64 for k in keys])


def padded_eval_batch_size(eval_batch_size: int, num_shards: int) -> int:
  """`eval_batch_size` rounded up to a multiple of `num_shards` (devices or
  processes), so every shard gets the same number of rows; padding rows are
  masked, so the rounding changes no number."""
  return math.ceil(eval_batch_size / num_shards) * num_shards


class DataSource:
  """Batches for one process. See the module docstring for the guarantees.

  Attributes:
    name: 'cifar10', 'imagenet2012', 'digits', or 'synthetic:<dataset>'.
    synthetic: True for random data.
    image_shape: (H, W, C) of one model input.
    num_classes: number of labels.
    num_train_examples: global size of the training split.
    steps_per_epoch: num_train_examples // batch_size.
    eval_splits: role ('validation', 'test') -> (split string, num examples).
    batch_size, local_batch_size: global and per-process training batch.
    eval_batch_size, local_eval_batch_size: the same for evaluation (the
      configured size rounded up to a multiple of `eval_shards`).
  """

  def __init__(self, config, *, name: str, synthetic: bool,
               image_shape: tuple[int, int, int], num_classes: int,
               num_train_examples: int, eval_splits: dict[str, tuple[str, int]],
               process_index: int, process_count: int, eval_shards: int | None = None):
    self.name = name
    self.synthetic = synthetic
    self.image_shape = tuple(image_shape)
    self.num_classes = num_classes
    self.num_train_examples = num_train_examples
    self.eval_splits = dict(eval_splits)
    self.process_index = process_index
    self.process_count = process_count
    self.seed = config.seed
    self.batch_size = config.batch_size
    self.eval_batch_size = padded_eval_batch_size(
        config.eval_batch_size, max(eval_shards or 1, process_count))
    self.local_batch_size = self.batch_size // process_count
    self.local_eval_batch_size = self.eval_batch_size // process_count
    self.steps_per_epoch = num_train_examples // self.batch_size
    if self.steps_per_epoch < 1:
      raise DataError(
          f'The training split of {name} has {num_train_examples} examples, fewer '
          f'than one batch (config.batch_size={self.batch_size}). Use a smaller '
          'batch size or a larger config.data.train_split.')
    self._prefetch = config.data.prefetch

  def fingerprint(self) -> dict[str, object]:
    """What identifies the training set; a checkpoint records it and a resumed run must match."""
    return {'examples': self.num_train_examples}

  def permutation(self, epoch: int) -> np.ndarray:
    """The order in which epoch `epoch` reads the training split (sources that index it)."""
    return rng(self.seed, PERMUTATION, epoch).permutation(self.num_train_examples)

  def steps_and_permutations(self, start_step: int = 0):
    """(step, its epoch's permutation) for steps start_step, start_step + 1, ...; each
    permutation is drawn once per epoch."""
    epoch, permutation = None, None
    for step in itertools.count(start_step):
      if step // self.steps_per_epoch != epoch:
        epoch = step // self.steps_per_epoch
        permutation = self.permutation(epoch)
      yield step, permutation

  def train_batches(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """{'image': float32 [B_local, H, W, C], 'label': int32 [B_local]} for
    global steps start_step, start_step + 1, ... (infinite)."""
    raise NotImplementedError

  def eval_batches(self, role: str) -> Iterator[dict[str, np.ndarray]]:
    """One pass over `eval_splits[role]`: {'image', 'label', 'mask'} batches of
    fixed shape [E_local, ...]; padding rows are zero with mask False."""
    raise NotImplementedError

  def num_eval_batches(self, role: str) -> int:
    return math.ceil(self._eval_split(role)[1] / self.eval_batch_size)

  def _eval_split(self, role: str) -> tuple[str, int]:
    if role not in self.eval_splits:
      raise DataError(f'No evaluation split with role {role!r} in {self.name}; '
                      f'the roles are {sorted(self.eval_splits)}. Set '
                      'config.data.val_split / config.data.test_split.')
    return self.eval_splits[role]

  def _local(self, global_size: int) -> slice:
    """This process's contiguous rows of a global batch of `global_size`."""
    n = global_size // self.process_count
    return slice(self.process_index * n, (self.process_index + 1) * n)

  def _eval_positions(self, num_examples: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(indices, mask) of this process's rows of each padded global eval batch."""
    rows = np.arange(self.eval_batch_size)[self._local(self.eval_batch_size)]
    for b in range(math.ceil(num_examples / self.eval_batch_size)):
      pos = b * self.eval_batch_size + rows
      mask = pos < num_examples
      yield np.where(mask, pos, 0), mask

  def __repr__(self):
    return (f'{type(self).__name__}(name={self.name!r}, image_shape={self.image_shape}, '
            f'num_classes={self.num_classes}, num_train_examples={self.num_train_examples}, '
            f'steps_per_epoch={self.steps_per_epoch}, eval_splits={self.eval_splits}, '
            f'process={self.process_index}/{self.process_count})')


def eval_roles(d) -> list[tuple[str, str, str]]:
  """(role, split, config key) of the configured evaluation splits."""
  return [(role, d[key], key) for role, key in (('validation', 'val_split'), ('test', 'test_split'))
          if d[key]]


# ----------------------------------------------------------------------------
# Split strings, as tfds reads them: 'train', 'train[:45000]', 'train[45000:]',
# 'train[:90%]', 'train[-5000:]', 'train+test'. Percent boundaries round to the
# closest example, as tfds does by default.

_SLICE = re.compile(r'^\s*(\w+)\s*(?:\[\s*([+-]?\d*)\s*(%?)\s*:\s*([+-]?\d*)\s*(%?)\s*\])?\s*$')


def split_rows(split: str, sizes: dict[str, int], key: str) -> list[tuple[str, int, int]]:
  """(split name, start, stop) parts of a tfds-style split string."""
  parts = []
  for part in split.split('+'):
    m = _SLICE.match(part)
    if not m:
      raise DataError(f'config.data.{key}={split!r}: {part!r} is not a split; write e.g. '
                      "'train', 'train[:45000]', 'train[45000:]', 'train[:90%]' or 'train+test'.")
    name, start, start_pct, stop, stop_pct = m.groups()
    if name not in sizes:
      raise DataError(f'config.data.{key}={split!r}: there is no split {name!r}; the splits '
                      f'are {list(sizes)}.')
    n = sizes[name]
    def bound(text, pct, default):
      if text in (None, '', '+', '-'):
        return default
      value = int(text)
      if pct:
        if not -100 <= value <= 100:
          raise DataError(f'config.data.{key}={split!r}: {value}% is outside [-100%, 100%].')
        value = int(round(value * n / 100))
      return value
    lo, hi, _ = slice(bound(start, start_pct, 0), bound(stop, stop_pct, n)).indices(n)
    if hi <= lo:
      raise DataError(f'config.data.{key}={split!r} selects no examples of {name!r} '
                      f'({n} examples).')
    parts.append((name, lo, hi))
  return parts


def resolve_split(split: str, arrays: dict[str, tuple[np.ndarray, np.ndarray]],
                  key: str) -> tuple[np.ndarray, np.ndarray]:
  """The (images, labels) a split string selects from in-memory arrays, in order."""
  parts = split_rows(split, {name: len(x) for name, (x, _) in arrays.items()}, key)
  return tuple(np.concatenate([arrays[name][i][lo:hi] for name, lo, hi in parts])
               for i in range(2))


def split_size(split: str, sizes: dict[str, int], key: str) -> int:
  return sum(hi - lo for _, lo, hi in split_rows(split, sizes, key))


# ----------------------------------------------------------------------------
# A background thread that assembles batches ahead of the step.


class _Failure:
  def __init__(self, error: BaseException):
    self.error = error


_END = object()


def prefetch(iterator: Iterator, size: int) -> Iterator:
  """Runs `iterator` in a background thread up to `size` items ahead, so that
  batch assembly (numpy, which mostly releases the GIL) overlaps the step."""
  if size <= 0:
    yield from iterator
    return
  items: queue.Queue = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(item) -> bool:
    while not stop.is_set():
      try:
        items.put(item, timeout=0.1)
        return True
      except queue.Full:
        pass
    return False

  def work():
    try:
      for item in iterator:
        if not put(item):
          return
      put(_END)
    except BaseException as e:  # pylint: disable=broad-except
      put(_Failure(e))

  threading.Thread(target=work, daemon=True).start()
  try:
    while True:
      item = items.get()
      if item is _END:
        return
      if isinstance(item, _Failure):
        raise item.error
      yield item
  finally:
    stop.set()
