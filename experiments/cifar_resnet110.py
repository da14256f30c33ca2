"""CIFAR-10 ResNet-110 (Section 4.2, Table 6). The paper's numbers: resnet_jax/paper.py.

The paper's ResNet-110 warm-up: lr 0.01 for the first 400 iterations (until the
training error is below 80%), then 0.1 and the usual schedule. Set
`--config.warmup_until_train_error=0.8` to end the warm-up on the error instead.

    python -m resnet_jax.main --config=experiments/cifar_resnet110.py --workdir=workdirs/cifar_resnet110

Recipe: batch 128, SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at
32k and 48k iterations, 64k iterations, 45k/5k train/validation split, option-A
shortcuts, per-pixel mean subtraction, pad-4 random crops and flips.
"""

from resnet_jax import configs


def get_config():
  return configs.cifar('cifar_resnet110', warmup_steps=400)
