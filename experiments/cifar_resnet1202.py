"""CIFAR-10 ResNet-1202 (Section 4.2, Table 6). The paper's numbers: resnet_jax/paper.py.

The identical blocks of each stage run under `nn.scan`, so the 1202-layer
step compiles in seconds rather than hours; the function is the same. Each
block is rematerialised in the backward pass (its activations recomputed, not
stored), which keeps batch 128 within ~24 GB of host memory; on a large GPU,
`--config.model.remat=False` trades that memory for ~25% less compute.

    python -m resnet_jax.main --config=experiments/cifar_resnet1202.py --workdir=workdirs/cifar_resnet1202

Recipe: batch 128, SGD momentum 0.9, weight decay 1e-4, lr 0.1 divided by 10 at
32k and 48k iterations, 64k iterations, 45k/5k train/validation split, option-A
shortcuts, per-pixel mean subtraction, pad-4 random crops and flips.
"""

from resnet_jax import configs


def get_config():
  config = configs.cifar('cifar_resnet1202')
  config.model.scan_blocks = True
  config.model.remat = True
  return config
