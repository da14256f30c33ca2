"""ImageNet (ILSVRC-2012) read from its class folders with Pillow and numpy: no TensorFlow.

`config.data.source='files'`, `config.data.dataset='imagenet2012'`,
`config.data.data_dir=DIR`, where DIR holds the layout that torchvision's
ImageFolder and most PyTorch recipes read:

  DIR/train/n01440764/n01440764_10026.JPEG ...   1,000 class folders, 1,281,167 images
  DIR/val/n01440764/ILSVRC2012_val_00000293.JPEG ...   the same folders, 50,000 images

or Kaggle's copy (DIR/ILSVRC/Data/CLS-LOC/{train,val}, with `val` flat and its
labels in DIR/LOC_val_solution.csv). Local paths or gs://.

Splits are tfds's: 'train' and 'validation' (slices such as 'train[:10%]' work).
Within a split the files are sorted by class folder, then by name; the labels are
the class folders' sorted order, which is also tfds imagenet2012's and
torchvision's, so weights move between them unchanged.

The augmentation and evaluation are the paper's, as in the tf.data pipeline
(imagenet.py): the shorter side resized to a random size in [min_resize,
max_resize], a random image_size square crop, a random flip, PCA lighting;
evaluation on the centre crop (or 10 crops) of the image resized to
eval_resize. Only the part of the image that becomes the crop is resized
(Pillow's `box`), which gives the pixels of resizing the whole image and then
cropping, and a JPEG at least twice the resized size is decoded at a reduced
DCT scale (Pillow's `draft`). Pillow's bilinear filter widens when it shrinks
(it antialiases, as torchvision's pipeline does); tf.image.resize's does not.

Determinism: epoch e reads the training split in a permutation drawn from
(seed, e), and the example at position i of epoch e draws its augmentation from
(seed, e, i). The stream is therefore a function of (seed, step) alone, the same
for any number of processes and threads, and a run resumed at step k reads
nothing before it. Images are decoded by `num_parallel_calls` threads (Pillow
releases the GIL while decoding and resizing); each process decodes only its own
rows of every global batch.
"""

from __future__ import annotations

import concurrent.futures
import csv
import hashlib
import io
import math
import os

import numpy as np

from resnet_jax.data import base
from resnet_jax.data.base import DataError

# Per-channel RGB means and standard deviations of ImageNet (0..255 scale). This code does
# not compute a per-pixel mean image of ImageNet (a pass over 1.28M images); 'pixel_mean'
# uses the image that is constant at these means.
IMAGENET_MEAN_RGB = (123.68, 116.78, 103.94)
IMAGENET_STD_RGB = (58.393, 57.12, 57.375)
# AlexNet PCA lighting: eigenvalues/eigenvectors of the RGB covariance of ImageNet pixels
# on a 0..1 scale (as in fb.resnet.torch). Columns are the eigenvectors.
IMAGENET_PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
IMAGENET_PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
                       (-0.5808, -0.0045, -0.8140),
                       (-0.5836, -0.6948, 0.4203))

# What a complete copy of ILSVRC-2012 holds; a copy with fewer is refused.
_EXPECTED = {'classes': 1000, 'train': 1_281_167, 'validation': 50_000}
_SPLIT_FOLDERS = {'train': 'train', 'validation': 'val'}
_KAGGLE = ('ILSVRC', 'Data', 'CLS-LOC')
_KAGGLE_VAL_LABELS = 'LOC_val_solution.csv'
_IMAGE_SUFFIXES = ('.jpeg', '.jpg', '.png')


def imagenet_normalizer(mode: str) -> tuple[np.ndarray, np.ndarray]:
  """(mean, scale) for ImageNet, normalised = (image - mean) * scale; 'pixel_mean' uses
  the constant mean image."""
  mean = np.asarray(IMAGENET_MEAN_RGB, np.float32)
  if mode == 'channel_mean_std':
    return mean, 1.0 / np.asarray(IMAGENET_STD_RGB, np.float32)
  return mean, np.ones((), np.float32)


