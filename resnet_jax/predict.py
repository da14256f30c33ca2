"""Command line: classify images with a trained network; prints the top 5 classes of each.

    python -m resnet_jax.predict --pretrained=cifar_resnet20 cat.png photos/
    python -m resnet_jax.predict --workdir=workdirs/digits_resnet20 [--best] digit.png
    python -m resnet_jax.predict --checkpoint=converted/resnet50 photos/     # resnet_jax.convert

The network comes from shipped weights (`resnet_jax.pretrained`), a run's
workdir (its newest checkpoint, or with --best the one with the lowest
validation error), or one checkpoint directory such as a converted torchvision
model. Images are prepared as that network's evaluation expects: the CIFAR-
sized networks see the image resized to 32x32; the ImageNet networks see its
shorter side resized to 256 and the centre 224x224 crop. Normalisation is the
network's own: the recorded one (shipped and converted weights) or the run's
statistics, recomputed from its training split (workdirs).

A folder stands for the image files in it (not its subfolders). An image that
cannot be read is reported on stderr and the others are still classified;
the exit code is then 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import numpy as np

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.webp', '.ppm', '.pgm', '.tif',
                    '.tiff')
CIFAR_SIZE = 32
IMAGENET_RESIZE, IMAGENET_CROP = 256, 224


def load_network(*, pretrained: str | None = None, workdir: str | None = None,
                 checkpoint: str | None = None, best: bool = False,
                 weights_dir: str | None = None, data_dir: str | None = None) -> dict[str, Any]:
  """{'model', 'model_kwargs', 'variables', 'normalize', 'label_names', 'description'} of one
  source; from a checkpoint also 'config', the run's config (empty for converted weights)."""
  if sum(x is not None for x in (pretrained, workdir, checkpoint)) != 1:
    raise ValueError('Name exactly one network: --pretrained=NAME, --workdir=DIR or '
                     '--checkpoint=DIR.')
  if best and workdir is None:
    raise ValueError('--best picks among the checkpoints of a run: use it with --workdir.')
  if pretrained is not None:
    from resnet_jax.weights import shipped  # pylint: disable=g-import-not-at-top
    net = shipped.pretrained(pretrained, directory=weights_dir)
    net['description'] = (f"pretrained {pretrained} ({net['model']}, test error "
                          f"{net['test_error']:.2f}% on {net['data']})")
    return net
  from resnet_jax.weights import loading  # pylint: disable=g-import-not-at-top
  from resnet_jax.weights import normalization  # pylint: disable=g-import-not-at-top
  path = workdir if workdir is not None else checkpoint
  info = loading.checkpoint_info(path, best=best)
  if info['normalize'] is not None:  # written by resnet_jax.convert: no run config to go by
    normalize = normalization.from_spec(info['normalize'])
    label_names = info['label_names']
  else:
    run = normalization.run_statistics(info['config'], data_dir)
    normalization.check_fingerprint(info['fingerprint'], run['fingerprint'], path)
    normalize = normalization.from_spec(run['spec'], run['stats'])
    label_names = run['label_names']
  kwargs = dict(info['model_kwargs'], conv='xla', remat=False)
  return {'model': info['model'], 'model_kwargs': kwargs,
          'variables': loading.load_variables(info['path']), 'normalize': normalize,
          'label_names': label_names, 'config': info['config'],
          'description': f"{info['model']} from {info['path']} (step {info['step']})"}


