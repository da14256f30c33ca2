"""CIFAR-10 plain-44: ResNet-44 without shortcuts, same layers and parameters.

Appears in Fig. 6 only; the paper reports higher training AND test error than the shallower plain nets (Fig. 6, left: the degradation problem).

    python -m resnet_jax.main --config=experiments/cifar_plain44.py --workdir=workdirs/cifar_plain44

Recipe as for the ResNets (see cifar_resnet44.py).
"""

from resnet_jax import configs


def get_config():
  return configs.cifar('cifar_plain44')
