"""torchvision's ImageNet ResNets (18/34/50/101/152) as this project's networks.

    import torch, resnet_jax
    from resnet_jax.weights import from_torchvision
    converted = from_torchvision('resnet50', torch.load('resnet50.pth', weights_only=True))
    _, apply_fn = resnet_jax.functional(converted['model'], **converted['model_kwargs'])
    logits = apply_fn(converted['variables'], converted['normalize'](uint8_images))

torchvision's ResNet is this project's ImageNet `ResNet` with
- `stride_on_3x3=True`: its bottleneck ("v1.5") strides on the 3x3 conv; the
  paper's (v1) strides on the first 1x1. For ResNet-18/34 (basic blocks) the
  two are the same network.
- `shortcut='B'`: a 1x1 projection + BN (`downsample`) only where the shape changes.
- `bn_epsilon=1e-5` (torch's BatchNorm2d default, and this project's).
The padding is the same: the 7x7/2 stem pads 3, the 3x3/2 max pool pads 1
with -inf (Flax's `max_pool` pads with -inf, as torch does), 3x3 convs pad 1
on every side; `models/resnet.py` pads explicitly and symmetrically, never 'SAME'.
tests/test_torchvision.py checks that both give the same logits.

Layouts: conv weights OIHW -> HWIO kernels, Linear (out, in) -> Dense (in, out),
BN weight/bias/running_mean/running_var -> params scale/bias and batch_stats
mean/var. `num_batches_tracked` is ignored (only BN momentum=None uses it).
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import numpy as np

from resnet_jax import models
from resnet_jax.weights import normalization

# Model attributes torchvision's ResNets have; a caller may restate them, not change them.
REQUIRED = {'stride_on_3x3': True, 'shortcut': 'B', 'residual': True, 'bn_epsilon': 1e-5,
            'stem': 'imagenet', 'width': 64, 'scan_blocks': False}
# Attributes that change how the network runs, not what it computes.
ALLOWED = ('conv', 'remat', 'bn_momentum', 'ghost_batch_size', 'zero_init_last_bn')
DTYPES = ('float32', 'float64')
_BN = {'weight': ('params', 'scale'), 'bias': ('params', 'bias'),
       'running_mean': ('batch_stats', 'mean'), 'running_var': ('batch_stats', 'var')}


def torchvision_models() -> list[str]:
  """This project's names of the networks torchvision has weights for."""
  return [f'resnet{d}' for d in sorted(models.IMAGENET_STAGES)]


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor; torch itself is not needed to convert
    value = value.detach().cpu()
    if str(value.dtype) == 'torch.bfloat16':
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def infer_model(state_dict: Mapping[str, Any]) -> str:
  """The project name ('resnet50', ...) of the torchvision ResNet a state dict holds.

  Read from the block counts of layer1..layer4 and whether the blocks have a
  third conv (bottleneck). Raises ValueError if it is no torchvision ResNet.
  """
  counts = [0, 0, 0, 0]
  for key in state_dict:
    m = re.match(r'layer([1-4])\.(\d+)\.', key)
    if m:
      counts[int(m.group(1)) - 1] = max(counts[int(m.group(1)) - 1], int(m.group(2)) + 1)
  bottleneck = 'layer1.0.conv3.weight' in state_dict
  for depth, (stages, block_cls) in models.IMAGENET_STAGES.items():
    if tuple(stages) == tuple(counts) and (block_cls is models.BottleneckBlock) == bottleneck:
      return f'resnet{depth}'
  kind = 'bottleneck' if bottleneck else 'basic'
  known = ', '.join(f'resnet{d} {list(s)}' for d, (s, _) in models.IMAGENET_STAGES.items())
  raise ValueError(f'The state dict has {kind} blocks per stage {counts} (layer1..layer4), which '
                   f'is not a torchvision ImageNet ResNet ({known}). Pass a state dict of '
                   'torchvision.models.resnet18 ... resnet152 (model.state_dict()).')


