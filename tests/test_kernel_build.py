"""The kernel build: one compile per machine under a file lock, a compiler timeout, the prebuild command.

A fake compiler (a Python script) stands in for g++: it records each call,
can wait for a release file, and writes a dummy library. No real compile runs.
"""

import os
import stat
import subprocess
import sys
import textwrap
import time

import pytest

from resnet_jax.kernels import __main__ as kernels_command
from resnet_jax.kernels import build
from resnet_jax.kernels import onednn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FAKE_COMPILER = f"""#!{sys.executable}
import os, sys, time
with open(os.environ['FAKE_CXX_LOG'], 'a') as f:
  f.write(f'{{os.getpid()}}\\n')
release = os.environ.get('FAKE_CXX_RELEASE')
while release and not os.path.exists(release):
  time.sleep(0.01)
time.sleep(float(os.environ.get('FAKE_CXX_SLEEP', '0')))
with open(sys.argv[sys.argv.index('-o') + 1], 'w') as f:
  f.write('not really a library')
"""

# Builds one library with the fake compiler, as each process of a job would.
BUILD = textwrap.dedent("""
    import os, sys
    os.umask(0o077)  # a private umask: the shared cache must still be readable by all
    from resnet_jax.kernels import build
    print(build.cached_library('fake_ops', 'k1', [sys.argv[1], 'source.cc']))
""")


@pytest.fixture
def fake(tmp_path, monkeypatch):
  """The fake compiler's path, its call log and a fresh cache, also set in os.environ."""
  compiler = tmp_path / 'fake-cxx'
  compiler.write_text(FAKE_COMPILER)
  compiler.chmod(0o755)
  log, cache = tmp_path / 'calls.log', tmp_path / 'cache' / 'resnet_jax'
  log.touch()
  monkeypatch.setenv('FAKE_CXX_LOG', str(log))
  monkeypatch.setenv('RESNET_JAX_CACHE', str(cache))
  return compiler, log, cache


def _calls(log):
  return log.read_text().split()


def test_two_processes_building_at_once_compile_once(fake, tmp_path):
  compiler, log, cache = fake
  release = tmp_path / 'release'
  env = dict(os.environ, FAKE_CXX_RELEASE=str(release))

  def start(name):
    err = open(tmp_path / f'{name}.err', 'w+')  # pylint: disable=consider-using-with
    return subprocess.Popen([sys.executable, '-c', BUILD, str(compiler)], env=env, cwd=ROOT,  # pylint: disable=consider-using-with
                            stdout=subprocess.PIPE, stderr=err, text=True), err

  first, first_err = start('first')
  # The first process is inside its compile (the fake waits for `release`) ...
  _wait_for(lambda: _calls(log) or first.poll() is not None)
  assert first.poll() is None, first_err.read()
  # ... when the second starts: it must wait for the lock, not compile too.
  second, second_err = start('second')
  _wait_for(lambda: 'waiting for another process' in _read(second_err) or len(_calls(log)) > 1
            or second.poll() is not None)
  release.touch()
  outs = [p.communicate(timeout=600)[0].strip() for p in (first, second)]
  assert [p.returncode for p in (first, second)] == [0, 0], _read(first_err) + _read(second_err)
  assert len(_calls(log)) == 1
  assert outs[0] == outs[1] == str(cache / 'fake_ops-k1.so')
  assert 'waiting for another process building fake_ops-k1' in _read(second_err)
  # A shared cache: directory 0o755, library 0o644 despite the umask, no leftovers.
  assert stat.S_IMODE(os.stat(cache).st_mode) == 0o755
  assert stat.S_IMODE(os.stat(outs[0]).st_mode) == 0o644
  assert sorted(os.listdir(cache)) == ['fake_ops-k1.lock', 'fake_ops-k1.so']
  # Built: later processes neither compile nor wait.
  assert build.cached_library('fake_ops', 'k1', [str(compiler)]) == cache / 'fake_ops-k1.so'
  assert len(_calls(log)) == 1


def _read(f):
  f.seek(0)
  return f.read()


def _wait_for(condition):
  """Polls `condition` (a handshake, not a timing assumption); fails after 10 minutes."""
  deadline = time.monotonic() + 600
  while not condition():
    assert time.monotonic() < deadline, 'gave up waiting'
    time.sleep(0.01)


