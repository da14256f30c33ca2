"""The report's figures: training curves (Fig. 6) and layer responses (Fig. 7)."""

from __future__ import annotations

import re
import textwrap
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from resnet_jax.runs import Group, RunRecord, demonstration_label, group_labels, group_runs

# One colour per depth, shared by both figures.
_DEPTH_COLOURS = {20: '#e6a700', 32: '#1f77b4', 44: '#2ca02c', 56: '#d62728', 110: '#111111',
                  1202: '#9467bd', 18: '#e6a700', 34: '#1f77b4', 50: '#2ca02c', 101: '#d62728',
                  152: '#111111'}


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
  labels = group_labels(groups)
  fig = Figure(figsize=(11, 4.2), dpi=100, layout='constrained')
  axes = fig.subplots(1, 2, sharey=True)
  top = 0.0
  for ax, residual in zip(axes, (False, True)):
    chosen = [g for g in groups if g.residual == residual]
    used = set()
    for i, g in enumerate(chosen):
      colour = _colour(g.depth, i)
      if colour in used:  # one depth on two datasets or schedules: another colour
        colour = _colour(-1, i)
      used.add(colour)
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
  title = title if title is not None else figure_title(groups, 'dashed: training error, '
                                                       'bold: test error')
  fig.suptitle('\n'.join(w for line in title.splitlines() for w in textwrap.wrap(line, 150) or ['']),
               fontsize=10)
  if path:
    fig.savefig(path)
  return fig


def figure_title(groups: Sequence[Group], text: str) -> str:
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
