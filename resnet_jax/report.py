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
import datetime
import json
import logging
import os
import sys
from typing import Any, Sequence

import numpy as np

from resnet_jax import analysis, paper
from resnet_jax.plots import figure_title, plot_layer_responses, plot_training_curves
from resnet_jax.runs import (DEMO_LABEL, Group, demonstration_label, find_run_dirs, group_labels,
                             group_runs)
# Re-exported for notebooks and scripts that read runs through the report.
from resnet_jax.runs import RunRecord, collect_runs, load_run  # pylint: disable=unused-import

__all__ = ['RunRecord', 'collect_runs', 'load_run', 'plot_layer_responses', 'plot_training_curves', 'write_report',
           'cifar_table', 'imagenet_table', 'runs_table', 'group_runs', 'demonstration_label']

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
  notes = [f'training images: {g.data_origin}'] if g.data_digest else []
  reasons = g.demonstration_reasons()
  if reasons:
    notes.append(f"**DEMONSTRATION**: {', '.join(reasons)}")
  return '; '.join(notes)


def cifar_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
  """One row of the Table 6 layout per CIFAR group (ResNets, then plain nets)."""
  rows = []
  for g in groups:
    if g.family != 'cifar':
      continue
    errors = g.test_errors()
    published = paper.CIFAR_ERROR.get(g.depth) if g.residual else None
    paper_mean = paper.CIFAR_MEAN_STD.get(g.depth, (published, None))[0] if published else None
    comparable = not g.demonstration_reasons()
    rows.append(dict(
        method='ResNet' if g.residual else 'plain', model=g.model, depth=g.depth,
        params=int(g.runs[0].result['params']), runs=len(g.runs), data=g.data, steps=g.steps,
        data_digest=g.data_digest or None,
        best=float(errors.min()) if len(errors) else None,
        mean=float(errors.mean()) if len(errors) else None,
        std=float(errors.std(ddof=1)) if len(errors) > 1 else None,
        paper=published, paper_mean=paper_mean,
        difference=(float(errors.mean()) - paper_mean
                    if comparable and paper_mean is not None and len(errors) else None),
        demonstration=not comparable, notes=_notes(g),
        workdirs=[r.workdir for r in g.runs]))
  return rows


