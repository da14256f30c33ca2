"""resnet_jax: a faithful JAX/Flax reproduction of He et al., "Deep Residual Learning for Image Recognition".

    import resnet_jax
    resnet_jax.list_models()
    model = resnet_jax.create_model('cifar_resnet110')
    init_fn, apply_fn = resnet_jax.functional('resnet50')
    variables = resnet_jax.load_variables('workdirs/r110')   # trained weights, numpy
    info = resnet_jax.checkpoint_info('workdirs/r110')       # which model, which step
    net = resnet_jax.pretrained('cifar_resnet20')            # shipped weights (pretrained.available())
"""

from resnet_jax import host_memory

# Before anything starts JAX's threads: step buffers reused, not re-faulted (host_memory.py).
host_memory.configure()

from resnet_jax.api import create_model, functional, list_models  # pylint: disable=g-import-not-at-top,wrong-import-position

__all__ = ['checkpoint_info', 'create_model', 'functional', 'list_models', 'load_variables',
           'pretrained']
__version__ = '0.1.0'

_CHECKPOINT_API = ('checkpoint_info', 'load_variables')


def __getattr__(name):
  # Checkpoint readers load on first use: orbax is slow to import.
  if name in _CHECKPOINT_API:
    from resnet_jax import checkpoints  # pylint: disable=g-import-not-at-top
    return getattr(checkpoints, name)
  if name == 'pretrained':
    from resnet_jax.weights import pretrained  # pylint: disable=g-import-not-at-top
    return pretrained
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
