"""Parameter counts and multiply-adds of every model, beside the paper's numbers.

    python -m resnet_jax.summary            # all models
    python -m resnet_jax.summary resnet50   # some

Counts come from the models themselves: parameters from `jax.eval_shape` of
`init` (nothing is allocated), multiply-adds by walking the jaxpr of one
forward pass and adding up every convolution and matrix product, as the paper
counts FLOPs (BN, ReLU, pooling and additions are not counted).
"""

from __future__ import annotations

import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import models, paper

def _eqn_macs(eqn) -> int:
  name = eqn.primitive.name
  if name == 'conv_general_dilated':
    out = eqn.outvars[0].aval.shape
    rhs = eqn.invars[1].aval.shape
    dn = eqn.params['dimension_numbers']
    # rhs_spec = (out feature dim, in feature dim, *spatial dims)
    in_feat = rhs[dn.rhs_spec[1]]
    window = math.prod(rhs[d] for d in dn.rhs_spec[2:])
    return math.prod(out) * in_feat * window
  if name == 'dot_general':
    (lhs_contract, _), _ = eqn.params['dimension_numbers']
    lhs = eqn.invars[0].aval.shape
    return math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in lhs_contract)
  return 0


def _jaxpr_macs(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    total += _eqn_macs(eqn)
    mult = eqn.params.get('length', 1) if eqn.primitive.name == 'scan' else 1
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else [param]):
        inner = getattr(sub, 'jaxpr', None)
        if inner is not None and hasattr(inner, 'eqns'):
          total += mult * _jaxpr_macs(inner)
        elif hasattr(sub, 'eqns'):
          total += mult * _jaxpr_macs(sub)
  return total


def count_macs(fn, *args) -> int:
  """Multiply-adds of convolutions and matrix products in `fn(*args)` (traced, not run)."""
  return _jaxpr_macs(jax.make_jaxpr(fn)(*args).jaxpr)


def count_params(tree: Any) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def model_summary(name: str, **overrides) -> dict[str, Any]:
  """Parameters and multiply-adds per image of the named model, from the model itself."""
  model = models.create_model(name, **overrides)
  x = jax.ShapeDtypeStruct(models.default_input_shape(name), jnp.float32)
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)
  macs = count_macs(lambda v, x: model.apply(v, x, train=False), variables, x)
  return dict(name=name, params=count_params(variables['params']), macs=macs,
              paper_params=paper.PARAMS.get(name), paper_macs=paper.MACS.get(name))


def _fmt(x: float | None, scale: float, unit: str, digits: int = 2) -> str:
  return '-' if x is None else f'{x / scale:.{digits}f}{unit}'


def summary_table(names: list[str] | None = None) -> str:
  """A Markdown table of parameters and multiply-adds beside the paper's numbers."""
  rows = ['| model | params | paper params | mult-adds | paper mult-adds |',
          '|---|---|---|---|---|']
  for name in names or models.list_models():
    s = model_summary(name)
    rows.append(f"| {name} | {s['params']:,} | {_fmt(s['paper_params'], 1e6, 'M')} | "
                f"{_fmt(s['macs'], 1e9, 'G', 3)} | {_fmt(s['paper_macs'], 1e9, 'G', 1)} |")
  return '\n'.join(rows)


if __name__ == '__main__':
  print(summary_table(sys.argv[1:] or None))
