"""Writes small ImageNet-like copies (class folders of JPEGs) for the tests of the ImageNet
`files` source, and patches what a complete copy must hold down to their size."""

import os

import numpy as np
from PIL import Image

WNIDS = ('n01440764', 'n01443537', 'n01484850')
# (width, height) in turn: landscape, portrait, and large enough to be decoded at a reduced
# scale with image_size 16.
SIZES = ((40, 30), (30, 50), (120, 90), (64, 64))


def gradient(width, height, seed):
  """A smooth uint8 RGB image, different in every channel and direction (so that a swapped
  axis, a wrong offset or a flip shows)."""
  y, x = np.mgrid[0:height, 0:width].astype(np.float64)
  r = 255 * x / max(width - 1, 1)
  g = 255 * y / max(height - 1, 1)
  b = 128 + 100 * np.sin((x + 2 * y) / 9 + seed)
  return np.clip(np.stack([r, g, b], -1), 0, 255).astype(np.uint8)


def write_imagenet(root, train_per_class=4, val_per_class=2, kaggle=False):
  """{'train': [(relative path, label)], 'validation': [...]} written under `root` in
  sorted order; with `kaggle`, val is flat and labelled by LOC_val_solution.csv."""
  base = os.path.join(root, 'ILSVRC', 'Data', 'CLS-LOC') if kaggle else str(root)
  written = {'train': [], 'validation': []}
  rows = ['ImageId,PredictionString']
  n = 0
  for label, wnid in enumerate(WNIDS):
    for split, folder, count in (('train', 'train', train_per_class),
                                 ('validation', 'val', val_per_class)):
      for i in range(count):
        w, h = SIZES[n % len(SIZES)]
        n += 1
        if split == 'train':
          name = f'{folder}/{wnid}/{wnid}_{i}.JPEG'
        else:
          stem = f'ILSVRC2012_val_{label * 100 + i:08d}'
          name = f'{folder}/{stem}.JPEG' if kaggle else f'{folder}/{wnid}/{stem}.JPEG'
          rows.append(f'{stem},{wnid} 1 2 3 4')
        path = os.path.join(base, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(gradient(w, h, n)).save(path, quality=95)
        written[split].append((name, label))
  if kaggle:
    with open(os.path.join(root, 'LOC_val_solution.csv'), 'w') as f:
      f.write('\n'.join(rows) + '\n')
  for split in written:  # the order the source reads them in
    written[split].sort()
  return written


def expect(monkeypatch, train_per_class=4, val_per_class=2):
  """What a complete copy holds, patched down to write_imagenet's copy."""
  from resnet_jax.data import imagenet_files  # pylint: disable=g-import-not-at-top
  values = {'classes': len(WNIDS), 'train': len(WNIDS) * train_per_class,
            'validation': len(WNIDS) * val_per_class}
  monkeypatch.setattr(imagenet_files, '_EXPECTED', values)
