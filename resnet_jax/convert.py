"""Command line: convert torchvision ResNet weights into a checkpoint of this project.

    python -m resnet_jax.convert --torchvision resnet50.pth --model resnet50 --out converted/resnet50
    python -m resnet_jax.predict --checkpoint=converted/resnet50 photo.jpg

The .pth is a torchvision ResNet-18/34/50/101/152 state dict
(`torch.save(model.state_dict(), path)`, or a file torchvision downloaded);
reading it needs torch. Without --model the network is read from the state
dict's block counts. The output is one checkpoint that
`resnet_jax.load_variables(OUT)` and `resnet_jax.checkpoint_info(OUT)` read;
its meta records the input normalisation (ImageNet mean/std after /255), the
source file and its SHA-256, and the class names if --label_names gives them
(a text file, one name per line, in the order of the fc outputs). OUT must
not exist, and nothing is left behind on an error. See weights/torchvision.py
for how the two networks correspond.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from resnet_jax.weights import torchvision as tv


def read_state_dict(path: str) -> dict[str, Any]:
  """A state dict from a .pth file (torch.load with weights_only: no code from the file runs)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f'Reading {path} needs torch, which is not installed: pip install torch '
                     '(the CPU build is enough).') from e
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'Cannot read {path} as a torch state dict ({type(e).__name__}: '
                     f'{str(e).splitlines()[0] if str(e) else ""}). Save one with '
                     'torch.save(model.state_dict(), path).') from e
  if not isinstance(obj, dict):
    raise ValueError(f'{path} holds a {type(obj).__name__}, not a state dict. Save one with '
                     'torch.save(model.state_dict(), path).')
  if 'state_dict' in obj and isinstance(obj['state_dict'], dict) and 'fc.weight' not in obj:
    raise ValueError(f"{path} is a training checkpoint whose weights are under 'state_dict'; "
                     "save checkpoint['state_dict'] on its own and convert that.")
  return obj


def convert(torchvision_path: str, out: str, *, model: str | None = None,
            label_names_path: str | None = None) -> dict[str, Any]:
  """Converts one .pth into a checkpoint at `out`; returns the conversion (see from_torchvision)."""
  from resnet_jax.weights import loading  # pylint: disable=g-import-not-at-top
  out = os.path.abspath(out)
  if os.path.exists(out):
    raise FileExistsError(f'{out} already exists; not overwriting it. Choose a new --out or '
                          'delete it first.')
  state_dict = read_state_dict(torchvision_path)
  model = model or tv.infer_model(state_dict)
  label_names = None
  if label_names_path is not None:
    with open(label_names_path) as f:
      label_names = [line.strip() for line in f if line.strip()]
  converted = tv.from_torchvision(model, state_dict, label_names=label_names)
  import torch  # pylint: disable=g-import-not-at-top
  source = {'format': 'torchvision', 'file': os.path.abspath(torchvision_path),
            'sha256': loading.sha256_file(torchvision_path), 'torch_version': torch.__version__}
  loading.write_inference_checkpoint(
      out, converted['variables'], converted['model'], converted['model_kwargs'],
      {'normalize': converted['normalize_spec'], 'label_names': converted['label_names'],
       'source': source})
  return converted


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m resnet_jax.convert', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--torchvision', required=True, metavar='PTH',
                      help='A torchvision ResNet state dict (.pth).')
  parser.add_argument('--model', choices=tv.torchvision_models(), default=None,
                      help='The network (default: read from the state dict).')
  parser.add_argument('--out', required=True, help='The checkpoint directory to write (new).')
  parser.add_argument('--label_names', default=None,
                      help='A text file of class names, one per line, in output order.')
  args = parser.parse_args(argv)
  try:
    converted = convert(args.torchvision, args.out, model=args.model,
                        label_names_path=args.label_names)
  except (ValueError, OSError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  kwargs = converted['model_kwargs']
  print(f"Wrote {os.path.abspath(args.out)}: {converted['model']} "
        f"(num_classes={kwargs['num_classes']}, stride_on_3x3=True, shortcut='B') from "
        f'{args.torchvision}.')
  return 0


if __name__ == '__main__':
  sys.exit(main())
