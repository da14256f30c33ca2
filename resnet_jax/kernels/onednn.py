"""oneDNN convolutions and BatchNorm inside the jit-compiled step on the CPU.

Selected with `model.conv='onednn'` (or 'auto', the default, where it can run).
XLA:CPU's own convolutions are 1.5-7x slower than oneDNN's on the CIFAR shapes
(the kernel gradient most of all), and it runs each BatchNorm/ReLU loop on one
core (docs/cpu_speed_investigation.md). This module calls oneDNN, the library
behind PyTorch's CPU convolutions, through four XLA FFI custom calls
(csrc/onednn_ops.cc): convolution forward, convolution backward (input and
kernel gradients), BatchNorm forward with batch statistics, BatchNorm backward,
tied together with `jax.custom_vjp`. ReLU, the residual additions, the loss and
the optimiser stay in XLA. The calls read and write XLA's NHWC/HWIO buffers in
place: no copies, no Python callbacks, one compilation.

The shared library is compiled on first use with the machine's C++ compiler
against the oneDNN wheel (`onednn-cpu-gomp` + `onednn-devel-cpu-gomp`, installed
with the package on Linux x86-64) and jaxlib's FFI headers, and cached in
`$RESNET_JAX_CACHE` (default ~/.cache/resnet_jax), keyed by the source, the
compiler command, the jaxlib and the oneDNN versions. It takes a few seconds,
once per machine: concurrent processes wait for one build (`build.py`), and
`python -m resnet_jax.kernels build` prebuilds it (clusters, shared caches).

Scope: float32, NHWC, the CPU backend on a single device (what a CPU machine
trains with). Other dtypes take the `lax`/jnp path inside the same modules;
'auto' picks oneDNN only where it applies (`why_not_usable`). Inference-mode
BatchNorm (running averages) stays in XLA. Results equal XLA's up to float32
summation order (tests/test_onednn.py).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import sys
import sysconfig
import threading
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from resnet_jax.kernels import build
from resnet_jax.kernels import cpu_conv
from resnet_jax.models import resnet as models

_SOURCE = Path(__file__).parent / 'csrc' / 'onednn_ops.cc'
_TARGETS = {'conv_fwd': 'ResnetJaxConvFwd', 'conv_bwd': 'ResnetJaxConvBwd',
            'bn_fwd': 'ResnetJaxBnFwd', 'bn_bwd': 'ResnetJaxBnBwd'}
_FFI_NAME = 'resnet_jax_onednn_{}'
_INSTALL = ("pip install 'onednn-cpu-gomp==2023.2.0' 'onednn-devel-cpu-gomp==2023.2.0' "
            '(Linux x86-64; also needs a C++17 compiler, e.g. apt install g++)')
_DN = ('NHWC', 'HWIO', 'NHWC')

_lock = threading.Lock()
_state: dict = {}


class OneDNNUnavailable(RuntimeError):
  """oneDNN convolutions cannot be used here; the message says why and the fix."""


def _prefixes() -> list[Path]:
  """Where pip puts the wheels' data files (lib/libdnnl.so, include/)."""
  out = []
  for p in (sys.prefix, sysconfig.get_path('data'), sys.base_prefix, '/usr/local', '/usr'):
    if p and Path(p) not in out:
      out.append(Path(p))
  return out


def _find_onednn() -> tuple[Path, Path]:
  for prefix in _prefixes():
    lib, inc = prefix / 'lib', prefix / 'include'
    if (lib / 'libdnnl.so').exists() and (inc / 'oneapi' / 'dnnl' / 'dnnl.hpp').exists():
      return lib, inc
  raise OneDNNUnavailable(
      f'oneDNN (libdnnl.so and its headers) not found under {", ".join(map(str, _prefixes()))}. '
      f'Fix: {_INSTALL}, or use model.conv=xla.')


def _compiler() -> str:
  for cxx in (os.environ.get('CXX'), 'g++', 'c++', 'clang++'):
    if cxx and shutil.which(cxx):
      return cxx
  raise OneDNNUnavailable(f'No C++ compiler found to build {_SOURCE.name}. Fix: {_INSTALL}, or '
                          'use model.conv=xla.')