def image_files(paths: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """(image files to classify, [(path, why it is not usable)]); folders expand to their images."""
  files, problems = [], []
  for path in paths:
    if os.path.isdir(path):
      found = sorted(os.path.join(path, n) for n in os.listdir(path)
                     if not n.startswith('.') and n.lower().endswith(IMAGE_EXTENSIONS)
                     and os.path.isfile(os.path.join(path, n)))
      if not found:
        problems.append((path, f'a folder with no image files ({", ".join(IMAGE_EXTENSIONS)})'))
      files.extend(found)
    elif os.path.exists(path):
      files.append(path)
    else:
      problems.append((path, 'no such file or folder'))
  return files, problems


def prepare(path: str, family: str) -> np.ndarray:
  """uint8 RGB [H, W, 3] as the network's evaluation expects; raises OSError if unreadable."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(path) as image:
    image = image.convert('RGB')  # reads the pixels: a corrupt file fails here
  if family == 'cifar':
    image = image.resize((CIFAR_SIZE, CIFAR_SIZE), Image.BILINEAR)
  else:  # torchvision's Resize(256) + CenterCrop(224)
    w, h = image.size
    if w <= h:
      size = (IMAGENET_RESIZE, int(IMAGENET_RESIZE * h / w))
    else:
      size = (int(IMAGENET_RESIZE * w / h), IMAGENET_RESIZE)
    image = image.resize(size, Image.BILINEAR)
    left = int(round((size[0] - IMAGENET_CROP) / 2.0))
    top = int(round((size[1] - IMAGENET_CROP) / 2.0))
    image = image.crop((left, top, left + IMAGENET_CROP, top + IMAGENET_CROP))
  return np.asarray(image, np.uint8)


def class_name(net: dict[str, Any], index: int) -> str:
  names = net.get('label_names')
  return names[index] if names else f'class {index}'


def classifier(net: dict[str, Any]):
  """`classify` for one network, compiled once per input shape: a function
  (images [N, H, W, 3] uint8 RGB, or float32 on the 0..255 scale; batch_size) -> probabilities."""
  import jax  # pylint: disable=g-import-not-at-top
  from resnet_jax import models  # pylint: disable=g-import-not-at-top
  _, apply_fn = models.functional(net['model'], **net['model_kwargs'])
  apply_fn = jax.jit(apply_fn)

  def probabilities(images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    size = min(batch_size, len(images))
    out = []
    for start in range(0, len(images), size):
      chunk = net['normalize'](images[start:start + size])
      n = len(chunk)
      if n < size:  # one shape, one compilation
        chunk = np.concatenate([chunk, np.zeros((size - n, *chunk.shape[1:]), chunk.dtype)])
      out.append(np.asarray(apply_fn(net['variables'], chunk), np.float64)[:n])
    logits = np.concatenate(out)
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(-1, keepdims=True)

  return probabilities


def classify(net: dict[str, Any], images: np.ndarray, batch_size: int = 32) -> np.ndarray:
  """Class probabilities [N, classes] of uint8 RGB images [N, H, W, 3]."""
  return classifier(net)(images, batch_size)


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
  """The flags that name one network for `load_network` (predict, evaluate)."""
  parser.add_argument('--pretrained', help='Shipped weights (resnet_jax.pretrained.available()).')
  parser.add_argument('--workdir', help="A run's workdir: its newest checkpoint.")
  parser.add_argument('--best', action='store_true',
                      help='With --workdir: the checkpoint with the lowest validation error.')
  parser.add_argument('--checkpoint', help='One checkpoint directory (e.g. resnet_jax.convert output).')
  parser.add_argument('--weights_dir', help='Read --pretrained weights from this folder.')


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m resnet_jax.predict', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('images', nargs='+', metavar='IMAGE_OR_FOLDER')
  add_network_arguments(parser)
  parser.add_argument('--data_dir', help="The run's training data, if it has moved since the run.")
  parser.add_argument('--top', type=int, default=5, help='Classes to print per image.')
  args = parser.parse_args(argv)
  from resnet_jax import models  # pylint: disable=g-import-not-at-top
  try:
    net = load_network(pretrained=args.pretrained, workdir=args.workdir,
                       checkpoint=args.checkpoint, best=args.best,
                       weights_dir=args.weights_dir, data_dir=args.data_dir)
  except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: CheckpointError
    print(f'error: {e}', file=sys.stderr)
    return 2
  family = models.family(net['model'])
  files, problems = image_files(args.images)
  images, names = [], []
  for path in files:
    try:
      images.append(prepare(path, family))
      names.append(path)
    except (OSError, ValueError) as e:  # PIL: UnidentifiedImageError is an OSError
      problems.append((path, f'cannot read it as an image ({type(e).__name__}: {e})'))
  for path, why in problems:
    print(f'error: {path}: {why}', file=sys.stderr)
  print(f"Network: {net['description']}")
  if images:
    probs = classify(net, np.stack(images))
    top = max(1, min(args.top, probs.shape[1]))
    for path, p in zip(names, probs):
      print(path)
      for k in np.argsort(-p, kind='stable')[:top]:
        print(f'  {p[k]:7.2%}  {class_name(net, int(k))}')
  return 1 if problems else 0


if __name__ == '__main__':
  sys.exit(main())