def _check_model_kwargs(model_name: str, model_kwargs: dict[str, Any]) -> None:
  if model_name not in torchvision_models():
    raise ValueError(f'torchvision has ImageNet weights for {", ".join(torchvision_models())}; '
                     f'{model_name!r} is not one of them. Pick one of those names.')
  for key, value in model_kwargs.items():
    if key in REQUIRED:
      if value != REQUIRED[key]:
        if key == 'stride_on_3x3':
          raise ValueError(
              f'{model_name} with stride_on_3x3=False is the paper\'s "v1" bottleneck (stride on '
              'the first 1x1 conv); torchvision\'s weights are "v1.5" (stride on the 3x3 conv) '
              'and would compute something else in it. Drop stride_on_3x3=False (the converted '
              'model uses stride_on_3x3=True).')
        raise ValueError(f'torchvision ResNets have {key}={REQUIRED[key]!r}; {key}={value!r} '
                         f'would not compute what the weights were trained for. Drop {key}.')
    elif key not in ALLOWED:
      raise ValueError(f'Model attribute {key}={value!r} cannot be set for converted torchvision '
                       f'weights (num_classes comes from the fc weight); settable: '
                       f'{", ".join(ALLOWED)}.')


def _expected(model_name: str, num_classes: int) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """torch key -> (path of our variable, our shape) for every tensor the network needs."""
  import jax  # pylint: disable=g-import-not-at-top
  init_fn, _ = models.functional(model_name, num_classes=num_classes, stride_on_3x3=True,
                              shortcut='B')
  abstract = jax.eval_shape(lambda rng: init_fn(rng, (1, 64, 64, 3)), jax.random.key(0))
  out = {}
  for collection, tree in abstract.items():
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    for path, leaf in flat:
      names = tuple(p.key for p in path)
      out[_torch_key(names, collection)] = ((collection, *names), tuple(leaf.shape))
  return out


def _torch_key(names: tuple[str, ...], collection: str) -> str:
  """torchvision's name of one of our variables (path without the collection)."""
  *modules, leaf = names
  param = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
           'var': 'running_var'}[leaf]
  if modules == ['head']:
    return f'fc.{param}'
  if modules[0] in ('stem_conv', 'stem_bn'):
    return f'{"conv1" if modules[0] == "stem_conv" else "bn1"}.{param}'
  m = re.fullmatch(r'stage(\d)_block(\d+)', modules[0])
  if not m:
    raise AssertionError(f'unexpected variable {collection}/{"/".join(names)}')
  prefix = f'layer{m.group(1)}.{int(m.group(2)) - 1}'
  rest = modules[1:]
  if rest[0] == 'shortcut':
    return f'{prefix}.downsample.{0 if rest[1] == "proj_conv" else 1}.{param}'
  return f'{prefix}.{rest[0]}.{param}'


def _to_ours(value: np.ndarray, leaf: str) -> np.ndarray:
  if leaf == 'kernel' and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
  if leaf == 'kernel' and value.ndim == 2:
    return value.T  # Linear (out, in) -> Dense (in, out)
  return value


