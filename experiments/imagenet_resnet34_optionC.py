"""ImageNet ResNet-34 with shortcut option C (Table 3, 10-crop). The paper's numbers: resnet_jax/paper.py.

    python -m resnet_jax.main --config=experiments/imagenet_resnet34_optionC.py --workdir=workdirs/imagenet_resnet34_optionC

Option A: zero-padding identity shortcuts, no parameters. Option C: a projection
on every shortcut. Recipe as in imagenet_resnet34.py.
"""

from resnet_jax import configs


def get_config():
  return configs.imagenet('resnet34', shortcut='C')
