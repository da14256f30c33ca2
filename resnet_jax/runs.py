"""Finished runs as the report reads them: result.json, metrics.jsonl, and
groups of runs of one experiment (seeds). Reads workdirs only; runs nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Sequence

import numpy as np

from resnet_jax import models, paper

METRICS_FILE = 'metrics.jsonl'
DEMO_LABEL = 'DEMONSTRATION \u2014 not a reproduction'


def read_metrics(workdir) -> list[dict[str, Any]]:
  """The records of `metrics.jsonl` (local or gs://), in order (a resumed run appends to it)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  path = epath.Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  records = []
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except ValueError:
      if i < len(lines) - 1:
        raise
      # The last line of a run killed while writing it: dropped (and by truncate_metrics).
  return records



@dataclasses.dataclass
class RunRecord:
  """One finished run: its directory, result.json and metrics.jsonl."""
  workdir: str
  result: dict[str, Any]
  metrics: list[dict[str, Any]]

  @property
  def config(self) -> dict[str, Any]:
    return self.result.get('config') or {}

  @property
  def data_digest(self) -> str:
    """The digest of the training images ('' where unknown: tfds, or an older run).

    result.json records it as 'train_data'; runs finished before it did are read
    from their newest checkpoint's metadata, which has always recorded it.
    """
    digest = (self.result.get('train_data') or {}).get('digest')
    if digest:
      return str(digest)
    from resnet_jax.weights import loading  # pylint: disable=g-import-not-at-top
    try:  # the newest complete, readable checkpoint
      fingerprint = loading.checkpoint_info(self.workdir)['fingerprint']
    except (OSError, ValueError, KeyError, loading.CheckpointError):
      return ''
    return str(fingerprint.get('data.train.digest') or '')

  @property
  def data_dir(self) -> str:
    return str((self.config.get('data') or {}).get('data_dir') or '')


def load_run(workdir: str) -> RunRecord:
  """The run in `workdir` (which must hold result.json)."""
  path = os.path.join(workdir, 'result.json')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{workdir} has no result.json: the run has not finished.')
  with open(path) as f:
    result = json.load(f)
  return RunRecord(workdir, result, read_metrics(workdir))


def find_run_dirs(results_dir: str) -> tuple[list[str], list[str]]:
  """(finished, unfinished) run directories below `results_dir`, sorted.

  A finished run has a result.json; an unfinished one only a metrics.jsonl or
  checkpoints. Directories named 'report' are not searched.
  """
  if not os.path.isdir(results_dir):
    raise FileNotFoundError(f'No results directory {results_dir}.')
  finished, unfinished = [], []
  for root, dirs, files in os.walk(results_dir):
    dirs[:] = sorted(d for d in dirs if d not in ('checkpoints', 'tensorboard', 'report'))
    if 'result.json' in files:
      finished.append(root)
      dirs[:] = []
    elif 'metrics.jsonl' in files or 'config.json' in files:
      unfinished.append(root)
      dirs[:] = []
  return finished, unfinished


def collect_runs(results_dir: str) -> list[RunRecord]:
  """Every finished run below `results_dir`."""
  return [load_run(d) for d in find_run_dirs(results_dir)[0]]


def _depth(model: str) -> int:
  return int(re.search(r'(\d+)$', model).group(1))


@dataclasses.dataclass
class Group:
  """Runs of one experiment that differ only in their seed."""
  model: str
  shortcut: str
  data: str
  synthetic: bool
  steps: int
  batch_size: int
  ten_crop: bool
  runs: list[RunRecord]
  data_digest: str = ''  # set where runs of one name, steps and batch read different images

  @property
  def data_origin(self) -> str:
    """Where the training images came from: 'cifar10_q75x2 (digest 3f2a9c1e)'."""
    folder = os.path.basename(self.runs[0].data_dir.rstrip('/')) if self.runs else ''
    digest = f'digest {self.data_digest[:8]}' if self.data_digest else 'digest unknown'
    return f'{folder} ({digest})' if folder else digest

  @property
  def family(self) -> str:
    return models.family(self.model)

  @property
  def depth(self) -> int:
    return _depth(self.model)

  @property
  def residual(self) -> bool:
    return 'plain' not in self.model

  @property
  def name(self) -> str:
    """'ResNet-20', 'plain-56', 'ResNet-34 B' as the paper writes them."""
    base = f"{'ResNet' if self.residual else 'plain'}-{self.depth}"
    if self.family == 'imagenet' and self.residual and self.depth == 34:
      base += f' {self.shortcut}'
    return base

  def demonstration_reasons(self) -> list[str]:
    """Why this group cannot be compared with the paper ([] if it can)."""
    reasons = []
    if self.synthetic:
      reasons.append('synthetic data')
    elif self.data != paper.DATA[self.family]:
      reasons.append(f'{self.data} data')
    if self.steps < paper.steps(self.family, self.batch_size):
      reasons.append(f'{self.steps:,} steps of {self.batch_size}')
    return reasons

  def test_errors(self, key: str = 'test_error') -> np.ndarray:
    return np.array([r.result[key] for r in self.runs if r.result.get(key) is not None], float)


def group_runs(runs: Sequence[RunRecord]) -> list[Group]:
  """Runs grouped by experiment (model, shortcut, data, schedule, evaluation), seeds sorted.

  Runs that read different training images (their digests differ, as for the
  JPEG copy of CIFAR-10 and a recompressed copy of it) are different
  experiments even where the dataset's name is the same. A run whose digest is
  unknown (tfds, or no checkpoint left) joins the group of the known digest
  when there is only one.
  """
  by_key: dict[tuple, list[RunRecord]] = {}
  for r in runs:
    c = r.config
    key = (r.result['model'], c.get('model', {}).get('shortcut', 'A'), r.result.get('data', ''),
           bool(r.result.get('synthetic')), int(r.result['steps']),
           int(r.result.get('batch_size') or c.get('batch_size', 0)),
           bool(c.get('data', {}).get('ten_crop', False)))
    by_key.setdefault(key, []).append(r)
  groups = []
  for key, members in by_key.items():
    digests = [r.data_digest for r in members]
    known = set(d for d in digests if d)
    parts: dict[str, list[RunRecord]] = {}
    for r, d in zip(members, digests):
      parts.setdefault(d if len(known) > 1 else '', []).append(r)
    for digest, rs in parts.items():
      rs.sort(key=lambda r: (r.result.get('seed', 0), r.workdir))
      groups.append(Group(*key, runs=rs, data_digest=digest))
  return sorted(groups, key=lambda g: (g.family != 'cifar', not g.residual, g.depth,
                                       g.shortcut, g.data, g.steps, g.data_digest))


def group_labels(groups: Sequence[Group]) -> dict[int, str]:
  """Display label of each group: its name, with data and steps where names repeat, and
  where those repeat too, the folder and digest of the training images."""
  names = [g.name for g in groups]
  same = [(g.name, g.data, g.steps) for g in groups]
  labels = {}
  for g in groups:
    if names.count(g.name) == 1:
      labels[id(g)] = g.name
    elif same.count((g.name, g.data, g.steps)) == 1:
      labels[id(g)] = f'{g.name} ({g.data}, {g.steps} steps)'
    else:
      labels[id(g)] = f'{g.name} ({g.data} from {g.data_origin}, {g.steps} steps)'
  return labels


def demonstration_label(groups: Sequence[Group]) -> str:
  """'DEMONSTRATION - not a reproduction: digits data, 300 steps ...', or '' for real runs."""
  reasons = []
  for g in groups:
    for reason in g.demonstration_reasons():
      if reason not in reasons:
        reasons.append(reason)
  return f'{DEMO_LABEL}: {", ".join(reasons)}' if reasons else ''


# --- Tables -------------------------------------------------------------------


