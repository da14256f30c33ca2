"""Command line: a trained network's error on a split of the official CIFAR files or of
ImageNet's class folders.

    python -m resnet_jax.evaluate --pretrained=cifar_resnet20 --data_dir=/data/cifar10
    python -m resnet_jax.evaluate --workdir=workdirs/cifar_resnet20 [--best] --data_dir=/data/cifar10
    python -m resnet_jax.evaluate --pretrained=NAME --data_dir=DIR --split='train[45000:]' --out=e.json
    python -m resnet_jax.evaluate --checkpoint=converted/resnet50 --data_dir=/data/imagenet [--ten_crop | --multi_scale]

The network comes as `predict` takes it (shipped weights, a run's workdir, or
one checkpoint directory, such as `resnet_jax.convert`'s torchvision weights);
the images come from the files (DIR as for `config.data.source='files'`: no
TensorFlow) through the network's own normalisation, in batches of
`--batch_size`. CIFAR networks read the official CIFAR files, uint8; ImageNet
networks read DIR/train and DIR/val class folders (imagenet_files.py) and see
the centre 224x224 crop of the image resized to 256 on its shorter side (as
torchvision's evaluation does; a run's own image_size and eval_resize where
its config is known), or with --ten_crop the 4 corner and centre crops and
their flips, softmax scores averaged (the paper's Table 3), or with
--multi_scale the whole image with its shorter side at 224, 256, 384, 480 and
640 (the longer side to the nearest multiple of 32), scores averaged (the
paper's fully convolutional testing, Table 4; --scales=... for others). It prints the top-1 error
(ImageNet: and top-5), the number of images and each class's error.

Shipped weights state the test error their run measured, and on which split:
by default that split is evaluated (else 'test'; ImageNet: 'validation'), and
the command exits with status 1 if the two differ by more than --tolerance
percentage points (the run's step and this command may sum in another order,
which can move a borderline image or two).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import sys
from typing import Any

import numpy as np

from resnet_jax.predict import add_network_arguments, load_network


def _run_data(net: dict[str, Any]) -> dict[str, Any]:
  """The data config of the run `net` comes from: shipped weights keep it under 'source',
  a checkpoint under 'config'; {} where unknown (converted weights)."""
  config = (net.get('source') or {}).get('config') or net.get('config') or {}
  return config.get('data') or {}


def stated_on(net: dict[str, Any]) -> tuple[str | None, str]:
  """(dataset, split) that the run of `net` measured its test error on.

  The dataset is None where unknown (weights without a run config); the split
  defaults to 'test'.
  """
  recorded = _run_data(net)
  return recorded.get('dataset'), recorded.get('test_split') or 'test'


def _dataset_and_split(net: dict[str, Any], dataset: str | None,
                       split: str | None) -> tuple[str, str]:
  """The dataset and split to evaluate: the flags, else what shipped weights were measured on."""
  from resnet_jax import models  # pylint: disable=g-import-not-at-top
  stated_dataset, stated_split = stated_on(net)
  if models.family(net['model']) != 'cifar':
    if dataset not in (None, 'imagenet2012'):
      raise ValueError(f"{net['model']} is an ImageNet network: evaluate it on imagenet2012, "
                       f'not {dataset}.')
    return 'imagenet2012', split or (stated_split if stated_dataset == 'imagenet2012'
                                     else 'validation')
  if dataset is None:
    num_classes = net['model_kwargs'].get('num_classes', 10)
    dataset = stated_dataset or {10: 'cifar10', 100: 'cifar100'}.get(num_classes)
    if dataset not in ('cifar10', 'cifar100'):
      raise ValueError(f"The network was trained on {dataset or f'{num_classes} classes'}; this "
                       'command reads the official CIFAR files: give --dataset=cifar10 or '
                       'cifar100 to evaluate it on them anyway.')
  elif dataset == 'imagenet2012':
    raise ValueError(f"{net['model']} is a CIFAR network: evaluate it on cifar10 or cifar100.")
  return dataset, split or stated_split


def _imagenet_probabilities(net: dict[str, Any], data_dir: str, split: str, batch_size: int,
                            ten_crop: bool, scales: tuple[int, ...] = ()
                            ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], str]:
  """(softmax scores [N, classes], labels, the class folders' names, where) of an ImageNet
  split: each image decoded as the evaluation of an ImageNet run decodes it (centre crop or
  10 crops), or with `scales` whole at each scale (the paper's multi-scale testing)."""
  from resnet_jax import configs  # pylint: disable=g-import-not-at-top
  from resnet_jax.data import imagenet_files  # pylint: disable=g-import-not-at-top
  from resnet_jax.predict import classifier  # pylint: disable=g-import-not-at-top
  listings, wnids, where = imagenet_files.load(data_dir)
  rows = imagenet_files.Rows(split, listings, '--split')
  d = configs.imagenet('resnet50').data  # 256 on the shorter side, 224 crops
  recorded = _run_data(net)  # a run's own sizes, where known
  d.image_size = int(recorded.get('image_size', d.image_size))
  d.eval_resize = int(recorded.get('eval_resize', d.eval_resize))
  d.ten_crop = ten_crop
  probabilities = classifier(net)
  if scales:  # one image at a time (images differ in shape), its scales averaged
    def scores(i):
      return np.mean([probabilities(imagenet_files.whole_image(rows.path(i), s)[None], 1)[0]
                      for s in scales], axis=0)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:  # decodes the next image meanwhile
      return (np.stack(list(pool.map(scores, range(len(rows))))), rows.labels, wnids, where)
  crops = 10 if ten_crop else 1
  size = max(1, batch_size // crops)  # images per batch
  out = []
  with concurrent.futures.ThreadPoolExecutor(imagenet_files.decode_threads(d)) as pool:
    for start in range(0, len(rows), size):
      images = np.stack(list(pool.map(lambda i: imagenet_files.eval_image(rows.path(i), d),
                                      range(start, min(start + size, len(rows))))))
      probs = probabilities(images.reshape(-1, *images.shape[-3:]), size * crops)
      out.append(probs.reshape(len(images), crops, -1).mean(1))
  return np.concatenate(out), rows.labels, wnids, where


def evaluate(net: dict[str, Any], data_dir: str, *, dataset: str | None = None,
             split: str | None = None, batch_size: int = 500,
             ten_crop: bool = False, scales: tuple[int, ...] = ()) -> dict[str, Any]:
  """{'error', 'examples', 'split', 'dataset', 'data', 'per_class_error'} of `net` on one split
  (ImageNet: also 'top5_error' and 'evaluation')."""
  from resnet_jax.data import base, cifar_files  # pylint: disable=g-import-not-at-top
  from resnet_jax.predict import classify  # pylint: disable=g-import-not-at-top
  dataset, split = _dataset_and_split(net, dataset, split)
  num_classes = net['model_kwargs'].get('num_classes', base.NUM_CLASSES[dataset])
  if num_classes != base.NUM_CLASSES[dataset]:
    raise ValueError(f"The network has {num_classes} classes and {dataset} has "
                     f'{base.NUM_CLASSES[dataset]}: give the --dataset it was trained on.')
  extra = {}
  if dataset == 'imagenet2012':
    if ten_crop and scales:
      raise ValueError('Choose --ten_crop or --multi_scale/--scales, not both.')
    scores, labels, folder_names, where = _imagenet_probabilities(net, data_dir, split,
                                                                  batch_size, ten_crop, scales)
    names = net.get('label_names') or folder_names
    top5 = np.argsort(-scores, axis=-1)[:, :5]
    evaluation = ('multi-scale ' + '/'.join(map(str, scales)) if scales
                  else '10-crop' if ten_crop else 'centre crop')
    extra = {'top5_error': 100.0 * float(np.mean(~(top5 == labels[:, None]).any(-1))),
             'evaluation': evaluation}
  else:
    if ten_crop or scales:
      raise ValueError('--ten_crop and --multi_scale are for ImageNet networks; CIFAR networks '
                       'see the whole image.')
    splits, _, where = cifar_files.load(data_dir, dataset)
    images, labels = base.resolve_split(split, splits, '--split')
    scores = classify(net, images, batch_size=batch_size)
    names = net.get('label_names') or [str(c) for c in range(num_classes)]
  wrong = scores.argmax(-1) != labels
  counts = np.bincount(labels, minlength=num_classes)
  misses = np.bincount(labels, weights=wrong, minlength=num_classes)
  per_class = {names[c]: 100.0 * float(misses[c] / counts[c])
               for c in range(num_classes) if counts[c]}
  return {'error': 100.0 * float(wrong.mean()), **extra, 'examples': int(len(labels)),
          'split': split, 'dataset': dataset, 'data': where, 'per_class_error': per_class}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m resnet_jax.evaluate', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  add_network_arguments(parser)
  parser.add_argument('--data_dir', required=True,
                      help='Holds the official CIFAR files (cifar-10-batches-py/, ...), or '
                           "ImageNet's train/ and val/ class folders.")
  parser.add_argument('--run_data_dir', default=None,
                      help="With --workdir: the run's training data, if it has moved since the "
                           'run (its normalisation is recomputed from it).')
  parser.add_argument('--dataset', choices=('cifar10', 'cifar100', 'imagenet2012'),
                      default=None, help='Default: what the network was trained on.')
  parser.add_argument('--split', default=None,
                      help="A split string as in the configs ('test', 'train[45000:]'); default: "
                           "the split shipped weights were measured on, else 'test' "
                           "(ImageNet: 'validation').")
  parser.add_argument('--batch_size', type=int, default=500,
                      help='Network inputs per batch (a 10-crop image counts 10).')
  parser.add_argument('--ten_crop', action='store_true',
                      help='ImageNet: average the scores of 10 crops (the paper\'s Table 3).')
  parser.add_argument('--multi_scale', action='store_true',
                      help='ImageNet: the whole image with its shorter side at 224, 256, 384, '
                           '480 and 640, scores averaged (the paper\'s Table 4).')
  parser.add_argument('--scales', default='',
                      help='ImageNet: multi-scale testing at these shorter sides, e.g. 256,384.')
  parser.add_argument('--tolerance', type=float, default=0.1,
                      help='Percentage points allowed between the stated and the measured error.')
  parser.add_argument('--out', help='Also write the figures to this JSON file.')
  args = parser.parse_args(argv)
  from resnet_jax.data.base import DataError  # pylint: disable=g-import-not-at-top
  try:
    scales = tuple(int(v) for v in args.scales.split(',') if v.strip()) if args.scales else ()
    if args.multi_scale and not scales:
      from resnet_jax.data.imagenet_files import PAPER_TEST_SCALES  # pylint: disable=g-import-not-at-top
      scales = PAPER_TEST_SCALES
    net = load_network(pretrained=args.pretrained, workdir=args.workdir,
                       checkpoint=args.checkpoint, best=args.best,
                       weights_dir=args.weights_dir, data_dir=args.run_data_dir)
    out = evaluate(net, args.data_dir, dataset=args.dataset, split=args.split,
                   batch_size=args.batch_size, ten_crop=args.ten_crop, scales=scales)
  except (ValueError, OSError, RuntimeError, DataError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  print(f"Network: {net['description']}")
  top5 = f", top-5 error {out['top5_error']:.2f}% ({out['evaluation']})" if 'top5_error' in out else ''
  print(f"{out['dataset']} {out['split']!r} ({out['examples']:,} images from {out['data']}): "
        f"error {out['error']:.2f}%{top5}")
  per_class = sorted(out['per_class_error'].items(), key=lambda kv: -kv[1])
  if len(per_class) > 20:
    print(f'Worst classes of {len(per_class)}: ' + ', '.join(f'{k} {v:.1f}%' for k, v in per_class[:10]))
  else:
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
