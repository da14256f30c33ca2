"""The PyTorch reference used by the speed benchmark is the same network as ours, and our
compiled train step takes the same SGD steps as torch.optim.SGD on it.

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



def _torch_state(ref, name, variables):
  """{name: float64 array} of the PyTorch reference holding `variables`."""
  model = ref.from_name(name)
  ref.load_jax_variables(model, variables)
  return {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()
          if v.dtype.is_floating_point}


def _to_float64(tree):
  return jax.tree.map(lambda a: a.astype(np.float64) if np.issubdtype(a.dtype, np.floating) else a,
                      jax.device_get(tree))


def test_training_steps_equal_pytorch_sgd_on_the_same_batches():
  """The train step that `resnet_jax.main` compiles (loss, BatchNorm with batch statistics and
  running averages, L2 weight decay before the momentum, the learning rate) takes the same
  steps as torch.optim.SGD(momentum=0.9, weight_decay) on the PyTorch reference, from the same
  weights on the same batches. In float64 on both sides: in float32 a ReLU that flips sign on
  a rounding difference moves this freshly initialised network's gradient by ~1e-3 and three
  steps at lr 0.1 amplify it to ~5%, which would hide real differences. Weight decay is raised
  to 0.05 so that dropping it or applying it after the momentum fails by far."""
  from conftest import experiment_config  # pylint: disable=g-import-not-at-top
  from resnet_jax.training import build  # pylint: disable=g-import-not-at-top
  ref = _reference()
  name, steps, wd = 'cifar_resnet20', 3, 0.05
  config = experiment_config(name, batch_size=16, weight_decay=wd, progress_bar=False)
  config.data.source, config.model.conv, config.model.dtype = 'synthetic', 'xla', 'float64'
  with jax.enable_x64(True):
    run = build.build(config)
    state = run.init_state()
    state = state.replace(params=_to_float64(state.params),
                          batch_stats=_to_float64(state.batch_stats),
                          opt_state=_to_float64(state.opt_state))
    start = {'params': jax.device_get(state.params), 'batch_stats': jax.device_get(state.batch_stats)}
    model = ref.from_name(name)
    ref.load_jax_variables(model, start)
    model = model.double().train()
    opt = torch.optim.SGD(model.parameters(), lr=config.learning_rate, momentum=config.momentum,
                          weight_decay=wd)
    batches = run.source.train_batches(0)
    for _ in range(steps):
      batch = next(batches)
      state, metrics = run.train_step(state, batch)
      opt.zero_grad()
      x = torch.from_numpy(np.ascontiguousarray(batch['image'].transpose(0, 3, 1, 2))).double()
      loss = torch.nn.functional.cross_entropy(model(x), torch.from_numpy(batch['label']).long())
      loss.backward()
      opt.step()
      assert abs(float(metrics['loss']) - loss.item()) < 1e-6  # the logits leave the model in float32
    after = {'params': jax.device_get(state.params), 'batch_stats': jax.device_get(state.batch_stats)}
  assert jax.tree.leaves(after['params'])[0].dtype == np.float64
  got, before = _torch_state(ref, name, after), _torch_state(ref, name, start)
  want = {k: v.detach().numpy() for k, v in model.state_dict().items() if v.dtype.is_floating_point}
  assert got.keys() == want.keys()
  for key in want:
    moved = np.linalg.norm(want[key] - before[key])
    assert moved > 1e-3 * np.linalg.norm(before[key]), key  # every tensor really changed
    # Running variances: PyTorch averages the unbiased batch variance (n/(n-1), n >= 16*8*8
    # values per channel here), Flax the biased one, 0.1% apart at most.
    tolerance = 2e-3 if key.endswith('running_var') else 1e-6
    assert np.linalg.norm(got[key] - want[key]) < tolerance * moved, key
