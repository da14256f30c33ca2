"""Checkpoints with orbax: save the whole train state, resume exactly, load for inference.

Layout: `WORKDIR/checkpoints/<step>/{state,meta}`. `state` is the full
`TrainState` (params, batch statistics, optimiser state, step, RNG, metric
accumulators); the input pipeline needs nothing else, because its position is
a function of the step. `meta` is JSON: the model (name and constructor
arguments), the config, and the fingerprint of the config fields that make a
checkpoint meaningful (model, batch size, seed, data), checked on resume.

Saving is asynchronous: `Checkpointer.save` returns once the arrays are copied
to host memory and the files are written by a background thread; an error
there (disk full, permission denied) is raised by the next `poll` (the loop
calls it after every step), `save`, `wait` or `close`. Orbax writes a step to `<step>.orbax-checkpoint-tmp` and renames it
when complete, so a crash mid-save leaves a temporary directory, never a
half-written `<step>`.

Once a save is complete, the sha256 of each of its files goes into
`<step>/sha256.json` (`loading.write_manifest`); reading verifies them, so
flipped bytes are found instead of restored as NaN or 3e38.

Resuming takes the newest checkpoint that restores. A damaged one (truncated,
missing or changed files, unreadable metadata, non-finite values) is skipped
with a warning and, once an older one has restored, moved aside to
`<step>.damaged-<time>`; leftover temporary directories are removed with a
warning. A read error (permissions, I/O) is not damage: the run stops with it
and nothing is moved (`integrity.py`). If checkpoints exist but none can be
read, the run stops rather than silently start again from scratch.

For inference, `load_variables(path)` returns `{'params', 'batch_stats'}` as
numpy arrays, whatever the device count of the run that wrote them, and
`checkpoint_info(path)` says which model to build:

    info = checkpoint_info('workdirs/digits_resnet20')
    variables = load_variables(info['path'])
    _, apply_fn = resnet_jax.functional(info['model'], **info['model_kwargs'])
    logits = apply_fn(variables, images)
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from resnet_jax.training import integrity, parallel
from resnet_jax.weights import loading

# Config fields that must match for a checkpoint to make sense on resume: the
# model, the batch, the seed, and everything that decides the training set,
# its order and its augmentation. Anything else (logging, evaluation and
# checkpoint frequency, number of steps, learning rate, ...) may change.
_MUST_MATCH = ('model', 'batch_size', 'seed', 'data.source', 'data.dataset', 'data.train_split',
               'data.normalization', 'data.augment', 'data.pad_pixels',
               'data.digits_test_fraction', 'data.image_size', 'data.min_resize',
               'data.max_resize', 'data.pca_lighting')
# ... except these, which change memory use and speed, not what is trained.
_MAY_CHANGE = ('model.remat', 'model.conv')
# Checkpoints written before a key joined the fingerprint were trained with
# the value it then always had; a key with no entry here is not checked there.
_LEGACY = {'data.normalization': 'pixel_mean', 'data.augment': True, 'data.pad_pixels': 4,
           'data.digits_test_fraction': 0.2, 'data.image_size': 224, 'data.min_resize': 256,
           'data.max_resize': 480, 'data.pca_lighting': 0.1}

_TMP_MARKER = loading.TMP_MARKER
_METRICS_FILE = loading.METRICS_FILE
CheckpointError = loading.CheckpointError
_short = loading.short
_steps = loading.steps


class CheckpointMismatchError(ValueError):
  """The checkpoints in the workdir were written by an incompatible config."""


def _get(config, dotted: str):
  value = config
  for part in dotted.split('.'):
    value = value[part]
  return value.to_dict() if hasattr(value, 'to_dict') else value


def fingerprint(config, data: dict[str, Any] | None = None) -> dict[str, Any]:
  """The config fields a resumed run must share with its checkpoint, flattened
  ('model.name': ...), plus what the data source reports of its training set
  (`DataSource.fingerprint()`: its size and, for in-memory data, a digest of the
  images), under 'data.train.*'."""
  out = {}
  for key in _MUST_MATCH:
    value = _get(config, key)
    items = {f'{key}.{k}': v for k, v in value.items()} if isinstance(value, dict) else {key: value}
    out.update({k: v for k, v in items.items() if k not in _MAY_CHANGE})
  out.update({f'data.train.{k}': v for k, v in (data or {}).items()})
  return json.loads(json.dumps(out))  # as it reads back from the checkpoint (tuples -> lists)


def _check_fingerprint(meta: dict[str, Any], config, where: str,
                       data: dict[str, Any] | None = None) -> None:
  found = meta.get('fingerprint', {})
  diffs = []
  for k, v in fingerprint(config, data).items():
    if k in found:
      old = found[k]
    elif k in _LEGACY:
      old = json.loads(json.dumps(_LEGACY[k]))
    else:
      continue  # written before this key was recorded: nothing to compare with
    if old != v:
      diffs.append((k, old, v))
  if diffs:
    lines = '\n'.join(f'  {k}: checkpoint has {a!r}, config has {b!r}' for k, a, b in diffs)
    raise CheckpointMismatchError(
        f'The checkpoints in {where} were written by a different experiment:\n{lines}\n'
        'Use a new --workdir for a new experiment, or the original config and data to resume '
        'this one.')


def _validation_error(metrics: dict[str, Any]) -> float:
  return metrics.get('validation_error', math.inf)


def _remove_leftover_tmp(directory: str) -> None:
  """Deletes the temporary directories of saves that never finished (a crash mid-save)."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return
  for path in sorted(directory.iterdir()):
    if _TMP_MARKER in path.name:
      logging.warning('Removing %s: the temporary directory of a checkpoint save that never '
                      'finished (the run stopped while saving).', path)
      try:
        path.rmtree()
      except OSError:
        pass