def from_torchvision(model_name: str, state_dict: Mapping[str, Any], *, dtype: str = 'float32',
                     label_names: list[str] | None = None, **model_kwargs) -> dict[str, Any]:
  """Converts a torchvision ResNet state dict to this project's model and variables.

  Args:
    model_name: 'resnet18', 'resnet34', 'resnet50', 'resnet101' or 'resnet152'.
    state_dict: `torchvision.models.resnet50().state_dict()` or the same keys
      with numpy arrays.
    dtype: 'float32' or 'float64': of the variables and of the model's compute.
    label_names: class names, if known (nothing is downloaded).
    **model_kwargs: restated or run-time model attributes (see REQUIRED, ALLOWED).

  Returns {'model', 'model_kwargs', 'variables' ({'params', 'batch_stats'} as
  numpy), 'normalize' (uint8 RGB [N, H, W, 3] -> network input),
  'normalize_spec', 'label_names'}.

  Raises ValueError naming the key for missing or unexpected keys and shape
  mismatches, and for model attributes torchvision's networks do not have
  (e.g. stride_on_3x3=False).
  """
  if dtype not in DTYPES:
    raise ValueError(f'dtype={dtype!r}: use one of {DTYPES}.')
  _check_model_kwargs(model_name, model_kwargs)
  state = {k: v for k, v in state_dict.items() if not k.endswith('num_batches_tracked')}
  prefixed = [k[:-len('fc.weight')] for k in state if k.endswith('.fc.weight')]
  if 'fc.weight' not in state and prefixed:
    prefix = prefixed[0]
    raise ValueError(f'The state dict keys carry the prefix {prefix!r} (e.g. {prefix}fc.weight; '
                     'a "module." or other prefix comes from DataParallel or a wrapper). Strip '
                     f'it first: {{k.removeprefix({prefix!r}): v for k, v in state_dict.items()}}.')
  if 'fc.weight' not in state:
    raise ValueError("The state dict has no 'fc.weight', so it is not a torchvision ResNet's "
                     '(the number of classes comes from it). Pass model.state_dict() of '
                     'torchvision.models.resnet18 ... resnet152.')
  fc_shape = tuple(np.shape(state['fc.weight']))
  num_classes = int(fc_shape[0])
  expected = _expected(model_name, num_classes)

  missing = sorted(set(expected) - set(state))
  unexpected = sorted(set(state) - set(expected))
  if missing or unexpected:
    try:
      hint = infer_model(state)
      hint = (f' The state dict is torchvision\'s {hint}: use model {hint!r}.'
              if hint != model_name else '')
    except ValueError:
      hint = ''
    parts = []
    if missing:
      parts.append(f'missing key {missing[0]!r}' + (f' (and {len(missing) - 1} more)'
                                                    if len(missing) > 1 else ''))
    if unexpected:
      parts.append(f'unexpected key {unexpected[0]!r}' + (f' (and {len(unexpected) - 1} more)'
                                                          if len(unexpected) > 1 else ''))
    raise ValueError(f'The state dict does not fit {model_name}: {"; ".join(parts)}.{hint or ""} '
                     'Pass the unmodified model.state_dict() of the matching torchvision '
                     'ResNet (a checkpoint saved with a "module." or other prefix must have it '
                     'stripped first).')

  variables: dict[str, Any] = {'params': {}, 'batch_stats': {}}
  for key, (path, shape) in expected.items():
    value = _to_ours(_to_numpy(state[key]), path[-1])
    if tuple(value.shape) != shape:
      torch_shape = tuple(np.shape(state[key]))
      want = _torch_shape(shape, path[-1])
      raise ValueError(f'state_dict[{key!r}] has shape {list(torch_shape)}; {model_name} needs '
                       f'{list(want)} there. The state dict is of another network: pass the '
                       'matching model name, or the unmodified torchvision state dict.')
    node = variables
    for name in path[:-1]:
      node = node.setdefault(name, {})
    node[path[-1]] = np.ascontiguousarray(value, dtype=dtype)

  kwargs = {'num_classes': num_classes, 'stride_on_3x3': True, 'shortcut': 'B',
            'bn_epsilon': 1e-5, 'dtype': dtype, **model_kwargs}
  if label_names is not None and len(label_names) != num_classes:
    raise ValueError(f'{len(label_names)} label names for {num_classes} classes; pass one name '
                     'per output of the fc layer.')
  return {'model': model_name, 'model_kwargs': kwargs, 'variables': variables,
          'normalize': normalization.imagenet_normalize,
          'normalize_spec': {'kind': 'imagenet_mean_std', 'mean': list(normalization.IMAGENET_MEAN),
                             'std': list(normalization.IMAGENET_STD), 'scale': 1 / 255},
          'label_names': list(label_names) if label_names is not None else None}


def _torch_shape(ours: tuple[int, ...], leaf: str) -> tuple[int, ...]:
  if leaf == 'kernel' and len(ours) == 4:
    return (ours[3], ours[2], ours[0], ours[1])
  if leaf == 'kernel' and len(ours) == 2:
    return (ours[1], ours[0])
  return ours
