"""Writes CIFAR-10/100 in the official forms (python pickles or binary records, as a
folder or as the .tar.gz), for the tests of the `files` source."""

import io
import os
import pickle
import tarfile

import numpy as np

CIFAR10_NAMES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship',
                 'truck']


def random_dataset(per_train_file, test, num_classes, seed=0):
  """Images and labels whose every pixel differs from image to image (order is checked)."""
  rng = np.random.default_rng(seed)
  n = 5 * per_train_file
  train = (rng.integers(0, 256, (n, 32, 32, 3), np.uint8), rng.integers(0, num_classes, n))
  tests = (rng.integers(0, 256, (test, 32, 32, 3), np.uint8), rng.integers(0, num_classes, test))
  return {'train': train, 'test': tests}


def _rows(images):
  """uint8 [N, 32, 32, 3] -> the official rows: 1024 red, 1024 green, 1024 blue bytes."""
  return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), -1))


def to_pickle(obj):
  return pickle.dumps(obj, protocol=2)


def _cifar10_files(data, kind):
  """{name: bytes} of the official CIFAR-10 folder of `kind` ('pickle' or 'binary')."""
  train_images, train_labels = data['train']
  per_file = len(train_images) // 5
  batches = [(f'data_batch_{i + 1}', train_images[i * per_file:(i + 1) * per_file],
              train_labels[i * per_file:(i + 1) * per_file]) for i in range(5)]
  batches.append(('test_batch', *data['test']))
  files = {}
  for name, images, labels in batches:
    if kind == 'pickle':
      files[name] = to_pickle({b'batch_label': name.encode(), b'labels': [int(l) for l in labels],
                             b'data': _rows(images),
                             b'filenames': [b'%d.png' % i for i in range(len(images))]})
    else:
      files[f'{name}.bin'] = np.concatenate(
          [labels.astype(np.uint8)[:, None], _rows(images)], axis=1).tobytes()
  if kind == 'pickle':
    files['batches.meta'] = to_pickle({b'label_names': [n.encode() for n in CIFAR10_NAMES],
                                     b'num_cases_per_batch': per_file, b'num_vis': 3072})
  else:
    files['batches.meta.txt'] = ('\n'.join(CIFAR10_NAMES) + '\n').encode()
  return files


def _cifar100_files(data, kind):
  files = {}
  for split in ('train', 'test'):
    images, fine = data[split]
    coarse = fine // 5
    if kind == 'pickle':
      files[split] = to_pickle({b'filenames': [b'x.png'] * len(images), b'fine_labels': list(fine),
                              b'coarse_labels': list(coarse), b'data': _rows(images)})
    else:
      files[f'{split}.bin'] = np.concatenate(
          [coarse.astype(np.uint8)[:, None], fine.astype(np.uint8)[:, None], _rows(images)],
          axis=1).tobytes()
  names = [f'class{i}' for i in range(100)]
  if kind == 'pickle':
    files['meta'] = to_pickle({b'fine_label_names': [n.encode() for n in names],
                             b'coarse_label_names': [b'c%d' % i for i in range(20)]})
  else:
    files['fine_label_names.txt'] = ('\n'.join(names) + '\n').encode()
  return files


FORMS = {  # form: (dataset, folder inside the archive or DIR, archive name or None, kind)
    'cifar-10-batches-py': ('cifar10', 'cifar-10-batches-py', None, 'pickle'),
    'cifar-10-batches-bin': ('cifar10', 'cifar-10-batches-bin', None, 'binary'),
    'cifar-10-python.tar.gz': ('cifar10', 'cifar-10-batches-py', 'cifar-10-python.tar.gz', 'pickle'),
    'cifar-10-binary.tar.gz': ('cifar10', 'cifar-10-batches-bin', 'cifar-10-binary.tar.gz',
                               'binary'),
    'cifar-100-python': ('cifar100', 'cifar-100-python', None, 'pickle'),
    'cifar-100-binary.tar.gz': ('cifar100', 'cifar-100-binary', 'cifar-100-binary.tar.gz',
                                'binary'),
}


def write_form(root, form, data):
  """Writes `data` as the official `form` under `root`; returns the written folder or archive."""
  dataset, folder, archive, kind = FORMS[form]
  files = (_cifar10_files if dataset == 'cifar10' else _cifar100_files)(data, kind)
  os.makedirs(root, exist_ok=True)
  if archive is None:
    os.makedirs(os.path.join(root, folder))
    for name, payload in files.items():
      with open(os.path.join(root, folder, name), 'wb') as f:
        f.write(payload)
    return os.path.join(root, folder)
  with tarfile.open(os.path.join(root, archive), 'w:gz', compresslevel=1) as tar:
    for name, payload in files.items():
      info = tarfile.TarInfo(f'{folder}/{name}')
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  return os.path.join(root, archive)


def official_size(per_train_file=10_000, test=10_000, num_classes=10):
  """Cheap to write and to compress: each image one grey level, from its label and index."""
  def split(n, offset):
    labels = (np.arange(n) + offset) % num_classes
    levels = (labels * 23 + np.arange(n) % 7).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (n, 32, 32, 3)).copy(), labels
  return {'train': split(5 * per_train_file, 0), 'test': split(test, 3)}
