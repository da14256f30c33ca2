"""The paper's numbers, in one place: He, Zhang, Ren and Sun, "Deep Residual
Learning for Image Recognition" (CVPR 2016).

The report, `summary`, the tests that quote the paper and the README's tables
(`python -m resnet_jax.paper`) all read them from here.
"""

from __future__ import annotations

import math

# Table 6: CIFAR-10 test error (%). ResNet-110 is "best (mean +- std)" of 5 runs.
CIFAR_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}
CIFAR_MEAN_STD = {110: (6.61, 0.16)}
# Table 6's parameter counts (the CIFAR nets), and the option-B counts of the
# ImageNet nets that every common implementation has (Table 1 gives FLOPs only).
PARAMS = {
    'cifar_resnet20': 0.27e6, 'cifar_resnet32': 0.46e6, 'cifar_resnet44': 0.66e6,
    'cifar_resnet56': 0.85e6, 'cifar_resnet110': 1.7e6, 'cifar_resnet1202': 19.4e6,
    'resnet18': 11_689_512, 'resnet34': 21_797_672, 'resnet50': 25_557_032,
    'resnet101': 44_549_160, 'resnet152': 60_192_808,
}
# Table 1: multiply-adds ("FLOPs") of a 224x224 image.
MACS = {
    'resnet18': 1.8e9, 'plain18': 1.8e9, 'resnet34': 3.6e9, 'plain34': 3.6e9,
    'resnet50': 3.8e9, 'resnet101': 7.6e9, 'resnet152': 11.3e9,
}
# Table 3: top-1 / top-5 error (%), 10-crop testing on the validation set.
# Keys: (model, shortcut option); None where the paper gives no top-5. The
# 18-layer numbers are Table 2's (10-crop too).
IMAGENET_10CROP = {
    ('plain18', 'B'): (27.94, None), ('resnet18', 'B'): (27.88, None),
    ('plain34', 'B'): (28.54, 10.02),
    ('resnet34', 'A'): (25.03, 7.76), ('resnet34', 'B'): (24.52, 7.46),
    ('resnet34', 'C'): (24.19, 7.40),
    ('resnet50', 'B'): (22.85, 6.71), ('resnet101', 'B'): (21.75, 6.05),
    ('resnet152', 'B'): (21.43, 5.71),
}
# Table 4: single-model top-1 / top-5 error (%), fully convolutional multi-scale testing.
IMAGENET_SINGLE_MODEL = {
    ('resnet34', 'B'): (21.84, 5.71), ('resnet34', 'C'): (21.53, 5.60),
    ('resnet50', 'B'): (20.74, 5.25), ('resnet101', 'B'): (19.87, 4.60),
    ('resnet152', 'B'): (19.38, 4.49),
}
# Fig. 6 (left): plain nets get worse with depth; plain-110 is not in Table 6
# ("more than 60%" error, Sec. 4.2).
PLAIN110_ERROR_ABOVE = 60.0

# What each family's numbers were trained on, and for how long.
DATA = {'cifar': 'cifar10', 'imagenet': 'imagenet2012'}
IMAGENET_TRAIN_EXAMPLES = 1_281_167
SCHEDULE = {'cifar': 'CIFAR-10, 64,000 iterations of 128 images',
            'imagenet': 'ImageNet, 90 epochs (our recipe; the paper: up to 600,000 '
                        'iterations of 256)'}
# The recipes (Sec. 3.4 and 4.2).
CIFAR_RECIPE = dict(batch_size=128, learning_rate=0.1, momentum=0.9, weight_decay=1e-4,
                    lr_boundaries_steps=(32_000, 48_000), num_train_steps=64_000,
                    train_examples=45_000, val_examples=5_000,
                    resnet110_warmup=dict(learning_rate=0.01, until_train_error=0.8,
                                          steps=400))
IMAGENET_RECIPE = dict(batch_size=256, learning_rate=0.1, momentum=0.9, weight_decay=1e-4,
                       scale_augmentation=(256, 480), crop=224)


def steps(family: str, batch_size: int) -> int:
  """Iterations of `batch_size` that match the paper's schedule (CIFAR) or our recipe (ImageNet)."""
  if family == 'cifar':
    return math.ceil(CIFAR_RECIPE['num_train_steps'] * CIFAR_RECIPE['batch_size'] / batch_size)
  return 90 * (IMAGENET_TRAIN_EXAMPLES // batch_size)  # epochs drop their remainder


def cifar_error_text(depth: int) -> str:
  """'8.75', or '6.43 (6.61 ± 0.16)' for ResNet-110."""
  if depth in CIFAR_MEAN_STD:
    mean, std = CIFAR_MEAN_STD[depth]
    return f'{CIFAR_ERROR[depth]:.2f} ({mean:.2f} \u00b1 {std:.2f})'
  return f'{CIFAR_ERROR[depth]:.2f}'


def markdown_tables() -> str:
  """The README's tables of the paper's numbers."""
  lines = ['| CIFAR-10 network | params (paper) | test error % (paper) |', '|---|---|---|']
  for depth, _ in sorted(CIFAR_ERROR.items()):
    params = PARAMS[f'cifar_resnet{depth}'] / 1e6
    lines.append(f'| ResNet-{depth} | {params:.2f}M | {cifar_error_text(depth)} |')
  lines += ['', '| ImageNet network | shortcut | top-1 / top-5 % (10-crop, paper) |'
            ' single model, multi-scale |', '|---|---|---|---|']
  for (model, shortcut), (top1, top5) in IMAGENET_10CROP.items():
    single = IMAGENET_SINGLE_MODEL.get((model, shortcut))
    lines.append(f'| {model} | {shortcut} | {top1:.2f} / {"-" if top5 is None else f"{top5:.2f}"} '
                 f'| {"-" if single is None else f"{single[0]:.2f} / {single[1]:.2f}"} |')
  return '\n'.join(lines)


if __name__ == '__main__':
  print(markdown_tables())
