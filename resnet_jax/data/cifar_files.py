"""CIFAR-10 and CIFAR-100 read from the official files, with numpy only.

`config.data.source='files'`, `config.data.data_dir=DIR`. DIR holds one of the
official forms (or DIR is itself one of the folders):

  CIFAR-10:  cifar-10-batches-py/    (python pickles; what torchvision and Keras download)
             cifar-10-batches-bin/   (binary records)
             cifar-10-python.tar.gz or cifar-10-binary.tar.gz (read without extracting)
  CIFAR-100: cifar-100-python/, cifar-100-binary/, or their .tar.gz archives

The examples keep the official files' order: 'train' is data_batch_1 ...
data_batch_5 (CIFAR-100: train), 'test' is test_batch (test). Split strings
mean what they mean with tfds ('train[:45000]', 'train[45000:]', 'test').

The pickles are read with an unpickler that accepts only the few numpy types
the official files use, so a file of another kind is refused, never run.

`write` does the reverse for CIFAR-10: it writes images and labels (a modified
copy, say) as the official python or binary folder, which `load` and every
CIFAR reader that knows the official files then read.
"""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np

from resnet_jax.data import arrays, base
from resnet_jax.data.base import DataError

_IMAGE_BYTES = 32 * 32 * 3


class _Layout:
  def __init__(self, folder: str, archive: str, kind: str, files: dict[str, list[str]],
               meta: str, record_labels: int = 0):
    self.folder, self.archive, self.kind = folder, archive, kind
    self.files, self.meta, self.record_labels = files, meta, record_labels


_LAYOUTS = {
    'cifar10': (
        _Layout('cifar-10-batches-py', 'cifar-10-python.tar.gz', 'pickle',
                {'train': [f'data_batch_{i}' for i in range(1, 6)], 'test': ['test_batch']},
                'batches.meta'),
        _Layout('cifar-10-batches-bin', 'cifar-10-binary.tar.gz', 'binary',
                {'train': [f'data_batch_{i}.bin' for i in range(1, 6)],
                 'test': ['test_batch.bin']}, 'batches.meta.txt', record_labels=1),
    ),
    'cifar100': (
        _Layout('cifar-100-python', 'cifar-100-python.tar.gz', 'pickle',
                {'train': ['train'], 'test': ['test']}, 'meta'),
        # records: <coarse label><fine label><3072 pixels>; the fine label is used
        _Layout('cifar-100-binary', 'cifar-100-binary.tar.gz', 'binary',
                {'train': ['train.bin'], 'test': ['test.bin']}, 'fine_label_names.txt',
                record_labels=2),
    ),
}
_SIZES = {'cifar10': {'train': 50_000, 'test': 10_000},
          'cifar100': {'train': 50_000, 'test': 10_000}}
_LABEL_KEY = {'cifar10': b'labels', 'cifar100': b'fine_labels'}
_OTHER = {'cifar10': 'cifar100', 'cifar100': 'cifar10'}


def _how_to_get(dataset: str, data_dir: str) -> str:
  number = dataset[len('cifar'):]
  return (
      f'Three ways to get them:\n'
      f'  1. download cifar-{number}-python.tar.gz or cifar-{number}-binary.tar.gz from '
      f'https://www.cs.toronto.edu/~kriz/cifar.html and put it (or the folder it unpacks to) '
      f'in {data_dir};\n'
      f'  2. point config.data.data_dir at a copy you already have: torchvision '
      f'(datasets.CIFAR{number}(root=DIR, download=True)) and Keras keep '
      f'cifar-{number}-batches-py / cifar-{number}-python in DIR;\n'
      f"  3. use config.data.source='tfds' (tensorflow-datasets downloads and prepares {dataset}).")


