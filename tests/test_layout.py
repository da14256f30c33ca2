"""The package's layout: imports go one way, modules stay small, and workdirs
written before the restructure still load and resume."""

import ast
import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

import resnet_jax
from resnet_jax import configs

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / 'resnet_jax'
FIXTURE = ROOT / 'tests' / 'fixtures' / 'workdir_v0_digits'

# Layers, lowest first: a module may import its own layer and those below it.
_LAYERS = [
    {'paper', 'configs', 'kernels', 'models', 'data', 'weights', 'runs'},
    {'analysis'},
    {'training'},
    {'main', 'sweep', 'report', 'plots', 'benchmark', 'benchmark_input', 'summary', 'predict',
     'convert', 'export', 'benchmark_gpu', 'evaluate'},
]
_COMMANDS = _LAYERS[-1]


def _layer(unit: str) -> int:
  for i, layer in enumerate(_LAYERS):
    if unit in layer:
      return i
  raise AssertionError(f'resnet_jax.{unit} is in no layer of tests/test_layout.py; add it.')


def _unit(module: str) -> str:
  """'resnet_jax.training.loop' -> 'training'; 'resnet_jax.paper' -> 'paper'."""
  return module.split('.')[1]


def _imports(source: str, module: str) -> list[str]:
  """Every resnet_jax module the source of `module` imports, at any depth (lazy imports count)."""
  out = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out += [a.name for a in node.names if a.name.startswith('resnet_jax.')]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # relative import
        base = '.'.join(module.split('.')[:-node.level] + ([base] if base else []))
      if base == 'resnet_jax':
        out += [f'resnet_jax.{a.name}' for a in node.names]
      elif base.startswith('resnet_jax.'):
        out.append(base)
  return out


def _package_sources() -> dict[str, str]:
  """module name -> source of every module of the package (its __init__ excluded)."""
  return {'.'.join(p.relative_to(ROOT).with_suffix('').parts): p.read_text()
          for p in sorted(PACKAGE.rglob('*.py')) if p != PACKAGE / '__init__.py'}


def _upward_imports(sources: dict[str, str]) -> list[str]:
  bad = []
  for module, source in sources.items():
    for target in _imports(source, module):
      if _unit(target) != _unit(module) and _layer(_unit(target)) > _layer(_unit(module)):
        bad.append(f'{module} imports {target}')
  return bad


def test_no_module_imports_one_above_it():
  assert _upward_imports(_package_sources()) == []


def test_report_imports_no_training_code_and_libraries_no_commands():
  sources = _package_sources()
  assert [t for t in _imports(sources['resnet_jax.report'], 'resnet_jax.report')
          if _unit(t) == 'training'] == []
  for module, source in sources.items():
    if _unit(module) in ('models', 'data', 'training', 'kernels', 'weights'):
      assert [t for t in _imports(source, module) if _unit(t) in _COMMANDS] == [], module


def test_the_layer_check_sees_upward_imports():
  # The checks above must be able to fail: a data module importing a command and training.
  fake = {'resnet_jax.data.fake': 'from resnet_jax import report\n'
                                  'def f():\n  from resnet_jax.training import loop\n'
                                  'from . import base\n'}
  assert sorted(_imports(fake['resnet_jax.data.fake'], 'resnet_jax.data.fake')) == [
      'resnet_jax.data', 'resnet_jax.report', 'resnet_jax.training']
  assert _upward_imports(fake) == ['resnet_jax.data.fake imports resnet_jax.report',
                                   'resnet_jax.data.fake imports resnet_jax.training']


def test_no_module_is_over_450_lines():
  sizes = {m: len(source.splitlines()) for m, source in _package_sources().items()}
  assert {p: n for p, n in sizes.items() if n > 450} == {}


def test_importing_the_package_loads_nothing_heavy():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ('import sys, resnet_jax; print(sorted(m for m in ("jax", "flax", "orbax.checkpoint", '
          '"tensorflow", "tensorflow_datasets") if m in sys.modules)); '
          'from resnet_jax.kernels import host_memory; print(host_memory.status)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True,
                       cwd=ROOT).stdout.splitlines()
  assert out == ['[]', 'not configured']


# ----------------------------------------------------------------------------
# A workdir written by the code before the restructure (commit 33c6ad4):
# `experiments/digits_resnet20.py` with the overrides below, stopped after its
# checkpoint at step 2; reference_metrics.jsonl is that run's log to step 4.

_V0_OVERRIDES = dict(num_train_steps=4, batch_size=8, checkpoint_every_steps=2, eval_every_steps=4,
                     log_every_steps=2, keep_checkpoints=2, progress_bar=False)


def _v0_config():
  c = configs.digits('cifar_resnet20', **_V0_OVERRIDES)
  c.model.conv = 'xla'
  return configs.lock(c)


def test_old_checkpoint_loads_for_inference():
  info = resnet_jax.checkpoint_info(FIXTURE)
  assert (info['step'], info['model']) == (2, 'cifar_resnet20')
  variables = resnet_jax.load_variables(FIXTURE)
  _, apply_fn = resnet_jax.functional(info['model'], **info['model_kwargs'])
  logits = apply_fn(variables, np.zeros((2, 32, 32, 3), np.float32))
  assert logits.shape == (2, 10) and bool(np.isfinite(logits).all())


def test_old_workdir_resumes_to_the_same_losses(tmp_path):
  from resnet_jax.training import loop  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'w'
  shutil.copytree(FIXTURE, workdir)
  result = loop.train_and_evaluate(_v0_config(), str(workdir))
  assert result['resumed_from_step'] == 2 and result['steps'] == 4
  with open(FIXTURE / 'reference_metrics.jsonl') as f:
    reference = {r['step']: r for r in map(json.loads, f)}
  with open(workdir / 'metrics.jsonl') as f:
    resumed = {r['step']: r for r in map(json.loads, f)}
  assert sorted(resumed) == [2, 4]
  np.testing.assert_allclose(resumed[4]['train_loss'], reference[4]['train_loss'], rtol=1e-5)
  np.testing.assert_allclose(resumed[4]['test_error'], reference[4]['test_error'])
  assert jax.tree.leaves(result['state'].params)[0].dtype == np.float32


def test_old_workdir_refuses_a_changed_training_set(tmp_path):
  from resnet_jax.training import checkpoints, loop  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / 'w'
  shutil.copytree(FIXTURE, workdir)
  config = _v0_config()
  config.unlock()
  config.data.digits_test_fraction = 0.5  # not recorded then; then it was always 0.2
  with pytest.raises(checkpoints.CheckpointMismatchError, match='digits_test_fraction'):
    loop.train_and_evaluate(configs.lock(config), str(workdir))
  assert os.listdir(workdir / 'checkpoints') == ['2']


def test_readme_quotes_the_papers_numbers_from_paper_py():
  from resnet_jax import paper  # pylint: disable=g-import-not-at-top
  readme = (ROOT / 'README.md').read_text()
  assert paper.markdown_tables() in readme
