"""Fine-tuning: start a run from trained weights instead of random ones (`config.init_from`).

    --config.init_from=WORKDIR          a run's newest readable checkpoint
    --config.init_from=CHECKPOINT_DIR   WORKDIR/checkpoints/<step>, or a converted checkpoint
    --config.init_from=pretrained:NAME  weights shipped with the package (weights/shipped.py)

The source's params and BatchNorm statistics replace the fresh ones; the
optimiser state, the step, the RNG and the metric sums stay those of a new run
(momentum from zero: the source's momentum belongs to another schedule and
possibly another data set). The classifier `head` is carried over when it has
as many classes as this run's data, else kept from the fresh initialisation.
Everything else must match the configured model key by key and shape by
shape: a network of another depth or shortcut option is refused, not
partially loaded.

The loop calls `load_initial_variables` only when the workdir holds no
checkpoint of the run itself, so a resumed fine-tuning run continues from its
own checkpoints and never reads the source again (`fresh_start` / `resumed`);
WORKDIR/init_from.json keeps where it started, for its result.json.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
from etils import epath

from resnet_jax import models
from resnet_jax.training import workdir as workdir_lib
from resnet_jax.weights import loading, shipped

PRETRAINED_PREFIX = 'pretrained:'
HEAD = 'head'  # the classifier Dense of models.ResNet
RECORD_FILE = 'init_from.json'


def read_source(init_from: str) -> dict[str, Any]:
  """{'source', 'model', 'model_kwargs', 'step', 'variables'} of an `init_from` value.

  Raises shipped.NotShippedError for unknown shipped weights, FileNotFoundError
  for a path that holds no checkpoint, loading.CheckpointError for one that
  cannot be read.
  """
  if init_from.startswith(PRETRAINED_PREFIX):
    net = shipped.pretrained(init_from[len(PRETRAINED_PREFIX):])
    origin = net.get('source') if isinstance(net.get('source'), dict) else {}
    return {'source': init_from, 'model': net['model'], 'model_kwargs': net['model_kwargs'],
            'step': origin.get('step'), 'variables': net['variables']}
  try:
    info = loading.checkpoint_info(init_from)
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f'config.init_from={init_from!r}: {e} Give a workdir, a checkpoint directory, or '
        f'{PRETRAINED_PREFIX}NAME for shipped weights ({", ".join(shipped.available()) or "none shipped yet"}).'
    ) from e
  return {'source': info['path'], 'model': info['model'], 'model_kwargs': info['model_kwargs'],
          'step': info['step'], 'variables': loading.load_variables(info['path'])}


def _is_scanned(tree: dict[str, Any]) -> bool:
  return any(k.endswith('_scan') for k in tree)


def _flat(tree: dict[str, Any]) -> dict[str, Any]:
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _first_mismatch(source: dict[str, Any], target: dict[str, Any]) -> str | None:
  """The first difference (in key order) between two flat {key: array} trees, in words."""
  for key in sorted(set(source) | set(target)):
    if key not in target:
      return f'{key} is in the source but not in the configured model'
    if key not in source:
      return f'{key} of the configured model is not in the source'
    a, b = np.shape(source[key]), np.shape(target[key])
    if a != b:
      return f'{key} has shape {a} in the source and {b} in the configured model'
  return None


def _describe_model(name: str, kwargs: dict[str, Any]) -> str:
  shown = {k: kwargs[k] for k in ('shortcut', 'num_classes', 'stride_on_3x3') if k in kwargs}
  return f"{name} ({', '.join(f'{k}={v!r}' for k, v in shown.items())})" if shown else name


def merge(source: dict[str, Any], fresh: dict[str, Any], *, init_from: str, source_model: str,
          target_model: str) -> tuple[dict[str, Any], bool]:
  """(variables, head_loaded): `source`'s variables in the structure and dtypes of `fresh`.

  Both are {'params', 'batch_stats'}. Scanned source weights are unrolled for
  an unscanned model. The head comes from `source` when its shapes match,
  else from `fresh`; any other difference raises ValueError naming the first
  mismatching key and the model the source was trained as.
  """
  source = {c: source[c] for c in ('params', 'batch_stats')}
  if _is_scanned(source['params']) and not _is_scanned(fresh['params']):
    source = models.unroll_scanned(source)
  elif _is_scanned(fresh['params']) and not _is_scanned(source['params']):
    raise ValueError(
        f'config.init_from={init_from!r} holds unscanned weights and this run has '
        'model.scan_blocks=True; set --config.model.scan_blocks=False (the same network).')
  src_head = source['params'].get(HEAD)
  fresh_head = fresh['params'][HEAD]
  head_loaded = (src_head is not None and jax.tree.structure(src_head) ==
                 jax.tree.structure(fresh_head) and all(
                     np.shape(a) == np.shape(b)
                     for a, b in zip(jax.tree.leaves(src_head), jax.tree.leaves(fresh_head))))
  body = lambda v: {'params': {k: x for k, x in v['params'].items() if k != HEAD},
                    'batch_stats': v['batch_stats']}
  problem = _first_mismatch(_flat(body(source)), _flat(body(fresh)))
  if problem is None and not head_loaded:
    src_kernel = np.shape((src_head or {}).get('kernel', ()))
    fresh_kernel = np.shape(fresh_head['kernel'])
    if len(src_kernel) != 2 or src_kernel[0] != fresh_kernel[0]:
      problem = (f'{HEAD}/kernel has shape {src_kernel} in the source and {fresh_kernel} in the '
                 'configured model (a different number of features, not of classes)')
  if problem is not None:
    raise ValueError(
        f'config.init_from={init_from!r} does not fit this run: {problem}. The source was '
        f'trained as {source_model}; this run builds {target_model}. Use weights of the same '
        'network (depth, shortcut option, bottleneck stride), or set --config.model.* to the '
        "source's.")
  as_fresh = lambda s, f: np.asarray(s, dtype=np.asarray(f).dtype)
  out = {
      'params': {k: jax.tree.map(as_fresh, source['params'][k], v)
                 if k != HEAD or head_loaded else v for k, v in fresh['params'].items()},
      'batch_stats': jax.tree.map(as_fresh, source['batch_stats'], fresh['batch_stats']),
  }
  return out, head_loaded


def load_initial_variables(run, state) -> tuple[Any, dict[str, Any], str]:
  """(state, record, message): `state` (a fresh `run.init_state()`) with the weights of
  `run.config.init_from`, and what to record in result.json and print.

  The new state keeps the fresh step, RNG and metric sums; its optimiser state
  is `run.tx.init` of the loaded params; it is replicated like `state`.
  """
  init_from = run.config.init_from
  src = read_source(init_from)
  fresh = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  num_classes = run.source.num_classes
  target_kwargs = {**run.config.model.to_dict(), 'num_classes': num_classes}
  variables, head_loaded = merge(
      src['variables'], fresh, init_from=init_from,
      source_model=_describe_model(src['model'], src['model_kwargs']),
      target_model=_describe_model(run.config.model.name, target_kwargs))
  variables = jax.device_put(variables, run.replicated)
  opt_state = jax.jit(run.tx.init, out_shardings=run.replicated)(variables['params'])
  state = state.replace(params=variables['params'], batch_stats=variables['batch_stats'],
                        opt_state=opt_state)
  record = {'source': src['source'], 'model': src['model'], 'step': src['step'],
            'head': 'loaded' if head_loaded else 'reinitialised'}
  message = (f"Starting from {src['source']} ({src['model']}, step {src['step']}): its weights "
             'and BatchNorm statistics; fresh optimiser state, step 0.')
  if not head_loaded:
    source_classes = np.shape(src['variables']['params'].get(HEAD, {}).get('bias', ()))
    note = (f'The classifier head is re-initialised: the source has '
            f'{source_classes[0] if source_classes else "no"} classes, this run\'s data '
            f'{num_classes}.')
    logging.warning('%s', note)  # also into WORKDIR/logs/run.log
    message += ' ' + note
  return state, record, message


def fresh_start(run, state, workdir: str, *, lead: bool = True) -> tuple[Any, dict | None, str | None]:
  """(state, record, message) of a run that found no checkpoint of its own.

  With `config.init_from` set: `load_initial_variables`, and the record kept
  in WORKDIR/init_from.json for its resumed runs; without: `state` unchanged
  (an earlier attempt's record, which left no checkpoint, is removed).
  """
  record = message = None
  if run.config.init_from:
    state, record, message = load_initial_variables(run, state)
  if lead:
    path = os.path.join(workdir, RECORD_FILE)
    if record is not None:
      workdir_lib.write_text(path, json.dumps(record, indent=2))
    elif epath.Path(path).exists():
      epath.Path(path).unlink()
  return state, record, message


def resumed(config, workdir: str) -> tuple[dict | None, str | None]:
  """(record, message) of a resumed run: where its first attempt started from, read from the
  workdir, not from `config.init_from` (which may have moved or changed since)."""
  path = epath.Path(workdir) / RECORD_FILE
  record = json.loads(path.read_text()) if path.exists() else None
  message = ('config.init_from is not read: the run resumes from its own checkpoint.'
             if config.init_from else None)
  return record, message
