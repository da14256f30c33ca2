"""Command line: train and evaluate one experiment.

    python -m resnet_jax.main --config=experiments/cifar_resnet110.py --workdir=workdirs/r110
    python -m resnet_jax.main --config=experiments/cifar_resnet20.py --workdir=/tmp/r20 \
        --config.batch_size=64 --config.seed=1

Flags and wiring only: the run itself is `loop.train_and_evaluate`, which the
notebooks call too. Running the same command again on the same workdir resumes.
"""

import logging
import sys

from resnet_jax.kernels import host_memory

host_memory.configure_for_cpu_commands()  # before JAX starts its threads

from absl import app, flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags

from resnet_jax import data
from resnet_jax.training import loop
from resnet_jax.training.checkpoints import CheckpointError, CheckpointMismatchError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (experiments/*.py).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and results.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.getLogger('absl').setLevel(logging.WARNING)
  try:
    result = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except loop.RunInterrupted as e:
    print(e, file=sys.stderr)
    sys.exit(128 + e.signum)  # the shell convention for "killed by this signal"
  except (data.DataError, CheckpointError, CheckpointMismatchError, loop.NonFiniteError,
          ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2 if not isinstance(e, loop.NonFiniteError) else 3)
  if result.get('test_error') is not None:
    print(f"Final test error: {result['test_error']:.2f}% over {result['test_examples']} "
          f"examples ({result['data']}); results in {FLAGS.workdir}/result.json")


if __name__ == '__main__':
  app.run(main)
