"""CIFAR-10 ResNet-32 (Section 4.2, Table 6). The paper's numbers: resnet_jax/paper.py.

    python -m resnet_jax.main --config=experiments/cifar_resnet32.py --workdir=workdirs/cifar_resnet32

Recipe: batch 128, SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at
32k and 48k iterations, 64k iterations, 45k/5k train/validation split, option-A
shortcuts, per-pixel mean subtraction, pad-4 random crops and flips.
"""

from resnet_jax import configs


def get_config():
  return configs.cifar('cifar_resnet32')
