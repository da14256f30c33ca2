"""The PyTorch reference used by the speed benchmark is the same network as ours.

Runs only where torch is installed (it is not a dependency):
`pip install torch==2.13.0` for the CPU build.
"""

import jax
import numpy as np
import pytest

import resnet_jax
from resnet_jax import summary

torch = pytest.importorskip('torch')

from resnet_jax.benchmark import load_torch_reference as _reference  # pylint: disable=g-import-not-at-top,wrong-import-position


@pytest.mark.parametrize('name', ['cifar_resnet20', 'cifar_resnet56', 'cifar_plain20'])
def test_same_parameter_count(name):
  ref = _reference()
  init_fn, _ = resnet_jax.functional(name)
  params = jax.eval_shape(init_fn, jax.random.key(0))['params']
  assert ref.count_params(ref.from_name(name)) == summary.count_params(params)


@pytest.mark.parametrize('name', ['cifar_resnet20', 'cifar_plain20'])
def test_same_outputs_given_the_same_weights(name):
  ref = _reference()
  init_fn, apply_fn = resnet_jax.functional(name)
  variables = init_fn(jax.random.key(0))
  # Non-trivial BN statistics and affine parameters.
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda a: np.asarray(a) + 0.1 * np.abs(rng.normal(size=a.shape)).astype(np.float32),
                           variables)
  images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
  model = ref.from_name(name)
  ref.load_jax_variables(model, variables)
  model.eval()
  with torch.no_grad():
    expected = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(apply_fn(variables, images), expected, rtol=1e-4, atol=1e-4)
  # Training mode (batch statistics) agrees too.
  model.train()
  with torch.no_grad():
    expected = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  logits, _ = apply_fn(variables, images, train=True)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