def _simd_flags() -> list[str]:
  """AVX2/FMA for the BatchNorm loops where this CPU has them (oneDNN picks its own)."""
  try:
    flags = Path('/proc/cpuinfo').read_text().split()
  except OSError:
    return []
  return ['-mavx2', '-mfma'] if 'avx2' in flags and 'fma' in flags else []


def _onednn_version(inc: Path) -> str:
  """'3.2.0 (40112196...)' from the headers the library is built against."""
  try:
    text = (inc / 'oneapi' / 'dnnl' / 'dnnl_version.h').read_text()
  except OSError:
    return 'unknown'
  fields = dict(line.split()[1:3] for line in text.splitlines()
                if line.startswith('#define DNNL_VERSION_') and len(line.split()) >= 3)
  return (f"{fields.get('DNNL_VERSION_MAJOR')}.{fields.get('DNNL_VERSION_MINOR')}."
          f"{fields.get('DNNL_VERSION_PATCH')} ({fields.get('DNNL_VERSION_HASH', '').strip(chr(34))})")


def build_library(timeout: float | None = None) -> Path:
  """Compiles (once per machine, see `build.py`) and returns the kernels' shared library.

  Cached by the source, the compiler command, the jaxlib version (its FFI
  headers) and the oneDNN version. Raises OneDNNUnavailable with the fix.
  """
  lib, inc = _find_onednn()
  cxx = _compiler()
  cmd = [cxx, '-O3', '-std=c++17', '-shared', '-fPIC', '-fopenmp', '-w', *_simd_flags(),
         f'-I{jax.ffi.include_dir()}', f'-I{inc}', str(_SOURCE), f'-L{lib}', '-ldnnl',
         f'-Wl,-rpath,{lib}']
  key = hashlib.sha256('\0'.join([_SOURCE.read_text(), *cmd, jax.lib.__version__,
                                   _onednn_version(inc)]).encode()).hexdigest()[:16]
  try:
    return build.cached_library('onednn_ops', key, cmd, timeout=timeout)
  except build.BuildError as e:
    raise OneDNNUnavailable(f'{e}\nOr use model.conv=xla.') from None


def load() -> None:
  """Builds (once), loads and registers the FFI targets; raises OneDNNUnavailable."""
  with _lock:
    if 'error' in _state:
      raise OneDNNUnavailable(_state['error'])
    if 'lib' in _state:
      return
    try:
      if not sys.platform.startswith('linux'):
        raise OneDNNUnavailable(f'oneDNN convolutions are built for Linux only (this is {sys.platform}).')
      lib = ctypes.cdll.LoadLibrary(str(build_library()))
    except OneDNNUnavailable as e:
      _state['error'] = str(e)
      raise
    except OSError as e:
      _state['error'] = f'Loading the oneDNN convolution library failed: {e}. Fix: {_INSTALL}.'
      raise OneDNNUnavailable(_state['error']) from e
    for kind, symbol in _TARGETS.items():
      jax.ffi.register_ffi_target(_FFI_NAME.format(kind), jax.ffi.pycapsule(getattr(lib, symbol)),
                                  platform='cpu')
    _state['lib'] = lib


def unavailable_reason() -> str | None:
  """None if oneDNN kernels can run here (builds the library on first call), else why not."""
  try:
    load()
    return None
  except OneDNNUnavailable as e:
    return str(e)


def _ffi(kind, out_shapes, *args, **attrs):
  """Calls one of the library's FFI targets; `out_shapes` are float32 result shapes."""
  result = tuple(jax.ShapeDtypeStruct(s, jnp.float32) for s in out_shapes)
  return jax.ffi.ffi_call(_FFI_NAME.format(kind), result, vmap_method='sequential')(*args, **attrs)


