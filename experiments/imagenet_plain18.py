"""ImageNet plain-18 (Section 3.4). The paper's numbers: resnet_jax/paper.py.

    python -m resnet_jax.main --config=experiments/imagenet_plain18.py --workdir=workdirs/imagenet_plain18

Needs ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in tfds's manual
directory (see the README). Recipe: batch 256, SGD momentum 0.9, weight decay
1e-4, lr 0.1 divided by 10 at epochs 30 and 60 (the paper: "when the error
plateaus"), 90 epochs, scale augmentation [256, 480], 224 crops, PCA colour
augmentation. `--config.data.ten_crop=True` evaluates with the paper's 10 crops.
"""

from resnet_jax import configs


def get_config():
  return configs.imagenet('plain18')
