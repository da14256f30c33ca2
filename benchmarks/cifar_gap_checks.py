"""Checks behind the real-CIFAR-10 error gap (README, "Real CIFAR-10"). Prints, asserts nothing.

    python benchmarks/cifar_gap_checks.py --checkpoint=RUN/checkpoints/48000 --data_dir=DIR

Where a trained CIFAR-10 network's test error sits well above the paper's, these
separate the code from the data, on that network:
- kernels: the training loss and gradient of one real, augmented batch of 128
  with the oneDNN kernels the CPU run trains with against XLA's own (relative
  difference of the whole gradient, and of the BatchNorm statistics).
- confusion: the test confusion matrix and the number of confidently wrong
  predictions; label noise would spread errors across unrelated classes.
- recompress: the test error after one more JPEG compression of the test
  images, at the copy's quality on a shifted 8x8 block grid (a fresh
  compression of the kind the copy went through, not a repeat of it) and at
  other settings, with the PSNR of each against the copy: how much the
  network's decisions depend on the detail such a compression removes.
"""

from __future__ import annotations

import argparse
import io

import numpy as np


def recompress(images: np.ndarray, quality: int, shift: int) -> np.ndarray:
  """`images` [N, 32, 32, 3] uint8 compressed once more as JPEG at `quality`, the 8x8 block grid
  moved by `shift` pixels (reflection padding, cropped back after decoding)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  out = np.empty_like(images)
  pad = ((shift, 8 - shift),) * 2 + ((0, 0),) if shift else None
  for i, image in enumerate(images):
    big = np.pad(image, pad, mode='reflect') if shift else image
    buffer = io.BytesIO()
    Image.fromarray(big).save(buffer, 'JPEG', quality=quality)
    decoded = np.asarray(Image.open(buffer).convert('RGB'))
    out[i] = decoded[shift:shift + image.shape[0], shift:shift + image.shape[1]]
  return out


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  mse = ((a.astype(np.float64) - b) ** 2).reshape(len(a), -1).mean(1)
  return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def kernels(net, images, labels, seed: int = 0) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  import resnet_jax  # pylint: disable=g-import-not-at-top
  from resnet_jax.data import arrays  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  rows = rng.choice(len(images), 128, replace=False)
  offsets, flips = arrays.augment_params(rng, 128, 4)
  x = jnp.asarray(arrays.crop_and_flip(net['normalize'](images[rows]), 4, offsets, flips))
  y = jnp.asarray(labels[rows])
  variables = jax.tree.map(jnp.asarray, net['variables'])
  results = {}
  for conv in ('xla', 'onednn'):
    model = resnet_jax.create_model(net['model'], conv=conv)

    def loss(params, model=model):
      logits, updates = model.apply({'params': params, 'batch_stats': variables['batch_stats']},
                                    x, train=True, mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), updates

    results[conv] = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  flat = lambda tree: np.concatenate([np.ravel(a) for a in jax.tree.leaves(tree)])
  (l0, u0), g0 = results['xla']
  (l1, u1), g1 = results['onednn']
  print(f'loss: XLA {float(l0):.7f}, oneDNN {float(l1):.7f}')
  a, b = flat(g1), flat(g0)
  print(f'gradient: relative difference {np.linalg.norm(a - b) / np.linalg.norm(b):.2e} '
        f'(norm {np.linalg.norm(b):.4f})')
  a, b = flat(u1), flat(u0)
  print(f'BatchNorm statistics: largest relative difference {np.abs(a - b).max() / np.abs(b).max():.2e}')


def confusion(net, images, labels, classify) -> np.ndarray:
  probs = classify(images, 500)
  pred = probs.argmax(-1)
  names = [n[:5] for n in net['label_names']]
  matrix = np.zeros((len(names), len(names)), int)
  np.add.at(matrix, (labels, pred), 1)
  print(f'test error {100 * np.mean(pred != labels):.2f}%; rows: true class, columns: predicted')
  print('      ' + ' '.join(f'{n:>5}' for n in names))
  for name, row in zip(names, matrix):
    print(f'{name:>5} ' + ' '.join(f'{v:5d}' for v in row))
  wrong = pred != labels
  for level in (0.9, 0.99):
    print(f'wrong with probability > {level}: {int(np.sum(wrong & (probs.max(-1) > level)))}')
  return probs


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--checkpoint', required=True, help='A CIFAR-10 run checkpoint directory.')
  parser.add_argument('--data_dir', required=True, help='The CIFAR-10 files the run trained on.')
  parser.add_argument('--checks', default='kernels,confusion,recompress')
  args = parser.parse_args()
  from resnet_jax import predict  # pylint: disable=g-import-not-at-top
  from resnet_jax.data import base, cifar_files  # pylint: disable=g-import-not-at-top
  net = predict.load_network(checkpoint=args.checkpoint, data_dir=args.data_dir)
  splits, _, _ = cifar_files.load(args.data_dir, 'cifar10')
  checks = args.checks.split(',')
  if 'kernels' in checks:
    print('== kernels: oneDNN against XLA on one augmented training batch')
    kernels(net, *base.resolve_split(net['config']['data']['train_split'], splits, 'train'))
  images, labels = base.resolve_split('test', splits, 'test')
  classify = predict.classifier(net)
  if 'confusion' in checks:
    print('== confusion on the test set')
    confusion(net, images, labels, classify)
  if 'recompress' in checks:
    print('== test images compressed once more')
    error = lambda x: 100 * float(np.mean(classify(x, 500).argmax(-1) != labels))
    print(f'as stored: {error(images):.2f}%')
    for quality, shift in ((75, 0), (75, 4), (90, 4), (50, 4)):
      again = recompress(images, quality, shift)
      p = psnr(again, images)
      print(f'JPEG quality {quality}, grid shifted {shift} px: PSNR against the copy median '
            f'{np.median(p):.1f} dB (1st percentile {np.percentile(p, 1):.1f}); '
            f'test error {error(again):.2f}%')


if __name__ == '__main__':
  main()
