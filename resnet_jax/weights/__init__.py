"""Trained weights: converted from torchvision, and the ones this package ships.

    from resnet_jax.weights import from_torchvision, pretrained
    converted = from_torchvision('resnet50', torch_state_dict)   # see torchvision.py
    net = pretrained('cifar_resnet20')                            # see shipped.py
    pretrained.available()                                        # what is shipped

Each returns the model name and constructor arguments, the variables
({'params', 'batch_stats'} as numpy), the input normalisation as a function of
uint8 RGB images, and the class names where known.
"""

from resnet_jax.weights.shipped import pretrained
from resnet_jax.weights.torchvision import from_torchvision, infer_model

__all__ = ['from_torchvision', 'infer_model', 'pretrained']
