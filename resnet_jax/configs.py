"""Base experiment configs that the files in `experiments/` build on.

Every hyperparameter of a run lives in one `ml_collections.ConfigDict`; nothing
below `main` reads flags or globals. The experiment files call `cifar(...)`,
`imagenet(...)` or `digits(...)` and override a few fields. All configs are
locked, so a mistyped key (`--config.batch_sise=64`) is an error, not a silently
ignored setting.

Durations: `num_train_steps` or `num_epochs` (exactly one is positive), and the
learning-rate boundaries either in steps (`lr_boundaries_steps`) or in epochs
(`lr_boundaries_epochs`). `optim.resolve_durations` converts epochs to steps in
one place.
"""

from __future__ import annotations

import os
from typing import Sequence
import warnings

import ml_collections


def _model(name: str, shortcut: str) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(
      name=name,
      # 'A' zero-padding identity, 'B' projection where the shape changes,
      # 'C' projection on every shortcut.
      shortcut=shortcut,
      # 'float32' or 'bfloat16' compute; parameters and BN statistics stay float32.
      dtype='float32',
      bn_momentum=0.9,
      bn_epsilon=1e-5,
      # BatchNorm statistics over groups of this many examples ("ghost" batches,
      # the paper's per-GPU BN); 0 = statistics of the whole global batch.
      ghost_batch_size=0,
      zero_init_last_bn=False,
      # Bottleneck blocks: stride on the first 1x1 (paper, v1) or on the 3x3 (v1.5).
      stride_on_3x3=False,
      # nn.scan over the identical blocks of a stage (same numbers, faster compile
      # for deep nets) and rematerialisation of each block in the backward pass.
      scan_blocks=False,
      remat=False,
      # Convolution/BatchNorm kernels (api.resolve_conv): 'auto' = oneDNN where it
      # can run (float32 on one CPU device; 2.5-3x XLA:CPU, onednn.py), else 'xla'.
      # Also 'xla', 'onednn' (error where it cannot run), 'cpu_kgrad'.
      conv='auto',
  ))


def _data(**kw) -> ml_collections.ConfigDict:
  d = dict(
      # 'tfds' (real data through tensorflow-datasets), 'files' (CIFAR-10/100
      # from the official python/binary files or archives in data_dir, numpy
      # only; ImageNet from its train/ and val/ class folders, Pillow and
      # numpy), 'synthetic' (random images, for benchmarks and smoke runs) or
      # 'digits' (scikit-learn's bundled 8x8 digits, offline demo).
      source='tfds',
      dataset='cifar10',
      # tfds: its data dir ('' = ~/tensorflow_datasets or $TFDS_DATA_DIR);
      # files: the directory holding the CIFAR files or ImageNet's train/ and
      # val/ folders. Local or gs://.
      data_dir='',
      manual_dir='',      # '' = <data_dir>/downloads/manual
      train_split='train',
      val_split='',       # '' = no validation split
      test_split='test',
      # 'pixel_mean' (the paper: mean image of the training split),
      # 'channel_mean' or 'channel_mean_std'.
      normalization='pixel_mean',
      augment=True,
      # CIFAR: pad this many pixels on each side, then random crop + flip.
      pad_pixels=4,
      # ImageNet: scale augmentation, crop, colour augmentation, evaluation.
      image_size=224,
      min_resize=256,
      max_resize=480,
      pca_lighting=0.1,   # AlexNet PCA colour augmentation std; 0 = off
      eval_resize=256,
      ten_crop=False,     # evaluation: 10 crops (corners + centre, and flips)
      shuffle_buffer=16_384,
      cache=True,
      # ImageNet decoding: tf.data's parallelism, or the files source's
      # threads; -1 = tf.data.AUTOTUNE / one thread per CPU core.
      num_parallel_calls=-1,
      prefetch=2,
      # In-memory datasets (CIFAR, digits): hold the uint8 training set on the
      # devices and gather, crop and flip each batch inside the train step; the
      # host sends only indices, crop offsets and flips (data/device.py). Same
      # batches as the host pipeline.
      device_input=False,
      # synthetic source: number of distinct examples it cycles through
      synthetic_examples=1024,
      # digits source: held-out test fraction
      digits_test_fraction=0.2,
  )
  d.update(kw)
  return ml_collections.ConfigDict(d)


