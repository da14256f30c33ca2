"""What a run writes: `metrics.jsonl`, TensorBoard events and a console progress bar.

Only process 0 writes; the other processes get a writer that does nothing.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


class MetricWriter:
  """Appends one JSON object per logged step to `metrics.jsonl` and mirrors it to TensorBoard."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if enabled and tensorboard:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), **values}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      import tensorflow as tf  # pylint: disable=g-import-not-at-top
      from tensorflow.core.framework import summary_pb2  # pylint: disable=g-import-not-at-top
      # tf.summary.scalar needs the separate `tensorboard` package; the core
      # write op with the scalars plugin's metadata makes the same events.
      meta = summary_pb2.SummaryMetadata()
      meta.plugin_data.plugin_name = 'scalars'
      with self._tb.as_default(step=int(step)):
        for key, value in values.items():
          if isinstance(value, (int, float)) and not isinstance(value, bool):
            tf.summary.write(key, tf.constant(float(value), tf.float32), metadata=meta)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of `metrics.jsonl`, in order (a resumed run appends to the same file)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    lines = [line for line in f if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except ValueError:
      if i < len(lines) - 1:
        raise
      # The last line of a run killed while writing it: dropped (and by truncate_metrics).
  return records


def truncate_metrics(workdir: str, after_step: int) -> None:
  """Drops records past `after_step`: a resumed run rewrites them from its checkpoint."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return
  keep = [r for r in read_metrics(workdir) if r['step'] <= after_step]
  # Rewritten whole, also when nothing is past the step: a torn last line goes too.
  with open(f'{path}.tmp', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in keep)
  os.replace(f'{path}.tmp', path)


def _duration(seconds: float) -> str:
  seconds = int(max(0, seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m:02d}:{s:02d}'


class ProgressBar:
  """A one-line progress bar: step, loss, error, learning rate, images/s, time left.

  On a terminal the line is redrawn in place; otherwise (log files) one line
  is printed per update.
  """

  def __init__(self, total_steps: int, *, enabled: bool = True, label: str = '',
               stream=sys.stderr, width: int = 24):
    self.total = total_steps
    self.enabled = enabled
    self.label = f'[{label}] ' if label else ''
    self.stream = stream
    self.width = width
    self.tty = hasattr(stream, 'isatty') and stream.isatty()

  def update(self, step: int, *, loss: float, error: float, learning_rate: float,
             images_per_second: float, seconds_per_step: float) -> None:
    if not self.enabled:
      return
    frac = min(1.0, step / max(1, self.total))
    filled = int(frac * self.width)
    bar = '#' * filled + '-' * (self.width - filled)
    left = _duration((self.total - step) * seconds_per_step)
    line = (f'{self.label}[{bar}] {step}/{self.total} loss {loss:.4f} err {100 * error:.2f}% '
            f'lr {learning_rate:.4g} {images_per_second:,.0f} img/s left {left}')
    if self.tty:
      self.stream.write('\r' + line + '\x1b[K')
    else:
      self.stream.write(line + '\n')
    self.stream.flush()

  def message(self, text: str) -> None:
    if not self.enabled:
      return
    self.stream.write(('\r\x1b[K' if self.tty else '') + self.label + text + '\n')
    self.stream.flush()

  def close(self) -> None:
    if self.enabled and self.tty:
      self.stream.write('\n')
      self.stream.flush()
