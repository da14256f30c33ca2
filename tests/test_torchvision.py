"""torchvision's ResNets, converted, compute what torchvision computes; bad state dicts are refused.

Runs where torch and torchvision are installed (`pip install -e .[test]`).
No weights are downloaded: the torchvision networks are randomly initialised,
with random BN statistics and affine parameters so that every BN matters.
"""

import os
import sys

import jax
import numpy as np
import pytest

import resnet_jax
from resnet_jax import convert
from resnet_jax.weights import from_torchvision, infer_model
from resnet_jax.weights import torchvision as tv

torch = pytest.importorskip('torch')


def _import_torchvision():
  """torchvision, even where its C++ ops cannot load.

  PyPI's torchvision wheels are built against the CUDA torch; beside the CPU
  torch wheel their C++ extension (detection ops only: nms, roi_align, ...)
  fails to load, and `import torchvision` then fails registering fake kernels
  for the two ops `torchvision::nms` and `torchvision::qnms`. The models are
  plain Python and torch ops: declaring those two schemas lets it import.
  """
  try:
    import torchvision  # pylint: disable=g-import-not-at-top
    return torchvision
  except RuntimeError as e:
    if 'torchvision::' not in str(e):
      raise
  for name in [n for n in sys.modules if n == 'torchvision' or n.startswith('torchvision.')]:
    del sys.modules[name]
  lib = torch.library.Library('torchvision', 'DEF')  # pylint: disable=unused-variable
  lib.define('nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor')
  lib.define('qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor')
  _import_torchvision.lib = lib  # keep the definitions alive
  import torchvision  # pylint: disable=g-import-not-at-top
  return torchvision


torchvision = _import_torchvision()


def _random_torchvision(name, num_classes=10, seed=0):
  """A torchvision ResNet in eval mode with non-trivial BN parameters and statistics."""
  torch.manual_seed(seed)
  model = getattr(torchvision.models, name)(num_classes=num_classes)
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
        m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
        m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
  return model.eval()


@pytest.fixture(scope='module')
def resnet18():
  return _random_torchvision('resnet18')


@pytest.fixture(scope='module')
def resnet50():
  return _random_torchvision('resnet50')


