"""resnet_jax: a faithful JAX/Flax reproduction of He et al., "Deep Residual Learning for Image Recognition".

    import resnet_jax
    resnet_jax.list_models()
    model = resnet_jax.create_model('cifar_resnet110')
    init_fn, apply_fn = resnet_jax.functional('resnet50')
    variables = resnet_jax.load_variables('workdirs/r110')   # trained weights, numpy
    info = resnet_jax.checkpoint_info('workdirs/r110')       # which model, which step
    net = resnet_jax.pretrained('cifar_resnet20')            # shipped weights (pretrained.available())

Importing the package imports nothing heavy and changes nothing in the process:
each name below loads its module on first use. (The CPU training commands also
tune glibc's allocator; library users who want that call
`resnet_jax.kernels.host_memory.configure()` before their first JAX computation.)
"""

import importlib

__version__ = '0.1.0'

_API = {
    'list_models': 'resnet_jax.models',
    'create_model': 'resnet_jax.models',
    'functional': 'resnet_jax.models',
    'load_variables': 'resnet_jax.weights.loading',
    'load_state': 'resnet_jax.weights.loading',
    'checkpoint_info': 'resnet_jax.weights.loading',
    'pretrained': 'resnet_jax.weights.shipped',
    'from_torchvision': 'resnet_jax.weights.torchvision',
}
__all__ = sorted(_API)


def __getattr__(name):
  if name in _API:
    return getattr(importlib.import_module(_API[name]), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + list(_API))
