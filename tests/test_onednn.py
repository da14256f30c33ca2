"""The oneDNN/OpenMP convolutions and BatchNorm compute what XLA computes, and 'auto' picks them only where they run."""

import os
import platform
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resnet_jax
from resnet_jax import models
from resnet_jax.kernels import onednn

from model_compare import train_loss_and_grads  # tests/model_compare.py

# Where the oneDNN wheels are dependencies of the package and a compiler exists,
# the oneDNN path must work; elsewhere these tests say why they skip.
EXPECTED_HERE = (sys.platform.startswith('linux') and platform.machine() == 'x86_64'
                 and shutil.which('g++') is not None)


def _require_onednn():
  reason = onednn.unavailable_reason()
  if reason and not EXPECTED_HERE:
    pytest.skip(reason)
  assert reason is None


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / (np.abs(b).max() + 1e-30)


@pytest.mark.parametrize('n,h,w,ci,co,k,s,pad', [
    (4, 16, 16, 16, 16, 3, 1, ((1, 1), (1, 1))),   # CIFAR stage 1
    (4, 16, 16, 16, 32, 3, 2, ((1, 1), (1, 1))),   # downsampling
    (3, 9, 10, 5, 7, 3, 2, ((1, 1), (1, 1))),      # odd sizes
    (2, 11, 12, 6, 36, 3, 1, ((2, 0), (1, 1))),    # asymmetric padding
    (2, 14, 14, 3, 8, 7, 2, ((3, 3), (3, 3))),     # ImageNet stem
    (2, 8, 8, 16, 64, 1, 2, ((0, 0), (0, 0))),     # projection shortcut
])
def test_convolution_and_both_gradients_equal_xlas(n, h, w, ci, co, k, s, pad):
  _require_onednn()
  x = jax.random.normal(jax.random.key(0), (n, h, w, ci))
  kernel = jax.random.normal(jax.random.key(1), (k, k, ci, co)) * 0.2
  ref = lambda x, kk: jax.lax.conv_general_dilated(x, kk, (s, s), pad,
                                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  got = lambda x, kk: onednn.conv2d(x, kk, (s, s), pad)
  y_ref, vjp_ref = jax.vjp(ref, x, kernel)
  y, vjp = jax.jit(lambda x, kk: jax.vjp(got, x, kk))(x, kernel)
  dy = jax.random.normal(jax.random.key(2), y.shape)
  assert y.shape == y_ref.shape and rel(y, y_ref) < 1e-5
  for g, g_ref in zip(vjp(dy), vjp_ref(dy)):
    assert rel(g, g_ref) < 1e-5


def test_batch_norm_equals_flax_in_output_statistics_and_gradients():
  _require_onednn()
  x = jax.random.normal(jax.random.key(0), (8, 6, 5, 24)) * 3 + 2
  scale = jax.random.uniform(jax.random.key(1), (24,), minval=0.5, maxval=1.5)
  bias = jax.random.normal(jax.random.key(2), (24,))
  dy = jax.random.normal(jax.random.key(3), x.shape)

  def flax_bn(x, scale, bias):
    y, upd = nn.BatchNorm(use_running_average=False, momentum=0.0, epsilon=1e-5).apply(
        {'params': {'scale': scale, 'bias': bias},
         'batch_stats': {'mean': jnp.zeros(24), 'var': jnp.ones(24)}}, x, mutable=['batch_stats'])
    return y, upd['batch_stats']['mean'], upd['batch_stats']['var']  # momentum 0: batch stats

  def loss(bn, *args):
    y, mean, var = bn(*args)
    return (y * dy).sum(), (y, mean, var)

  grads_ref, out_ref = jax.grad(lambda *a: loss(flax_bn, *a), argnums=(0, 1, 2), has_aux=True)(
      x, scale, bias)
  grads, out = jax.jit(jax.grad(lambda *a: loss(onednn.batch_norm, *a), argnums=(0, 1, 2),
                                has_aux=True))(x, scale, bias)
  for a, b in zip(out, out_ref):
    assert rel(a, b) < 1e-5
  for a, b in zip(grads, grads_ref):
    assert rel(a, b) < 1e-5


def test_resnet_trains_the_same_with_onednn_as_with_xla():
  _require_onednn()
  x = jax.random.normal(jax.random.key(0), (16, 32, 32, 3))
  y = jax.random.randint(jax.random.key(1), (16,), 0, 10)
  ref = resnet_jax.create_model('cifar_resnet20')
  new = resnet_jax.create_model('cifar_resnet20', conv='onednn')
  v = ref.init(jax.random.key(2), x[:2])
  assert jax.tree.structure(new.init(jax.random.key(2), x[:2])) == jax.tree.structure(v)

  (l0, u0), g0 = train_loss_and_grads(ref, v, x, y)
  (l1, u1), g1 = train_loss_and_grads(new, v, x, y)
  assert rel(l1, l0) < 1e-5
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), u1, u0)
  # The gradient of this float32 network at initialisation is sensitive: a
  # random 1e-7 relative perturbation of the stem's output alone moves it by
  # 3.4e-4 (relative norm; PyTorch float32 vs float64 on the same network:
  # 3.3e-4). So the whole gradient is compared at that scale; the kernels
  # themselves are checked to 1e-5 above.
  diff = sum(float(((a - b) ** 2).sum()) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)))
  assert np.sqrt(diff / sum(float((b ** 2).sum()) for b in jax.tree.leaves(g0))) < 2e-3
  assert rel(jax.jit(new.apply)(v, x), jax.jit(ref.apply)(v, x)) < 1e-5
  # The compiled step really calls oneDNN: one call per conv and per BN, forward.
  hlo = jax.jit(lambda p: new.apply({'params': p, 'batch_stats': v['batch_stats']}, x, train=True,
                                    mutable=['batch_stats'])).lower(v['params']).as_text()
  assert hlo.count('resnet_jax_onednn_conv_fwd') == 19 and hlo.count('resnet_jax_onednn_bn_fwd') == 19


