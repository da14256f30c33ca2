"""What a run owns in its workdir besides checkpoints and metrics: the lock, config.json,
the log file, and what an aborted earlier attempt left behind.

- `WorkdirLock`: one run per workdir. Two runs on one workdir would write the
  same checkpoints and interleave metrics.jsonl. The lock is an fcntl lock on
  `WORKDIR/run.lock`, which the kernel releases when its process ends however
  it ends (so a crashed run leaves no stale lock on this host); the file holds
  the holder's pid and host, for the message.
- `write_text`: config.json and the like via a temporary file and a rename, so
  a full disk leaves the old file or none, never a 0-byte one.
- `log_to_file`: everything logged (absl, orbax, ours) goes to
  `WORKDIR/logs/run.log`, the console gets one line per problem.
- `set_aside_aborted_attempt`: a run that finds no checkpoint starts its
  metrics anew; an earlier attempt's metrics.jsonl and TensorBoard events are
  renamed to `*.aborted-<time>`, so no step appears twice and the aborted
  attempt's errors cannot become the best.

A workdir on an object store (`gs://...`) has no lock (object stores cannot
lock files: run one job per workdir there) and no log file; its files are
written whole, which object stores do atomically.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import time

from etils import epath

LOCK_FILE = 'run.lock'
LOG_FILE = os.path.join('logs', 'run.log')


def is_local(path) -> bool:
  return '://' not in str(path)


class WorkdirInUseError(RuntimeError):
  """Another run holds the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, another user's
    return True
  return True


class WorkdirLock:
  """Holds `WORKDIR/run.lock` while a run uses the workdir; raises WorkdirInUseError if taken."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.enabled = enabled and is_local(workdir)
    self._fd = None

  def acquire(self) -> WorkdirLock:
    if not self.enabled or self._fd is not None:
      return self
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.read(fd, 1000).decode(errors='replace').split()
      os.close(fd)
      raise WorkdirInUseError(self._in_use_message(holder)) from None
    previous = os.read(fd, 1000).decode(errors='replace').split()
    if len(previous) >= 2:  # the kernel freed the lock of a process that ended without unlocking
      logging.info('Taking over %s from the run (pid %s on %s) that ended without releasing it.',
                   self.path, previous[0], previous[1])
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'{os.getpid()} {socket.gethostname()} {time.strftime("%Y-%m-%dT%H:%M:%S")}\n'
              .encode(), 0)
    self._fd = fd
    return self

  def _in_use_message(self, holder: list[str]) -> str:
    who = (f'pid {holder[0]} on host {holder[1]}, since {holder[2] if len(holder) > 2 else "?"}'
           if len(holder) >= 2 else 'another process')
    if len(holder) >= 2 and holder[1] == socket.gethostname() and holder[0].isdigit() and \
        not _pid_alive(int(holder[0])):
      who += ' (that process has ended; another one holds the lock file open)'
    return (f'The workdir {os.path.dirname(self.path)} is in use by another run ({who}). Wait '
            'for it to finish or stop it, or use another --workdir.')

  def release(self) -> None:
    if self._fd is None:
      return
    os.ftruncate(self._fd, 0)  # released cleanly: no holder to report
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def write_text(path: str, text: str) -> None:
  """Writes `path` atomically: a temporary file, then a rename. Raises OSError (disk full, ...)."""
  if not is_local(path):
    epath.Path(path).write_text(text)
    return
  tmp = f'{path}.tmp-{os.getpid()}'
  try:
    with open(tmp, 'w') as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException as e:
    if os.path.exists(tmp):
      os.remove(tmp)
    if isinstance(e, OSError):
      raise OSError(e.errno, f'Could not write {path}: {e.strerror or e}') from e
    raise


def log_to_file(workdir: str, level: int = logging.WARNING) -> logging.Handler:
  """Sends every log record at `level` and above (with tracebacks) to WORKDIR/logs/run.log.

  The loggers' own levels are left alone. Returns the handler; remove it from
  the root logger when the run ends.
  """
  path = os.path.join(workdir, LOG_FILE)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  handler = logging.FileHandler(path)
  handler.setLevel(level)
  handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(name)s: %(message)s'))
  logging.getLogger().addHandler(handler)
  return handler


def set_aside_aborted_attempt(workdir: str) -> list[str]:
  """Renames metrics.jsonl and tensorboard/ of an attempt that left no checkpoint; returns the new names."""
  stamp = time.strftime('%Y%m%d-%H%M%S')
  moved = []
  for name in ('metrics.jsonl', 'tensorboard'):
    path = epath.Path(workdir) / name
    if path.exists():
      target = path.parent / f'{name}.aborted-{stamp}'
      path.rename(target)
      moved.append(target)
      logging.warning('No checkpoint to resume from: the earlier attempt\'s %s was moved to %s; '
                      'this run starts its metrics anew.', path, target)
  return moved