def base() -> ml_collections.ConfigDict:
  """Fields common to every experiment."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 128           # global, over all devices and processes
  c.eval_batch_size = 500      # global; the last batch is padded and masked
  c.num_train_steps = -1
  c.num_epochs = -1.0
  c.eval_every_steps = 2000
  c.checkpoint_every_steps = 2000
  c.log_every_steps = 100
  c.keep_checkpoints = 3
  c.keep_best_checkpoint = False
  # Fine-tuning: start from trained weights instead of random ones
  # (training/init_from.py): a WORKDIR, a CHECKPOINT_DIR or 'pretrained:NAME'.
  # Read only when the workdir holds no checkpoint of the run itself.
  c.init_from = ''
  # Train steps per compiled call (lax.scan); logging, evaluation and
  # checkpoints still fall on the same steps (training/multistep.py).
  c.steps_per_dispatch = 1

  # Optimiser: SGD with momentum and L2 weight decay, as in the paper.
  c.learning_rate = 0.1
  c.learning_rate_per_256 = False   # True: learning_rate * batch_size / 256
  c.momentum = 0.9
  c.nesterov = False
  c.weight_decay = 1e-4
  c.weight_decay_on_bn_and_bias = True  # the paper decays all weights
  # Step decay: multiply by lr_decay_factor at each boundary.
  c.lr_boundaries_steps = ()
  c.lr_boundaries_epochs = ()
  c.lr_decay_factor = 0.1
  # Warm-up (ResNet-110): warmup_learning_rate for warmup_steps, then back to
  # learning_rate. With warmup_until_train_error > 0 the warm-up instead lasts
  # until a training batch's error first drops below that fraction.
  c.warmup_steps = 0
  c.warmup_learning_rate = 0.01
  c.warmup_until_train_error = 0.0

  # Devices and hosts.
  c.distributed = 'auto'   # 'auto' | 'yes' | 'no': call jax.distributed.initialize()
  c.coordinator_address = ''
  c.num_processes = 0
  c.process_id = -1
  c.progress_bar = True
  return c


def cifar(model_name: str, **overrides) -> ml_collections.ConfigDict:
  """The paper's CIFAR-10 recipe (Section 4.2).

  Batch 128, lr 0.1 divided by 10 at 32k and 48k iterations, stop at 64k,
  weight decay 1e-4, momentum 0.9, 45k/5k train/validation split, the 10k test
  split for the final figure.
  """
  c = base()
  c.model = _model(model_name, shortcut='A')
  c.data = _data(dataset='cifar10', train_split='train[:45000]',
                 val_split='train[45000:]', test_split='test')
  c.num_train_steps = 64_000
  c.lr_boundaries_steps = (32_000, 48_000)
  c.eval_every_steps = 2_000
  c.checkpoint_every_steps = 2_000
  c.update(overrides)
  return c


def imagenet(model_name: str, shortcut: str = 'B', **overrides) -> ml_collections.ConfigDict:
  """The paper's ImageNet recipe (Section 3.4).

  Batch 256, lr 0.1 divided by 10 "when the error plateaus" (here at fixed
  epochs 30 and 60), 90 epochs, weight decay 1e-4, momentum 0.9; scale
  augmentation [256, 480], 224 crops, PCA colour augmentation.
  """
  c = base()
  c.model = _model(model_name, shortcut=shortcut)
  c.data = _data(dataset='imagenet2012', train_split='train', val_split='',
                 test_split='validation', cache=False)
  c.batch_size = 256
  c.eval_batch_size = 250
  c.num_epochs = 90.0
  c.lr_boundaries_epochs = (30.0, 60.0)
  c.eval_every_steps = 5_000
  c.checkpoint_every_steps = 5_000
  c.log_every_steps = 100
  c.update(overrides)
  return c


def digits(model_name: str = 'cifar_resnet20', **overrides) -> ml_collections.ConfigDict:
  """Offline demo: the CIFAR pipeline and networks on scikit-learn's digits."""
  c = base()
  c.model = _model(model_name, shortcut='A')
  c.data = _data(source='digits', dataset='digits', train_split='train',
                 val_split='', test_split='test', pad_pixels=4)
  c.batch_size = 64
  c.eval_batch_size = 200
  c.num_train_steps = 600
  c.lr_boundaries_steps = (400, 500)
  c.eval_every_steps = 200
  c.checkpoint_every_steps = 200
  c.log_every_steps = 20
  c.update(overrides)
  return c


def lock(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  config.lock()
  return config


def experiments_dir() -> str:
  """The repository's experiments/ directory (the package is installed editable)."""
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'experiments')


def experiment_path(experiment: str) -> str:
  """experiments/<experiment>.py, or the path itself if `experiment` is a .py file."""
  path = experiment if experiment.endswith('.py') else os.path.join(experiments_dir(),
                                                                     f'{experiment}.py')
  if not os.path.isfile(path):
    known = sorted(f[:-3] for f in os.listdir(experiments_dir()) if f.endswith('.py'))
    raise ValueError(f'No experiment {experiment!r} (no file {path}). Experiments: '
                     f'{", ".join(known)}.')
  return path


def load(experiment: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The locked config `python -m resnet_jax.main --config=<experiment> *overrides` builds.

  `experiment` is a name in experiments/ ('cifar_resnet20') or a path to a
  config file; `overrides` are command-line flags ('--config.batch_size=64').
  This is the one way main, sweep, the benchmarks and the tests load configs.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  path = experiment_path(experiment)
  argv = ['resnet_jax', f'--config={path}', *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  with warnings.catch_warnings():  # ml_collections loads the file with a deprecated importlib call
    warnings.simplefilter('ignore', DeprecationWarning)
    fv(argv)
  return fv.config
