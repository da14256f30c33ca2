"""Reading checkpoints outside a run: inference, analysis, export, tests.

A checkpoint is the directory `WORKDIR/checkpoints/<step>` that orbax writes
(`training/checkpoints.py`): `state/` (the train state's arrays) and `meta/`
(JSON: model name, constructor arguments, config, fingerprint). These readers
need neither the run's devices nor its config:

    info = checkpoint_info('workdirs/digits_resnet20')
    variables = load_variables(info['path'])
    _, apply_fn = resnet_jax.functional(info['model'], **info['model_kwargs'])
    logits = apply_fn(variables, images)
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

TMP_MARKER = '.orbax-checkpoint-tmp'  # orbax 0.12: '<step>.orbax-checkpoint-tmp' while saving
METRICS_FILE = os.path.join('metrics', 'metrics')  # orbax's per-step metrics (keep_best_checkpoint)


class CheckpointError(RuntimeError):
  """A checkpoint could not be written, or none of the checkpoints found can be read."""


def short(error: BaseException, limit: int = 400) -> str:
  text = f'{type(error).__name__}: {error}'.replace('\n', ' ')
  return text if len(text) <= limit else text[:limit] + ' ...'


def steps(directory: str) -> list[int]:
  """Steps of the complete checkpoints in `directory`, newest first (orbax names them by the step)."""
  if not os.path.isdir(directory):
    return []
  return sorted((int(n) for n in os.listdir(directory)
                 if n.isdigit() and os.path.isdir(os.path.join(directory, n))), reverse=True)




def _step_dirs(path: str) -> list[str]:
  """A workdir, its checkpoints directory, or one step directory -> step directories, newest first."""
  path = os.path.abspath(os.fspath(path))
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    path = os.path.join(path, 'checkpoints')
  if os.path.isdir(os.path.join(path, 'state')) and os.path.isdir(os.path.join(path, 'meta')):
    return [path]
  dirs = [os.path.join(path, str(s)) for s in steps(path)]
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
        raise CheckpointError(f'Cannot read the checkpoint {step_dir}: {short(e)}') from e
      logging.warning('Skipping the checkpoint %s, which cannot be read: %s', step_dir, short(e))
      failures.append(f'  {step_dir}: {short(e)}')
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
  'validation_error'}: `functional(info['model'], **info['model_kwargs'])`
  builds its network, `load_variables(info['path'])` loads its weights.
  `validation_error` is recorded with `config.keep_best_checkpoint` (else
  None); `best=True` picks the checkpoint with the lowest one.
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
          'validation_error': _recorded_validation_error(step_dir)}


def _recorded_validation_error(step_dir: str) -> float | None:
  try:
    with open(os.path.join(step_dir, METRICS_FILE)) as f:
      value = json.load(f).get('validation_error')
  except (OSError, ValueError):
    return None
  return None if value is None or not np.isfinite(value) else float(value)

