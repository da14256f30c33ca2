"""Command line: ship a finished run's weights as `resnet_jax/weights/files/<NAME>.npz`.

    python -m resnet_jax.export --workdir=workdirs/cifar_resnet20 --name=cifar_resnet20 \
        --data_label='CIFAR-10 test set (10,000 images)'

Takes the run's final checkpoint (the one its result.json measured), its test
error and data from result.json, and its normalisation statistics recomputed
from its training split with the run's own data config (`--data_dir` if the
data has moved; the digest of the training set must match the checkpoint's).
`resnet_jax.pretrained(NAME)` then loads it, offline.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from resnet_jax.weights import normalization, shipped


def export(workdir: str, name: str, *, data_label: str | None = None,
           out_dir: str | None = None, data_dir: str | None = None,
           overwrite: bool = False) -> str:
  """Writes `<out_dir>/<name>.npz` (default: the package's weights folder); returns its path."""
  from resnet_jax import models  # pylint: disable=g-import-not-at-top
  from resnet_jax.weights import loading  # pylint: disable=g-import-not-at-top
  path = shipped.path_of(name, out_dir)
  if os.path.exists(path) and not overwrite:
    raise FileExistsError(f'{path} exists; pass --overwrite to replace it.')
  result_path = os.path.join(workdir, 'result.json')
  try:
    with open(result_path) as f:
      result = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'Cannot read {result_path} ({e}); export only a finished run, whose '
                     'result.json says what its weights achieved.') from e
  if result.get('synthetic'):
    raise ValueError(f'The run in {workdir} trained on synthetic data; its weights are not '
                     'worth shipping.')
  if result.get('test_error') is None:
    raise ValueError(f'{result_path} has no test_error (the run had no test split), so there '
                     'is no result to ship with the weights. Evaluate on a test split first.')
  info = loading.checkpoint_info(workdir)
  if info['step'] != result.get('steps'):
    raise ValueError(f"The newest checkpoint in {workdir} is of step {info['step']}, but "
                     f"result.json measured step {result.get('steps')}; the test error would not "
                     'describe these weights. Finish (resume) the run first.')
  variables = loading.load_variables(info['path'])
  kwargs = dict(info['model_kwargs'])
  if kwargs.get('scan_blocks'):
    variables = models.unroll_scanned(variables)
  # How the run computed, not what: the shipped file loads anywhere with plain XLA.
  kwargs.update(scan_blocks=False, remat=False, conv='xla')
  run = normalization.run_statistics(info['config'], data_dir)
  normalization.check_fingerprint(info['fingerprint'], run['fingerprint'], workdir)
  config = info['config']
  split = config['data'].get('test_split')
  data = data_label or f"{result['data']} {split!r} split ({result.get('test_examples')} images)"
  meta: dict[str, Any] = {
      'name': name, 'model': info['model'], 'model_kwargs': kwargs,
      'label_names': run['label_names'], 'normalize': run['spec'],
      'test_error': result['test_error'], 'test_top5_error': result.get('test_top5_error'),
      'data': data,
      'source': {'workdir': os.path.abspath(workdir), 'step': info['step'],
                 'data_source': run['source'], 'training_set': run['fingerprint'],
                 'git_commit': result.get('git_commit'), 'versions': result.get('versions'),
                 'wall_time_seconds': result.get('wall_time_seconds'), 'config': config},
  }
  return shipped.write(path, variables=variables, stats=run['stats'], meta=meta)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m resnet_jax.export', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--workdir', required=True, help='The finished run.')
  parser.add_argument('--name', required=True, help='Name for resnet_jax.pretrained(NAME).')
  parser.add_argument('--data_label', default=None,
                      help='What the test error was measured on, in words.')
  parser.add_argument('--out_dir', default=None,
                      help=f'Where to write NAME.npz (default: {shipped.FILES_DIR}).')
  parser.add_argument('--data_dir', default=None,
                      help="The run's training data, if it has moved since the run.")
  parser.add_argument('--overwrite', action='store_true', help='Replace an existing NAME.npz.')
  args = parser.parse_args(argv)
  try:
    path = export(args.workdir, args.name, data_label=args.data_label, out_dir=args.out_dir,
                  data_dir=args.data_dir, overwrite=args.overwrite)
  except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: CheckpointError
    print(f'error: {e}', file=sys.stderr)
    return 2
  net = shipped.read(path)
  print(f"Wrote {path} ({os.path.getsize(path):,} bytes): {net['model']}, test error "
        f"{net['test_error']:.2f}% on {net['data']}.")
  return 0


if __name__ == '__main__':
  sys.exit(main())