class Checkpointer:
  """Orbax `CheckpointManager` for one run's workdir: asynchronous saves, careful resume.

  Keeps the newest `config.keep_checkpoints` checkpoints and, with
  `config.keep_best_checkpoint`, also the one with the lowest validation error.
  As a context manager it closes (waits for the save in flight) on the way out.
  """

  def __init__(self, workdir: str, config, *, num_classes: int | None = None,
               data_fingerprint: dict[str, Any] | None = None, async_save: bool = True):
    directory = epath.Path(workdir) / 'checkpoints'
    # A local workdir is made absolute; gs://... stays as it is.
    self.directory = str(directory if '://' in str(directory) else directory.absolute())
    self.config = config
    self.num_classes = num_classes
    self.data_fingerprint = data_fingerprint
    self._lead = jax.process_index() == 0
    self._pending: int | None = None  # step of a save that may still be in flight
    self._closed = False
    if self._lead:
      _remove_leftover_tmp(self.directory)
    self._keep_best = bool(config.keep_best_checkpoint)
    policies = [checkpoint_managers.LatestN(n=max(1, config.keep_checkpoints))]
    best = {}
    if self._keep_best:
      # BestN sorts with sorted(key, reverse=reverse) and keeps the LAST n:
      # reverse=True sorts by decreasing error, so it keeps the lowest (as
      # orbax's own best_mode='min' does). best_fn makes orbax write the metrics
      # with each checkpoint, so the best one is still known after a restart.
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=_validation_error, reverse=True, n=1,
          keep_checkpoints_without_metrics=False))
      best = dict(best_fn=_validation_error, best_mode='min')
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        create=True, **best)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'meta'))
    try:
      self._check_newest_meta()
    except CheckpointMismatchError:
      self.manager.close()
      raise

  def path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: Any, *, metrics: dict[str, float] | None = None) -> None:
    """Starts writing `state` (at its step); raises CheckpointError if the previous save failed."""
    step = int(parallel.fetch(state.step))
    self.wait()
    if step in self.manager.all_steps():
      return
    meta = _meta(self.config, step, self.num_classes, self.data_fingerprint)
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
          metrics=dict(metrics or {}) if self._keep_best else None, force=True)
    except Exception as e:
      raise CheckpointError(f'Could not write the checkpoint of step {step} to {self.path(step)}: '
                            f'{_short(e)}. Check the free space and permissions of '
                            f'{self.directory}.') from e
    self._pending = step

  def wait(self) -> None:
    """Blocks until the save in flight is complete; raises CheckpointError if it failed."""
    step, self._pending = self._pending, None
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise CheckpointError(f'Writing the checkpoint of step {step} to {self.path(step)} failed: '
                            f'{_short(e)}. Check the free space and permissions of '
                            f'{self.directory}; the earlier checkpoints are kept.') from e
    if step is not None and not epath.Path(self.path(step)).is_dir():
      raise CheckpointError(f'The checkpoint of step {step} was not completed: {self.path(step)} '
                            'does not exist after the save (see the errors logged above).')
    if step is not None and self._lead:
      try:
        loading.write_manifest(self.path(step))
      except OSError as e:
        raise CheckpointError(f'Could not write the checksums of {self.path(step)}: {_short(e)}. '
                              f'Check the free space and permissions of {self.directory}.') from e

  def poll(self) -> None:
    """Cheap, after every step: completes a save that has finished in the background, so that
    its error (disk full, ...) is raised now rather than at the next checkpoint."""
    if self._pending is not None and not self.manager.is_saving_in_progress():
      self.wait()

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    try:
      self.wait()
    finally:
      self.manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc is None:
      self.close()
      return
    try:  # an error is on its way out: finish the save in flight, don't mask the error
      self.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.error('%s', e)

  def restore(self, target: Any) -> Any | None:
    """The state of the newest usable checkpoint, placed like `target`; None if there is none.

    Raises CheckpointMismatchError if the checkpoints belong to another
    experiment, and CheckpointError if there are checkpoints but none restores.
    """
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    failures = []
    steps = sorted(self.manager.all_steps(), reverse=True)
    # Multi-host: every process restores the same step, the newest that all of them see;
    # a step counts as damaged or unreadable if it is so on any process (`_judged`).
    newest = parallel.min_over_processes(steps[0] if steps else -1)
    for step in [s for s in steps if s <= newest]:
      # Each read is judged (and agreed on) before the next: orbax's reads are collectives
      # (a barrier at their end), which a process must not skip because only it saw damage.
      _, error = self._judged(step, lambda s=step: self._verify_files(s))
      if error is None:
        meta, error = self._judged(step, lambda s=step: self._read_meta(s))
      if error is not None:
        failures.append(self._skip(step, error))
        continue
      _check_fingerprint(meta, self.config, self.directory, self.data_fingerprint)
      state, error = self._judged(step, lambda s=step: self._restore_state(s, abstract))
      if error is not None:
        failures.append(self._skip(step, error))
        continue
      self._set_aside([s for s, _ in failures])
      logging.info('Restored the checkpoint of step %d from %s', step, self.path(step))
      return state
    if failures:
      lines = '\n'.join(f'  {self.path(s)}: {error}' for s, error in failures)
      raise CheckpointError(
          f'None of the checkpoints in {self.directory} can be restored:\n{lines}\n'
          'Not starting from scratch over them: move the directory away (or fix the error) '
          'and run again.')
    return None

  def _judged(self, step: int, read) -> tuple[Any, BaseException | str | None]:
    """(read(), None), or (None, error) if the checkpoint is damaged on any process.

    Raises CheckpointError, and moves nothing, if the read failed for another
    reason (permissions, I/O) on any process.
    """
    value, error, code = None, None, integrity.OK
    try:
      value = read()
    except Exception as e:  # pylint: disable=broad-except
      error, code = e, integrity.verdict(e)
    code = integrity.agree(code)
    if code == integrity.READ_ERROR:
      cause = _short(error) if error is not None else 'a read error on another process'
      raise CheckpointError(
          f'Could not read the checkpoint {self.path(step)}: {cause}. This is a read error, not '
          'damage: nothing was set aside. Fix the cause (permissions, the filesystem) and run '
          'again to resume.') from error
    if code == integrity.DAMAGED:
      return None, error if error is not None else 'damaged as read by another process'
    return value, None

  def _verify_files(self, step: int) -> None:
    """Checks the checkpoint's files against their checksums (on process 0 only: no collective)."""
    if self._lead:
      loading.verify_manifest(self.path(step))

  def _restore_state(self, step: int, abstract: Any) -> Any:
    state = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract)))['state']
    found = int(parallel.fetch(state.step))
    if found != step:
      raise loading.CorruptCheckpointError(f'it holds step {found}')
    for path, x in jax.tree_util.tree_leaves_with_path(state):
      if jnp.issubdtype(x.dtype, jnp.floating) and not bool(parallel.fetch(jnp.isfinite(x).all())):
        raise loading.CorruptCheckpointError(f'{jax.tree_util.keystr(path)} holds non-finite values')
    return state

  def _read_meta(self, step: int) -> dict[str, Any]:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

  def _check_newest_meta(self) -> None:
    """Raises CheckpointMismatchError early, before the train state is built."""
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = self._read_meta(step)
      except Exception:  # pylint: disable=broad-except
        continue  # damaged: restore() says so
      _check_fingerprint(meta, self.config, self.directory, self.data_fingerprint)
      return

  def _skip(self, step: int, error: BaseException | str) -> tuple[int, str]:
    error = error if isinstance(error, str) else _short(error)
    logging.warning('Skipping the checkpoint %s, which cannot be restored: %s',
                    self.path(step), error)
    return step, error

  def _set_aside(self, steps: list[int]) -> None:
    """Renames damaged checkpoints, so that the resumed run can write those steps again."""
    if not steps:
      return
    if self._lead:
      stamp = time.strftime('%Y%m%d-%H%M%S')
      for step in steps:
        target = f'{self.path(step)}.damaged-{stamp}'
        epath.Path(self.path(step)).rename(target)
        logging.warning('Moved the damaged checkpoint %s to %s; delete it when no longer needed.',
                        self.path(step), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices('resnet_jax.checkpoints.set_aside')
    self.manager.reload()


def _meta(config, step: int, num_classes: int | None,
          data: dict[str, Any] | None = None) -> dict[str, Any]:
  model = config.model.to_dict()
  kwargs = {k: v for k, v in model.items() if k != 'name'}
  if num_classes is not None:
    kwargs['num_classes'] = num_classes
  return {'step': step, 'model': model['name'], 'model_kwargs': kwargs,
          'fingerprint': fingerprint(config, data), 'config': json.loads(config.to_json_best_effort())}