def pca_lighting_offset(alpha: np.ndarray) -> np.ndarray:
  """The RGB offset (0..255 scale) of AlexNet's colour augmentation for the principal-
  component coefficients `alpha` [3] (drawn from N(0, std))."""
  eigvec = np.asarray(IMAGENET_PCA_EIGVEC, np.float32)
  return 255.0 * eigvec @ (np.asarray(alpha, np.float32) * np.asarray(IMAGENET_PCA_EIGVAL,
                                                                      np.float32))


def resized_shape(h: int, w: int, shorter_to: int) -> tuple[int, int]:
  """(height, width) of an h x w image whose shorter side is resized to `shorter_to`; the
  longer side is truncated, as torchvision's Resize(shorter_to) does."""
  if h <= w:
    return shorter_to, max(shorter_to, int(w * shorter_to / h))
  return max(shorter_to, int(h * shorter_to / w)), shorter_to


def decode_threads(d) -> int:
  """Threads that decode images: config.data.num_parallel_calls, or one per CPU core."""
  return d.num_parallel_calls if d.num_parallel_calls > 0 else (os.cpu_count() or 1)


def _how_to_get(data_dir: str) -> str:
  return (
      'Two ways to get them:\n'
      f'  1. extract ILSVRC2012_img_train.tar (a tar of 1,000 per-class tars) into '
      f'{data_dir}/train/<wnid>/ and ILSVRC2012_img_val.tar into {data_dir}/val/, then sort '
      'val into the same class folders (the widely used valprep.sh does it); Kaggle\'s copy '
      f'(ILSVRC/Data/CLS-LOC with {_KAGGLE_VAL_LABELS} beside ILSVRC) works as it is;\n'
      "  2. use config.data.source='tfds' with the two tars in <data_dir>/downloads/manual "
      '(tensorflow-datasets prepares imagenet2012 from them; needs TensorFlow).')


def _is_image(name: str) -> bool:
  return name.lower().endswith(_IMAGE_SUFFIXES)


def _sorted_dirs(path) -> list:
  return sorted((p for p in path.iterdir() if p.is_dir()), key=lambda p: p.name)


class Listing:
  """The files of a split: `root`, relative `names` (bytes) and int32 `labels`."""

  def __init__(self, root, names: list[str], labels: list[int]):
    self.root = root
    self.names = np.asarray([n.encode() for n in names], dtype=bytes)
    self.labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self.labels)

  def path(self, i: int):
    return self.root / self.names[i].decode()


def _class_folders(root, folders: list, wnids: list[str]) -> Listing:
  """The images in `folders` (one split's class folders, sorted), labelled by `wnids`."""
  names, labels = [], []
  index = {w: i for i, w in enumerate(wnids)}
  for folder in folders:
    if folder.name not in index:
      raise DataError(f'{folder} is a class folder that {root / "train"} does not have; the '
                      'training and validation folders must hold the same classes.')
    files = sorted(p.name for p in folder.iterdir() if _is_image(p.name))
    names += [f'{folder.parent.name}/{folder.name}/{f}' for f in files]
    labels += [index[folder.name]] * len(files)
  return Listing(root, names, labels)


def _flat_val(root, split_dir, wnids: list[str], csv_path) -> Listing:
  """Kaggle's flat val folder, labelled by LOC_val_solution.csv (ImageId, 'wnid x y x y ...')."""
  index = {w: i for i, w in enumerate(wnids)}
  truth = {}
  with csv_path.open('r') as f:
    for row in csv.DictReader(f):
      try:
        truth[row['ImageId']] = index[row['PredictionString'].split()[0]]
      except (KeyError, IndexError) as e:
        raise DataError(f'{csv_path}: row {row} does not name an image and one of the training '
                        f'classes ({type(e).__name__}: {e}); it is not Kaggle\'s '
                        f'{_KAGGLE_VAL_LABELS}.') from e
  names, labels = [], []
  for name in sorted(p.name for p in split_dir.iterdir() if _is_image(p.name)):
    stem = name.rsplit('.', 1)[0]
    if stem not in truth:
      raise DataError(f'{csv_path} has no label for {split_dir / name}.')
    names.append(f'{split_dir.name}/{name}')
    labels.append(truth[stem])
  return Listing(root, names, labels)


