"""`python -m resnet_jax.main ...` that holds still after logging a given step until it gets a signal.

    python tests/paused_main.py STEP READY_FILE -- --config=... --workdir=...

After metrics.jsonl has the record of STEP, the run creates READY_FILE and
waits until SIGTERM or SIGINT has reached the run's own handler; then it
carries on, exactly as `resnet_jax.main` would have had the signal come
during that step. A test can thus signal a run at a known step however slow
or fast the machine is: no race between the signal and the end of the run.
"""

import os
import runpy
import signal
import sys
import time

# This checkout's package, not whichever one the environment has installed
# (a script's sys.path[0] is tests/, not the repository).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from resnet_jax.kernels import host_memory

host_memory.configure_for_cpu_commands()  # as resnet_jax.main does, before JAX starts

from resnet_jax.training import metrics  # pylint: disable=g-import-not-at-top,wrong-import-position


def _pause_after(step: int, ready: str) -> None:
  write = metrics.MetricWriter.write
  received = []

  def paused_write(self, record_step, record):
    write(self, record_step, record)
    if record_step != step:
      return
    for signum in (signal.SIGTERM, signal.SIGINT):
      handler = signal.getsignal(signum)  # the run's own: it sets the stop flag

      def forward(signum, frame, handler=handler):
        handler(signum, frame)
        received.append(signum)
      signal.signal(signum, forward)
    with open(ready, 'w'):
      pass
    while not received:  # Python runs signal handlers in this (the main) thread, between these
      time.sleep(0.01)

  metrics.MetricWriter.write = paused_write


def main(step, ready, separator, *args):
  if separator != '--':
    raise SystemExit(__doc__)
  _pause_after(int(step), ready)
  sys.argv = ['resnet_jax.main', *args]
  runpy.run_module('resnet_jax.main', run_name='__main__', alter_sys=True)


if __name__ == '__main__':
  main(*sys.argv[1:])
