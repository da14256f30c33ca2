"""Every network of the paper: the Flax modules (`resnet.py`) and the named
presets with their pure init/apply functions (`registry.py`)."""

from resnet_jax.models.registry import (CONV_CHOICES, DTYPES, MODELS, check_dtype,
                                        check_model_name, create_model, from_config,
                                        default_input_shape, family, functional, list_models,
                                        resolve_conv, unroll_scanned)
from resnet_jax.models.registry import (CIFAR_DEPTHS, CIFAR_PLAIN_DEPTHS, IMAGENET_STAGES,
                                        cifar_resnet, imagenet_resnet)
from resnet_jax.models.resnet import (BasicBlock, BottleneckBlock, GhostBatchNorm, ResNet,
                                      Shortcut)

__all__ = ['BasicBlock', 'BottleneckBlock', 'CIFAR_DEPTHS', 'CIFAR_PLAIN_DEPTHS', 'GhostBatchNorm',
           'IMAGENET_STAGES', 'Shortcut', 'cifar_resnet', 'imagenet_resnet', 'CONV_CHOICES', 'DTYPES', 'MODELS', 'check_dtype', 'ResNet', 'check_model_name', 'create_model',
           'default_input_shape', 'family', 'from_config', 'functional', 'list_models', 'resolve_conv',
           'unroll_scanned']
