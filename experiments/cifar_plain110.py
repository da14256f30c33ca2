"""CIFAR-10 plain-110: ResNet-110 without shortcuts, same layers and parameters.

Appears in Fig. 6 only; the paper reports over 60% error (Fig. 6, right).

    python -m resnet_jax.main --config=experiments/cifar_plain110.py --workdir=workdirs/cifar_plain110

Recipe as for the ResNets (see cifar_resnet110.py).
"""

from resnet_jax import configs


def get_config():
  return configs.cifar('cifar_plain110', warmup_steps=400)
