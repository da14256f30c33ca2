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
  """Runs grouped by experiment (model, shortcut, data, schedule, evaluation), seeds sorted."""
  groups: dict[tuple, Group] = {}
  for r in runs:
    c = r.config
    key = (r.result['model'], c.get('model', {}).get('shortcut', 'A'), r.result.get('data', ''),
           bool(r.result.get('synthetic')), int(r.result['steps']),
           int(r.result.get('batch_size') or c.get('batch_size', 0)),
           bool(c.get('data', {}).get('ten_crop', False)))
    if key not in groups:
      groups[key] = Group(*key, runs=[])
    groups[key].runs.append(r)
  for g in groups.values():
    g.runs.sort(key=lambda r: (r.result.get('seed', 0), r.workdir))
  return sorted(groups.values(), key=lambda g: (g.family != 'cifar', not g.residual, g.depth,
                                                 g.shortcut, g.data, g.steps))


def group_labels(groups: Sequence[Group]) -> dict[int, str]:
  """Display label of each group: its name, with data and steps where names repeat."""
  names = [g.name for g in groups]
  return {id(g): g.name if names.count(g.name) == 1 else f'{g.name} ({g.data}, {g.steps} steps)'
          for g in groups}


def demonstration_label(groups: Sequence[Group]) -> str:
  """'DEMONSTRATION - not a reproduction: digits data, 300 steps ...', or '' for real runs."""
  reasons = []
  for g in groups:
    for reason in g.demonstration_reasons():
      if reason not in reasons:
        reasons.append(reason)
  return f'{DEMO_LABEL}: {", ".join(reasons)}' if reasons else ''


# --- Tables -------------------------------------------------------------------


