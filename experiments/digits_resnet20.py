"""Offline demo: CIFAR ResNet-20 on scikit-learn's bundled handwritten digits.

No network needed: the 1,797 8x8 digits ship inside scikit-learn; they are
upsampled to 32x32x3 and go through the same CIFAR pipeline (per-pixel mean,
pad-4 crops and flips), model, optimiser and loop as the paper's runs.

    python -m resnet_jax.main --config=experiments/digits_resnet20.py --workdir=workdirs/digits_resnet20

600 iterations of 64 images, lr 0.1 divided by 10 at 400 and 500. Expect
about 97-99% test accuracy (see the README for the measured figure).
"""

from resnet_jax import configs


def get_config():
  return configs.digits('cifar_resnet20')
