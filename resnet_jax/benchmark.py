"""Speed of the real train and eval steps, and of the input pipeline.

    python -m resnet_jax.benchmark --config=experiments/cifar_resnet20.py
    python -m resnet_jax.benchmark --config=experiments/cifar_resnet56.py --torch   # side by side
    python -m resnet_jax.benchmark --config=experiments/imagenet_resnet50.py \
        --config.model.dtype=bfloat16 --config.batch_size=256
    python -m resnet_jax.benchmark --suite=gpu --json=gpu.json      # a fresh GPU machine: run first

Prints a table and writes JSON (`--json`): compile time, train and eval
images/second (median over `--steps` timed steps after warm-up, with min and
max), minor page faults per train step (with the `host_memory` settings in
force; `RESNET_JAX_MALLOC=default` for glibc's, to compare), peak memory, and
the input pipeline's images/second. The steps are
exactly `steps.train_step` / `steps.eval_step`, jit-compiled and sharded as in
training, fed one fixed on-device batch of random data (the synthetic source)
so the figures are the model's, not the data's. `--torch` also times the
PyTorch reference of the same CIFAR network (benchmarks/torch_reference.py,
needs `pip install torch`), alternating with JAX, and prints the ratios.
`--suite=gpu` runs the machine check of `benchmark_gpu.py` instead of one config.
"""

from __future__ import annotations

from resnet_jax.kernels import host_memory

host_memory.configure_for_cpu_commands()  # before JAX starts its threads

import functools  # pylint: disable=g-import-not-at-top,wrong-import-position
import importlib.util  # pylint: disable=g-import-not-at-top,wrong-import-position
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable

from absl import app, flags, logging
import jax
import numpy as np
from ml_collections import config_flags

from resnet_jax import benchmark_input
from resnet_jax import data
from resnet_jax.training import build, parallel

FLAGS = flags.FLAGS


def _define_flags():
  # Only for the command line: importing this module (tests, notebooks) must not
  # define flags that clash with resnet_jax.main's.
  config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
  flags.DEFINE_integer('steps', 20, 'Timed steps per measurement.')
  flags.DEFINE_integer('warmup', 3, 'Untimed steps after compilation.')
  flags.DEFINE_integer('rounds', 3, 'Alternating rounds (JAX, then PyTorch) with --torch.')
  flags.DEFINE_boolean('torch', False, 'Also time the PyTorch reference (CIFAR nets only).')
  flags.DEFINE_boolean('channels_last', True, 'PyTorch: channels_last memory format.')
  flags.DEFINE_boolean('pipeline', True, 'Also measure the input pipeline.')
  flags.DEFINE_string('json', '', 'Write the results here as JSON.')
  flags.DEFINE_enum('suite', '', ['', 'gpu'], 'gpu: the fresh-machine check (benchmark_gpu.py) '
                    'instead of one --config.')
  flags.DEFINE_boolean('quick', False, '--suite=gpu: small and short, for a CPU.')
  flags.DEFINE_string('cifar_dir', '', '--suite=gpu: the official CIFAR-10 files, to time the '
                      "paper's ResNet-20 recipe.")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _time_steps(step: Callable[[], Any], steps: int) -> list[float]:
  """Seconds per call, each call waited for."""
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(step())
    times.append(time.perf_counter() - start)
  return times


def _throughput(times: list[float], batch: int) -> dict[str, float]:
  rates = [batch / t for t in times]
  return {'median': statistics.median(rates), 'min': min(rates), 'max': max(rates)}


def peak_memory_bytes() -> dict[str, int | None]:
  """Peak device memory (where the backend reports it) and the process's peak RSS."""
  stats = jax.local_devices()[0].memory_stats() or {}
  rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
  return {'device_peak_bytes': stats.get('peak_bytes_in_use'), 'host_peak_rss_bytes': rss_kb * 1024}


def _call_compiled(compiled, extra, state, batch):
  return compiled(state, batch, *extra)


