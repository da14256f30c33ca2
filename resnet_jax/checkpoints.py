"""Checkpoints with orbax: save the whole train state, resume exactly, load for inference.

Layout: `WORKDIR/checkpoints/<step>/{state,meta}`. `state` is the full
`TrainState` (params, batch statistics, optimiser state, step, RNG, metric
accumulators); the input pipeline needs nothing else, because its position is
a function of the step. `meta` is JSON: the model (name and constructor
arguments), the config, and the fingerprint of the config fields that make a
checkpoint meaningful (model, batch size, seed, data), checked on resume.

Saving is asynchronous: `Checkpointer.save` returns once the arrays are copied
to host memory and the files are written by a background thread; an error
there (disk full, permission denied) is raised by the next `save`, `wait` or
`close`. Orbax writes a step to `<step>.orbax-checkpoint-tmp` and renames it
when complete, so a crash mid-save leaves a temporary directory, never a
half-written `<step>`.

Resuming takes the newest checkpoint that restores. A damaged one (truncated
or missing files) is skipped with a warning and, once an older one has
restored, moved aside to `<step>.damaged-<time>`; leftover temporary
directories are removed with a warning. If checkpoints exist but none can be
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
import shutil
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from resnet_jax import parallel

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

_TMP_MARKER = '.orbax-checkpoint-tmp'  # orbax 0.12: '<step>.orbax-checkpoint-tmp' while saving
_METRICS_FILE = os.path.join('metrics', 'metrics')  # orbax's per-step metrics (keep_best_checkpoint)


class CheckpointError(RuntimeError):
  """A checkpoint could not be written, or none of the checkpoints found can be read."""


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


def _short(error: BaseException, limit: int = 400) -> str:
  text = f'{type(error).__name__}: {error}'.replace('\n', ' ')
  return text if len(text) <= limit else text[:limit] + ' ...'


def _steps(directory: str) -> list[int]:
  """Steps of the complete checkpoints in `directory`, newest first (orbax names them by the step)."""
  if not os.path.isdir(directory):
    return []
  return sorted((int(n) for n in os.listdir(directory)
                 if n.isdigit() and os.path.isdir(os.path.join(directory, n))), reverse=True)


def _remove_leftover_tmp(directory: str) -> None:
  """Deletes the temporary directories of saves that never finished (a crash mid-save)."""
  if not os.path.isdir(directory):
    return
  for name in sorted(os.listdir(directory)):
    if _TMP_MARKER in name:
      path = os.path.join(directory, name)
      logging.warning('Removing %s: the temporary directory of a checkpoint save that never '
                      'finished (the run stopped while saving).', path)
      shutil.rmtree(path, ignore_errors=True)


class Checkpointer:
  """Orbax `CheckpointManager` for one run's workdir: asynchronous saves, careful resume.

  Keeps the newest `config.keep_checkpoints` checkpoints and, with
  `config.keep_best_checkpoint`, also the one with the lowest validation error.
  As a context manager it closes (waits for the save in flight) on the way out.
  """

  def __init__(self, workdir: str, config, *, num_classes: int | None = None,
               data_fingerprint: dict[str, Any] | None = None, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
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
    if step is not None and not os.path.isdir(self.path(step)):
      raise CheckpointError(f'The checkpoint of step {step} was not completed: {self.path(step)} '
                            'does not exist after the save (see the errors logged above).')

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
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        meta = self._read_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        failures.append(self._skip(step, e))
        continue
      _check_fingerprint(meta, self.config, self.directory, self.data_fingerprint)
      try:
        state = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract)))['state']
        found = int(parallel.fetch(state.step))
        if found != step:
          raise ValueError(f'it holds step {found}')
      except Exception as e:  # pylint: disable=broad-except
        failures.append(self._skip(step, e))
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

  def _skip(self, step: int, error: BaseException) -> tuple[int, str]:
    logging.warning('Skipping the checkpoint %s, which cannot be restored: %s',
                    self.path(step), _short(error))
    return step, _short(error)

  def _set_aside(self, steps: list[int]) -> None:
    """Renames damaged checkpoints, so that the resumed run can write those steps again."""
    if not steps:
      return
    if self._lead:
      stamp = time.strftime('%Y%m%d-%H%M%S')
      for step in steps:
        target = f'{self.path(step)}.damaged-{stamp}'
        os.rename(self.path(step), target)
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


# ----------------------------------------------------------------------------
# Reading checkpoints outside a run: inference, analysis, tests.


def _step_dirs(path: str) -> list[str]:
  """A workdir, its checkpoints directory, or one step directory -> step directories, newest first."""
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    path = os.path.join(path, 'checkpoints')
  if os.path.isdir(os.path.join(path, 'state')) and os.path.isdir(os.path.join(path, 'meta')):
    return [path]
  dirs = [os.path.join(path, str(s)) for s in _steps(path)]
  if not dirs:
    raise FileNotFoundError(f'No checkpoint at {path}: expected a workdir, its checkpoints '
                            'directory, or one checkpoint (checkpoints/<step>).')
  return dirs


def _read(step_dir: str, keys: tuple[str, ...] | None) -> tuple[dict[str, Any], dict[str, Any]]:
  """(meta, state) of one checkpoint; state as numpy arrays, only `keys` if given (None: all)."""
  meta = ocp.JsonCheckpointHandler().restore(epath.Path(step_dir) / 'meta')
  handler = ocp.PyTreeCheckpointHandler()
  state_dir = epath.Path(step_dir) / 'state'
  tree = dict(handler.metadata(state_dir).tree)  # the structure: cheap, and fails if missing
  if keys == ():
    return meta, {}
  if keys is not None:
    tree = {k: tree[k] for k in keys}
  # Plain numpy arrays: no devices or shardings from the run that wrote it.
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  state = handler.restore(state_dir, args=ocp.args.PyTreeRestore(
      item=tree, restore_args=restore_args, partial_restore=keys is not None))
  return meta, state


def _read_newest(dirs: list[str], keys: tuple[str, ...] | None) -> tuple[str, dict, dict]:
  """(step directory, meta, state) of the first of `dirs` that reads; warns about the others."""
  failures = []
  for step_dir in dirs:
    try:
      return (step_dir, *_read(step_dir, keys))
    except Exception as e:  # pylint: disable=broad-except
      if len(dirs) == 1:
        raise CheckpointError(f'Cannot read the checkpoint {step_dir}: {_short(e)}') from e
      logging.warning('Skipping the checkpoint %s, which cannot be read: %s', step_dir, _short(e))
      failures.append(f'  {step_dir}: {_short(e)}')
  raise CheckpointError('None of the checkpoints can be read:\n' + '\n'.join(failures))


def load_variables(path: str) -> dict[str, Any]:
  """Trained weights for inference: `{'params': ..., 'batch_stats': ...}` as numpy arrays.

  `path` is a workdir (its newest readable checkpoint), its `checkpoints`
  directory, or one checkpoint (`WORKDIR/checkpoints/<step>`). Any device
  count may have written it; the arrays land on the host, ready for the
  `apply_fn` of `resnet_jax.functional(...)` (see `checkpoint_info` for the
  model to build).
  """
  return _read_newest(_step_dirs(path), ('params', 'batch_stats'))[2]


def load_state(path: str) -> dict[str, Any]:
  """The whole train state of a checkpoint (see `load_variables` for `path`) as nested dicts of
  numpy arrays: params, batch_stats, opt_state, step, rng, warmup_active, metric_sums."""
  return _read_newest(_step_dirs(path), None)[2]


def checkpoint_info(path: str, *, best: bool = False) -> dict[str, Any]:
  """What a checkpoint holds (see `load_variables` for `path`), without reading the arrays.

  Returns {'path', 'step', 'model', 'model_kwargs', 'config', 'fingerprint',
  'validation_error', 'normalize', 'label_names', 'source'}:
  `functional(info['model'], **info['model_kwargs'])` builds its network,
  `load_variables(info['path'])` loads its weights. `validation_error` is
  recorded with `config.keep_best_checkpoint` (else None); `best=True` picks
  the checkpoint with the lowest one. The last three are recorded by
  `write_inference_checkpoint` (converted weights) and None for a run's
  checkpoints, whose normalisation follows from `config`.
  """
  dirs = _step_dirs(path)
  if best:
    scored = [(e, d) for d in dirs if (e := _recorded_validation_error(d)) is not None]
    if not scored:
      raise CheckpointError(f'No checkpoint at {path} has a recorded validation error (runs '
                            'record it with config.keep_best_checkpoint=True and a val_split).')
    dirs = [min(scored)[1]]
  step_dir, meta, _ = _read_newest(dirs, ())
  return {'path': step_dir, 'step': int(meta['step']), 'model': meta['model'],
          'model_kwargs': meta['model_kwargs'], 'config': meta['config'],
          'fingerprint': meta['fingerprint'],
          'validation_error': _recorded_validation_error(step_dir),
          **{k: meta.get(k) for k in _INFERENCE_META}}


def _recorded_validation_error(step_dir: str) -> float | None:
  try:
    with open(os.path.join(step_dir, _METRICS_FILE)) as f:
      value = json.load(f).get('validation_error')
  except (OSError, ValueError):
    return None
  return None if value is None or not np.isfinite(value) else float(value)



# ----------------------------------------------------------------------------
# Writing weights that no run of ours trained (converted from torchvision).

_INFERENCE_META = ('normalize', 'label_names', 'source')


def write_inference_checkpoint(directory: str, variables: dict[str, Any], model: str,
                               model_kwargs: dict[str, Any],
                               extra_meta: dict[str, Any] | None = None) -> str:
  """Writes `variables` as one checkpoint that `load_variables` and `checkpoint_info` read.

  The layout is that of a run's `checkpoints/<step>` (orbax `state` holding
  {'params', 'batch_stats'}, JSON `meta`) with step 0, an empty config and
  fingerprint, and `extra_meta` (e.g. 'normalize', 'label_names', 'source';
  JSON-serialisable) merged into the meta. `directory` must not exist: the
  checkpoint is written beside it under a temporary name and renamed into
  place when complete, so an error never leaves a half-written `directory`.
  Returns the absolute path.
  """
  directory = os.path.abspath(os.fspath(directory))
  if os.path.exists(directory):
    raise FileExistsError(f'{directory} already exists; not overwriting it. Choose a new output '
                          'directory or delete this one first.')
  meta = {'step': 0, 'model': model, 'model_kwargs': dict(model_kwargs), 'config': {},
          'fingerprint': {}, **(extra_meta or {})}
  meta = json.loads(json.dumps(meta))  # fails here, before writing, if not JSON-serialisable
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  staging = os.path.join(parent, f'.{os.path.basename(directory)}.partial-{os.getpid()}')
  shutil.rmtree(staging, ignore_errors=True)
  try:
    os.makedirs(staging)
    tree = {'params': variables['params'], 'batch_stats': variables['batch_stats']}
    tree = jax.tree.map(np.asarray, tree)
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
      checkpointer.save(os.path.join(staging, 'checkpoint'), args=ocp.args.Composite(
          state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)))
    os.rename(os.path.join(staging, 'checkpoint'), directory)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return directory