def test_a_compiler_past_the_timeout_is_stopped_with_a_clear_error(fake, monkeypatch):
  compiler, log, cache = fake
  monkeypatch.setenv('FAKE_CXX_SLEEP', '600')
  with pytest.raises(build.BuildError, match=r'(?s)longer than the 0\.5 s timeout.*RESNET_JAX_BUILD_TIMEOUT'):
    build.cached_library('fake_ops', 'k2', [str(compiler)], timeout=0.5)
  assert os.listdir(cache) == ['fake_ops-k2.lock']  # no half-written library, no temporary
  for pid in _calls(log):  # the compiler itself was stopped (if it got as far as logging)
    with pytest.raises(ProcessLookupError):
      os.kill(int(pid), 0)


def test_a_killed_builds_temporary_file_is_removed_by_the_next_build(fake):
  compiler, log, cache = fake
  cache.mkdir(parents=True)
  leftover = cache / '.fake_ops-k3-abc123.tmp'  # as a build killed mid-compile leaves it
  leftover.write_text('half')
  assert build.cached_library('fake_ops', 'k3', [str(compiler)]) == cache / 'fake_ops-k3.so'
  assert sorted(os.listdir(cache)) == ['fake_ops-k3.lock', 'fake_ops-k3.so']
  assert len(_calls(log)) == 1


def test_a_failing_compiler_names_the_command_and_leaves_nothing(fake, tmp_path):
  _, _, cache = fake
  bad = tmp_path / 'bad-cxx'
  bad.write_text('#!/bin/sh\necho "fatal error: dnnl.hpp: No such file" >&2\nexit 1\n')
  bad.chmod(0o755)
  with pytest.raises(build.BuildError, match=r'(?s)exit status 1.*bad-cxx.*dnnl.hpp: No such file'):
    build.cached_library('fake_ops', 'k4', [str(bad)])
  assert os.listdir(cache) == ['fake_ops-k4.lock']


def test_the_onednn_cache_key_includes_the_onednn_version(tmp_path):
  header = tmp_path / 'oneapi' / 'dnnl' / 'dnnl_version.h'
  header.parent.mkdir(parents=True)
  header.write_text('#define DNNL_VERSION_MAJOR 3\n#define DNNL_VERSION_MINOR 2\n'
                    '#define DNNL_VERSION_PATCH 0\n#define DNNL_VERSION_HASH  "4011"\n')
  assert onednn._onednn_version(tmp_path) == '3.2.0 (4011)'  # pylint: disable=protected-access


def test_the_cache_key_changes_with_the_onednn_version(fake, monkeypatch):
  compiler, log, cache = fake
  monkeypatch.setenv('CXX', str(compiler))
  versions = iter(['3.2.0 (a)', '3.2.0 (a)', '3.3.0 (b)'])
  monkeypatch.setattr(onednn, '_onednn_version', lambda inc: next(versions))
  try:
    onednn._find_onednn()  # pylint: disable=protected-access
  except onednn.OneDNNUnavailable as e:
    pytest.skip(str(e))
  first, same, other = (onednn.build_library() for _ in range(3))
  assert first == same != other and first.parent == other.parent == cache
  assert len(_calls(log)) == 2


def test_build_command_prints_the_library_or_why_not(fake, monkeypatch, capsys, tmp_path):
  compiler, _, cache = fake
  monkeypatch.setenv('CXX', str(compiler))
  try:
    onednn._find_onednn()  # pylint: disable=protected-access
  except onednn.OneDNNUnavailable:
    pass
  else:
    assert kernels_command.main(['build']) == 0
    path = capsys.readouterr().out.strip()
    assert os.path.dirname(path) == str(cache) and os.path.basename(path).startswith('onednn_ops-')
  monkeypatch.setattr(onednn, '_prefixes', lambda: [tmp_path / 'nowhere'])
  assert kernels_command.main(['build']) == 1
  assert 'cannot be built here' in capsys.readouterr().err
  assert kernels_command.main([]) == 2


def test_build_command_runs_as_a_module(fake, tmp_path):
  out = subprocess.run([sys.executable, '-m', 'resnet_jax.kernels', 'bild'], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, check=False)
  assert out.returncode == 2 and 'python -m resnet_jax.kernels build' in out.stderr
