"""Layer responses (Fig. 7): which layers, in which order, and exactly what is measured."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resnet_jax
from resnet_jax import analysis
from resnet_jax import models


def _shapes(name, **kw):
  model = resnet_jax.create_model(name, **kw)
  x = jax.ShapeDtypeStruct(models.default_input_shape(name), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


@pytest.fixture(scope='module')
def resnet20():
  model = resnet_jax.create_model('cifar_resnet20')
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
  images = np.asarray(jax.random.normal(jax.random.key(1), (37, 32, 32, 3)))
  return model, jax.device_get(variables), images


def _set(variables, block, bn, **values):
  """A copy of `variables` with the BN `block/bn`'s scale/bias/mean/var replaced."""
  v = jax.tree.map(np.array, variables)
  for key, value in values.items():
    collection = 'params' if key in ('scale', 'bias') else 'batch_stats'
    old = v[collection][block][bn][key]
    v[collection][block][bn][key] = np.broadcast_to(value, old.shape).astype(old.dtype)
  return v


@pytest.mark.parametrize('depth', [20, 32, 56, 110])
def test_one_layer_per_3x3_conv_of_a_cifar_net_in_network_order(depth):
  n = (depth - 2) // 6
  expected = [f'stage{i}_block{j}/conv{k}' for i in (1, 2, 3) for j in range(1, n + 1)
              for k in (1, 2)]
  for name in (f'cifar_resnet{depth}', f'cifar_plain{depth}'):
    layers = analysis.three_by_three_layers(_shapes(name))
    assert layers == expected
    assert len(layers) == 6 * n  # depth 6n+2 minus the stem and the classifier


def test_scanned_stages_are_listed_like_unrolled_ones():
  assert (analysis.three_by_three_layers(_shapes('cifar_resnet56', scan_blocks=True))
          == analysis.three_by_three_layers(_shapes('cifar_resnet56')))


@pytest.mark.parametrize('name,count,convs', [('resnet18', 16, {'conv1', 'conv2'}),
                                              ('resnet50', 16, {'conv2'}),
                                              ('resnet152', 50, {'conv2'})])
def test_imagenet_nets_list_only_their_3x3_convs(name, count, convs):
  layers = analysis.three_by_three_layers(_shapes(name))
  assert len(layers) == count
  assert {layer.split('/')[1] for layer in layers} == convs


def test_responses_are_the_per_channel_std_over_images_and_positions(resnet20):
  model, variables, images = resnet20
  # 37 images in batches of 16: two full batches and a padded, masked one.
  r = analysis.layer_responses(model, variables, images, batch_size=16)
  _, state = model.apply(variables, images, train=False, mutable=['intermediates'])
  inter = state['intermediates']
  expected = [np.asarray(inter[name.split('/')[0]][f"{name.split('/')[1]}_response"][0],
                         np.float64).std(axis=(0, 1, 2)).mean() for name in r.names]
  assert len(r) == 18 and r.num_examples == 37
  np.testing.assert_allclose(r.std, expected, rtol=1e-4)


def test_masked_rows_are_left_out(resnet20):
  model, variables, images = resnet20
  garbage = np.full((3,) + images.shape[1:], 1e3, np.float32)
  batches = [{'image': images[:16], 'mask': np.ones(16, bool)},
             {'image': np.concatenate([images[16:29], garbage]),
              'mask': np.arange(16) < 13}]
  masked = analysis.layer_responses_from_batches(model, variables, batches)
  plain = analysis.layer_responses(model, variables, images[:29], batch_size=29)
  assert masked.num_examples == 29
  np.testing.assert_allclose(masked.std, plain.std, rtol=1e-4)


def test_response_is_the_bn_output_before_the_addition(resnet20):
  model, variables, images = resnet20
  # gamma = 0 and a per-channel beta: the BN output of the last conv of
  # stage 2 is constant, so its std is exactly 0 ...
  beta = np.linspace(-2.0, 3.0, 32)
  v = _set(variables, 'stage2_block3', 'bn2', scale=0.0, bias=beta)
  r = analysis.layer_responses(model, v, images, batch_size=16)
  names = list(r.names)
  assert r.std[names.index('stage2_block3/conv2')] == pytest.approx(0.0, abs=1e-6)
  assert np.all(np.delete(r.std, names.index('stage2_block3/conv2')) > 0.1)
  # ... while the block's output after the addition (and ReLU) still varies.
  _, state = model.apply(v, images, train=False, mutable=['intermediates'])
  assert np.asarray(state['intermediates']['stage2'][0]).std(axis=(0, 1, 2)).mean() > 0.1


def test_response_scales_with_the_bn_scale_and_ignores_its_bias(resnet20):
  model, variables, images = resnet20
  # A channel's response is gamma * (x - mean) / sqrt(var + eps) + beta with
  # the running statistics: its std is |gamma| / sqrt(var + eps) times the
  # std of the conv output x. Scale gamma by -3, var by 4 and shift beta: the
  # std of that layer changes by exactly 3 / 2.
  bn = variables['params']['stage1_block1']['bn1']
  np.testing.assert_array_equal(variables['batch_stats']['stage1_block1']['bn1']['var'], 1.0)
  base = analysis.layer_responses(model, variables, images, batch_size=16)
  v = _set(variables, 'stage1_block1', 'bn1', scale=-3.0 * bn['scale'], bias=7.0, var=4.0)
  changed = analysis.layer_responses(model, v, images, batch_size=16)
  # eps = 1e-5 makes the ratio sqrt((1 + eps) / (4 + eps)) rather than 1/2.
  ratio = 3.0 * np.sqrt((1.0 + 1e-5) / (4.0 + 1e-5))
  assert changed.std[0] == pytest.approx(ratio * base.std[0], rel=1e-4)


def test_scanned_model_gives_the_same_responses(resnet20):
  _, _, images = resnet20
  scanned = resnet_jax.create_model('cifar_resnet20', scan_blocks=True)
  variables = scanned.init(jax.random.key(3), jnp.zeros((1, 32, 32, 3)), train=False)
  unrolled = resnet_jax.create_model('cifar_resnet20')
  a = analysis.layer_responses(scanned, variables, images, batch_size=16)
  b = analysis.layer_responses(unrolled, models.unroll_scanned(variables), images, batch_size=16)
  assert a.names == b.names and len(a) == 18
  np.testing.assert_allclose(a.std, b.std, rtol=1e-4)


def test_sorted_view_and_mean_over_runs():
  r1 = analysis.LayerResponses(('a', 'b', 'c'), np.array([1.0, 3.0, 2.0]), 10)
  r2 = analysis.LayerResponses(('a', 'b', 'c'), np.array([3.0, 1.0, 2.0]), 10)
  np.testing.assert_array_equal(r1.sorted(), [3.0, 2.0, 1.0])
  mean = analysis.mean_responses([r1, r2])
  np.testing.assert_array_equal(mean.std, [2.0, 2.0, 2.0])
  assert analysis.LayerResponses.from_dict(r1.to_dict()).names == r1.names
  with pytest.raises(ValueError):
    analysis.mean_responses([r1, analysis.LayerResponses(('a',), np.ones(1), 1)])
