"""Reading checkpoints outside a run: inference, analysis, export, tests.

A checkpoint is the directory `WORKDIR/checkpoints/<step>` that orbax writes
(`training/checkpoints.py`): `state/` (the train state's arrays) and `meta/`
(JSON: model name, constructor arguments, config, fingerprint), and
`sha256.json`, the checksums of their files, which the readers verify (a
checkpoint written before it existed is read unverified). These readers need
neither the run's devices nor its config:

    info = checkpoint_info('workdirs/digits_resnet20')
    variables = load_variables(info['path'])
    _, apply_fn = resnet_jax.functional(info['model'], **info['model_kwargs'])
    logits = apply_fn(variables, images)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

TMP_MARKER = '.orbax-checkpoint-tmp'  # orbax 0.12: '<step>.orbax-checkpoint-tmp' while saving
METRICS_FILE = os.path.join('metrics', 'metrics')  # orbax's per-step metrics (keep_best_checkpoint)


MANIFEST = 'sha256.json'  # {relative path: sha256} of every file orbax wrote, next to state/meta


class CheckpointError(RuntimeError):
  """A checkpoint could not be written, or none of the checkpoints found can be read."""


class CorruptCheckpointError(CheckpointError):
  """A checkpoint's files differ from what was saved: a checksum, a missing file, a non-finite value."""


def sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def _files(step_dir: str) -> list[str]:
  out = []
  for root, _, names in os.walk(step_dir):
    out += [os.path.relpath(os.path.join(root, n), step_dir) for n in names]
  return sorted(f for f in out if f != MANIFEST and not f.startswith(MANIFEST + '.'))


def write_manifest(step_dir: str) -> None:
  """Records the sha256 of every file of a finished checkpoint, so that damage is found on reading.

  Written after orbax has completed the step (atomically: temp file, then
  rename). A checkpoint without one (older code, or a crash in between) is
  read unverified; its arrays are still checked for non-finite values.
  """
  sums = {f: sha256_file(os.path.join(step_dir, f)) for f in _files(step_dir)}
  tmp = os.path.join(step_dir, f'{MANIFEST}.tmp-{os.getpid()}')
  with open(tmp, 'w') as f:
    json.dump(sums, f, indent=0, sort_keys=True)
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def verify_manifest(step_dir: str) -> bool:
  """Checks a checkpoint's files against its manifest; False if it has none (older checkpoints).

  Raises CorruptCheckpointError naming the first file that is missing or whose
  contents changed. Other OSErrors (permissions, I/O) propagate as they are:
  they say nothing about the checkpoint itself.
  """
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      sums = json.load(f)
  except ValueError as e:
    raise CorruptCheckpointError(f'its checksum manifest {path} is unreadable ({e})') from e
  for name, expected in sorted(sums.items()):
    file = os.path.join(step_dir, name)
    if not os.path.exists(file):
      raise CorruptCheckpointError(f'the file {name} is missing')
    if sha256_file(file) != expected:
      raise CorruptCheckpointError(f'the file {name} does not match its checksum (changed on disk '
                                   'after it was saved)')
  return True


def check_finite(tree: Any) -> None:
  """Raises CorruptCheckpointError if a floating-point array of `tree` has a NaN or infinity."""
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    x = np.asarray(x)
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
      raise CorruptCheckpointError(f'{jax.tree_util.keystr(path)} holds non-finite values '
                                   '(a damaged file, or a run saved past a divergence)')


def os_error_in(error: BaseException) -> OSError | None:
  """The OSError that caused `error` (itself, or along its __cause__/__context__ chain), if any."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, OSError) and error.errno is not None:
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


def short(error: BaseException, limit: int = 400) -> str:
  """One line for a message: the error, cut at `limit`, ending with the OS error behind it."""
  text = f'{type(error).__name__}: {error}'.replace('\n', ' ')
  text = text if len(text) <= limit else text[:limit] + ' ...'
  cause = os_error_in(error)
  if cause is not None and cause.strerror and cause.strerror not in text:
    text += f' ({cause.strerror})'
  return text


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
  verify_manifest(step_dir)
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
  check_finite(state)
  return meta, state


def _read_newest(dirs: list[str], keys: tuple[str, ...] | None) -> tuple[str, dict, dict]:
  """(step directory, meta, state) of the first of `dirs` that reads; warns about the others."""
  failures = []
  for step_dir in dirs:
    try:
      return (step_dir, *_read(step_dir, keys))
    except Exception as e:  # pylint: disable=broad-except
      if len(dirs) == 1:
        if isinstance(e, CorruptCheckpointError):
          raise CorruptCheckpointError(
              f'The checkpoint {step_dir} is damaged: {e}. Load an older checkpoint '
              f'({os.path.dirname(step_dir)}/<step>) or the workdir, which skips it.') from e
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
    with open(os.path.join(step_dir, METRICS_FILE)) as f:
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
    write_manifest(os.path.join(staging, 'checkpoint'))  # load_variables verifies it
    os.rename(os.path.join(staging, 'checkpoint'), directory)
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return directory
