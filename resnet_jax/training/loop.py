"""The run loop: `train_and_evaluate(config, workdir)` is the whole run.

It is what `python -m resnet_jax.main` and the notebooks call: build the run
(`build.py`), restore or initialise the state, then train with evaluation,
logging and checkpoints on fixed step boundaries, and write result.json.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import threading
import time
from typing import Any, Callable

import logging

import jax
import jax.numpy as jnp
from etils import epath

from resnet_jax import analysis
from resnet_jax.kernels import host_memory
from resnet_jax.training import build as build_lib
from resnet_jax.training import checkpoints, init_from, metrics, multistep, parallel
from resnet_jax.training import workdir as workdir_lib
from resnet_jax.training.state import TrainState


class NonFiniteError(FloatingPointError):
  """The loss or the gradient norm stopped being finite."""


class RunInterrupted(Exception):
  """SIGTERM/SIGINT arrived; a checkpoint of the last finished step was written (if one finished)."""

  def __init__(self, signum: int, step: int, *, during: str = '', elsewhere: bool = False):
    name = signal.Signals(signum).name + (' (sent to another process of the run)' if elsewhere
                                          else '')
    super().__init__(
        f'Interrupted by {name} during start-up ({during}); no step was trained, nothing new was '
        'written. Run the same command again to start.' if during else
        f'Interrupted by {name} after step {step}; a checkpoint was written. Run the same '
        'command again to resume.')
    self.signum = signum
    self.step = step


# Multi-host runs poll for a stop request every this many steps (a small
# all-gather, which waits for the steps in flight); single-process runs check
# after every step at no cost.
STOP_CHECK_EVERY_STEPS = 10


def evaluate(eval_fn: Callable, state: TrainState, source: Any, role: str,
             sharding: jax.sharding.NamedSharding) -> dict[str, Any]:
  """Loss and error (percent) over every example of one evaluation split."""
  split, expected = source.eval_splits[role]
  totals = None
  for batch in parallel.device_prefetch(source.eval_batches(role), sharding):
    sums = eval_fn(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = parallel.fetch(totals)
  count = int(round(float(totals['count'])))
  if count != expected:
    raise RuntimeError(f'Evaluation on {split!r} saw {count} examples, expected {expected}.')
  out = {f'{role}_loss': float(totals['loss']) / count,
         f'{role}_error': 100.0 * (1.0 - float(totals['correct']) / count),
         f'{role}_split': split, f'{role}_examples': count}
  if source.num_classes >= 100:
    out[f'{role}_top5_error'] = 100.0 * (1.0 - float(totals['correct_top5']) / count)
  return out


def _versions() -> dict[str, str]:
  out = {'python': platform.python_version()}
  for pkg in ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'tensorflow-cpu',
              'tensorflow', 'tensorflow-datasets', 'ml_collections', 'numpy'):
    try:
      out[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      pass
  return out


@functools.cache
def _git_commit() -> str | None:
  """The commit of the code this process runs: read once, when a run starts (a run of
  hours must not record the commit checked out when it ends)."""
  try:
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=here, capture_output=True, text=True,
                         timeout=5)
    if out.returncode:
      return None
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=here,
                           capture_output=True, text=True, timeout=5).stdout.strip()
    return out.stdout.strip() + ('-dirty' if dirty else '')
  except (OSError, subprocess.SubprocessError):
    return None


class _StopSignals:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

  def __init__(self):
    self.signum = None
    self._previous = {}

  def check(self, during: str, step: int = 0) -> None:
    """Start-up's safe points: raises RunInterrupted if a signal has reached any process.

    Multi-host, this is a collective that every process reaches at the same
    point of start-up, so that a signal to one host stops all of them there
    (rather than leaving the others waiting for it in their next collective).
    """
    signum = parallel.max_over_processes(self.signum or 0)
    if signum:
      raise RunInterrupted(signum, step, during=during, elsewhere=not self.signum)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # signals only work there
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def agreed(self, step: int) -> int:
    """The signal every process stops on after `step`, 0 to go on.

    A stop request may reach only one host (a preempted machine): the processes
    agree on it together at fixed steps, so that all of them save the same step
    and stop.
    """
    if jax.process_count() == 1:
      return self.signum or 0
    if step % STOP_CHECK_EVERY_STEPS:
      return 0
    return parallel.max_over_processes(self.signum or 0)


def train_and_evaluate(config, workdir: str, *, source: Any = None) -> dict[str, Any]:
  """Trains and evaluates the configured experiment in `workdir`, resuming if it holds checkpoints.

  Returns the contents of `result.json`, plus 'state' (the final
  `TrainState`, for notebooks and analysis) and 'compilations' (how often each
  step was compiled). Raises `RunInterrupted` after writing a checkpoint on
  SIGTERM/SIGINT (during start-up: at the next safe point, writing nothing),
  `NonFiniteError` (without checkpointing) if the loss or gradient norm stops
  being finite, and `workdir.WorkdirInUseError` if another run holds `workdir`.
  """
  # The signal handlers come first: a Ctrl-C while XLA compiles must not land in C++.
  with _StopSignals() as stop, contextlib.ExitStack() as cleanup:
    return _train_and_evaluate(config, workdir, source, stop, cleanup)


def _train_and_evaluate(config, workdir: str, source: Any, stop: _StopSignals,
                        cleanup: contextlib.ExitStack) -> dict[str, Any]:
  start_time = time.time()
  _git_commit()  # the code this process imported, not what is checked out at the end
  run = build_lib.build(config, source=source)
  source, num_steps = run.source, run.num_steps
  lead = jax.process_index() == 0
  if lead:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  # One run per workdir (a local lock file; object stores cannot lock, see workdir.py);
  # details such as orbax's tracebacks go to WORKDIR/logs/run.log.
  cleanup.enter_context(workdir_lib.WorkdirLock(workdir, enabled=lead))
  if lead and workdir_lib.is_local(workdir):
    cleanup.callback(logging.getLogger().removeHandler, workdir_lib.log_to_file(workdir))
  stop.check('after building the run')
  label = 'SYNTHETIC DATA' if source.synthetic else ''
  # Refuses another experiment's checkpoints before the costly initialisation.
  ckpt = checkpoints.Checkpointer(workdir, config, num_classes=source.num_classes,
                                 data_fingerprint=source.fingerprint())
  cleanup.push(ckpt)  # closed on the way out, whichever way that is
  batch_sharding = run.batch_sharding
  state = run.init_state()
  num_params = sum(x.size for x in jax.tree.leaves(state.params))

  restored = ckpt.restore(state)
  state = state if restored is None else restored
  # Fine-tuning (init_from.py): only a run with no checkpoint of its own starts from
  # config.init_from's weights; a resumed one continues from its own, never reading it again.
  if restored is None:
    state, init_record, init_message = init_from.fresh_start(run, state, workdir, lead=lead)
  else:
    init_record, init_message = init_from.resumed(config, workdir)
  stop.check('after restoring')
  start_step = int(parallel.fetch(state.step))
  if start_step > num_steps:
    ckpt.close()
    raise ValueError(
        f'The workdir {workdir} holds a checkpoint of step {start_step}, past the '
        f'{num_steps} steps this config asks for; a shorter run cannot be resumed from it. '
        f'Use num_train_steps >= {start_step} to continue it, or a new --workdir.')
  progress = metrics.ProgressBar(num_steps, enabled=lead and config.progress_bar, label=label)
  if restored is not None:
    progress.message(f'Resuming from the checkpoint at step {start_step} in {ckpt.directory}')
    if lead:
      metrics.truncate_metrics(workdir, start_step)
  elif lead:  # an earlier attempt that stopped before its first checkpoint: start its logs anew
    workdir_lib.set_aside_aborted_attempt(workdir)
  if init_message:
    progress.message(init_message)
  if lead:
    workdir_lib.write_text(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))
  writer = metrics.MetricWriter(workdir, enabled=lead)
  progress.message(f'{config.model.name}: {num_params:,} parameters; {num_steps} steps of '
                   f'{config.batch_size} on {jax.device_count()} {jax.devices()[0].device_kind} '
                   f'device(s); data: {source.name}' + (' (synthetic)' if source.synthetic else '')
                   + f'; kernels: {run.kernels}')
  p_eval = run.eval_step
  train_fn, eval_fn = run.train_traces, run.eval_traces

  history = metrics.read_metrics(workdir) if lead else []
  best_val = min((r['validation_error'] for r in history if 'validation_error' in r), default=None)
  data_tag = {'data': source.name, 'synthetic': bool(source.synthetic)}
  roles = list(source.eval_splits)

  def run_evals(step: int) -> dict[str, Any]:
    nonlocal best_val
    out = {}
    for role in roles:
      out.update(evaluate(p_eval, state, source, role, batch_sharding))
    if 'validation_error' in out:
      best_val = out['validation_error'] if best_val is None else min(best_val, out['validation_error'])
    summary = ', '.join(f"{r} error {out[f'{r}_error']:.2f}% ({out[f'{r}_examples']} examples)"
                        for r in roles)
    progress.message(f'step {step}: {summary}')
    return out

  # Chunks of steps_per_dispatch steps that end on every log/eval/checkpoint boundary.
  # Several processes agree on a stop request every STOP_CHECK_EVERY_STEPS steps:
  # chunks of several steps end there too.
  chunks = multistep.dispatches(
      run, start_step, num_steps,
      extra_intervals=(STOP_CHECK_EVERY_STEPS,) if jax.process_count() > 1 else ())
  window_start, window_step = time.perf_counter(), start_step
  previous = None
  eval_results: dict[str, Any] = {}
  with ckpt:  # ckpt: any error waits for the save in flight
    for step, n, inputs in chunks:
      state, step_metrics = multistep.train(run, state, inputs)
      ckpt.poll()  # a background save that failed is reported now, not a checkpoint later
      if previous is not None and not parallel.fetch(previous[1]['finite']):
        _raise_nonfinite(previous[0], previous[1])
      done = step + n
      previous = (done, step_metrics)
      is_last = done == num_steps
      record = {}
      # Not on a signal: an extra record would make a resumed run's log differ.
      if done % config.log_every_steps == 0 or is_last:
        if not parallel.fetch(step_metrics['finite']):
          _raise_nonfinite(done, step_metrics)
        sums = parallel.fetch(state.metric_sums)
        elapsed = time.perf_counter() - window_start
        per_step = elapsed / max(1, done - window_step)
        host = parallel.fetch(step_metrics)
        record = {'train_loss': float(sums['loss'] / sums['count']),
                  'train_error': 100.0 * float(sums['error'] / sums['count']),
                  'learning_rate': float(host['learning_rate']),
                  'grad_norm': float(host['grad_norm']),
                  'images_per_second': config.batch_size / per_step}
        progress.update(done, loss=record['train_loss'], error=record['train_error'] / 100,
                        learning_rate=record['learning_rate'],
                        images_per_second=record['images_per_second'], seconds_per_step=per_step)
      if done % config.eval_every_steps == 0 or is_last:
        eval_results = run_evals(done)
        record.update(eval_results)
      if record:
        writer.write(done, {**record, **data_tag})
        window_start, window_step = time.perf_counter(), done
      stop_signum = stop.agreed(done)
      if done % config.checkpoint_every_steps == 0 or is_last or stop_signum:
        if not parallel.fetch(step_metrics['finite']):
          _raise_nonfinite(done, step_metrics)  # never checkpoint past a bad step
        val = eval_results.get('validation_error') if 'validation_error' in record else None
        ckpt.save(state, metrics={'validation_error': val} if val is not None else None)
      if stop_signum and not is_last:
        ckpt.close()
        writer.close()
        progress.close()
        raise RunInterrupted(stop_signum, done, elsewhere=not stop.signum)
  progress.close()
  if start_step >= num_steps:  # resumed a finished run: evaluate again for the result
    eval_results = run_evals(num_steps)
  ckpt.close()
  writer.close()
  if lead:
    _write_layer_responses(run, state, workdir, num_steps, progress)

  devices = jax.devices()
  result = {
      'model': config.model.name, 'params': int(num_params), 'steps': num_steps,
      'seed': config.seed, 'batch_size': config.batch_size, **data_tag,
      'train_data': ckpt.data_fingerprint,
      'test_error': eval_results.get('test_error'),
      'test_top5_error': eval_results.get('test_top5_error'),
      'test_examples': eval_results.get('test_examples'),
      'final_validation_error': eval_results.get('validation_error'),
      'best_validation_error': best_val,
      'wall_time_seconds': time.time() - start_time,
      'resumed_from_step': start_step or None,
      'init_from': init_record,
      'device_kind': devices[0].device_kind, 'device_count': len(devices),
      'process_count': jax.process_count(), 'platform': devices[0].platform,
      'kernels': run.kernels, 'host_memory': host_memory.status,
      'git_commit': _git_commit(), 'versions': _versions(),
      'config': json.loads(config.to_json_best_effort()),
  }
  if lead:
    (epath.Path(workdir) / 'result.json').write_text(json.dumps(result, indent=2))
  result['compilations'] = {'train_step': train_fn.count, 'eval_step': eval_fn.count}
  result['state'] = state
  return result


def _write_layer_responses(run, state, workdir: str, step: int, progress) -> None:
  """Fig. 7's layer responses of the final network on the test split, into the workdir,
  so that the report reads them and runs no network (CIFAR networks, one process)."""
  if (not analysis.wanted(run.config.model.name) or 'test' not in run.source.eval_splits
      or jax.process_count() > 1):
    return
  variables = parallel.fetch({'params': state.params, 'batch_stats': state.batch_stats})
  responses = analysis.layer_responses_from_batches(run.model, variables,
                                                    run.source.eval_batches('test'))
  analysis.write_responses(workdir, responses, role='test', step=step)
  progress.message(f'Layer responses of {len(responses)} 3x3 layers over '
                   f'{responses.num_examples} test images in {workdir}/{analysis.RESPONSES_FILE}')


def _raise_nonfinite(step: int, step_metrics: dict[str, jax.Array]) -> None:
  m = parallel.fetch(step_metrics)
  raise NonFiniteError(
      f'Step {step}: loss {float(m["loss"])} or gradient norm {float(m["grad_norm"])} is not '
      'finite; the run stops. The last checkpoint (before this step) is kept; lower the '
      'learning rate or check the data, then rerun to resume from it.')
