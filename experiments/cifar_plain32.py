"""CIFAR-10 plain-32: ResNet-32 without shortcuts, same layers and parameters.

Appears in Fig. 6 only; the paper reports higher training AND test error than the shallower plain nets (Fig. 6, left: the degradation problem).

    python -m resnet_jax.main --config=experiments/cifar_plain32.py --workdir=workdirs/cifar_plain32

Recipe as for the ResNets (see cifar_resnet32.py).
"""

from resnet_jax import configs


def get_config():
  return configs.cifar('cifar_plain32')
