"""Command line: train and evaluate one experiment.

    python -m resnet_jax.main --config=experiments/cifar_resnet110.py --workdir=workdirs/r110
    python -m resnet_jax.main --config=experiments/cifar_resnet20.py --workdir=/tmp/r20 \
        --config.batch_size=64 --config.seed=1

Flags and wiring only: the run itself is `loop.train_and_evaluate`, which the
notebooks call too. Running the same command again on the same workdir resumes.

Errors the user can fix (a mistyped config key, a missing config file, a
workdir in use, a damaged checkpoint, a full disk) print one line,
`error: ...`, and exit with status 2; the details, such as orbax's own
tracebacks, go to WORKDIR/logs/run.log, not to the console.
"""

import ast
import logging
import os
import sys

from resnet_jax.kernels import host_memory

host_memory.configure_for_cpu_commands()  # before JAX starts its threads

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags

from resnet_jax import data
from resnet_jax.training import loop
from resnet_jax.training.checkpoints import CheckpointError, CheckpointMismatchError
from resnet_jax.training.workdir import WorkdirInUseError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (experiments/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
flags.mark_flags_as_required(['config', 'workdir'])


def _fail(message: str, status: int = 2) -> None:
  print(f'error: {message}', file=sys.stderr)
  sys.exit(status)


def _config_error(error: BaseException, path: str | None) -> str:
  """One line for a config that does not load: the file, or the key, that is wrong."""
  seen = error
  while seen is not None:
    if isinstance(seen, SyntaxError):
      return (f'the config file {seen.filename or path} has a syntax error at line {seen.lineno}: '
              f'{seen.msg}')
    seen = seen.__cause__ or seen.__context__
  text = str(error)
  try:  # ConfigDict's AttributeError holds the repr of a KeyError's message
    text = ast.literal_eval(text) if text[:1] in '\'"' else text
  except (ValueError, SyntaxError):
    pass
  text = ' '.join(str(text).split())
  if isinstance(error, (AttributeError, KeyError)):
    return f'unknown config key: {text} (see --config={path} for the keys)'
  return f'the config {path} does not load: {text}'


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config errors as one line instead of a traceback."""
  path = next((a.split('=', 1)[1] for a in argv[1:] if a.startswith('--config=')), None)
  if path is not None and not os.path.isfile(path.split(':')[0]):
    _fail(f'the config file {path} does not exist (expected a file like '
          'experiments/cifar_resnet20.py).')
  try:
    rest = FLAGS(argv)
    if FLAGS.config is None:
      raise flags.Error('--config is required, e.g. --config=experiments/cifar_resnet20.py')
  except flags.Error as e:
    _fail(' '.join(str(e).split()))
  except (AttributeError, KeyError, OSError, SyntaxError, ValueError, TypeError) as e:
    _fail(_config_error(e, path))
  return rest


class _ConsoleFilter(logging.Filter):
  """The console shows our own warnings in one line each; libraries' logs and tracebacks go
  to the run's log file only."""

  def filter(self, record: logging.LogRecord) -> bool:
    return record.name == 'root' and not record.exc_info


def _quiet_console() -> None:
  """Called by the command only (app.run has installed absl's console handler by then)."""
  for handler in logging.getLogger().handlers:
    if isinstance(handler, absl_logging.ABSLHandler):
      handler.addFilter(_ConsoleFilter())
  # Exceptions in orbax's background threads and event loops ('Event loop is closed'):
  # logged (to the file), not printed.
  sys.unraisablehook = lambda u: logging.getLogger('resnet_jax.background').warning(
      'Ignored in %r: %s', u.object, u.exc_value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.getLogger('absl').setLevel(logging.WARNING)
  if __name__ == '__main__':
    _quiet_console()
  try:
    result = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except loop.RunInterrupted as e:
    print(e, file=sys.stderr)
    sys.exit(128 + e.signum)  # the shell convention for "killed by this signal"
  except (data.DataError, CheckpointError, CheckpointMismatchError, loop.NonFiniteError,
          WorkdirInUseError, ValueError) as e:
    _fail(e, 2 if not isinstance(e, loop.NonFiniteError) else 3)
  except OSError as e:  # disk full, permissions: the error says which file
    _fail(f'{e}. Check the free space and permissions of {FLAGS.workdir}.')
  if result.get('test_error') is not None:
    print(f"Final test error: {result['test_error']:.2f}% over {result['test_examples']} "
          f"examples ({result['data']}); results in {FLAGS.workdir}/result.json")


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
