"""resnet_jax: a faithful JAX/Flax reproduction of He et al., "Deep Residual Learning for Image Recognition".

    import resnet_jax
    resnet_jax.list_models()
    model = resnet_jax.create_model('cifar_resnet110')
    init_fn, apply_fn = resnet_jax.functional('resnet50')
"""

from resnet_jax.api import create_model, functional, list_models

__all__ = ['create_model', 'functional', 'list_models']
__version__ = '0.1.0'
