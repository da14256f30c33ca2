"""host_memory: which malloc settings are applied, when, and that importing the package applies none.

The effect itself (page faults per train step) depends on the machine and its
load, so it is measured, not asserted: `python -m resnet_jax.benchmark` prints it.
"""

import importlib.util
import os
import subprocess
import sys
import types

import pytest

from resnet_jax.kernels import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETTINGS = [(-8, 1), (-4, 0), (-1, 2**31 - 1)]  # M_ARENA_MAX, M_MMAP_MAX, M_TRIM_THRESHOLD


@pytest.fixture
def fake_libc(monkeypatch):
  """A libc whose mallopt records its calls; host_memory reset to 'not configured'."""
  calls = []
  libc = types.SimpleNamespace(mallopt=lambda param, value: calls.append((param, value)) or 1)
  monkeypatch.setattr(host_memory.ctypes, 'CDLL', lambda name: libc)
  monkeypatch.setattr(host_memory, 'status', 'not configured')
  monkeypatch.setattr(host_memory.sys, 'platform', 'linux')
  monkeypatch.delenv('RESNET_JAX_MALLOC', raising=False)
  monkeypatch.delenv('JAX_PLATFORMS', raising=False)
  return calls


def test_configure_sets_one_arena_no_mmap_no_trim_once(fake_libc):
  assert host_memory.configure() == host_memory.status == 'one arena, no mmap, no trim'
  assert fake_libc == SETTINGS
  host_memory.configure()
  assert fake_libc == SETTINGS  # once per process


def test_configure_reports_a_refused_setting_and_honours_the_opt_out(fake_libc, monkeypatch):
  monkeypatch.setattr(host_memory.ctypes, 'CDLL', lambda name: types.SimpleNamespace(
      mallopt=lambda param, value: 0 if param == -4 else 1))
  assert host_memory.configure() == 'mallopt refused a setting'
  monkeypatch.setattr(host_memory, 'status', 'not configured')
  monkeypatch.setenv('RESNET_JAX_MALLOC', 'default')
  monkeypatch.setattr(host_memory.ctypes, 'CDLL', lambda name: pytest.fail('mallopt called'))
  assert host_memory.configure() == 'glibc malloc defaults (RESNET_JAX_MALLOC=default)'


def _find_spec_with(plugin):
  real = importlib.util.find_spec
  return lambda name, *a: types.SimpleNamespace(name=name) if name == plugin else real(name, *a)


def test_cpu_commands_leave_malloc_alone_where_an_accelerator_plugin_is_installed(
    fake_libc, monkeypatch):
  monkeypatch.setattr(host_memory.importlib.util, 'find_spec', _find_spec_with('jax_cuda12_plugin'))
  status = host_memory.configure_for_cpu_commands()
  assert status == 'glibc malloc defaults (an accelerator plugin, jax_cuda12_plugin, is installed)'
  assert fake_libc == []
  # Unless JAX is told to run on the CPU anyway.
  monkeypatch.setattr(host_memory, 'status', 'not configured')
  monkeypatch.setenv('JAX_PLATFORMS', 'cpu')
  assert host_memory.configure_for_cpu_commands() == 'one arena, no mmap, no trim'
  assert fake_libc == SETTINGS


def test_cpu_commands_configure_where_no_plugin_is_installed(fake_libc, monkeypatch):
  monkeypatch.setattr(host_memory.importlib.util, 'find_spec', _find_spec_with('no_such_plugin'))
  assert host_memory.configure_for_cpu_commands() == 'one arena, no mmap, no trim'
  assert fake_libc == SETTINGS


IMPORTS = """
import resnet_jax
from resnet_jax import models
from resnet_jax.training import loop
from resnet_jax.kernels import host_memory
print(host_memory.status)
host_memory.configure()
print(host_memory.status)
"""


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt')
def test_importing_the_package_changes_nothing_and_real_mallopt_accepts_the_settings():
  env = {k: v for k, v in os.environ.items() if k != 'RESNET_JAX_MALLOC'}
  out = subprocess.run([sys.executable, '-c', IMPORTS], env=env, cwd=ROOT, capture_output=True,
                       text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.splitlines()[-2:] == ['not configured', 'one arena, no mmap, no trim']
