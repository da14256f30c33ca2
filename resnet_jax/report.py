"""Tables and figures from finished runs, beside the paper's numbers.

    python -m resnet_jax.report RESULTS_DIR [--out OUT_DIR] [--no-responses]

Reads every run directory below RESULTS_DIR (a directory holding a
result.json, as `python -m resnet_jax.sweep` lays them out) and writes into
OUT_DIR (default RESULTS_DIR/report):

* report.md: Table 6 (CIFAR-10 test error, best and mean +- std over seeds,
  beside the paper and the difference; plain nets too), Tables 3-4 for any
  ImageNet runs, and the runs behind every row (directory, seed, commit,
  device, versions);
* fig6_curves.png: training (dashed) and test (bold) error of the plain
  (left) and residual (right) CIFAR nets, as Fig. 6;
* fig7_responses.png: the std of every 3x3 layer's response, in layer order
  (top) and sorted by magnitude (bottom), as Fig. 7 (computed from each run's
  last checkpoint on its test split; see `analysis`);
* summary.json: the table rows, machine-readable.

Runs on other data than the paper's (the digits demo, synthetic data) or with a
shorter schedule are labelled "DEMONSTRATION - not a reproduction" in the
title, in every row they contribute to and on the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import re
import sys
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from resnet_jax.training import metrics as metrics_lib
from resnet_jax import models

# --- The paper's numbers ------------------------------------------------------

# Table 6: CIFAR-10 test error (%). ResNet-110 is "best (mean +- std)" of 5 runs.
PAPER_CIFAR_ERROR = {20: 8.75, 32: 7.51, 44: 7.17, 56: 6.97, 110: 6.43, 1202: 7.93}
PAPER_CIFAR_MEAN_STD = {110: (6.61, 0.16)}
# Table 3: top-1 / top-5 error (%), 10-crop testing on the validation set.
# Keys: (model, shortcut option); None where the paper gives no top-5.
PAPER_IMAGENET_10CROP = {
    ('plain18', 'B'): (27.94, None), ('resnet18', 'B'): (27.88, None),
    ('plain34', 'B'): (28.54, 10.02),
    ('resnet34', 'A'): (25.03, 7.76), ('resnet34', 'B'): (24.52, 7.46),
    ('resnet34', 'C'): (24.19, 7.40),
    ('resnet50', 'B'): (22.85, 6.71), ('resnet101', 'B'): (21.75, 6.05),
    ('resnet152', 'B'): (21.43, 5.71),
}
# Table 4: single-model top-1 / top-5 error (%), fully convolutional multi-scale testing.
PAPER_IMAGENET_SINGLE_MODEL = {
    ('resnet34', 'B'): (21.84, 5.71), ('resnet34', 'C'): (21.53, 5.60),
    ('resnet50', 'B'): (20.74, 5.25), ('resnet101', 'B'): (19.87, 4.60),
    ('resnet152', 'B'): (19.38, 4.49),
}
# What each family's paper numbers were trained on, and for how long (in
# images seen): CIFAR 64k iterations of 128; ImageNet our 90-epoch recipe.
PAPER_DATA = {'cifar': 'cifar10', 'imagenet': 'imagenet2012'}
_IMAGENET_TRAIN_EXAMPLES = 1_281_167


def paper_steps(family: str, batch_size: int) -> int:
  """Iterations of `batch_size` that match the paper's schedule (CIFAR) or our recipe (ImageNet)."""
  if family == 'cifar':
    return math.ceil(64_000 * 128 / batch_size)
  return 90 * (_IMAGENET_TRAIN_EXAMPLES // batch_size)  # epochs drop their remainder


PAPER_SCHEDULE = {'cifar': 'CIFAR-10, 64,000 iterations of 128 images',
                  'imagenet': 'ImageNet, 90 epochs (our recipe; the paper: up to 600,000 '
                              'iterations of 256)'}

DEMO_LABEL = 'DEMONSTRATION \u2014 not a reproduction'
# One colour per depth, shared by both figures.
_DEPTH_COLOURS = {20: '#e6a700', 32: '#1f77b4', 44: '#2ca02c', 56: '#d62728', 110: '#111111',
                  1202: '#9467bd', 18: '#e6a700', 34: '#1f77b4', 50: '#2ca02c', 101: '#d62728',
                  152: '#111111'}


# --- Runs and groups ------------------------------------------------------------


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
  return RunRecord(workdir, result, metrics_lib.read_metrics(workdir))


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
    elif self.data != PAPER_DATA[self.family]:
      reasons.append(f'{self.data} data')
    if self.steps < paper_steps(self.family, self.batch_size):
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


def _labels(groups: Sequence[Group]) -> dict[int, str]:
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


def _errors(values: np.ndarray) -> str:
  """'best (mean ± std)' as Table 6 writes it; one run: its value."""
  if len(values) == 0:
    return '-'
  if len(values) == 1:
    return f'{values[0]:.2f}'
  return f'{values.min():.2f} ({values.mean():.2f} \u00b1 {values.std(ddof=1):.2f})'


def _params(n: int) -> str:
  return f'{n / 1e6:.2f}M' if n < 1e7 else f'{n / 1e6:.1f}M'


def _notes(g: Group) -> str:
  reasons = g.demonstration_reasons()
  return f"**DEMONSTRATION**: {', '.join(reasons)}" if reasons else ''


def cifar_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
  """One row of the Table 6 layout per CIFAR group (ResNets, then plain nets)."""
  rows = []
  for g in groups:
    if g.family != 'cifar':
      continue
    errors = g.test_errors()
    paper = PAPER_CIFAR_ERROR.get(g.depth) if g.residual else None
    paper_mean = PAPER_CIFAR_MEAN_STD.get(g.depth, (paper, None))[0] if paper else None
    comparable = not g.demonstration_reasons()
    rows.append(dict(
        method='ResNet' if g.residual else 'plain', model=g.model, depth=g.depth,
        params=int(g.runs[0].result['params']), runs=len(g.runs), data=g.data, steps=g.steps,
        best=float(errors.min()) if len(errors) else None,
        mean=float(errors.mean()) if len(errors) else None,
        std=float(errors.std(ddof=1)) if len(errors) > 1 else None,
        paper=paper, paper_mean=paper_mean,
        difference=(float(errors.mean()) - paper_mean
                    if comparable and paper_mean is not None and len(errors) else None),
        demonstration=not comparable, notes=_notes(g),
        workdirs=[r.workdir for r in g.runs]))
  return rows


def _paper_cifar(depth: int | None) -> str:
  if depth is None or depth not in PAPER_CIFAR_ERROR:
    return '-'
  if depth in PAPER_CIFAR_MEAN_STD:
    mean, std = PAPER_CIFAR_MEAN_STD[depth]
    return f'{PAPER_CIFAR_ERROR[depth]:.2f} ({mean:.2f} \u00b1 {std:.2f})'
  return f'{PAPER_CIFAR_ERROR[depth]:.2f}'


def cifar_table(groups: Sequence[Group]) -> str:
  """Markdown table in the layout of Table 6, beside the paper's numbers."""
  lines = ['| method | depth | # params | runs | test error (%) best (mean \u00b1 std) '
           '| paper (Table 6) | ours \u2212 paper | notes |',
           '|---|---:|---:|---:|---:|---:|---:|---|']
  for g, row in zip([g for g in groups if g.family == 'cifar'], cifar_rows(groups)):
    diff = '-' if row['difference'] is None else f"{row['difference']:+.2f}"
    if row['demonstration'] and row['paper'] is not None:
      diff = 'not comparable'
    lines.append(f"| {row['method']} | {row['depth']} | {_params(row['params'])} | {row['runs']} "
                 f"| {_errors(g.test_errors())} | {_paper_cifar(g.depth if g.residual else None)} "
                 f"| {diff} | {row['notes']} |")
  return '\n'.join(lines)


def imagenet_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
  rows = []
  for g in groups:
    if g.family != 'imagenet':
      continue
    top1, top5 = g.test_errors(), g.test_errors('test_top5_error')
    paper = PAPER_IMAGENET_10CROP.get((g.model, g.shortcut))
    comparable = not g.demonstration_reasons()
    rows.append(dict(
        model=g.model, name=g.name, shortcut=g.shortcut, params=int(g.runs[0].result['params']),
        runs=len(g.runs), evaluation='10-crop' if g.ten_crop else 'centre crop',
        top1_best=float(top1.min()) if len(top1) else None,
        top1_mean=float(top1.mean()) if len(top1) else None,
        top5_mean=float(top5.mean()) if len(top5) else None,
        paper_top1=paper[0] if paper else None, paper_top5=paper[1] if paper else None,
        difference=(float(top1.mean()) - paper[0] if comparable and paper and len(top1) else None),
        single_model=PAPER_IMAGENET_SINGLE_MODEL.get((g.model, g.shortcut)),
        demonstration=not comparable, notes=_notes(g), workdirs=[r.workdir for r in g.runs]))
  return rows


def imagenet_table(groups: Sequence[Group]) -> str:
  """Markdown table of ImageNet runs beside Tables 3 (10-crop) and 4 (single model)."""
  lines = ['| model | evaluation | # params | runs | top-1 err (%) best (mean \u00b1 std) '
           '| top-5 err (%) | paper top-1 / top-5, 10-crop (Table 3) | ours \u2212 paper (top-1) '
           '| paper single-model (Table 4) | notes |',
           '|---|---|---:|---:|---:|---:|---:|---:|---:|---|']
  imagenet = [g for g in groups if g.family == 'imagenet']
  for g, row in zip(imagenet, imagenet_rows(groups)):
    top5 = '-' if row['paper_top5'] is None else f"{row['paper_top5']:.2f}"
    paper = '-' if row['paper_top1'] is None else f"{row['paper_top1']:.2f} / {top5}"
    diff = '-' if row['difference'] is None else f"{row['difference']:+.2f}"
    if row['demonstration'] and row['paper_top1'] is not None:
      diff = 'not comparable'
    elif row['difference'] is not None and not g.ten_crop:
      diff += ' (centre crop vs 10-crop)'
    single = '-' if not row['single_model'] else '{:.2f} / {:.2f}'.format(*row['single_model'])
    lines.append(f"| {g.name} | {row['evaluation']} | {_params(row['params'])} | {row['runs']} "
                 f"| {_errors(g.test_errors())} | {_errors(g.test_errors('test_top5_error'))} "
                 f"| {paper} | {diff} | {single} | {row['notes']} |")
  return '\n'.join(lines)


def runs_table(groups: Sequence[Group], base_dir: str) -> str:
  """Every run behind the tables: where it is and what produced it."""
  lines = ['| experiment | run directory | seed | steps | test error (%) | data | device '
           '| git commit | jax | wall time |', '|---|---|---:|---:|---:|---|---|---|---|---:|']
  labels = _labels(groups)
  for g in groups:
    for r in g.runs:
      res = r.result
      err = '-' if res.get('test_error') is None else f"{res['test_error']:.2f}"
      device = f"{res.get('device_count', 1)} x {res.get('device_kind', '?')}"
      commit = (res.get('git_commit') or '?')
      commit = commit[:12] + ('-dirty' if commit.endswith('-dirty') else '')
      data = res.get('data', '?') + (' (synthetic)' if res.get('synthetic') else '')
      wall = res.get('wall_time_seconds')
      lines.append(f"| {labels[id(g)]} | `{os.path.relpath(r.workdir, base_dir)}` "
                   f"| {res.get('seed', '-')} | {res['steps']:,} | {err} | {data} | {device} "
                   f"| `{commit}` | {res.get('versions', {}).get('jax', '?')} "
                   f"| {'-' if wall is None else f'{wall / 60:.1f} min'} |")
  return '\n'.join(lines)


# --- Figures ------------------------------------------------------------------


def _colour(depth: int, fallback: int = 0) -> str:
  palette = ['#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf']
  return _DEPTH_COLOURS.get(depth, palette[fallback % len(palette)])


def _mean_curve(runs: Sequence[RunRecord], key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, mean over runs) of metric `key` at the steps every run logged it."""
  per_run = [{m['step']: m[key] for m in r.metrics if m.get(key) is not None} for r in runs]
  steps = sorted(set.intersection(*(set(p) for p in per_run))) if per_run else []
  return np.array(steps), np.array([np.mean([p[s] for p in per_run]) for s in steps])


def _as_groups(runs_or_groups: Sequence[RunRecord | Group]) -> list[Group]:
  if runs_or_groups and all(isinstance(x, Group) for x in runs_or_groups):
    return list(runs_or_groups)
  return group_runs(runs_or_groups)


def plot_training_curves(runs: Sequence[RunRecord | Group], path: str | None = None,
                         *, title: str | None = None) -> Figure:
  """Fig. 6: training error (dashed) and test error (bold) against iterations.

  Plain nets on the left, ResNets on the right, one colour per depth; curves
  are the mean over the seeds of each experiment. `runs` are RunRecords (or
  Groups) of CIFAR nets. Saved as PNG at `path` if given.
  """
  groups = [g for g in _as_groups(runs) if g.family == 'cifar']
  labels = _labels(groups)
  fig = Figure(figsize=(11, 4.2), dpi=100, layout='constrained')
  axes = fig.subplots(1, 2, sharey=True)
  top = 0.0
  for ax, residual in zip(axes, (False, True)):
    chosen = [g for g in groups if g.residual == residual]
    for i, g in enumerate(chosen):
      colour = _colour(g.depth, i)
      steps, train_err = _mean_curve(g.runs, 'train_error')
      ax.plot(steps, train_err, '--', color=colour, linewidth=1)
      steps_t, test_err = _mean_curve(g.runs, 'test_error')
      ax.plot(steps_t, test_err, '-', color=colour, linewidth=2.2, label=labels[id(g)])
      tail = np.concatenate([train_err[len(train_err) // 10:], test_err[len(test_err) // 10:]])
      top = max(top, float(tail.max()) if len(tail) else 0.0)
    ax.set_title('plain networks' if not residual else 'ResNets')
    ax.set_xlabel('iterations')
    ax.grid(alpha=0.3)
    if chosen:
      ax.legend(loc='upper right', fontsize=8)
    else:
      ax.text(0.5, 0.5, 'no runs', ha='center', va='center', transform=ax.transAxes)
  axes[0].set_ylabel('error (%)')
  axes[0].set_ylim(0, min(100.0, top * 1.1) if top > 0 else 100.0)
  fig.suptitle(title if title is not None else _figure_title(groups, 'dashed: training error, '
                                                             'bold: test error'), fontsize=10)
  if path:
    fig.savefig(path)
  return fig


def _figure_title(groups: Sequence[Group], text: str) -> str:
  demo = demonstration_label(groups)
  return f'{demo}\n{text}' if demo else text


def plot_layer_responses(responses: Mapping[str, Any], path: str | None = None,
                         *, title: str = '') -> Figure:
  """Fig. 7: std of each 3x3 layer's response, in layer order (top) and sorted (bottom).

  `responses` maps a label ('plain-20', 'ResNet-56', ...) to an
  `analysis.LayerResponses`. Plain nets are dashed, ResNets solid, one colour
  per depth (6n+2 for n 3x3-layer pairs).
  """
  fig = Figure(figsize=(7, 6.5), dpi=100, layout='constrained')
  top, bottom = fig.subplots(2, 1)
  used = set()
  for i, (label, r) in enumerate(responses.items()):
    match = re.search(r'-(\d+)', label)
    depth = int(match.group(1)) if match else len(r) + 2
    style = '--' if 'plain' in label.lower() else '-'
    colour = _colour(depth, i)
    if (colour, style) in used:  # e.g. one network at two moments: another colour
      colour = _colour(-1, i)
    used.add((colour, style))
    x = np.arange(1, len(r) + 1)
    top.plot(x, r.std, style, color=colour, label=label, linewidth=1.4)
    bottom.plot(x, r.sorted(), style, color=colour, label=label, linewidth=1.4)
  for ax in (top, bottom):
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
  top.set_xlabel('layer index (original)')
  bottom.set_xlabel('layer index (sorted by magnitude)')
  for ax in (top, bottom):
    ax.set_ylabel('std')
    ax.grid(alpha=0.3)
    if responses:
      ax.legend(fontsize=8, ncol=2)
  fig.suptitle(title or 'std of 3x3 layer responses (after BN, before ReLU/addition)',
               fontsize=10)
  if path:
    fig.savefig(path)
  return fig


def group_responses(groups: Sequence[Group], *, log=logging.warning) -> tuple[dict, dict]:
  """Layer responses of every CIFAR group (mean over its runs) and of every run.

  Returns ({label: LayerResponses}, {workdir: LayerResponses}). Runs whose
  checkpoint or data cannot be read are skipped with a warning.
  """
  from resnet_jax import analysis  # pylint: disable=g-import-not-at-top
  from resnet_jax import data  # pylint: disable=g-import-not-at-top
  labels = _labels(groups)
  sources: dict[str, Any] = {}
  per_group, per_run = {}, {}
  for g in groups:
    if g.family != 'cifar':
      continue
    found = []
    for r in g.runs:
      try:
        config = analysis.load_run_config(r.workdir)
        key = json.dumps([config.data.to_dict(), config.batch_size, config.eval_batch_size],
                         sort_keys=True, default=str)
        if key not in sources:
          sources[key] = data.create_data_source(config, process_index=0, process_count=1)
        per_run[r.workdir] = analysis.run_layer_responses(r.workdir, source=sources[key])
        found.append(per_run[r.workdir])
      except Exception as e:  # pylint: disable=broad-except
        log(f'No layer responses for {r.workdir}: {type(e).__name__}: {e}')
    if found:
      per_group[labels[id(g)]] = analysis.mean_responses(found)
  return per_group, per_run


# --- The report -----------------------------------------------------------------


def write_report(results_dir: str, out_dir: str | None = None, *,
                 responses: bool = True) -> dict[str, str]:
  """Writes report.md, the figures and summary.json; returns their paths by name."""
  out_dir = out_dir or os.path.join(results_dir, 'report')
  finished, unfinished = find_run_dirs(results_dir)
  if not finished:
    raise FileNotFoundError(f'No finished runs (no result.json) below {results_dir}.')
  groups = group_runs([load_run(d) for d in finished])
  os.makedirs(out_dir, exist_ok=True)
  paths = {'report': os.path.join(out_dir, 'report.md'),
           'summary': os.path.join(out_dir, 'summary.json')}
  demo = demonstration_label(groups)
  cifar = [g for g in groups if g.family == 'cifar']
  imagenet = [g for g in groups if g.family == 'imagenet']

  md = ['# ResNet results' + (f': {demo}' if demo else ''), '']
  if demo:
    reasons = demo[len(DEMO_LABEL) + 2:]
    paper = '; '.join(PAPER_SCHEDULE[f] for f in sorted({g.family for g in groups}))
    md += [f'> **{DEMO_LABEL}.** These runs differ from the paper\'s experiments ({reasons}; '
           f'the paper: {paper}). Their numbers show that the code runs end to end, not how '
           'well it reproduces the paper.', '']
  md += [f'{len(finished)} finished runs in `{results_dir}`; made by '
         f'`python -m resnet_jax.report` on {datetime.date.today().isoformat()}.', '']
  if cifar:
    examples = sorted({r.result.get('test_examples') for g in cifar for r in g.runs} - {None})
    md += ['## CIFAR-10 (Table 6)', '', cifar_table(groups), '',
           f'Test error (%) of the final model on the test split ({", ".join(map(str, examples))} '
           'images), best and mean \u00b1 sample std over the runs (seeds); "ours \u2212 paper" '
           "compares our mean with the paper's number (with its mean for ResNet-110). The paper "
           'gives no number for plain nets (Fig. 6 only).', '']
  if imagenet:
    md += ['## ImageNet (Tables 3 and 4)', '', imagenet_table(groups), '',
           'Top-1/top-5 error (%) on the validation set. Table 3 uses 10-crop testing; Table 4 '
           'fully convolutional multi-scale testing (not implemented here), for reference only.',
           '']
  if cifar:
    fig6 = os.path.join(out_dir, 'fig6_curves.png')
    plot_training_curves(cifar, fig6)
    paths['fig6'] = fig6
    md += ['## Training curves (Fig. 6)', '', '![Fig. 6](fig6_curves.png)', '',
           'Dashed: training error (mean over the logging window); bold: test error. Plain nets '
           'left, ResNets right; each curve is the mean over the seeds.', '']
  per_run = {}
  if cifar and responses:
    per_group, per_run = group_responses(cifar)
    if per_group:
      fig7 = os.path.join(out_dir, 'fig7_responses.png')
      plot_layer_responses(per_group, fig7, title=_figure_title(
          cifar, 'std of 3x3 layer responses (after BN, before ReLU/addition)'))
      paths['fig7'] = fig7
      md += ['## Layer responses (Fig. 7)', '', '![Fig. 7](fig7_responses.png)', '',
             "Std of each 3x3 layer's output after BN and before the ReLU and the addition, over "
             'the test split: per channel over (images, positions), averaged over channels '
             '(`resnet_jax.analysis`); mean over the seeds. Top: layers in network order; bottom: '
             'sorted by magnitude.', '']
    else:
      md += ['## Layer responses (Fig. 7)', '', 'Not computed: no run had a readable checkpoint '
             'and test data (see the warnings).', '']
  md += ['## Runs', '', runs_table(groups, results_dir), '']
  if unfinished:
    md += ['Unfinished runs (not in the tables): '
           + ', '.join(f'`{os.path.relpath(d, results_dir)}`' for d in unfinished), '']
  configs_seen = {json.dumps({k: v for k, v in r.config.items() if k != 'seed'}, sort_keys=True)
                  for g in groups for r in g.runs}
  md += [f'Each run directory holds its full config (result.json, config.json), metrics.jsonl '
         f'and checkpoints; the runs above use {len(configs_seen)} distinct configs apart from '
         'the seed.', '']
  with open(paths['report'], 'w') as f:
    f.write('\n'.join(md))
  rel = lambda rows: [{**row, 'workdirs': [os.path.relpath(w, results_dir)
                                            for w in row['workdirs']]} for row in rows]
  with open(paths['summary'], 'w') as f:
    json.dump({'demonstration': demo, 'cifar': rel(cifar_rows(groups)),
               'imagenet': rel(imagenet_rows(groups)),
               'layer_responses': {os.path.relpath(k, results_dir): v.to_dict()
                                   for k, v in per_run.items()}}, f, indent=2)
  return paths


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog='python -m resnet_jax.report', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('results_dir', help='directory holding the run directories')
  parser.add_argument('--out', default=None, help='output directory (default RESULTS_DIR/report)')
  parser.add_argument('--no-responses', action='store_true',
                      help='skip Fig. 7 (which loads every checkpoint and the test data)')
  args = parser.parse_args(argv)
  try:
    paths = write_report(args.results_dir, args.out, responses=not args.no_responses)
  except FileNotFoundError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  for name, path in paths.items():
    print(f'{name}: {path}')


if __name__ == '__main__':
  main()
