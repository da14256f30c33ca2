"""The opt-in CPU convolution computes the same function and gradients as nn.Conv."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resnet_jax
from resnet_jax.kernels import cpu_conv

from model_compare import train_loss_and_grads  # tests/model_compare.py


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.abs(a - b).max() / (np.abs(b).max() + 1e-30)


@pytest.mark.parametrize('n,h,w,ci,co,k,s,pad,fold,chunk', [
    (8, 32, 32, 16, 16, 3, 1, ((1, 1), (1, 1)), 2, 16),   # stage 1, folded
    (8, 32, 32, 16, 32, 3, 2, ((1, 1), (1, 1)), 1, 3),    # downsampling, chunked
    (4, 9, 10, 5, 7, 3, 2, ((1, 1), (1, 1)), 3, 0),       # odd sizes, no chunks
    (4, 11, 12, 6, 36, 3, 1, ((2, 0), (1, 1)), 2, 1),     # asymmetric padding
    (3, 14, 14, 3, 8, 7, 2, ((3, 3), (3, 3)), 3, 2),      # ImageNet-style stem
])
def test_kernel_gradient_equals_xlas(n, h, w, ci, co, k, s, pad, fold, chunk):
  x = jax.random.normal(jax.random.key(0), (n, h, w, ci))
  kernel = jnp.zeros((k, k, ci, co))
  y, vjp = jax.vjp(lambda kk: cpu_conv._conv(x, kk, (s, s), pad), kernel)
  dy = jax.random.normal(jax.random.key(1), y.shape)
  got = cpu_conv.kernel_grad_folded(x, dy, kernel.shape, (s, s), pad, fold, chunk)
  assert rel(got, vjp(dy)[0]) < 1e-5


def test_module_matches_flax_conv_in_value_gradients_and_parameters():
  x = jax.random.normal(jax.random.key(0), (16, 12, 12, 8))
  for kw in [dict(padding='SAME'), dict(padding=((1, 1), (1, 1)), strides=(2, 2)),
             dict(kernel_size=(1, 1), padding='VALID')]:
    kw = {'kernel_size': (3, 3), **kw}
    a, b = nn.Conv(32, **kw), cpu_conv.Conv(32, **kw)
    v = a.init(jax.random.key(1), x)
    assert jax.tree.structure(v) == jax.tree.structure(b.init(jax.random.key(1), x))
    f = lambda m: jax.value_and_grad(lambda v, x: (m.apply(v, x) ** 2).sum(), argnums=(0, 1))(v, x)
    (la, (gva, gxa)), (lb, (gvb, gxb)) = f(a), f(b)
    assert rel(lb, la) < 1e-6 and rel(gxb, gxa) < 1e-6
    for p, q in zip(jax.tree.leaves(gvb), jax.tree.leaves(gva)):
      assert rel(p, q) < 1e-5


def test_resnet_trains_the_same_with_either_convolution():
  x = jax.random.normal(jax.random.key(0), (32, 32, 32, 3))
  y = jax.random.randint(jax.random.key(1), (32,), 0, 10)
  ref = resnet_jax.create_model('cifar_resnet20')
  new = resnet_jax.create_model('cifar_resnet20', conv='cpu_kgrad')
  v = ref.init(jax.random.key(2), x[:2])

  (l0, u0), g0 = train_loss_and_grads(ref, v, x, y)
  (l1, u1), g1 = train_loss_and_grads(new, v, x, y)
  assert rel(l1, l0) < 1e-6
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), u1, u0)
  assert max(rel(a, b) for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0))) < 5e-5
  np.testing.assert_array_equal(jax.jit(new.apply)(v, x), jax.jit(ref.apply)(v, x))


def test_unknown_conv_is_a_clear_error():
  with pytest.raises(ValueError, match="'cpu_kgrad'"):
    resnet_jax.create_model('cifar_resnet20', conv='fast')