class _Reader:
  """Reads the named files of one layout from a folder or from a .tar.gz."""

  def __init__(self, root, layout: _Layout, archive: bool):
    self.layout, self.archive = layout, archive
    self.root = root
    self.where = root / (layout.archive if archive else layout.folder)
    self._members = None

  def path(self, name: str) -> str:
    return f'{self.where}:{self.layout.folder}/{name}' if self.archive else str(self.where / name)

  def read(self, name: str) -> bytes:
    if not self.archive:
      path = self.where / name
      if not path.exists():
        raise DataError(f'{path} is missing; {self.where} should hold '
                        f'{", ".join(sum(self.layout.files.values(), []))}. '
                        'Copy the complete folder again.')
      return path.read_bytes()
    if self._members is None:
      self._members = {}
      try:
        with self.where.open('rb') as f, tarfile.open(fileobj=f, mode='r:gz') as tar:
          for member in tar:
            if member.isfile():
              self._members[member.name.split('/')[-1]] = tar.extractfile(member).read()
      except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f'{self.where} is not a readable .tar.gz ({type(e).__name__}: {e}); '
                        'it is probably truncated. Download it again.') from e
    if name not in self._members:
      raise DataError(f'{self.where} has no {self.layout.folder}/{name}; it is not the '
                      'official archive. Download it again.')
    return self._members[name]