def _geometry(strides, padding) -> dict:
  (pt, pb), (pl, pr) = padding
  return {k: np.int64(v) for k, v in dict(sh=strides[0], sw=strides[1], pt=pt, pb=pb, pl=pl,
                                          pr=pr).items()}


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv2d(x, kernel, strides, padding):
  y_shape = jax.eval_shape(
      lambda x, k: lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=_DN),
      x, kernel).shape
  return _ffi('conv_fwd', [y_shape], x, kernel, **_geometry(strides, padding))[0]


def _conv2d_fwd(x, kernel, strides, padding):
  return _conv2d(x, kernel, strides, padding), (x, kernel)


def _conv2d_bwd(strides, padding, res, dy):
  x, kernel = res
  # Input and kernel gradients in one call, one after the other, each over all cores.
  return _ffi('conv_bwd', [x.shape, kernel.shape], x, kernel, dy, **_geometry(strides, padding))


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv2d(x, kernel, strides=(1, 1), padding=((1, 1), (1, 1))):
  """`lax.conv_general_dilated(x, kernel, strides, padding, ('NHWC', 'HWIO', 'NHWC'))` via oneDNN.

  float32 only (other dtypes take the `lax` path); differentiable once (custom VJP).
  """
  strides = tuple(int(s) for s in strides)
  padding = tuple((int(a), int(b)) for a, b in padding)
  if x.dtype != jnp.float32 or kernel.dtype != jnp.float32:
    return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DN)
  load()
  return _conv2d(x, kernel, strides, padding)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm(x, scale, bias, epsilon):
  c = x.shape[-1:]
  return tuple(_ffi('bn_fwd', [x.shape, c, c], x, scale, bias, eps=np.float32(epsilon)))


def _batch_norm_fwd(x, scale, bias, epsilon):
  y, mean, var = _batch_norm(x, scale, bias, epsilon)
  return (y, mean, var), (x, scale, mean, var)


def _batch_norm_bwd(epsilon, res, cotangents):
  x, scale, mean, var = res
  dy = cotangents[0]  # mean and var only feed the running averages (no gradient)
  c = x.shape[-1:]
  return tuple(_ffi('bn_bwd', [x.shape, c, c], x, scale, mean, var, dy, eps=np.float32(epsilon)))


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd)


def batch_norm(x, scale, bias, epsilon=1e-5):
  """Training-mode BatchNorm over all but the last axis: (y, batch mean, biased batch var).

  As `flax.linen.BatchNorm(use_running_average=False)`; float32, NHWC (4-D).
  """
  load()
  return _batch_norm(x, scale, bias, float(epsilon))


class BatchNorm(models.GhostBatchNorm):
  """Training-mode BatchNorm in oneDNN: same parameters, statistics and numbers as
  `models.GhostBatchNorm` / `flax.linen.BatchNorm` (float32 NHWC, whole-batch
  statistics; anything else takes the jnp path)."""

  def normalize_batch(self, x, scale, bias):
    if self.group_size or x.dtype != jnp.float32 or x.ndim != 4:
      return super().normalize_batch(x, scale, bias)
    return batch_norm(x, scale.astype(jnp.float32), bias.astype(jnp.float32), self.epsilon)


class Conv(cpu_conv.Conv):
  """flax.linen.Conv-compatible module computing its convolution with oneDNN."""

  train_batch_norm = BatchNorm  # models.ResNet trains its BatchNorm layers with this

  def _convolve(self, x, kernel, strides, padding):
    return conv2d(x, kernel, strides, padding)


def why_not_usable(dtype: Any = jnp.float32) -> str | None:
  """None if the oneDNN path can run a model of this compute dtype here, else why not."""
  if jnp.dtype(dtype) != jnp.float32:
    return f'compute dtype {jnp.dtype(dtype).name} (oneDNN path is float32 only)'
  if jax.default_backend() != 'cpu':
    return f'the backend is {jax.default_backend()!r}, not the CPU'
  if jax.device_count() > 1:
    return (f'{jax.device_count()} devices (the oneDNN custom calls have no sharding rule, '
            'so they run on one CPU device only)')
  return unavailable_reason()