def test_auto_picks_onednn_only_where_it_runs():
  _require_onednn()
  assert jax.device_count() == 1 and jax.default_backend() == 'cpu'
  assert models.resolve_conv('auto')[0] is onednn.Conv
  module, why = models.resolve_conv('auto', jnp.bfloat16)
  assert module is nn.Conv and 'bfloat16' in why
  with pytest.raises(ValueError, match="conv='onednn' cannot run here: compute dtype bfloat16"):
    resnet_jax.create_model('cifar_resnet20', conv='onednn', dtype='bfloat16')
  with pytest.raises(ValueError, match="'auto', 'xla', 'onednn', 'cpu_kgrad'"):
    resnet_jax.create_model('cifar_resnet20', conv='fast')


def test_onednn_batch_norm_keeps_ghost_batch_statistics():
  """With ghost_batch_size the oneDNN model normalises each group by its own statistics."""
  _require_onednn()
  x = jax.random.normal(jax.random.key(0), (8, 4, 4, 16)) * 3 + 1
  x = x.at[4:].multiply(5.0)  # the two halves differ: whole-batch statistics would show
  ghost = models.GhostBatchNorm(group_size=4)
  v = ghost.init(jax.random.key(1), x)
  y_ref, s_ref = ghost.apply(v, x, mutable=['batch_stats'])
  y, s = jax.jit(lambda v, x: onednn.BatchNorm(group_size=4).apply(v, x, mutable=['batch_stats']))(v, x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), s, s_ref)
  whole, _ = onednn.BatchNorm().apply(v, x, mutable=['batch_stats'])
  assert not np.allclose(whole, y_ref, atol=1e-2)


def test_missing_library_names_the_fix(monkeypatch, tmp_path):
  monkeypatch.setattr(onednn, '_prefixes', lambda: [tmp_path])
  with pytest.raises(onednn.OneDNNUnavailable, match='pip install .onednn-cpu-gomp'):
    onednn._find_onednn()


_THREADS = r'''
import threading
import jax, jax.numpy as jnp, numpy as np
from resnet_jax.kernels import onednn
PAD = ((1, 1), (1, 1))
def case(n):  # a deep-stage 3x3 convolution (2x2 positions), whose kernel gradient is im2col+gemm
  x = jax.random.normal(jax.random.key(n), (n, 2, 2, 128))
  k = jax.random.normal(jax.random.key(99), (3, 3, 128, 128)) * 0.1
  loss = lambda conv: lambda x, k: jnp.sum(conv(x, k) ** 2)
  xla = lambda x, k: jax.lax.conv_general_dilated(x, k, (1, 1), PAD,
                                                  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  ours = lambda x, k: onednn.conv2d(x, k, (1, 1), PAD)
  return jax.jit(jax.grad(loss(ours), (0, 1))), jax.jit(jax.grad(loss(xla), (0, 1))), x, k
cases = [case(n) for n in range(1, 9)]
errors = []
def run(i, rounds):
  ours, xla, x, k = cases[i]
  for _ in range(rounds):
    for a, b in zip(ours(x, k), xla(x, k)):
      errors.append(float(np.abs(np.asarray(a) - b).max() / np.abs(np.asarray(b)).max()))
for rounds, order in ((1, range(8)), (3, reversed(range(8)))):
  threads = [threading.Thread(target=run, args=(i, rounds)) for i in order]
  for t in threads: t.start()
  for t in threads: t.join()
print('largest relative error', max(errors), 'of', len(errors))
'''


def test_convolutions_made_in_one_thread_run_in_any_other():
  """XLA runs a custom call on whichever of its threads is free, not the one that made the
  primitive. With oneDNN's default (per-thread) scratchpad, an im2col kernel gradient then
  wrote past a scratchpad sized for another thread and segfaulted (3 runs in 3); ours
  passes each primitive its scratchpad. In a subprocess, so that a crash fails only this test."""
  _require_onednn()
  out = subprocess.run([sys.executable, '-c', _THREADS], capture_output=True, text=True,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=600, check=False)
  assert out.returncode == 0, f'exit status {out.returncode}: {out.stderr[-2000:]}'
  words = out.stdout.split()
  assert words[-1] == '64' and float(words[-3]) < 1e-4, out.stdout
