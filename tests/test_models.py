"""The networks against the paper: sizes, FLOPs, structure and behaviour."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import resnet_jax
from resnet_jax import models, paper
from resnet_jax import summary


def _shapes(name, **kw):
  model = resnet_jax.create_model(name, **kw)
  x = jax.ShapeDtypeStruct(models.default_input_shape(name), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)


def _init(name, batch=2, seed=0, **kw):
  model = resnet_jax.create_model(name, **kw)
  x = jax.random.normal(jax.random.key(seed + 1), models.default_input_shape(name, batch))
  return model, model.init(jax.random.key(seed), x, train=False), x


# --- The paper's numbers ---------------------------------------------------

# Table 6: parameters at the table's rounding.
@pytest.mark.parametrize('depth', sorted(paper.CIFAR_ERROR))
def test_cifar_parameter_counts_match_table6(depth):
  params = summary.count_params(_shapes(f'cifar_resnet{depth}')['params'])
  millions = paper.PARAMS[f'cifar_resnet{depth}'] / 1e6
  digits = 1 if millions >= 1 else 2
  assert round(params / 1e6, digits) == millions


def test_resnet20_has_exactly_269722_parameters():
  assert summary.count_params(_shapes('cifar_resnet20')['params']) == 269_722


@pytest.mark.parametrize('depth', models.CIFAR_PLAIN_DEPTHS)
def test_plain_nets_have_the_parameters_of_their_option_a_resnets(depth):
  plain = summary.count_params(_shapes(f'cifar_plain{depth}')['params'])
  res = summary.count_params(_shapes(f'cifar_resnet{depth}', shortcut='A')['params'])
  assert plain == res


@pytest.mark.parametrize('name', ['resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152'])
def test_imagenet_option_b_parameter_counts(name):
  assert summary.count_params(_shapes(name)['params']) == paper.PARAMS[name]


@pytest.mark.parametrize('name', sorted(paper.MACS))
def test_multiply_adds_within_5_percent_of_table1(name):
  macs, published = summary.model_summary(name)['macs'], paper.MACS[name]
  assert abs(macs - published) / published < 0.05, macs


def test_v15_bottleneck_moves_the_stride_and_costs_more():
  v1 = summary.model_summary('resnet50')['macs']
  v15 = summary.model_summary('resnet50', stride_on_3x3=True)['macs']
  # torchvision's v1.5 ResNet-50 is the familiar ~4.1 GMACs; v1 is ~3.86.
  assert 4.0e9 < v15 < 4.2e9 and v1 < 3.9e9


def _shortcut_modules(params):
  return [k for k in jax.tree_util.tree_flatten_with_path(params)[0]
          if any(getattr(p, 'key', None) == 'proj_conv' for p in k[0])]


def test_option_a_has_no_shortcut_parameters_and_c_one_projection_per_block():
  params_a = _shapes('resnet34', shortcut='A')['params']
  params_b = _shapes('resnet34', shortcut='B')['params']
  params_c = _shapes('resnet34', shortcut='C')['params']
  blocks = sum((3, 4, 6, 3))
  assert not _shortcut_modules(params_a)
  assert len(_shortcut_modules(params_b)) == 3  # the three downsampling blocks
  assert len(_shortcut_modules(params_c)) == blocks
  assert summary.count_params(params_a) < summary.count_params(params_b) < summary.count_params(params_c)


def test_list_models_names_every_network_of_the_paper():
  expected = ([f'cifar_resnet{d}' for d in (20, 32, 44, 56, 110, 1202)]
              + [f'cifar_plain{d}' for d in (20, 32, 44, 56, 110)]
              + [f'resnet{d}' for d in (18, 34, 50, 101, 152)] + ['plain18', 'plain34'])
  assert sorted(resnet_jax.list_models()) == sorted(expected)


def test_errors_name_the_problem():
  with pytest.raises(ValueError, match='6n\\+2'):
    models.cifar_resnet(21)
  with pytest.raises(ValueError, match='cifar_resnet110'):
    resnet_jax.create_model('resnet_110')
  with pytest.raises(ValueError, match="'D'"):
    _init('cifar_resnet20', shortcut='D')


def test_any_6n_plus_2_depth_builds():
  model = models.cifar_resnet(14)
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
  # ResNet-20 less one block (two 3x3 convs and two BNs) in each of its three stages.
  per_n = sum(2 * (9 * w * w + 2 * w) for w in (16, 32, 64))
  assert summary.count_params(v['params']) == 269_722 - per_n == 172_506


# --- Structure -------------------------------------------------------------

def _reference_cifar_resnet(variables, x, train=False, momentum=0.9):
  """An independent forward pass of a CIFAR ResNet (option A) written with lax only.

  Checks padding (1 on every side, also at stride 2), option A (subsample +
  symmetric zero channel padding), BN placement and the v1 block order. With
  `train`, BN normalises by the batch's statistics (biased variance) and the
  second result holds the updated running averages.
  """
  p, s = variables['params'], variables['batch_stats']
  new_stats = {}

  def conv(x, k, stride):
    return jax.lax.conv_general_dilated(x, k, (stride, stride), ((1, 1), (1, 1)),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def bn(x, *path):
    pp, ss, node = p, s, new_stats
    for k in path:
      pp, ss = pp[k], ss[k]
    mean, var = ss['mean'], ss['var']
    if train:
      mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
      for k in path[:-1]:
        node = node.setdefault(k, {})
      node[path[-1]] = {'mean': momentum * ss['mean'] + (1 - momentum) * mean,
                        'var': momentum * ss['var'] + (1 - momentum) * var}
    return (x - mean) / jnp.sqrt(var + 1e-5) * pp['scale'] + pp['bias']

  y = jax.nn.relu(bn(conv(x, p['stem_conv']['kernel'], 1), 'stem_bn'))
  blocks = sorted((k for k in p if k.startswith('stage')),
                  key=lambda k: tuple(int(v) for v in k[len('stage'):].split('_block')))
  for name in blocks:
    stage, index = (int(v) for v in name[len('stage'):].split('_block'))
    width, stride = 16 * 2 ** (stage - 1), (2 if stage > 1 and index == 1 else 1)
    h = jax.nn.relu(bn(conv(y, p[name]['conv1']['kernel'], stride), name, 'bn1'))
    h = bn(conv(h, p[name]['conv2']['kernel'], 1), name, 'bn2')
    short = y[:, ::stride, ::stride, :]
    extra = width - short.shape[-1]
    short = jnp.pad(short, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
    y = jax.nn.relu(h + short)
  logits = y.mean((1, 2)) @ p['head']['kernel'] + p['head']['bias']
  return (logits, new_stats) if train else logits


def _perturbed(variables, seed=2):
  """Non-trivial BN statistics and affine parameters, so BN placement matters (weights kept)."""
  paths, tree = jax.tree_util.tree_flatten_with_path(variables)
  keys = jax.random.split(jax.random.key(seed), len(paths))
  return jax.tree.unflatten(tree, [
      l if 'kernel' in jax.tree_util.keystr(path) else
      jnp.abs(l + 0.3 * jax.random.normal(k, l.shape)) + 0.1 for (path, l), k in zip(paths, keys)])


def test_cifar_network_matches_an_independent_reference():
  model = models.cifar_resnet(8)
  x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
  variables = _perturbed(model.init(jax.random.key(0), x, train=False))
  np.testing.assert_allclose(jax.jit(model.apply)(variables, x),
                             jax.jit(_reference_cifar_resnet)(variables, x), rtol=1e-4, atol=1e-4)


def test_imagenet_stem_downsamples_224_to_56_and_outputs_1000_classes():
  model = resnet_jax.create_model('resnet18')
  x = jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32)
  v = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), x)
  (logits, state) = jax.eval_shape(
      lambda v, x: model.apply(v, x, mutable=['intermediates']), v, x)
  assert logits.shape == (2, 1000)
  assert state['intermediates']['stem'][0].shape == (2, 56, 56, 64)
  assert state['intermediates']['stage4'][0].shape == (2, 7, 7, 512)


def _block_output(residual, x):
  block = models.BasicBlock(
      features=16, strides=1, residual=residual, shortcut='A',
      conv=functools.partial(nn.Conv, use_bias=False),
      norm=functools.partial(nn.BatchNorm, use_running_average=True))
  v = block.init(jax.random.key(0), x)
  # Zero the residual branch: the last BN outputs 0 whatever its input.
  v = jax.tree_util.tree_map_with_path(
      lambda path, a: jnp.zeros_like(a) if 'bn2' in str(path) and 'params' in str(path) else a, v)
  return block.apply(v, x)


def test_residual_block_with_zeroed_branch_is_the_identity_and_plain_block_is_not():
  x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 8, 8, 16)))  # block inputs are post-ReLU
  np.testing.assert_allclose(_block_output(True, x), x, atol=1e-6)
  assert not np.allclose(_block_output(False, x), x, atol=1e-3)


# --- Behaviour -------------------------------------------------------------

def test_output_shapes_and_train_mode_updates_batch_stats_only_when_training():
  model, variables, x = _init('cifar_resnet20')
  logits = model.apply(variables, x, train=False)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  logits_t, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert logits_t.shape == (2, 10)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, b), variables['batch_stats'],
                         updates['batch_stats'])
  assert all(jax.tree.leaves(changed))
  _, same = model.apply(variables, x, train=False, mutable=['batch_stats'])
  jax.tree.map(np.testing.assert_array_equal, variables['batch_stats'], same['batch_stats'])


def test_functional_api_computes_the_network_in_both_modes_and_is_jittable():
  init_fn, apply_fn = resnet_jax.functional('cifar_resnet20')
  variables = jax.jit(init_fn)(jax.random.key(0))
  assert summary.count_params(variables['params']) == 269_722
  assert all(np.all(v['mean'] == 0) and np.all(v['var'] == 1)  # fresh BN running averages
             for v in jax.tree.leaves(variables['batch_stats'], is_leaf=lambda t: 'mean' in t))
  variables = _perturbed(variables)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
  np.testing.assert_allclose(jax.jit(apply_fn)(variables, x), _reference_cifar_resnet(variables, x),
                             rtol=1e-4, atol=1e-4)
  logits, stats = jax.jit(functools.partial(apply_fn, train=True))(variables, x)
  ref_logits, ref_stats = _reference_cifar_resnet(variables, x, train=True)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4)
  assert jax.tree.structure(stats) == jax.tree.structure(ref_stats)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), stats, ref_stats)
  assert init_fn(jax.random.key(0), (1, 24, 24, 3))['params']['head']['kernel'].shape == (64, 10)


def test_bfloat16_compute_keeps_float32_parameters_and_statistics():
  model, variables, x = _init('cifar_resnet20', dtype='bfloat16')
  assert {a.dtype for a in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats', 'intermediates'])
  assert logits.dtype == jnp.float32
  assert updates['intermediates']['stem'][0].dtype == jnp.bfloat16
  assert {a.dtype for a in jax.tree.leaves(updates['batch_stats'])} == {jnp.dtype(jnp.float32)}


def test_zero_init_last_bn():
  params = _init('cifar_resnet20', zero_init_last_bn=True)[1]['params']
  assert not np.any(params['stage1_block1']['bn2']['scale'])
  assert np.all(params['stage1_block1']['bn1']['scale'] == 1)


def test_intermediates_hold_one_response_per_3x3_layer_and_pre_logits():
  model, variables, x = _init('cifar_resnet20')
  _, state = model.apply(variables, x, mutable=['intermediates'])
  inter = state['intermediates']
  responses = [k for block in inter if block.startswith('stage') and isinstance(inter[block], dict)
               for k in inter[block]]
  assert len(responses) == 6 * 3
  assert inter['pre_logits'][0].shape == (2, 64)


def test_ghost_batch_norm_over_the_whole_batch_equals_batch_norm():
  x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3)) * 3 + 1
  bn = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  v = bn.init(jax.random.key(0), x)
  y_ref, s_ref = bn.apply(v, x, mutable=['batch_stats'])
  ghost = models.GhostBatchNorm(group_size=8)
  y, s = ghost.apply(v, x, mutable=['batch_stats'])
  np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), s, s_ref)
  # Groups of 4: each half is normalised by its own statistics.
  y4, _ = models.GhostBatchNorm(group_size=4).apply(v, x, mutable=['batch_stats'])
  np.testing.assert_allclose(y4[:4], bn.apply(v, x[:4], mutable=['batch_stats'])[0], atol=1e-4)
  assert not np.allclose(y4, y_ref, atol=1e-3)


def test_ghost_batch_norm_in_a_model_trains_and_evaluates():
  model, variables, x = _init('cifar_resnet20', batch=4, ghost_batch_size=2)
  logits, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
  assert logits.shape == (4, 10)
  assert jax.tree.structure(updates['batch_stats']) == jax.tree.structure(variables['batch_stats'])


def test_scanned_blocks_compute_the_same_function_with_the_same_parameters():
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  scanned = models.cifar_resnet(32, scan_blocks=True)
  unrolled = models.cifar_resnet(32)
  v = scanned.init(jax.random.key(0), x)
  assert summary.count_params(v['params']) == 464_154
  v_unrolled = models.unroll_scanned(dict(v))
  assert jax.tree.structure(v_unrolled) == jax.tree.structure(dict(unrolled.init(jax.random.key(0), x)))
  np.testing.assert_allclose(jax.jit(scanned.apply)(v, x), jax.jit(unrolled.apply)(v_unrolled, x),
                             rtol=1e-5, atol=1e-5)
  train = lambda m: jax.jit(functools.partial(m.apply, train=True, mutable=['batch_stats']))
  y_s, u_s = train(scanned)(v, x)
  y_u, u_u = train(unrolled)(v_unrolled, x)
  np.testing.assert_allclose(y_s, y_u, rtol=1e-5, atol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               models.unroll_scanned({'batch_stats': u_s['batch_stats']}),
               {'batch_stats': u_u['batch_stats']})
  remat = models.cifar_resnet(32, scan_blocks=True, remat=True)
  grad = lambda m, v: jax.jit(jax.grad(lambda p: m.apply({**v, 'params': p}, x).sum()))(v['params'])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               grad(remat, v), grad(scanned, v))
