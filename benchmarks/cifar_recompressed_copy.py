"""Writes a CIFAR-10 copy whose every image is JPEG-compressed once more, in the official
python layout, to measure what one more compression costs a training run.

    python benchmarks/cifar_recompressed_copy.py --data_dir=/data/cifar10 --out_dir=/data/cifar10_q75x2

Reads CIFAR-10 in any official form (`resnet_jax.data.cifar_files`), compresses each
image at --quality with its 8x8 block grid moved by --shift pixels (so that the new
compression does not repeat the old one: at the same quality on the same grid JPEG
nearly reproduces its input), and writes `OUT_DIR/cifar-10-batches-py/` in the
original order (`cifar_files.write`). Train on it with `--config.data.source=files
--config.data.data_dir=OUT_DIR`. Prints the PSNR of the new copy against the old.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from cifar_gap_checks import psnr, recompress  # benchmarks/, beside this file


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--data_dir', required=True)
  parser.add_argument('--out_dir', required=True)
  parser.add_argument('--quality', type=int, default=75)
  parser.add_argument('--shift', type=int, default=4, help='Block-grid offset, 0-7 pixels.')
  args = parser.parse_args()
  if os.path.abspath(args.out_dir) == os.path.abspath(args.data_dir):
    parser.error('--out_dir must differ from --data_dir: the copy would replace its source.')
  from resnet_jax.data import cifar_files  # pylint: disable=g-import-not-at-top
  splits, label_names, where = cifar_files.load(args.data_dir, 'cifar10')
  again = {}
  for split in ('train', 'test'):
    images, labels = splits[split]
    again[split] = (recompress(images, args.quality, args.shift), labels)
    p = psnr(again[split][0], images)
    print(f'{split}: PSNR against {where}: median {np.median(p):.1f} dB, '
          f'1st percentile {np.percentile(p, 1):.1f} dB')
  print('wrote', cifar_files.write(args.out_dir, again, label_names))


if __name__ == '__main__':
  main()