def find(data_dir, dataset: str) -> _Reader:
  """The first official form of `dataset` in `data_dir` (folders before archives)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  if dataset not in _LAYOUTS:
    raise DataError(f"config.data.dataset={dataset!r}: the 'files' source reads 'cifar10' "
                    "and 'cifar100'.")
  if not data_dir:
    raise DataError("config.data.source='files' needs config.data.data_dir: the directory "
                    f'that holds the official {dataset} files.')
  root = epath.Path(data_dir)
  looked = []
  for layout in _LAYOUTS[dataset]:
    if root.name == layout.folder and root.is_dir():  # DIR is the folder itself
      return _Reader(root.parent, layout, archive=False)
  for archive in (False, True):  # an extracted folder (faster to read) before any archive
    for layout in _LAYOUTS[dataset]:
      candidate = root / (layout.archive if archive else layout.folder)
      looked.append(str(candidate))
      if candidate.exists():
        return _Reader(root, layout, archive)
  other = [str(root / (l.archive if a else l.folder)) for l in _LAYOUTS[_OTHER[dataset]]
           for a in (False, True) if (root / (l.archive if a else l.folder)).exists()]
  if other:
    raise DataError(f'{data_dir} holds {_OTHER[dataset]} files ({", ".join(other)}), not '
                    f"{dataset}. Set config.data.dataset='{_OTHER[dataset]}' to use them, or "
                    f'point config.data.data_dir at the {dataset} files.')
  raise DataError(f'No {dataset} files in {data_dir}. Looked for:\n  ' + '\n  '.join(looked)
                  + '\n' + _how_to_get(dataset, str(root)))


class _Unpickler(pickle.Unpickler):
  """Only the types the official CIFAR pickles contain."""
  _ALLOWED = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
              ('numpy', 'ndarray'), ('numpy', 'dtype'), ('numpy.core.multiarray', 'scalar'),
              ('numpy._core.multiarray', 'scalar'), ('_codecs', 'encode')}

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f'refusing to load {module}.{name}')


def _unpickle(payload: bytes, path: str) -> dict:
  try:
    obj = _Unpickler(io.BytesIO(payload), encoding='bytes').load()
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{path} is not a CIFAR python pickle ({type(e).__name__}: {e}). It may be '
                    'truncated or another kind of file; copy the original again.') from e
  if not isinstance(obj, dict):
    raise DataError(f'{path} holds a {type(obj).__name__}, not the dict of a CIFAR batch; '
                    'it is not an official CIFAR pickle.')
  return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _from_pickle(reader: _Reader, name: str, dataset: str) -> tuple[np.ndarray, np.ndarray]:
  path = reader.path(name)
  batch = _unpickle(reader.read(name), path)
  label_key = _LABEL_KEY[dataset].decode()
  if label_key not in batch and _LABEL_KEY[_OTHER[dataset]].decode() in batch:
    raise DataError(f'{path} is a {_OTHER[dataset]} file, not {dataset}. Set '
                    f"config.data.dataset='{_OTHER[dataset]}' or use the {dataset} files.")
  if 'data' not in batch or label_key not in batch:
    raise DataError(f'{path} has keys {sorted(batch)}, not the {dataset} batch keys '
                    f"'data' and '{label_key}'; it is not an official {dataset} pickle.")
  images = np.asarray(batch['data'])
  labels = np.asarray(batch[label_key])
  if images.dtype != np.uint8 or images.ndim != 2 or images.shape[1] != _IMAGE_BYTES:
    raise DataError(f"{path}: 'data' is {images.dtype} {list(images.shape)}; a CIFAR batch "
                    f'holds uint8 [N, {_IMAGE_BYTES}]. Copy the original file again.')
  if labels.shape != (len(images),):
    raise DataError(f'{path}: {len(labels)} labels for {len(images)} images.')
  return images, labels


def _from_binary(reader: _Reader, name: str, expected: int) -> tuple[np.ndarray, np.ndarray]:
  path, payload = reader.path(name), reader.read(name)
  record = reader.layout.record_labels + _IMAGE_BYTES
  if len(payload) != expected * record:
    hint = ''
    other = 3 - reader.layout.record_labels  # the other dataset's label bytes
    if len(payload) % (other + _IMAGE_BYTES) == 0 and len(payload) % record:
      hint = (f' Its size fits records of {other + _IMAGE_BYTES} bytes: it looks like a '
              f'{"cifar100" if other == 2 else "cifar10"} file.')
    raise DataError(f'{path} has {len(payload):,} bytes; the official file holds {expected:,} '
                    f'records of {record} bytes ({expected * record:,} bytes), so it is '
                    f'truncated or not this dataset.{hint} Copy the original file again.')
  records = np.frombuffer(payload, np.uint8).reshape(expected, record)
  return records[:, record - _IMAGE_BYTES:], records[:, record - _IMAGE_BYTES - 1]


def _label_names(reader: _Reader, dataset: str, num_classes: int) -> tuple[str, ...]:
  try:
    payload = reader.read(reader.layout.meta)
  except DataError:
    return ()
  if reader.layout.kind == 'binary':
    names = [n.strip() for n in payload.decode('utf-8', 'replace').splitlines() if n.strip()]
  else:
    meta = _unpickle(payload, reader.path(reader.layout.meta))
    key = 'label_names' if dataset == 'cifar10' else 'fine_label_names'
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(key, [])]
  return tuple(names) if len(names) == num_classes else ()


def load(data_dir, dataset: str = 'cifar10') -> tuple[dict[str, tuple[np.ndarray, np.ndarray]],
                                                     tuple[str, ...], str]:
  """{'train': (uint8 [50000, 32, 32, 3], int32 [50000]), 'test': ...}, the label
  names, and where they were read from. Raises DataError naming the bad file."""
  reader = find(data_dir, dataset)
  num_classes = base.NUM_CLASSES[dataset]
  out = {}
  for split, names in reader.layout.files.items():
    per_file = _SIZES[dataset][split] // len(names)
    parts = []
    for name in names:
      if reader.layout.kind == 'pickle':
        images, labels = _from_pickle(reader, name, dataset)
        if len(images) != per_file:
          raise DataError(f'{reader.path(name)} holds {len(images):,} images; the official file '
                          f'holds {per_file:,}. Copy the original file again.')
      else:
        images, labels = _from_binary(reader, name, per_file)
      if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(f'{reader.path(name)} has labels in [{labels.min()}, {labels.max()}]; '
                        f'{dataset} has {num_classes} classes.')
      parts.append((images, labels))
    flat = np.concatenate([p[0] for p in parts])
    images = flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # planes -> HWC
    out[split] = (np.ascontiguousarray(images), np.concatenate([p[1] for p in parts]).astype(np.int32))
  return out, _label_names(reader, dataset, num_classes), str(reader.where)


def _rows(images: np.ndarray) -> np.ndarray:
  """uint8 [N, 32, 32, 3] -> the official records: 1024 red, 1024 green, 1024 blue bytes."""
  return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), _IMAGE_BYTES))


def write(out_dir, splits: dict[str, tuple[np.ndarray, np.ndarray]], label_names,
          kind: str = 'pickle') -> str:
  """Writes CIFAR-10 `splits` ({'train': (uint8 [50000, 32, 32, 3], labels [50000]),
  'test': ... [10000]}, in the official order) as OUT_DIR/cifar-10-batches-py/ (kind
  'pickle') or OUT_DIR/cifar-10-batches-bin/ ('binary'); returns that folder.

  Refuses a folder that exists, and data of the wrong shape, type or range. Each file
  is written under a temporary name and renamed, so none is ever half-written."""
  layout = {l.kind: l for l in _LAYOUTS['cifar10']}.get(kind)
  if layout is None:
    raise ValueError(f"kind must be 'pickle' or 'binary', not {kind!r}.")
  label_names = [str(n) for n in label_names]
  if len(label_names) != 10:
    raise ValueError(f'CIFAR-10 has 10 label names; got {len(label_names)}.')
  for split, expected in _SIZES['cifar10'].items():
    images, labels = splits[split]
    if images.dtype != np.uint8 or images.shape != (expected, 32, 32, 3):
      raise ValueError(f"splits['{split}'] images must be uint8 [{expected}, 32, 32, 3] (the "
                       f'official size); got {images.dtype} {list(images.shape)}.')
    if len(labels) != expected or np.min(labels) < 0 or np.max(labels) > 9:
      raise ValueError(f"splits['{split}'] needs {expected} labels in [0, 9].")
  folder = os.path.join(os.fspath(out_dir), layout.folder)
  if os.path.exists(folder):
    raise FileExistsError(f'{folder} exists; write to another out_dir or remove it first.')
  os.makedirs(folder)

  def put(name, payload):  # under a temporary name, then renamed
    path = os.path.join(folder, name)
    with open(path + '.tmp', 'wb') as f:
      f.write(payload)
    os.replace(path + '.tmp', path)

  for split, names in layout.files.items():
    images, labels = splits[split]
    per_file = len(images) // len(names)
    for k, name in enumerate(names):
      rows = slice(per_file * k, per_file * (k + 1))
      if kind == 'binary':
        put(name, np.concatenate([np.asarray(labels[rows], np.uint8)[:, None],
                                  _rows(images[rows])], axis=1).tobytes())
      else:
        put(name, pickle.dumps(
            {b'batch_label': name.encode(), b'labels': [int(v) for v in labels[rows]],
             b'data': _rows(images[rows]),
             b'filenames': [f'{split}_{per_file * k + i:05d}.png'.encode()
                            for i in range(per_file)]}, protocol=2))
  if kind == 'binary':
    put(layout.meta, ('\n'.join(label_names) + '\n').encode())
  else:
    put(layout.meta, pickle.dumps({b'label_names': [n.encode() for n in label_names],
                                   b'num_cases_per_batch': len(splits['test'][0]),
                                   b'num_vis': _IMAGE_BYTES}, protocol=2))
  return folder


def files_source(config, **kw) -> arrays.ArraySource:
  d = config.data
  splits, label_names, where = load(d.data_dir, d.dataset)
  train = base.resolve_split(d.train_split, splits, 'train_split')
  evals = {role: (split, *base.resolve_split(split, splits, key))
           for role, split, key in base.eval_roles(d)}
  from etils import epath  # pylint: disable=g-import-not-at-top
  cache = epath.Path(d.data_dir) / 'resnet_jax_stats' / arrays.cache_name(d.dataset, 'files',
                                                                          d.train_split)
  return arrays.ArraySource(config, name=d.dataset, train=train, evals=evals,
                            stats=arrays.cached_image_statistics(train[0], cache),
                            num_classes=base.NUM_CLASSES[d.dataset], label_names=label_names,
                            **kw)

