"""Command line: a trained CIFAR network's error on a split of the official CIFAR files.

    python -m resnet_jax.evaluate --pretrained=cifar_resnet20 --data_dir=/data/cifar10
    python -m resnet_jax.evaluate --workdir=workdirs/cifar_resnet20 [--best] --data_dir=/data/cifar10
    python -m resnet_jax.evaluate --pretrained=NAME --data_dir=DIR --split='train[45000:]' --out=e.json

The network comes as `predict` takes it (shipped weights, a run's workdir, or
one checkpoint directory); the images come from the official files (DIR as
for `config.data.source='files'`: numpy only, no TensorFlow), uint8, through
the network's own normalisation, in batches of `--batch_size`. It prints the
top-1 error, the number of images and each class's error.

Shipped weights state the test error their run measured, and on which split:
by default that split is evaluated (else 'test'), and the command exits with
status 1 if the two differ by more than --tolerance percentage points (the
run's step and this command may sum in another order, which can move a
borderline image or two).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import numpy as np

from resnet_jax.predict import add_network_arguments, load_network


def stated_on(net: dict[str, Any]) -> tuple[str | None, str]:
  """(dataset, split) that the run of shipped weights measured its test error on.

  The dataset is None where unknown (weights without a run config); the split
  defaults to 'test'.
  """
  recorded = ((net.get('source') or {}).get('config') or {}).get('data') or {}
  return recorded.get('dataset'), recorded.get('test_split') or 'test'


def _dataset_and_split(net: dict[str, Any], dataset: str | None,
                       split: str | None) -> tuple[str, str]:
  """The dataset and split to evaluate: the flags, else what shipped weights were measured on."""
  stated_dataset, stated_split = stated_on(net)
  if dataset is None:
    num_classes = net['model_kwargs'].get('num_classes', 10)
    dataset = stated_dataset or {10: 'cifar10', 100: 'cifar100'}.get(num_classes)
    if dataset not in ('cifar10', 'cifar100'):
      raise ValueError(f"The network was trained on {dataset or f'{num_classes} classes'}; this "
                       'command reads the official CIFAR files: give --dataset=cifar10 or '
                       'cifar100 to evaluate it on them anyway.')
  return dataset, split or stated_split


def evaluate(net: dict[str, Any], data_dir: str, *, dataset: str | None = None,
             split: str | None = None, batch_size: int = 500) -> dict[str, Any]:
  """{'error', 'examples', 'split', 'dataset', 'per_class_error'} of `net` on one split."""
  from resnet_jax import models  # pylint: disable=g-import-not-at-top
  from resnet_jax.data import base, cifar_files  # pylint: disable=g-import-not-at-top
  from resnet_jax.predict import classify  # pylint: disable=g-import-not-at-top
  if models.family(net['model']) != 'cifar':
    raise ValueError(f"{net['model']} is an ImageNet network; this command evaluates the CIFAR "
                     'networks on the official CIFAR files. For ImageNet, resume its run with '
                     'python -m resnet_jax.main (it evaluates on the validation split).')
  dataset, split = _dataset_and_split(net, dataset, split)
  splits, _, where = cifar_files.load(data_dir, dataset)
  images, labels = base.resolve_split(split, splits, '--split')
  num_classes = net['model_kwargs'].get('num_classes', base.NUM_CLASSES[dataset])
  if num_classes != base.NUM_CLASSES[dataset]:
    raise ValueError(f"The network has {num_classes} classes and {dataset} has "
                     f'{base.NUM_CLASSES[dataset]}: give the --dataset it was trained on.')
  predicted = classify(net, images, batch_size=batch_size).argmax(-1)
  wrong = predicted != labels
  names = net.get('label_names') or [str(c) for c in range(num_classes)]
  counts = np.bincount(labels, minlength=num_classes)
  misses = np.bincount(labels, weights=wrong, minlength=num_classes)
  per_class = {names[c]: 100.0 * float(misses[c] / counts[c])
               for c in range(num_classes) if counts[c]}
  return {'error': 100.0 * float(wrong.mean()), 'examples': int(len(labels)), 'split': split,
          'dataset': dataset, 'data': where, 'per_class_error': per_class}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m resnet_jax.evaluate', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_network_arguments(parser)
  parser.add_argument('--data_dir', required=True,
                      help='Holds the official CIFAR files (cifar-10-batches-py/, ...).')
  parser.add_argument('--run_data_dir', default=None,
                      help="With --workdir: the run's training data, if it has moved since the "
                           'run (its normalisation is recomputed from it).')
  parser.add_argument('--dataset', choices=('cifar10', 'cifar100'), default=None,
                      help='Default: what the network was trained on.')
  parser.add_argument('--split', default=None,
                      help="A split string as in the configs ('test', 'train[45000:]'); default: "
                           "the split shipped weights were measured on, else 'test'.")
  parser.add_argument('--batch_size', type=int, default=500)
  parser.add_argument('--tolerance', type=float, default=0.1,
                      help='Percentage points allowed between the stated and the measured error.')
  parser.add_argument('--out', help='Also write the figures to this JSON file.')
  args = parser.parse_args(argv)
  from resnet_jax.data.base import DataError  # pylint: disable=g-import-not-at-top
  try:
    net = load_network(pretrained=args.pretrained, workdir=args.workdir,
                       checkpoint=args.checkpoint, best=args.best,
                       weights_dir=args.weights_dir, data_dir=args.run_data_dir)
    out = evaluate(net, args.data_dir, dataset=args.dataset, split=args.split,
                   batch_size=args.batch_size)
  except (ValueError, OSError, RuntimeError, DataError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f"Network: {net['description']}")
  print(f"{out['dataset']} {out['split']!r} ({out['examples']:,} images from {out['data']}): "
        f"error {out['error']:.2f}%")
  print('Per class: ' + ', '.join(f'{k} {v:.1f}%' for k, v in out['per_class_error'].items()))
  status = 0
  if args.pretrained is not None:
    stated = float(net['test_error'])
    out['stated_error'], out['stated_on'] = stated, net['data']
    stated_dataset, stated_split = stated_on(net)
    if (out['dataset'], out['split']) != (stated_dataset or out['dataset'], stated_split):
      print(f"Stated: {stated:.2f}% on {net['data']}: another split, not compared.")
    else:
      agrees = abs(out['error'] - stated) <= args.tolerance
      print(f"Stated: {stated:.2f}% on {net['data']}; measured {out['error']:.2f}%: "
            + ('agrees.' if agrees else f'DIFFERS by more than {args.tolerance} points.'))
      status = 0 if agrees else 1
  if args.out:
    with open(args.out, 'w') as f:
      json.dump(out, f, indent=2)
  return status


if __name__ == '__main__':
  sys.exit(main())
