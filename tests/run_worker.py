"""Runs a short training job in a fresh process and saves what tests compare.

    python tests/run_worker.py OUT.npz WORKDIR key=value ...

The config is `configs.digits('cifar_resnet20')` with the given overrides
(values parsed as Python literals). The process's device count comes from
XLA_FLAGS; a 'distributed' process also gets coordinator settings as overrides.
Saves the final parameters, batch statistics and optimiser state (flattened)
and the logged training losses.
"""

import ast
import os
import signal
import sys

# This checkout's package, not whichever one the environment has installed
# (a script's sys.path[0] is tests/, not the repository).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
from flax import traverse_util

from resnet_jax import configs
from resnet_jax.training import metrics
from resnet_jax.training import parallel
from resnet_jax.training import loop


def _signal_self_after_build():
  """RUN_WORKER_SIGTERM_AFTER_BUILD=1: this process gets SIGTERM while start-up is still going."""
  from resnet_jax.training import build as build_lib  # pylint: disable=g-import-not-at-top
  real_build = build_lib.build

  def build_then_sigterm(*args, **kwargs):
    run = real_build(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGTERM)
    return run
  build_lib.build = build_then_sigterm


def main(out, workdir, *overrides):
  if os.environ.get('RUN_WORKER_SIGTERM_AFTER_BUILD') == '1':
    _signal_self_after_build()
  config = configs.digits('cifar_resnet20')
  config.progress_bar = False
  for item in overrides:
    key, value = item.split('=', 1)
    try:
      value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      pass
    target = config
    *path, last = key.split('.')
    for part in path:
      target = target[part]
    target[last] = value
  try:
    result = loop.train_and_evaluate(config, workdir)
  except loop.RunInterrupted as e:  # as resnet_jax.main exits
    print(e, flush=True)
    sys.exit(128 + e.signum)
  state = parallel.fetch(result['state'])
  arrays = {}
  for name in ('params', 'batch_stats'):
    for k, v in traverse_util.flatten_dict(getattr(state, name), sep='/').items():
      arrays[f'{name}/{k}'] = np.asarray(v)
  for i, leaf in enumerate(jax.tree.leaves(state.opt_state)):
    arrays[f'opt_state/{i}'] = np.asarray(leaf)
  losses = [r['train_loss'] for r in metrics.read_metrics(workdir)]
  if jax.process_index() == 0:
    np.savez(out, losses=np.asarray(losses), test_error=result['test_error'], **arrays)


if __name__ == '__main__':
  main(*sys.argv[1:])
