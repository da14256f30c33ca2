"""The first command on a fresh GPU machine: is it set up, and how fast is it?

    python -m resnet_jax.benchmark --suite=gpu --json=gpu.json
    python -m resnet_jax.benchmark --suite=gpu --json=gpu.json --cifar_dir=/data/cifar10
    python -m resnet_jax.benchmark --suite=gpu --quick --json=cpu.json   # a few minutes on a CPU

In about 8 minutes on one GPU, and in one JSON file:
1. the devices JAX sees and the convolution kernels each network uses;
2. the fast model and train-step tests, run by pytest on that device (pass/fail counts);
3. train and eval images/s of the real compiled steps on random data
   (`benchmark.JaxSteps`): ResNet-20, -56 and -110 at batch 128 in float32 and
   bfloat16, and ResNet-50 at batch 256 in bfloat16 on ImageNet-shaped data;
4. with `--cifar_dir` (the official CIFAR-10 files), the paper's ResNet-20 recipe
   against the clock: a few hundred steps on the real input pipeline and one
   pass over the evaluation splits, extrapolated to the whole recipe.

`--quick` is the same on a CPU: ResNet-20 at batch 8, two timed steps, one tiny
test. No TensorFlow is needed.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

import jax

from resnet_jax import configs
from resnet_jax.training import build, parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# pytest ids of fast tests of the models and the train step; they run on the default device.
GPU_TESTS = (
    'tests/test_models.py::test_resnet20_has_exactly_269722_parameters',
    'tests/test_models.py::test_cifar_network_matches_an_independent_reference',
    'tests/test_models.py::test_output_shapes_and_train_mode_updates_batch_stats_only_when_training',
    'tests/test_models.py::test_functional_api_matches_the_module_and_is_jittable',
    'tests/test_models.py::test_bfloat16_compute_keeps_float32_parameters_and_statistics',
    'tests/test_models.py::test_ghost_batch_norm_over_the_whole_batch_equals_batch_norm',
    'tests/test_train.py::test_loss_falls_on_a_fixed_batch',
    'tests/test_train.py::test_nonfinite_step_leaves_the_state_unchanged',
)
QUICK_TESTS = ('tests/test_models.py::test_resnet20_has_exactly_269722_parameters',)

# (config, model, batch size, dtypes): the networks of the paper a GPU user trains first.
FULL = [('cifar', 'cifar_resnet20', 128, ('float32', 'bfloat16')),
        ('cifar', 'cifar_resnet56', 128, ('float32', 'bfloat16')),
        ('cifar', 'cifar_resnet110', 128, ('float32', 'bfloat16')),
        ('imagenet', 'resnet50', 256, ('bfloat16',))]
QUICK = [('cifar', 'cifar_resnet20', 8, ('float32', 'bfloat16'))]


def _say(text: str) -> None:
  print(text, file=sys.stderr, flush=True)


def devices() -> list[dict[str, Any]]:
  return [{'id': d.id, 'platform': d.platform, 'kind': d.device_kind,
           'process_index': d.process_index} for d in jax.devices()]


def run_tests(test_ids: tuple[str, ...], timeout: float = 300) -> dict[str, Any]:
  """Runs pytest on `test_ids` in a subprocess; pass/fail counts from its summary line."""
  start = time.perf_counter()
  try:
    out = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                          *test_ids], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, check=False)
    text, code = out.stdout + out.stderr, out.returncode
  except subprocess.TimeoutExpired as e:
    text, code = f'timed out after {timeout} s: {e}', -1
  counts = {k: 0 for k in ('passed', 'failed', 'errors', 'skipped')}
  for number, word in re.findall(r'(\d+) (passed|failed|errors?|skipped)', text):
    counts['errors' if word.startswith('error') else word] = int(number)
  return {'ids': list(test_ids), 'returncode': code, **counts,
          'seconds': time.perf_counter() - start, 'output_tail': text[-2000:]}


def _config(kind: str, model: str, batch: int, dtype: str):
  config = configs.cifar(model) if kind == 'cifar' else configs.imagenet(model)
  config.batch_size = config.eval_batch_size = batch
  config.model.dtype = dtype
  config.data.source = 'synthetic'
  config.progress_bar = False
  return config


def throughput(kind: str, model: str, batch: int, dtype: str, *, steps: int,
               warmup: int) -> dict[str, Any]:
  """Train and eval images/s (median of `steps` timed steps) of one network."""
  from resnet_jax import benchmark  # pylint: disable=g-import-not-at-top
  jax_steps = benchmark.JaxSteps(_config(kind, model, batch, dtype))
  out = {'model': model, 'dtype': dtype, 'batch_size': batch, 'kernels': jax_steps.kernels,
         'image_shape': list(jax_steps.image_shape), **jax_steps.compile()}
  times = jax_steps.time(steps, warmup)
  for split in ('train', 'eval'):
    out[f'{split}_images_per_second'] = batch / statistics.median(times[split])
  return out


def recipe_clock(cifar_dir: str, *, steps: int, warmup: int = 5) -> dict[str, Any]:
  """The paper's ResNet-20 recipe on the real CIFAR-10 files: `steps` timed training
  steps through the real input pipeline and one timed pass over each evaluation
  split, extrapolated to the recipe's steps and evaluations."""
  config = configs.cifar('cifar_resnet20')
  config.data.source, config.data.data_dir = 'files', cifar_dir
  run = build.build(config)
  state = run.init_state()
  batches = parallel.device_prefetch(run.source.train_batches(0), run.batch_sharding)
  start = time.perf_counter()
  for _ in range(warmup):  # includes the compilation
    state, metrics = run.train_step(state, next(batches))
  jax.block_until_ready(metrics)
  compile_and_warmup = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = run.train_step(state, next(batches))
  jax.block_until_ready(metrics)
  per_step = (time.perf_counter() - start) / steps
  eval_seconds = {}
  for role in run.source.eval_splits:
    for timed in (False, True):  # the first pass compiles
      start = time.perf_counter()
      for batch in parallel.device_prefetch(run.source.eval_batches(role), run.batch_sharding):
        sums = run.eval_step(state, batch)
      jax.block_until_ready(sums)
      if timed:
        eval_seconds[role] = time.perf_counter() - start
  num_evals = -(-run.num_steps // config.eval_every_steps)
  total = compile_and_warmup + run.num_steps * per_step + num_evals * sum(eval_seconds.values())
  return {'model': config.model.name, 'batch_size': config.batch_size,
          'recipe_steps': run.num_steps, 'timed_steps': steps, 'seconds_per_step': per_step,
          'train_images_per_second': config.batch_size / per_step,
          'eval_seconds': eval_seconds, 'evaluations': num_evals,
          'compile_and_warmup_seconds': compile_and_warmup,
          'estimated_recipe_seconds': total}


def run_suite(*, quick: bool = False, cifar_dir: str = '', steps: int | None = None,
              recipe_steps: int = 300) -> dict[str, Any]:
  """The whole check; returns what the JSON file holds."""
  start = time.perf_counter()
  result: dict[str, Any] = {'suite': 'gpu', 'quick': quick, 'devices': devices(),
                            'platform': jax.devices()[0].platform,
                            'device_count': jax.device_count(), 'jax': jax.__version__}
  for d in result['devices']:
    _say(f"device {d['id']}: {d['platform']} {d['kind']} (process {d['process_index']})")
  _say('running the model and train-step tests ...')
  result['tests'] = run_tests(QUICK_TESTS if quick else GPU_TESTS)
  t = result['tests']
  _say(f"tests: {t['passed']} passed, {t['failed']} failed, {t['errors']} errors "
       f"({t['seconds']:.0f} s)")
  steps = steps or (2 if quick else 20)
  result['throughput'] = []
  for kind, model, batch, dtypes in (QUICK if quick else FULL):
    for dtype in dtypes:
      r = throughput(kind, model, batch, dtype, steps=steps, warmup=1 if quick else 3)
      result['throughput'].append(r)
      _say(f"{model:<16} {dtype:<9} batch {batch:>4}: train {r['train_images_per_second']:>9,.0f}"
           f" img/s, eval {r['eval_images_per_second']:>9,.0f} img/s; kernels: {r['kernels']}")
  result['kernels'] = sorted({r['kernels'] for r in result['throughput']})
  result['recipe'] = None
  if cifar_dir:
    r = result['recipe'] = recipe_clock(cifar_dir, steps=recipe_steps)
    _say(f"{r['model']} recipe ({r['recipe_steps']} steps, {r['evaluations']} evaluations): "
         f"about {r['estimated_recipe_seconds'] / 3600:.2f} h "
         f"({r['train_images_per_second']:,.0f} img/s on the real input pipeline)")
  result['seconds'] = time.perf_counter() - start
  return result
