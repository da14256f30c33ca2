"""Compiles a shared library once per machine and caches it, safely for many processes.

The oneDNN kernels (`onednn.py`) are C++ compiled on first use. On a cluster
node many processes start at once (one per device, several runs side by side)
and a shared cache may be read by other users, so the build here:

- takes an exclusive `fcntl.flock` on `<name>-<key>.lock` beside the library:
  one process compiles, the others wait, then load its library. The OS
  releases the lock when its holder dies, so a killed build never blocks later
  ones;
- compiles to a temporary name in the cache directory and renames it into
  place, so no process ever sees half a library; a holder of the lock first
  deletes temporary files that a killed build left behind;
- stops the compiler (and everything it started) after `timeout` seconds
  (`RESNET_JAX_BUILD_TIMEOUT`, default 600) with an error that says so;
- creates directories 0o755 and libraries 0o644, so one user can prebuild a
  shared cache (`python -m resnet_jax.kernels build`) that others read.

The caller supplies the cache key: everything the library depends on (source,
compiler command, library versions).
"""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_TIMEOUT = 600.0


class BuildError(RuntimeError):
  """A library could not be built; the message says why."""


def cache_dir() -> Path:
  """`$RESNET_JAX_CACHE`, else `$XDG_CACHE_HOME/resnet_jax`, else ~/.cache/resnet_jax."""
  root = os.environ.get('RESNET_JAX_CACHE') or os.path.join(
      os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'), 'resnet_jax')
  return Path(root)


def build_timeout() -> float:
  value = os.environ.get('RESNET_JAX_BUILD_TIMEOUT', '')
  try:
    return float(value) if value else DEFAULT_TIMEOUT
  except ValueError:
    raise BuildError(f'RESNET_JAX_BUILD_TIMEOUT={value!r} is not a number of seconds. '
                     'Fix: set it to e.g. 600, or unset it.') from None


def _make_dir(path: Path) -> None:
  """mkdir -p, with the directories it creates readable by all (0o755)."""
  missing = []
  p = path
  while not p.exists():
    missing.append(p)
    p = p.parent
  for p in reversed(missing):
    try:
      p.mkdir()
    except FileExistsError:  # another process made it first
      continue
    os.chmod(p, 0o755)


def _open_lock(path: Path) -> int:
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except PermissionError:  # a shared cache of another user: locking only needs to read
    return os.open(path, os.O_RDONLY)
  try:
    os.fchmod(fd, 0o644)
  except OSError:
    pass
  return fd


def _acquire(fd: int, lock_path: Path, timeout: float) -> None:
  """Exclusive lock on `fd`; waits (saying so on stderr) while another process builds."""
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return
  except BlockingIOError:
    pass
  print(f'resnet_jax: waiting for another process building {lock_path.stem} '
        f'(lock {lock_path})', file=sys.stderr, flush=True)
  deadline = time.monotonic() + timeout
  while True:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return
    except BlockingIOError:
      if time.monotonic() > deadline:
        raise BuildError(
            f'Waited {timeout:.0f} s for another process to build {lock_path.stem} (it holds '
            f'{lock_path}). Fix: wait for it, raise RESNET_JAX_BUILD_TIMEOUT, or stop that '
            'process (its lock goes with it).') from None
      time.sleep(0.05)


def _compile(cmd: list[str], out: Path, timeout: float) -> None:
  """Runs `cmd -o <temporary>` and renames the result to `out` (0o644); removes it on any failure."""
  fd, tmp = tempfile.mkstemp(prefix=f'.{out.stem}-', suffix='.tmp', dir=out.parent)
  os.close(fd)
  try:
    # A session of its own, so a timeout stops the compiler's children too.
    proc = subprocess.Popen(cmd + ['-o', tmp], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,  # pylint: disable=consider-using-with
                            text=True, start_new_session=True)
    try:
      output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.communicate()
      raise BuildError(
          f'Building {out.name} took longer than the {timeout:g} s timeout and was stopped:\n'
          f'{" ".join(cmd)}\nFix: raise RESNET_JAX_BUILD_TIMEOUT (seconds) on a slow or busy '
          'machine, or prebuild with `python -m resnet_jax.kernels build`.') from None
    except BaseException:  # KeyboardInterrupt, SystemExit: do not leave the compiler running
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      raise
    if proc.returncode != 0:
      raise BuildError(f'Building {out.name} failed (exit status {proc.returncode}):\n'
                       f'{" ".join(cmd)}\n{output[-3000:]}')
    os.chmod(tmp, 0o644)
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)


def cached_library(name: str, key: str, cmd: list[str], *, timeout: float | None = None) -> Path:
  """The library `<cache>/<name>-<key>.so`, compiled with `cmd + ['-o', path]` if missing.

  At most one process per machine compiles a given key; the others wait for it.
  Falls back to a per-user temporary directory where the cache is not writable.
  Raises `BuildError` if the compiler fails or runs past `timeout` seconds.
  """
  timeout = build_timeout() if timeout is None else timeout
  filename = f'{name}-{key}.so'
  candidates = [cache_dir(), Path(tempfile.gettempdir()) / f'resnet_jax-{os.getuid()}']
  errors = []
  for directory in candidates:
    out = directory / filename
    if out.exists():  # the common case: built before (maybe by another user)
      return out
    try:
      _make_dir(directory)
      fd = _open_lock(directory / f'{name}-{key}.lock')
    except OSError as e:  # read-only or foreign directory: try the next
      errors.append(f'{directory}: {e}')
      continue
    try:
      _acquire(fd, directory / f'{name}-{key}.lock', timeout)
      if out.exists():  # another process built it while this one waited
        return out
      for stale in directory.glob(f'.{name}-{key}-*.tmp'):  # left by a killed build
        stale.unlink(missing_ok=True)
      if not os.access(directory, os.W_OK):
        errors.append(f'{directory}: not writable')
        continue
      _compile(cmd, out, timeout)
      return out
    finally:
      os.close(fd)  # releases the lock
  raise BuildError(f'No writable directory to build {filename} in: {"; ".join(errors)}. '
                   'Fix: set RESNET_JAX_CACHE to a writable directory.')