def _paper_cifar(depth: int | None) -> str:
  return '-' if depth is None or depth not in paper.CIFAR_ERROR else paper.cifar_error_text(depth)


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
    published = paper.IMAGENET_10CROP.get((g.model, g.shortcut))
    comparable = not g.demonstration_reasons()
    rows.append(dict(
        model=g.model, name=g.name, shortcut=g.shortcut, params=int(g.runs[0].result['params']),
        runs=len(g.runs), evaluation='10-crop' if g.ten_crop else 'centre crop',
        top1_best=float(top1.min()) if len(top1) else None,
        top1_mean=float(top1.mean()) if len(top1) else None,
        top5_mean=float(top5.mean()) if len(top5) else None,
        paper_top1=published[0] if published else None,
        paper_top5=published[1] if published else None,
        difference=(float(top1.mean()) - published[0] if comparable and published and len(top1)
                    else None),
        single_model=paper.IMAGENET_SINGLE_MODEL.get((g.model, g.shortcut)),
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
    published = '-' if row['paper_top1'] is None else f"{row['paper_top1']:.2f} / {top5}"
    diff = '-' if row['difference'] is None else f"{row['difference']:+.2f}"
    if row['demonstration'] and row['paper_top1'] is not None:
      diff = 'not comparable'
    elif row['difference'] is not None and not g.ten_crop:
      diff += ' (centre crop vs 10-crop)'
    single = '-' if not row['single_model'] else '{:.2f} / {:.2f}'.format(*row['single_model'])
    lines.append(f"| {g.name} | {row['evaluation']} | {_params(row['params'])} | {row['runs']} "
                 f"| {_errors(g.test_errors())} | {_errors(g.test_errors('test_top5_error'))} "
                 f"| {published} | {diff} | {single} | {row['notes']} |")
  return '\n'.join(lines)


def runs_table(groups: Sequence[Group], base_dir: str) -> str:
  """Every run behind the tables: where it is and what produced it."""
  lines = ['| experiment | run directory | seed | steps | test error (%) | data | device '
           '| git commit | jax | wall time |', '|---|---|---:|---:|---:|---|---|---|---|---:|']
  labels = group_labels(groups)
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


def group_responses(groups: Sequence[Group], *, log=logging.warning) -> tuple[dict, dict]:
  """Layer responses of every CIFAR group (mean over its runs) and of every run.

  Reads the `layer_responses.json` each run wrote at the end of training; the
  report runs no network. Runs without one are skipped with a message that
  says how to compute them (`python -m resnet_jax.analysis WORKDIR`).
  Returns ({label: LayerResponses}, {workdir: LayerResponses}).
  """
  labels = group_labels(groups)
  per_group, per_run = {}, {}
  for g in groups:
    if g.family != 'cifar':
      continue
    found = []
    for r in g.runs:
      try:
        responses = analysis.read_responses(r.workdir)
      except (OSError, ValueError, KeyError) as e:
        log(f'Unreadable layer responses in {r.workdir}: {type(e).__name__}: {e}')
        continue
      if responses is None:
        log(f'No layer responses in {r.workdir}; compute them with '
            f'`python -m resnet_jax.analysis {r.workdir}`.')
        continue
      per_run[r.workdir] = responses
      found.append(responses)
    if found:
      per_group[labels[id(g)]] = analysis.mean_responses(found)
  return per_group, per_run


# --- The report -----------------------------------------------------------------


def write_report(results_dir: str, out_dir: str | None = None, *,
                 responses: bool = True, data_note: str = '') -> dict[str, str]:
  """Writes report.md, the figures and summary.json; returns their paths by name.

  `data_note` says what the data really was where its name does not (e.g.
  'CIFAR-10, JPEG quality-75 copy'): it heads the report and both figures.
  """
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
  if data_note:
    md += [f'> **Data: {data_note}.** Compare with the paper\'s numbers as a guide only.', '']
  if demo:
    reasons = demo[len(DEMO_LABEL) + 2:]
    schedule = '; '.join(paper.SCHEDULE[f] for f in sorted({g.family for g in groups}))
    md += [f'> **{DEMO_LABEL}.** These runs differ from the paper\'s experiments ({reasons}; '
           f'the paper: {schedule}). Their numbers show that the code runs end to end, not how '
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
           'fully convolutional multi-scale testing, which training runs do not do (measure a '
           'run with python -m resnet_jax.evaluate --workdir=RUN --data_dir=IMAGENET '
           '--multi_scale); its numbers are for reference only.',
           '']
  if cifar:
    fig6 = os.path.join(out_dir, 'fig6_curves.png')
    plot_training_curves(cifar, fig6, title=figure_title(
        cifar, (f'{data_note}: ' if data_note else '') + 'dashed: training error, bold: test '
        'error'))
    paths['fig6'] = fig6
    md += ['## Training curves (Fig. 6)', '', '![Fig. 6](fig6_curves.png)', '',
           'Dashed: training error (mean over the logging window); bold: test error. Plain nets '
           'left, ResNets right; each curve is the mean over the seeds.', '']
  per_run = {}
  if cifar and responses:
    per_group, per_run = group_responses(cifar)
    if per_group:
      fig7 = os.path.join(out_dir, 'fig7_responses.png')
      plot_layer_responses(per_group, fig7, title=figure_title(
          cifar, (f'{data_note}: ' if data_note else '')
          + 'std of 3x3 layer responses (after BN, before ReLU/addition)'))
      paths['fig7'] = fig7
      md += ['## Layer responses (Fig. 7)', '', '![Fig. 7](fig7_responses.png)', '',
             "Std of each 3x3 layer's output after BN and before the ReLU and the addition, over "
             'the test split: per channel over (images, positions), averaged over channels '
             '(`resnet_jax.analysis`); mean over the seeds. Top: layers in network order; bottom: '
             'sorted by magnitude.', '']
    else:
      md += ['## Layer responses (Fig. 7)', '', 'Not available: no run has a '
             '`layer_responses.json` (runs write it at the end of training; for older runs, '
             '`python -m resnet_jax.analysis WORKDIR` computes it).', '']
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
    json.dump({'demonstration': demo, 'data_note': data_note, 'cifar': rel(cifar_rows(groups)),
               'imagenet': rel(imagenet_rows(groups)),
               'layer_responses': {os.path.relpath(k, results_dir): v.to_dict()
                                   for k, v in per_run.items()}}, f, indent=2)
  return paths


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog='python -m resnet_jax.report', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('results_dir', help='directory holding the run directories')
  parser.add_argument('--out', default=None, help='output directory (default RESULTS_DIR/report)')
  parser.add_argument('--no-responses', action='store_true', help='skip Fig. 7')
  parser.add_argument('--data_note', default='',
                      help="what the data was, e.g. 'CIFAR-10, JPEG quality-75 copy'")
  args = parser.parse_args(argv)
  try:
    paths = write_report(args.results_dir, args.out, responses=not args.no_responses,
                         data_note=args.data_note)
  except FileNotFoundError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  for name, path in paths.items():
    print(f'{name}: {path}')


if __name__ == '__main__':
  main()
