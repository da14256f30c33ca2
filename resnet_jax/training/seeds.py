"""Several seeds of one experiment trained together: one compiled step, `jax.vmap`ped over seeds.

    results = train_seeds([config_seed0, config_seed1, ...], [workdir0, workdir1, ...])

The configs must differ in `seed` only. The train state carries a leading
seed axis, and so do the step's inputs: each seed keeps its own
initialisation, data order, augmentation, dropout key and BatchNorm
statistics (vmap maps the whole step, so every reduction stays within a
seed). With `data.device_input` the resident training set is shared and only
each seed's indices, crops and flips differ.

Each seed writes its own ordinary workdir, exactly as `loop.train_and_evaluate`
would (config.json, metrics.jsonl, TensorBoard, checkpoints, result.json), so
`report`, resuming and `load_variables` treat them as separate runs; a seed's
workdir can even be resumed on its own. Resuming together needs every seed at
the same step. Evaluation runs seed by seed on the host path. A non-finite
step in any seed stops all of them (before any checkpoint past it).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import data
from resnet_jax.kernels import host_memory
from resnet_jax.training import build as build_lib
from resnet_jax.training import checkpoints, loop, metrics, multistep, parallel


def check_configs(configs: Sequence[Any]) -> None:
  """Raises ValueError unless the configs differ in `seed` only, with distinct seeds."""
  seeds = [c.seed for c in configs]
  if len(set(seeds)) != len(seeds):
    raise ValueError(f'Parallel seeds must be distinct, got {seeds}.')
  strip = lambda c: {k: v for k, v in json.loads(c.to_json_best_effort()).items() if k != 'seed'}
  first = strip(configs[0])
  for c in configs[1:]:
    other = strip(c)
    keys = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
    if keys:
      raise ValueError(f'Seeds trained together must share their config except the seed; seed '
                       f'{c.seed} differs from seed {configs[0].seed} in {keys}.')


def _seed_source(source: data.DataSource, config) -> data.DataSource:
  """The data source of `config.seed`: in-memory data is shared, only the seed differs."""
  if isinstance(source, data.ArraySource):
    other = copy.copy(source)
    other.seed = config.seed
    return other
  return data.create_data_source(config)


def _slice(tree: Any, i: int) -> Any:
  return jax.tree.map(lambda x: x[i], tree)


def _stacked(trees: Sequence[Any]) -> Any:
  return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def train_seeds(configs: Sequence[Any], workdirs: Sequence[str]) -> list[dict[str, Any]]:
  """Trains the seeds of `configs` together; returns each seed's result (as train_and_evaluate)."""
  start_time = time.time()
  loop._git_commit()  # pylint: disable=protected-access  # read at the start: see there
  check_configs(configs)
  if len(configs) != len(workdirs):
    raise ValueError(f'{len(configs)} configs but {len(workdirs)} workdirs.')
  run = build_lib.build(configs[0])
  runs = [dataclasses.replace(run, config=c, source=_seed_source(run.source, c)) for c in configs]
  for r in runs:
    if r.device_input is not None:
      r.device_input = copy.copy(r.device_input)
      r.device_input.source = r.source
  config, num_steps, num_seeds = configs[0], run.num_steps, len(configs)
  lead = jax.process_index() == 0
  ckpts, states = [], []
  try:
    for r, w in zip(runs, workdirs):
      if lead:
        os.makedirs(w, exist_ok=True)
      ckpts.append(checkpoints.Checkpointer(w, r.config, num_classes=r.source.num_classes,
                                            data_fingerprint=r.source.fingerprint()))
      state = r.init_state()
      restored = ckpts[-1].restore(state)
      states.append(state if restored is None else restored)
    starts = [int(parallel.fetch(s.step)) for s in states]
    if len(set(starts)) != 1:
      where = ', '.join(f'seed {c.seed}: step {s}' for c, s in zip(configs, starts))
      raise ValueError(f'The seeds cannot resume together: their checkpoints are at different '
                       f'steps ({where}). Resume them one by one (without --parallel_seeds), '
                       'or move the checkpoints of the ones ahead away.')
    start_step = starts[0]
    if start_step > num_steps:
      raise ValueError(f'The checkpoints are at step {start_step}, past the {num_steps} steps '
                       'this config asks for.')
  except BaseException:
    for c in ckpts:
      c.close()
    raise
  state = jax.device_put(jax.tree.map(lambda *xs: jnp.stack(xs), *states), run.replicated)
  del states
  num_params = sum(x.size for x in jax.tree.leaves(run.init_state().params))
  writers = []
  for r, w in zip(runs, workdirs):
    if lead:
      if start_step:
        metrics.truncate_metrics(w, start_step)
      with open(os.path.join(w, 'config.json'), 'w') as f:
        f.write(r.config.to_json_best_effort(indent=2))
    writers.append(metrics.MetricWriter(w, enabled=lead))
  progress = metrics.ProgressBar(num_steps, enabled=lead and config.progress_bar,
                                 label=f'{num_seeds} seeds')
  progress.message(f'{config.model.name}: seeds {[c.seed for c in configs]} together; '
                   f'{num_steps} steps of {config.batch_size}; data: {run.source.name}; '
                   f'kernels: {run.kernels}' + (f'; resuming at step {start_step}' if start_step else ''))

  k = run.steps_per_dispatch
  train = run.compile_train(stacked=k > 1, seeds=True)
  per_seed = zip(*[iter(r.train_inputs(start_step)) for r in runs])
  chunks = multistep.host_chunks((_stacked(x) for x in per_seed), start_step, num_steps, k,
                                 multistep.boundaries(config))
  chunks = multistep.to_devices(chunks, run.input_sharding(*([0] * (1 + (k > 1)))))
  data_tag = {'data': run.source.name, 'synthetic': bool(run.source.synthetic)}
  histories = [metrics.read_metrics(w) if lead else [] for w in workdirs]
  best = [min((h['validation_error'] for h in hist if 'validation_error' in h), default=None)
          for hist in histories]
  evals: list[dict[str, Any]] = [{} for _ in configs]

  def run_evals(step: int) -> None:
    for i, r in enumerate(runs):
      out = {}
      for role in r.source.eval_splits:
        out.update(loop.evaluate(run.eval_step, _slice(state, i), r.source, role,
                                 run.batch_sharding))
      if 'validation_error' in out:
        v = out['validation_error']
        best[i] = v if best[i] is None else min(best[i], v)
      evals[i] = out
    progress.message(f'step {step}: ' + ', '.join(
        f"seed {c.seed} {'/'.join(f'{e[x]:.2f}%' for x in e if x.endswith('_error'))}"
        for c, e in zip(configs, evals)))

  window_start, window_step = time.perf_counter(), start_step
  with loop._StopSignals() as stop:  # pylint: disable=protected-access
    try:
      for step, n, inputs in chunks:
        state, step_metrics = train(state, inputs)
        done = step + n
        is_last = done == num_steps
        boundary = {'log': done % config.log_every_steps == 0 or is_last,
                    'eval': done % config.eval_every_steps == 0 or is_last,
                    'ckpt': done % config.checkpoint_every_steps == 0 or is_last or stop.signum}
        if any(boundary.values()) and not np.all(parallel.fetch(step_metrics['finite'])):
          raise loop.NonFiniteError(
              f'A step up to {done} was not finite in seed(s) '
              f'{[c.seed for c, f in zip(configs, np.atleast_1d(parallel.fetch(step_metrics["finite"]))) if not f]}; '
              'all seeds stop. The last checkpoints (before it) are kept.')
        records = [{} for _ in configs]
        if boundary['log']:
          sums, host = parallel.fetch(state.metric_sums), parallel.fetch(step_metrics)
          per_step = (time.perf_counter() - window_start) / max(1, done - window_step)
          for i in range(num_seeds):
            records[i] = {'train_loss': float(sums['loss'][i] / sums['count'][i]),
                          'train_error': 100.0 * float(sums['error'][i] / sums['count'][i]),
                          'learning_rate': float(host['learning_rate'][i]),
                          'grad_norm': float(host['grad_norm'][i]),
                          'images_per_second': num_seeds * config.batch_size / per_step}
          progress.update(done, loss=float(np.mean([r['train_loss'] for r in records])),
                          error=float(np.mean([r['train_error'] for r in records])) / 100,
                          learning_rate=records[0]['learning_rate'],
                          images_per_second=records[0]['images_per_second'],
                          seconds_per_step=per_step)
        if boundary['eval']:
          run_evals(done)
          for rec, e in zip(records, evals):
            rec.update(e)
        if any(records):
          for writer, rec in zip(writers, records):
            writer.write(done, {**rec, **data_tag})
          window_start, window_step = time.perf_counter(), done
        if boundary['ckpt']:
          for i, ckpt in enumerate(ckpts):
            val = records[i].get('validation_error')
            ckpt.save(_slice(state, i), metrics={'validation_error': val} if val is not None else None)
        if stop.signum and not is_last:
          raise loop.RunInterrupted(stop.signum, done)
      if start_step >= num_steps:
        run_evals(num_steps)
    finally:
      for c in ckpts:
        c.close()
      for w in writers:
        w.close()
      progress.close()

  results = []
  devices = jax.devices()
  for i, (c, w) in enumerate(zip(configs, workdirs)):
    e = evals[i]
    result = {
        'model': c.model.name, 'params': int(num_params), 'steps': num_steps, 'seed': c.seed,
        'batch_size': c.batch_size, **data_tag, 'train_data': ckpts[i].data_fingerprint,
        'test_error': e.get('test_error'), 'test_top5_error': e.get('test_top5_error'),
        'test_examples': e.get('test_examples'),
        'final_validation_error': e.get('validation_error'), 'best_validation_error': best[i],
        'wall_time_seconds': time.time() - start_time, 'resumed_from_step': start_step or None,
        'parallel_seeds': [x.seed for x in configs],
        'device_kind': devices[0].device_kind, 'device_count': len(devices),
        'process_count': jax.process_count(), 'platform': devices[0].platform,
        'kernels': run.kernels, 'host_memory': host_memory.status,
        'git_commit': loop._git_commit(), 'versions': loop._versions(),  # pylint: disable=protected-access
        'config': json.loads(c.to_json_best_effort()),
    }
    if lead:
      with open(os.path.join(w, 'result.json'), 'w') as f:
        json.dump(result, f, indent=2)
    result['compilations'] = {'train_step': run.train_traces.count,
                              'eval_step': run.eval_traces.count}
    result['state'] = _slice(state, i)
    results.append(result)
  return results