class JaxSteps:
  """The compiled train and eval steps of a config, with a fixed random batch."""

  def __init__(self, config):
    self.config = config
    config = config.copy_and_resolve_references()
    config.data.source = 'synthetic'  # shapes only: the steps run on a fixed random batch
    run = build.build(config)
    self.image_shape, num_classes = run.source.image_shape, run.source.num_classes
    self.state = run.init_state()
    self.kernels = run.kernels
    rng = np.random.default_rng(0)

    def batch(size):
      local = size // jax.process_count()
      return parallel.shard_batch({
          'image': rng.normal(size=(local, *self.image_shape)).astype(np.float32),
          'label': rng.integers(0, num_classes, local).astype(np.int32),
          'mask': np.ones(local, bool)}, run.batch_sharding)

    self.train_batch = {k: v for k, v in batch(config.batch_size).items() if k != 'mask'}
    self.eval_batch = batch(run.source.eval_batch_size)
    self._train, self._eval = run.train_step, run.eval_step
    self.num_params = sum(x.size for x in jax.tree.leaves(self.state.params))

  def compile(self) -> dict[str, float]:
    """Compile times (trace + XLA), seconds."""
    out = {}
    for name, fn, batch in (('train', self._train, self.train_batch),
                            ('eval', self._eval, self.eval_batch)):
      start = time.perf_counter()
      # build.Run's train step binds its resident-data argument; compile the jitted function.
      jitted, extra = getattr(fn, 'jitted', fn), getattr(fn, 'extra_args', ())
      compiled = jitted.lower(self.state, batch, *extra).compile()
      out[f'{name}_compile_seconds'] = time.perf_counter() - start
      setattr(self, f'_{name}_compiled', functools.partial(_call_compiled, compiled, extra))
    return out

  def train_step(self):
    self.state, metrics = self._train_compiled(self.state, self.train_batch)
    return metrics['loss']

  def eval_step(self):
    return self._eval_compiled(self.state, self.eval_batch)['correct']

  def time(self, steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per train and eval step, and the train steps' minor page faults per step.

    The page faults show whether the step's buffers are reused from the heap
    (`host_memory`: ~0 per step) or first-touched afresh every step (glibc's
    defaults: ~73,000 per ResNet-20 step at batch 128 on the CPU).
    """
    for _ in range(warmup):
      jax.block_until_ready(self.train_step())
      jax.block_until_ready(self.eval_step())
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    train = _time_steps(self.train_step, steps)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return {'train': train, 'eval': _time_steps(self.eval_step, steps),
            'train_page_faults': [faults / steps]}


def load_torch_reference():
  """benchmarks/torch_reference.py (outside the package; needs torch)."""
  path = os.path.join(ROOT, 'benchmarks', 'torch_reference.py')
  spec = importlib.util.spec_from_file_location('torch_reference', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _pipeline(config) -> dict[str, Any]:
  """Training-batch throughput of the config's input pipeline.

  Real data where it is prepared; otherwise, labelled as such, the same CIFAR code path on
  generated CIFAR-shaped data, or ImageNet's preprocessing on generated JPEGs (tf.data, or
  Pillow's for source='files' and where TensorFlow is not installed).
  """
  try:
    if config.data.source == 'synthetic':
      raise data.DataError('synthetic')
    return benchmark_input.pipeline_throughput(config, num_batches=200, warmup=10)
  except data.DataError:
    if config.data.dataset == 'cifar10':
      source = benchmark_input.generated_cifar_source(config)
      out = benchmark_input.pipeline_throughput(config, num_batches=200, warmup=10, source=source)
      out['name'] = 'cifar10 code path on generated data'
      return out
    if config.data.dataset == 'imagenet2012':
      import importlib.util  # pylint: disable=g-import-not-at-top
      if config.data.source == 'files' or importlib.util.find_spec('tensorflow') is None:
        out = benchmark_input.files_jpeg_throughput(config)
        out['name'] = 'imagenet files preprocessing (Pillow) on generated JPEGs'
      else:
        out = benchmark_input.jpeg_throughput(config)
        out['name'] = 'imagenet preprocessing on generated JPEGs'
      return out
    raise


def run(config, *, steps: int, warmup: int, rounds: int, use_torch: bool,
        channels_last: bool, pipeline: bool) -> dict[str, Any]:
  jax_steps = JaxSteps(config)
  result: dict[str, Any] = {
      'model': config.model.name, 'dtype': config.model.dtype, 'batch_size': config.batch_size,
      'eval_batch_size': config.eval_batch_size, 'params': int(jax_steps.num_params),
      'device_kind': jax.devices()[0].device_kind, 'device_count': jax.device_count(),
      'platform': jax.devices()[0].platform, 'cpu_count': os.cpu_count(),
      'machine': platform.machine(), 'jax': jax.__version__,
      'kernels': jax_steps.kernels,
      'host_memory': host_memory.status}
  result.update(jax_steps.compile())
  print(f"compiled: train {result['train_compile_seconds']:.1f} s, "
        f"eval {result['eval_compile_seconds']:.1f} s", file=sys.stderr, flush=True)
  torch_ref = torch_model = None
  if use_torch:
    torch_ref = load_torch_reference()
    torch_model = torch_ref.TorchBench(config.model.name, batch_size=config.batch_size,
                                       eval_batch_size=config.eval_batch_size,
                                       channels_last=channels_last,
                                       bf16=config.model.dtype == 'bfloat16')
    result['torch'] = torch_ref.versions()
  times: dict[str, list[float]] = {'train': [], 'eval': [], 'train_page_faults': [],
                                   'torch_train': [], 'torch_eval': []}
  for _ in range(rounds if use_torch else 1):
    for k, v in jax_steps.time(steps, warmup).items():
      times[k] += v
    if torch_model is not None:
      for k, v in torch_model.time(steps, warmup).items():
        times[f'torch_{k}'] += v
  result['train_images_per_second'] = _throughput(times['train'], config.batch_size)
  result['eval_images_per_second'] = _throughput(times['eval'], config.eval_batch_size)
  result['train_page_faults_per_step'] = statistics.median(times['train_page_faults'])
  if torch_model is not None:
    result['torch_train_images_per_second'] = _throughput(times['torch_train'], config.batch_size)
    result['torch_eval_images_per_second'] = _throughput(times['torch_eval'], config.eval_batch_size)
    for k in ('train', 'eval'):
      result[f'{k}_ratio_jax_over_torch'] = (result[f'{k}_images_per_second']['median']
                                             / result[f'torch_{k}_images_per_second']['median'])
  result.update(peak_memory_bytes())
  if pipeline:
    result['pipeline'] = _pipeline(config)
    result['pipeline_over_train_need'] = (result['pipeline']['images_per_s']
                                          / result['train_images_per_second']['median'])
  return result


def format_table(r: dict[str, Any]) -> str:
  def rate(key):
    v = r[key]
    return f"{v['median']:,.0f} ({v['min']:,.0f}-{v['max']:,.0f})"
  rows = [('model', f"{r['model']} ({r['params']:,} params, {r['dtype']})"),
          ('device', f"{r['device_count']} x {r['device_kind']} ({r['cpu_count']} CPU cores)"),
          ('kernels', r['kernels']),
          ('compile train / eval', f"{r['train_compile_seconds']:.1f} s / {r['eval_compile_seconds']:.1f} s"),
          (f"train img/s, batch {r['batch_size']}", rate('train_images_per_second')),
          (f"eval img/s, batch {r['eval_batch_size']}", rate('eval_images_per_second')),
          ('page faults / train step', f"{r['train_page_faults_per_step']:,.0f} "
           f"(host memory: {r['host_memory']})")]
  if 'torch_train_images_per_second' in r:
    rows += [('PyTorch train img/s', rate('torch_train_images_per_second')),
             ('PyTorch eval img/s', rate('torch_eval_images_per_second')),
             ('JAX / PyTorch train', f"{r['train_ratio_jax_over_torch']:.2f}"),
             ('JAX / PyTorch eval', f"{r['eval_ratio_jax_over_torch']:.2f}")]
  if r.get('device_peak_bytes'):
    rows.append(('peak device memory', f"{r['device_peak_bytes'] / 2**30:.2f} GiB"))
  rows.append(('peak host RSS', f"{r['host_peak_rss_bytes'] / 2**30:.2f} GiB"))
  if 'pipeline' in r:
    rows.append(('input pipeline img/s', f"{r['pipeline']['images_per_s']:,.0f} "
                 f"({r['pipeline']['name']}; {r['pipeline_over_train_need']:.1f}x the train step's need)"))
  width = max(len(k) for k, _ in rows)
  return '\n'.join(f'{k:<{width}}  {v}' for k, v in rows)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if FLAGS.suite == 'gpu':
    from resnet_jax import benchmark_gpu  # pylint: disable=g-import-not-at-top
    result = benchmark_gpu.run_suite(quick=FLAGS.quick, cifar_dir=FLAGS.cifar_dir)
    if FLAGS.json:
      with open(FLAGS.json, 'w') as f:
        json.dump(result, f, indent=2)
    return
  if FLAGS.config is None:
    raise app.UsageError('--config is required (or --suite=gpu).')
  result = run(FLAGS.config, steps=FLAGS.steps, warmup=FLAGS.warmup, rounds=FLAGS.rounds,
               use_torch=FLAGS.torch, channels_last=FLAGS.channels_last, pipeline=FLAGS.pipeline)
  print(format_table(result))
  if FLAGS.json:
    with open(FLAGS.json, 'w') as f:
      json.dump(result, f, indent=2)


if __name__ == '__main__':
  _define_flags()
  app.run(main)