@pytest.mark.parametrize('name', ['resnet18', 'resnet50'])
def test_same_logits_as_torchvision_in_float64(name, request):
  """Two 64x64 images (the stem, max pool and 3 stride-2 stages leave 2x2 at the end).

  Both run in float64; our model casts its logits to float32 at the end, so
  the difference is float32 rounding of the logits (relative 6e-8): any
  difference of layout, padding, stride placement or BN epsilon is far larger.
  """
  model = request.getfixturevalue(name).double()
  images = np.random.default_rng(1).normal(size=(2, 64, 64, 3))
  with torch.no_grad():
    expected = model(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  converted = from_torchvision(name, model.state_dict(), dtype='float64')
  assert converted['model_kwargs']['num_classes'] == 10
  with jax.enable_x64(True):
    _, apply_fn = resnet_jax.functional(converted['model'], **converted['model_kwargs'])
    logits = np.asarray(apply_fn(converted['variables'], images), np.float64)
  print(f'{name}: max |logit difference| {np.abs(logits - expected).max():.3g} '
        f'(logits up to {np.abs(expected).max():.3g})')
  np.testing.assert_allclose(logits, expected, rtol=2e-7, atol=1e-7)
  model.float()


def test_float32_conversion_agrees_at_float32_tolerance(resnet18):
  images = np.random.default_rng(2).normal(size=(2, 64, 64, 3)).astype(np.float32)
  with torch.no_grad():
    expected = resnet18(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  converted = from_torchvision('resnet18', resnet18.state_dict())
  assert converted['variables']['params']['stem_conv']['kernel'].dtype == np.float32
  _, apply_fn = resnet_jax.functional(converted['model'], **converted['model_kwargs'])
  np.testing.assert_allclose(apply_fn(converted['variables'], images), expected,
                             rtol=1e-4, atol=1e-4)


def test_layouts_and_normalisation(resnet18):
  state = resnet18.state_dict()
  converted = from_torchvision('resnet18', state)
  v = converted['variables']
  np.testing.assert_array_equal(v['params']['stem_conv']['kernel'],
                                state['conv1.weight'].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v['params']['head']['kernel'], state['fc.weight'].numpy().T)
  np.testing.assert_array_equal(v['params']['stage2_block1']['shortcut']['proj_bn']['scale'],
                                state['layer2.0.downsample.1.weight'].numpy())
  np.testing.assert_array_equal(v['batch_stats']['stage4_block2']['bn2']['var'],
                                state['layer4.1.bn2.running_var'].numpy())
  kwargs = converted['model_kwargs']
  assert (kwargs['stride_on_3x3'], kwargs['shortcut'], kwargs['bn_epsilon']) == (True, 'B', 1e-5)
  assert converted['label_names'] is None
  images = np.array([[[[0, 128, 255]]]], np.uint8)
  expected = (np.array([0, 128, 255]) / 255 - np.array([0.485, 0.456, 0.406])) / np.array(
      [0.229, 0.224, 0.225])
  np.testing.assert_allclose(converted['normalize'](images)[0, 0, 0], expected, rtol=1e-6)


@pytest.mark.parametrize('name', ['resnet34', 'resnet101', 'resnet152'])
def test_every_depth_maps_key_for_key(name):
  """The other depths, shapes only: torchvision builds them on the meta device (no memory)."""
  with torch.device('meta'):
    model = getattr(torchvision.models, name)()
  state = {k: v for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked')}
  assert infer_model(state) == name
  expected = tv._expected(name, 1000)  # pylint: disable=protected-access
  assert set(expected) == set(state)
  for key, (path, shape) in expected.items():
    assert tv._torch_shape(shape, path[-1]) == tuple(state[key].shape), key  # pylint: disable=protected-access


def test_infer_model(resnet18, resnet50):
  assert infer_model(resnet18.state_dict()) == 'resnet18'
  assert infer_model(resnet50.state_dict()) == 'resnet50'
  state = {k: v for k, v in resnet18.state_dict().items() if not k.startswith('layer4.1.')}
  with pytest.raises(ValueError, match=r'\[2, 2, 2, 1\].*not a torchvision ImageNet ResNet'):
    infer_model(state)


def test_missing_key_is_named(resnet18):
  state = dict(resnet18.state_dict())
  del state['layer3.1.bn1.running_var']
  with pytest.raises(ValueError, match=r"missing key 'layer3\.1\.bn1\.running_var'.*unmodified"):
    from_torchvision('resnet18', state)


def test_unexpected_key_is_named(resnet18):
  state = dict(resnet18.state_dict(), **{'extra.weight': torch.zeros(3)})
  with pytest.raises(ValueError, match=r"unexpected key 'extra\.weight'"):
    from_torchvision('resnet18', state)


def test_prefixed_state_dict_is_refused_with_a_hint(resnet18):
  state = {f'module.{k}': v for k, v in resnet18.state_dict().items()}
  with pytest.raises(ValueError, match=r'"module\." or other prefix'):
    from_torchvision('resnet18', state)


def test_wrong_model_name_points_at_the_right_one(resnet18):
  with pytest.raises(ValueError, match=r"torchvision's resnet18: use model 'resnet18'"):
    from_torchvision('resnet34', resnet18.state_dict())


def test_shape_mismatch_is_named(resnet18):
  state = dict(resnet18.state_dict())
  state['layer2.0.conv1.weight'] = torch.zeros(128, 64, 5, 5)
  with pytest.raises(ValueError, match=r"state_dict\['layer2\.0\.conv1\.weight'\] has shape "
                                       r'\[128, 64, 5, 5\]; resnet18 needs \[128, 64, 3, 3\]'):
    from_torchvision('resnet18', state)


def test_v1_bottleneck_model_is_refused(resnet50):
  with pytest.raises(ValueError, match=r'stride_on_3x3=False.*"v1\.5".*Drop stride_on_3x3=False'):
    from_torchvision('resnet50', resnet50.state_dict(), stride_on_3x3=False)
  with pytest.raises(ValueError, match=r"shortcut='B'"):
    from_torchvision('resnet50', resnet50.state_dict(), shortcut='A')
  with pytest.raises(ValueError, match='not one of them'):
    from_torchvision('cifar_resnet20', resnet50.state_dict())


def test_convert_command_writes_a_checkpoint_the_readers_understand(resnet18, tmp_path, capsys):
  pth = tmp_path / 'resnet18.pth'
  torch.save(resnet18.state_dict(), pth)
  out = tmp_path / 'converted'
  assert convert.main(['--torchvision', str(pth), '--out', str(out)]) == 0  # model inferred
  info = resnet_jax.checkpoint_info(str(out))
  assert info['model'] == 'resnet18'
  assert info['model_kwargs']['stride_on_3x3'] is True
  assert info['normalize']['kind'] == 'imagenet_mean_std'
  assert info['source']['file'] == str(pth) and len(info['source']['sha256']) == 64
  loaded = resnet_jax.load_variables(str(out))
  expected = from_torchvision('resnet18', resnet18.state_dict())['variables']
  jax.tree.map(np.testing.assert_array_equal, loaded, expected)

  # An existing output is never overwritten.
  assert convert.main(['--torchvision', str(pth), '--out', str(out)]) == 2
  assert 'already exists' in capsys.readouterr().err
  # A state dict that does not fit leaves nothing behind.
  bad = dict(resnet18.state_dict())
  del bad['fc.bias']
  torch.save(bad, tmp_path / 'bad.pth')
  before = sorted(os.listdir(tmp_path))
  assert convert.main(['--torchvision', str(tmp_path / 'bad.pth'), '--model', 'resnet18',
                       '--out', str(tmp_path / 'bad_out')]) == 2
  assert "missing key 'fc.bias'" in capsys.readouterr().err
  assert sorted(os.listdir(tmp_path)) == before
