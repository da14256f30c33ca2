"""What a run writes: `metrics.jsonl`, TensorBoard events and a console progress bar.

Only process 0 writes; the other processes get a writer that does nothing.
Paths go through etils.epath, so a workdir may be local or `gs://...`. The
TensorBoard events (WORKDIR/tensorboard) are written by tensorboardX, which
needs no TensorFlow; each numeric value of a record is one scalar, tagged with
its key ('train_loss', 'test_error', ...).
"""

from __future__ import annotations

import json
import sys
from typing import Any

from etils import epath

from resnet_jax.runs import METRICS_FILE, read_metrics  # the one reader of metrics.jsonl

TENSORBOARD_DIR = 'tensorboard'


def _is_local(path: epath.Path) -> bool:
  return '://' not in str(path)


def _append_text(path: epath.Path, text: str) -> None:
  if _is_local(path):
    with path.open('a') as f:
      f.write(text)
  else:  # object stores cannot append: rewrite the (small) file
    path.write_text((path.read_text() if path.exists() else '') + text)


class MetricWriter:
  """Appends one JSON object per logged step to `metrics.jsonl` and mirrors it to TensorBoard."""

  def __init__(self, workdir: str | epath.PathLike, *, enabled: bool = True,
               tensorboard: bool = True):
    self.enabled = enabled
    self.path = epath.Path(workdir) / METRICS_FILE
    self._tb = None
    if enabled and tensorboard:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(epath.Path(workdir) / TENSORBOARD_DIR), flush_secs=30)

  def write(self, step: int, values: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), **values}
    _append_text(self.path, json.dumps(record) + '\n')
    if self._tb is not None:
      for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(key, float(value), global_step=int(step))
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def truncate_metrics(workdir: str | epath.PathLike, after_step: int) -> None:
  """Drops records past `after_step`: a resumed run rewrites them from its checkpoint.

  Rewritten whole (to a temporary file, then renamed), also when nothing is
  past the step: a torn last line of a killed run goes too.
  """
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return
  keep = [r for r in read_metrics(workdir) if r['step'] <= after_step]
  tmp = path.parent / f'{path.name}.tmp'
  tmp.write_text(''.join(json.dumps(r) + '\n' for r in keep))
  tmp.replace(path)


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