def find_root(data_dir):
  """(the folder that holds train/ and val/, the Kaggle labels file or None)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  if not data_dir:
    raise DataError("config.data.source='files' needs config.data.data_dir: the directory "
                    'that holds the ImageNet train/ and val/ folders.')
  top = epath.Path(data_dir)
  for root, labels in ((top, top / _KAGGLE_VAL_LABELS),
                       (top.joinpath(*_KAGGLE), top / _KAGGLE_VAL_LABELS)):
    if (root / 'train').is_dir() and (root / 'val').is_dir():
      return root, labels if labels.exists() else None
  looked = [str(top / 'train'), str(top / 'val'), str(top.joinpath(*_KAGGLE, 'train'))]
  raise DataError(f'No ImageNet folders in {data_dir}. Looked for:\n  ' + '\n  '.join(looked)
                  + '\n' + _how_to_get(str(top)))


def load(data_dir) -> tuple[dict[str, Listing], tuple[str, ...], str]:
  """{'train': Listing, 'validation': Listing}, the class names (wnids) and the folder
  they were read from. Raises DataError when the copy is not complete."""
  root, kaggle_labels = find_root(data_dir)
  train_folders = _sorted_dirs(root / 'train')
  wnids = [f.name for f in train_folders]
  if len(wnids) != _EXPECTED['classes']:
    raise DataError(f'{root / "train"} holds {len(wnids):,} class folders; ILSVRC-2012 has '
                    f'{_EXPECTED["classes"]:,}. Extract every per-class tar of '
                    'ILSVRC2012_img_train.tar into its own folder (train/<wnid>/).')
  train = _class_folders(root, train_folders, wnids)
  val_dir = root / 'val'
  val_folders = _sorted_dirs(val_dir)
  if val_folders:
    validation = _class_folders(root, val_folders, wnids)
  elif kaggle_labels is not None:
    validation = _flat_val(root, val_dir, wnids, kaggle_labels)
  else:
    raise DataError(f'{val_dir} holds no class folders, so its images have no labels. Sort '
                    'them into val/<wnid>/ folders (valprep.sh), or put Kaggle\'s '
                    f'{_KAGGLE_VAL_LABELS} in {data_dir}.')
  splits = {'train': train, 'validation': validation}
  for split, listing in splits.items():
    if len(listing) != _EXPECTED[split]:
      folder = root / _SPLIT_FOLDERS[split]
      raise DataError(f'{folder} holds {len(listing):,} images; the {split} split of '
                      f'ILSVRC-2012 has {_EXPECTED[split]:,}, so this copy is incomplete. Copy '
                      'the missing files again (to train on a part of ImageNet on purpose, keep '
                      "the full copy and use a split string such as 'train[:10%]').")
  return splits, tuple(wnids), str(root)


# ----------------------------------------------------------------------------
# Decoding and preprocessing of one image.


def _open(path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    image = Image.open(io.BytesIO(path.read_bytes()))
    image.size  # pylint: disable=pointless-statement
    return image
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{path} cannot be read as an image ({type(e).__name__}: {e}); replace it '
                    'with the file from the original archive.') from e


def crops(path, resized: tuple[int, int], corners: list[tuple[int, int]],
          size: int | tuple[int, int], image=None) -> np.ndarray:
  """uint8 [len(corners), size, size, 3] (or [.., height, width, 3] for a (height, width)
  `size`): the crops at the top-left `corners` (y, x) of the image at `path` (already opened:
  `image`) resized to `resized` (height, width), bilinear. Only the crops are resized
  (Pillow's `box`), which gives the pixels that resizing the whole image and then cropping
  gives."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = _open(path) if image is None else image
  height, width = resized
  size_h, size_w = (size, size) if isinstance(size, int) else size
  try:
    if image.format == 'JPEG' and min(image.size) >= 2 * min(resized):
      image.draft('RGB', (width, height))  # a DCT scale that keeps at least this size
    sx, sy = width / image.size[0], height / image.size[1]
    image = image.convert('RGB')
    out = [np.asarray(image.resize((size_w, size_h), Image.BILINEAR,
                                   box=(x / sx, y / sy, (x + size_w) / sx, (y + size_h) / sy)))
           for y, x in corners]
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(f'{path} cannot be decoded ({type(e).__name__}: {e}); replace it with the '
                    'file from the original archive.') from e
  return np.stack(out)


def train_image(path, rng: np.random.Generator, d) -> np.ndarray:
  """One augmented training image, float32 [S, S, 3] on the 0..255 scale, before normalisation:
  the shorter side to a random size in [min_resize, max_resize], a random S x S crop, a random
  flip, PCA lighting. Everything random comes from `rng`."""
  image = _open(path)
  w, h = image.size
  height, width = resized_shape(h, w, int(rng.integers(d.min_resize, d.max_resize + 1)))
  y = int(rng.integers(0, height - d.image_size + 1))
  x = int(rng.integers(0, width - d.image_size + 1))
  flip = rng.random() < 0.5
  alpha = rng.normal(0.0, d.pca_lighting, 3) if d.pca_lighting > 0 else None
  out = crops(path, (height, width), [(y, x)], d.image_size, image)[0]
  if flip:
    out = out[:, ::-1]
  if alpha is None:
    return out.astype(np.float32)
  return np.add(out, pca_lighting_offset(alpha), dtype=np.float32)


def eval_image(path, d) -> np.ndarray:
  """The shorter side to eval_resize, then the centre S x S crop [S, S, 3]; with ten_crop the
  4 corner and the centre crops, then their flips [10, S, S, 3]."""
  image = _open(path)
  w, h = image.size
  height, width = resized_shape(h, w, d.eval_resize)
  dy, dx = height - d.image_size, width - d.image_size  # the largest corner offsets
  centre = (int(round(dy / 2)), int(round(dx / 2)))  # as torchvision's CenterCrop
  if not d.ten_crop:
    return crops(path, (height, width), [centre], d.image_size, image)[0].astype(np.float32)
  five = crops(path, (height, width), [(0, 0), (0, dx), (dy, 0), (dy, dx), centre],
               d.image_size, image)
  return np.concatenate([five, five[:, :, ::-1]]).astype(np.float32)


# The paper's multi-scale testing (Table 4): the whole image ("fully convolutional"), its
# shorter side at each of these sizes, softmax scores averaged.
PAPER_TEST_SCALES = (224, 256, 384, 480, 640)


def whole_image(path, shorter_to: int, multiple: int = 32) -> np.ndarray:
  """float32 [H, W, 3]: the whole image at `path`, its shorter side resized to `shorter_to` and
  its longer side to the multiple of `multiple` nearest to the aspect ratio's (at least
  `multiple`), so that the images of a split come in a few shapes (one compilation each)
  and the network's stride-32 maps cover them exactly; multiple=1 keeps the aspect ratio."""
  image = _open(path)
  w, h = image.size
  height, width = resized_shape(h, w, shorter_to)
  def nearest(n):
    return max(multiple, int(round(n / multiple)) * multiple) if multiple > 1 else n
  if h <= w:
    width = nearest(width)
  else:
    height = nearest(height)
  return crops(path, (height, width), [(0, 0)], (height, width), image)[0].astype(np.float32)


# ----------------------------------------------------------------------------
# The data source.


class Rows:
  """The examples a split string selects ('train[:10%]', 'train+validation'), in order."""

  def __init__(self, split: str, listings: dict[str, Listing], key: str):
    parts = base.split_rows(split, {name: len(l) for name, l in listings.items()}, key)
    self._listings = [listings[name] for name, _, _ in parts]
    self._part = np.concatenate([np.full(hi - lo, i) for i, (_, lo, hi) in enumerate(parts)])
    self._index = np.concatenate([np.arange(lo, hi) for _, lo, hi in parts])
    self.labels = np.concatenate([listings[name].labels[lo:hi] for name, lo, hi in parts])

  def __len__(self) -> int:
    return len(self.labels)

  def path(self, i: int):
    return self._listings[self._part[i]].path(int(self._index[i]))

  def digest(self) -> str:
    """A short digest of the selected files' names and labels, in order."""
    h = hashlib.blake2b(digest_size=12)
    for part, listing in enumerate(self._listings):
      h.update(b'\n'.join(listing.names[self._index[self._part == part]].tolist()))
    h.update(self.labels.tobytes())
    return h.hexdigest()


class ImageNetFilesSource(base.DataSource):
  """ImageNet from class folders; see the module docstring."""

  def __init__(self, config, **kw):
    d = self._d = config.data
    listings, self.label_names, self.where = load(d.data_dir)
    self._train = Rows(d.train_split, listings, 'train_split')
    self._evals = {role: (split, Rows(split, listings, key))
                   for role, split, key in base.eval_roles(d)}
    super().__init__(config, name='imagenet2012', synthetic=False,
                     image_shape=(d.image_size, d.image_size, 3),
                     num_classes=base.NUM_CLASSES['imagenet2012'],
                     num_train_examples=len(self._train),
                     eval_splits={role: (split, len(rows))
                                  for role, (split, rows) in self._evals.items()}, **kw)
    self.mean, self.scale = imagenet_normalizer(d.normalization)
    self._pool = concurrent.futures.ThreadPoolExecutor(decode_threads(d),
                                                       thread_name_prefix='imagenet')

  def fingerprint(self) -> dict[str, object]:
    """The training split's size and a digest of its files (a checkpoint records both)."""
    return {'examples': self.num_train_examples, 'digest': self._train.digest()}

  def normalize(self, images: np.ndarray) -> np.ndarray:
    return ((images - self.mean) * self.scale).astype(np.float32)

  def train_batch(self, step: int, permutation: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """This process's share of the global training batch of `step`."""
    epoch, i = divmod(step, self.steps_per_epoch)
    if permutation is None:
      permutation = self.permutation(epoch)
    positions = i * self.batch_size + np.arange(self.batch_size)[self._local(self.batch_size)]
    rows = permutation[positions]
    def one(k):
      rng = base.rng(self.seed, base.AUGMENT, epoch, int(positions[k]))
      return train_image(self._train.path(int(rows[k])), rng, self._d)
    images = np.stack(list(self._pool.map(one, range(len(rows)))))
    return {'image': self.normalize(images), 'label': self._train.labels[rows]}

  def train_batches(self, start_step: int = 0):
    return base.prefetch((self.train_batch(step, permutation)
                          for step, permutation in self.steps_and_permutations(start_step)),
                         self._prefetch)

  def eval_batches(self, role: str):
    self._eval_split(role)
    _, rows = self._evals[role]
    shape = (10,) * self._d.ten_crop + self.image_shape
    def one(i):
      return eval_image(rows.path(int(i)), self._d)
    def batches():
      for idx, mask in self._eval_positions(len(rows)):
        images = np.zeros((len(idx), *shape), np.float32)
        real = np.flatnonzero(mask)
        if len(real):
          images[real] = self.normalize(np.stack(list(self._pool.map(one, idx[real]))))
        yield {'image': images, 'label': np.where(mask, rows.labels[idx], 0).astype(np.int32),
               'mask': mask}
    return base.prefetch(batches(), self._prefetch)
