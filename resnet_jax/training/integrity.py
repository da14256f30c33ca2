"""Is a checkpoint that failed to restore damaged, or was the read itself what failed?

Resuming sets a damaged checkpoint aside and falls back to an older one, which
throws away training; that is right only when the checkpoint is positively
incomplete or corrupt (a missing file, a checksum mismatch, unreadable or
truncated orbax metadata, non-finite values). A transient read error (EIO,
EACCES, a timeout on a network filesystem) says nothing about the checkpoint:
the run stops with that error and everything stays where it is, to be retried.

With several processes, each judges its own read and all of them act on the
worst verdict (`agree`), so that no process moves a checkpoint aside, or
resumes from another step, alone.
"""

from __future__ import annotations

import errno

import jax
import numpy as np

from resnet_jax.weights import loading

OK, DAMAGED, READ_ERROR = 0, 1, 2  # ordered: the worst verdict of any process wins

# OSErrors that mean "this checkpoint lacks a piece", not "the disk did not answer".
_MISSING = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR)
# Words of the errors tensorstore raises (as ValueError) for a failed read, not bad data.
_TRANSIENT_WORDS = ('PERMISSION_DENIED', 'UNAVAILABLE', 'DEADLINE_EXCEEDED', 'Permission denied',
                    'Input/output error', 'timed out')


def verdict(error: BaseException) -> int:
  """DAMAGED if `error` shows the checkpoint is incomplete or corrupt, else READ_ERROR."""
  if isinstance(error, loading.CorruptCheckpointError):
    return DAMAGED
  cause = loading.os_error_in(error)
  if cause is not None:
    return DAMAGED if cause.errno in _MISSING else READ_ERROR
  if isinstance(error, OSError):  # an OSError without errno: no evidence of damage
    return READ_ERROR
  text = str(error)
  return READ_ERROR if any(w in text for w in _TRANSIENT_WORDS) else DAMAGED


def agree(code: int) -> int:
  """The worst of every process's verdict (with one process: `code` itself)."""
  if jax.process_count() == 1:
    return code
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return int(np.max(multihost_utils.process_allgather(np.int32(code))))
