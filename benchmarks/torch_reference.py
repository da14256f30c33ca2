"""PyTorch reference of the CIFAR networks, for speed comparisons only.

Not part of the package and not a dependency: `pip install torch` (the CPU
build: `pip install torch==2.13.0`) to use it. `python -m resnet_jax.benchmark
--torch` loads it and times it beside the JAX step; `tests/test_torch_reference.py`
checks it is the same network (parameter count, and the same outputs given the
same weights).

Architecture, as `resnet_jax.models.cifar_resnet`: 3x3 conv (16) -> BN -> ReLU;
3 stages of n basic blocks (16/32/64 filters, stride 2 on the first conv of
stages 2 and 3); option-A shortcuts (subsample, zero channels split between
both ends); BN eps 1e-5, momentum 0.1 (= Flax 0.9); global average pool;
Linear(64, 10). Plain nets drop the shortcut.
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class OptionA(nn.Module):
  def __init__(self, extra: int, stride: int):
    super().__init__()
    self.before, self.after, self.stride = extra // 2, extra - extra // 2, stride

  def forward(self, x):
    return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.before, self.after))


class BasicBlock(nn.Module):
  def __init__(self, in_planes: int, planes: int, stride: int, residual: bool):
    super().__init__()
    self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes, eps=1e-5, momentum=0.1)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes, eps=1e-5, momentum=0.1)
    self.residual = residual
    reshape = stride != 1 or in_planes != planes
    self.shortcut = OptionA(planes - in_planes, stride) if reshape else nn.Identity()

  def forward(self, x):
    out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    if self.residual:
      out = out + self.shortcut(x)
    return F.relu(out)


class CifarResNet(nn.Module):
  def __init__(self, depth: int = 20, residual: bool = True, num_classes: int = 10):
    super().__init__()
    if (depth - 2) % 6:
      raise ValueError(f'depth must be 6n+2, not {depth}')
    n = (depth - 2) // 6
    self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(16, eps=1e-5, momentum=0.1)
    blocks, in_planes = [], 16
    for i, planes in enumerate((16, 32, 64)):
      for j in range(n):
        blocks.append(BasicBlock(in_planes, planes, 2 if i > 0 and j == 0 else 1, residual))
        in_planes = planes
    self.blocks = nn.Sequential(*blocks)
    self.n = n
    self.fc = nn.Linear(64, num_classes)
    for m in self.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode='fan_in', nonlinearity='relu')

  def forward(self, x):
    out = self.blocks(F.relu(self.bn1(self.conv1(x))))
    return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def from_name(name: str) -> CifarResNet:
  """'cifar_resnet20' -> CifarResNet(20); 'cifar_plain56' -> plain CifarResNet(56)."""
  for prefix, residual in (('cifar_resnet', True), ('cifar_plain', False)):
    if name.startswith(prefix):
      return CifarResNet(int(name[len(prefix):]), residual)
  raise ValueError(f'The PyTorch reference has the CIFAR networks only, not {name!r}.')


def count_params(model: nn.Module) -> int:
  return sum(p.numel() for p in model.parameters())


def load_jax_variables(model: CifarResNet, variables) -> None:
  """Copies a `resnet_jax` CIFAR net's {'params', 'batch_stats'} into `model`."""
  params, stats = variables['params'], variables['batch_stats']

  def conv(m, kernel):  # HWIO -> OIHW
    m.weight.data = torch.from_numpy(np.asarray(kernel).transpose(3, 2, 0, 1).copy())

  def bn(m, p, s):
    for attr, value in (('weight', p['scale']), ('bias', p['bias']),
                        ('running_mean', s['mean']), ('running_var', s['var'])):
      getattr(m, attr).data = torch.from_numpy(np.array(value))

  conv(model.conv1, params['stem_conv']['kernel'])
  bn(model.bn1, params['stem_bn'], stats['stem_bn'])
  for index, block in enumerate(model.blocks):
    name = f'stage{index // model.n + 1}_block{index % model.n + 1}'
    conv(block.conv1, params[name]['conv1']['kernel'])
    conv(block.conv2, params[name]['conv2']['kernel'])
    bn(block.bn1, params[name]['bn1'], stats[name]['bn1'])
    bn(block.bn2, params[name]['bn2'], stats[name]['bn2'])
  model.fc.weight.data = torch.from_numpy(np.asarray(params['head']['kernel']).T.copy())
  model.fc.bias.data = torch.from_numpy(np.array(params['head']['bias']))


def versions() -> dict[str, object]:
  return {'torch': torch.__version__, 'torch_threads': torch.get_num_threads()}


class TorchBench:
  """A train step (SGD, momentum 0.9, wd 1e-4, cross-entropy) and an eval step on fixed data."""

  def __init__(self, name: str, *, batch_size: int, eval_batch_size: int,
               channels_last: bool = True, bf16: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    self.model = from_name(name)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    self.model = self.model.to(memory_format=fmt)
    self.x = torch.randn(batch_size, 3, 32, 32).contiguous(memory_format=fmt)
    self.y = torch.randint(0, 10, (batch_size,))
    self.x_eval = torch.randn(eval_batch_size, 3, 32, 32).contiguous(memory_format=fmt)
    self.bf16 = bf16
    self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)

  def train_step(self):
    self.model.train()
    self.opt.zero_grad(set_to_none=True)
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=self.bf16):
      loss = F.cross_entropy(self.model(self.x), self.y)
    loss.backward()
    self.opt.step()
    return loss.item()

  @torch.no_grad()
  def eval_step(self):
    self.model.eval()
    with torch.autocast('cpu', dtype=torch.bfloat16, enabled=self.bf16):
      return self.model(self.x_eval).argmax(-1).sum().item()

  def time(self, steps: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per train step and per eval step."""
    out = {}
    for name, fn in (('train', self.train_step), ('eval', self.eval_step)):
      for _ in range(warmup):
        fn()
      times = []
      for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
      out[name] = times
    return out
