"""The report: Table 6 rows, means and stds over seeds, demonstration labels, figures.

The results directory comes from short real runs on the bundled digits, made by
`python -m resnet_jax.sweep` (one process, so the cost is mostly compilation):
ResNet-20 and plain-20 with two seeds each, ResNet-32 and plain-32 with one.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from resnet_jax import report
from resnet_jax import sweep
from resnet_jax.weights import loading

_SETTINGS = ['num_train_steps=6', 'batch_size=16', 'eval_batch_size=360', 'eval_every_steps=3',
             'log_every_steps=2', 'checkpoint_every_steps=6', 'lr_boundaries_steps=()',
             'progress_bar=False']
_RUNS = {'cifar_resnet20': (0, 1), 'cifar_plain20': (0, 1), 'cifar_resnet32': (0,),
         'cifar_plain32': (0,)}


@pytest.fixture(scope='module')
def results(tmp_path_factory):
  """Runs the sweep in one fresh process, with a compilation cache shared by the seeds."""
  root = tmp_path_factory.mktemp('results')
  script = '\n'.join([
      'from resnet_jax import sweep',
      'runs = []',
      *(f'runs += sweep.plan([{e!r}], {list(s)!r}, {str(root)!r}, data="digits", '
        f'settings={_SETTINGS!r})' for e, s in _RUNS.items()),
      'assert not sweep.run_all(runs, in_process=True)'])
  out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return root


@pytest.fixture(scope='module')
def written(results, tmp_path_factory):
  out = tmp_path_factory.mktemp('report')
  paths = report.write_report(str(results), str(out))
  with open(paths['report']) as f:
    text = f.read()
  return paths, text


def _table_rows(text):
  """method -> depth -> cells of the Table 6 rows of report.md."""
  rows = {}
  for line in text.splitlines():
    cells = [c.strip() for c in line.strip().strip('|').split('|')]
    if cells[0] in ('ResNet', 'plain') and cells[1].isdigit():
      rows.setdefault(cells[0], {})[int(cells[1])] = cells
  return rows


def test_sweep_laid_out_one_finished_run_per_experiment_and_seed(results):
  for experiment, seeds in _RUNS.items():
    for seed in seeds:
      with open(results / experiment / f'seed{seed}' / 'result.json') as f:
        result = json.load(f)
      assert result['model'] == experiment and result['seed'] == seed
      assert result['data'] == 'digits' and result['steps'] == 6


def test_sweep_skips_finished_runs(results):
  runs = sweep.plan(['cifar_resnet20', 'cifar_resnet32'], [0], str(results), data='digits',
                    settings=_SETTINGS)
  log = []
  assert sweep.run_all(runs, in_process=True, log=log.append) == []
  assert log == ['2 runs, 2 already finished, 0 to run.']


def test_table6_rows_means_and_stds_match_the_results(results, written):
  _, text = written
  rows = _table_rows(text)
  assert sorted(rows['ResNet']) == [20, 32] and sorted(rows['plain']) == [20, 32]
  for experiment, seeds in _RUNS.items():
    errors = []
    for seed in seeds:
      with open(results / experiment / f'seed{seed}' / 'result.json') as f:
        errors.append(json.load(f)['test_error'])
    method, depth = ('plain' if 'plain' in experiment else 'ResNet'), int(experiment[-2:])
    cells = rows[method][depth]
    assert cells[2] == ('0.27M' if depth == 20 else '0.46M')
    assert cells[3] == str(len(seeds))
    if len(seeds) == 1:
      assert cells[4] == f'{errors[0]:.2f}'
    else:
      e = np.array(errors)
      std = np.sqrt(np.sum((e - e.mean())**2) / (len(e) - 1))
      assert cells[4] == f'{e.min():.2f} ({e.mean():.2f} \u00b1 {std:.2f})'
    assert cells[5] == ({20: '8.75', 32: '7.51'}[depth] if method == 'ResNet' else '-')
    # Digits runs of 6 steps are never compared with the paper.
    assert cells[6] == ('not comparable' if method == 'ResNet' else '-')
    assert 'DEMONSTRATION' in cells[7] and 'digits data' in cells[7] and '6 steps' in cells[7]


def test_report_is_labelled_a_demonstration(written):
  _, text = written
  title = text.splitlines()[0]
  assert title.startswith('# ') and 'DEMONSTRATION' in title and 'not a reproduction' in title
  assert 'digits data' in title and '6 steps of 16' in title


def test_report_traces_every_row_to_its_runs(results, written):
  paths, text = written
  for experiment, seeds in _RUNS.items():
    for seed in seeds:
      assert f'`{experiment}/seed{seed}`' in text
  with open(results / 'cifar_resnet20' / 'seed0' / 'result.json') as f:
    commit = json.load(f)['git_commit']
  if commit:
    assert commit[:12] in text
  with open(paths['summary']) as f:
    summary = json.load(f)
  row = next(r for r in summary['cifar'] if r['model'] == 'cifar_resnet20')
  assert row['workdirs'] == ['cifar_resnet20/seed0', 'cifar_resnet20/seed1']
  assert row['demonstration'] and row['difference'] is None


def _is_png(path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  with Image.open(path) as im:
    im.verify()
  with Image.open(path) as im:
    return im.size


def test_figures_are_written_and_linked(written):
  paths, text = written
  for key, name in (('fig6', 'fig6_curves.png'), ('fig7', 'fig7_responses.png')):
    assert os.path.basename(paths[key]) == name
    assert os.path.getsize(paths[key]) > 1000
    width, height = _is_png(paths[key])
    assert width > 300 and height > 300
    assert f']({name})' in text


def test_layer_responses_of_every_run_are_in_the_summary(written):
  paths, _ = written
  with open(paths['summary']) as f:
    responses = json.load(f)['layer_responses']
  assert len(responses) == 6
  for workdir, r in responses.items():
    depth = 20 if '20' in workdir.split('/')[0] else 32
    assert len(r['std']) == depth - 2 and r['num_examples'] == 360
    assert all(np.isfinite(r['std'])) and min(r['std']) > 0


def test_command_line_writes_to_results_report_by_default(results, tmp_path):
  copy = tmp_path / 'results'
  shutil.copytree(results / 'cifar_resnet32', copy / 'cifar_resnet32')
  # An interrupted run (no result.json) is listed, not tabulated.
  os.makedirs(copy / 'cifar_resnet44' / 'seed0')
  shutil.copy(results / 'cifar_resnet32' / 'seed0' / 'metrics.jsonl',
              copy / 'cifar_resnet44' / 'seed0' / 'metrics.jsonl')
  report.main([str(copy), '--no-responses'])
  with open(copy / 'report' / 'report.md') as f:
    text = f.read()
  assert list(_table_rows(text)) == ['ResNet'] and list(_table_rows(text)['ResNet']) == [32]
  assert 'Unfinished runs' in text and '`cifar_resnet44/seed0`' in text
  assert os.path.exists(copy / 'report' / 'fig6_curves.png')
  assert not os.path.exists(copy / 'report' / 'fig7_responses.png')


# --- Table logic on hand-made results (no training) ------------------------------


def _record(model, seed, error, *, data='cifar10', steps=64_000, batch_size=128, shortcut='A',
            top5=None, ten_crop=False, params=269_722):
  result = {'model': model, 'seed': seed, 'test_error': error, 'test_top5_error': top5,
            'steps': steps, 'batch_size': batch_size, 'data': data, 'synthetic': False,
            'params': params, 'test_examples': 10_000, 'git_commit': 'abc', 'versions': {},
            'config': {'model': {'shortcut': shortcut}, 'data': {'ten_crop': ten_crop},
                       'seed': seed}}
  return report.RunRecord(f'/r/{model}/seed{seed}', result, [])


def test_full_cifar_runs_are_compared_with_the_paper():
  runs = [_record('cifar_resnet110', s, e, params=1_730_714)
          for s, e in enumerate([6.5, 6.7, 6.9])]
  runs += [_record('cifar_resnet20', 0, 8.5)]
  groups = report.group_runs(runs)
  assert report.demonstration_label(groups) == ''
  table = report.cifar_table(groups)
  rows = _table_rows(table)['ResNet']
  assert rows[110][4] == '6.50 (6.70 \u00b1 0.20)'
  assert rows[110][5] == '6.43 (6.61 \u00b1 0.16)'
  assert rows[110][6] == '+0.09'  # our mean against the paper's mean
  assert rows[20][6] == '-0.25' and rows[20][7] == ''
  assert 'DEMONSTRATION' not in table


def _on_data(record, digest, data_dir):
  if digest:
    record.result['train_data'] = {'examples': 45_000, 'digest': digest}
  record.result['config']['data']['data_dir'] = data_dir
  record.workdir += '/' + os.path.basename(data_dir)
  return record


def test_runs_on_different_images_of_one_dataset_are_separate_rows(tmp_path):
  """The JPEG copy and a recompressed copy are both 'cifar10': their digests keep them apart."""
  copy = _on_data(_record('cifar_resnet20', 0, 14.57, steps=12_000), 'a267a72b8d12', '/d/cifar10')
  again = _on_data(_record('cifar_resnet20', 0, 15.80, steps=12_000), '5e0c11f9aa03',
                   '/d/cifar10_q75x2/')
  # An older run without the digest in result.json: read from its checkpoint's metadata.
  older = _on_data(_record('cifar_resnet20', 1, 14.99, steps=12_000), '', '/d/cifar10')
  older.workdir = str(tmp_path / 'older')
  loading.write_inference_checkpoint(
      str(tmp_path / 'older' / 'checkpoints' / '12000'),
      {'params': {'w': np.zeros(2, np.float32)}, 'batch_stats': {'m': np.zeros(1, np.float32)}},
      'cifar_resnet20', {}, extra_meta={'step': 12000,
                                        'fingerprint': {'data.train.digest': 'a267a72b8d12'}})

  groups = report.group_runs([again, older, copy])
  assert [(g.data_digest, [r.result['seed'] for r in g.runs]) for g in groups] == [
      ('5e0c11f9aa03', [0]), ('a267a72b8d12', [0, 1])]
  labels = report.group_labels(groups)
  assert [labels[id(g)] for g in groups] == [
      'ResNet-20 (cifar10 from cifar10_q75x2 (digest 5e0c11f9), 12000 steps)',
      'ResNet-20 (cifar10 from cifar10 (digest a267a72b), 12000 steps)']
  rows = [l for l in report.cifar_table(groups).splitlines() if l.startswith('| ResNet | 20 |')]
  assert len(rows) == 2
  assert '| 1 | 15.80 |' in rows[0] and 'training images: cifar10_q75x2 (digest 5e0c11f9)' in rows[0]
  assert '| 2 | 14.57 (14.78 \u00b1 0.30) |' in rows[1]
  fig = report.plot_training_curves(groups)
  bold = [l for l in fig.axes[1].get_lines() if l.get_linestyle() == '-']
  assert len(bold) == 2 and bold[0].get_color() != bold[1].get_color()

  # One known digest: a run without one (tfds) is the same experiment, as before.
  tfds_run = _on_data(_record('cifar_resnet20', 2, 15.0, steps=12_000), '', '')
  groups = report.group_runs([copy, tfds_run])
  assert len(groups) == 1 and groups[0].data_digest == ''
  assert report.group_labels(groups)[id(groups[0])] == 'ResNet-20'
  assert 'training images' not in report.cifar_table(groups)


def test_short_cifar_runs_are_demonstrations():
  groups = report.group_runs([_record('cifar_resnet56', 0, 7.0, steps=32_000)])
  label = report.demonstration_label(groups)
  assert label.startswith('DEMONSTRATION') and '32,000 steps' in label
  assert 'not comparable' in report.cifar_table(groups)


def test_imagenet_runs_are_compared_with_tables_3_and_4():
  runs = [_record('resnet34', 0, 24.0, data='imagenet2012', steps=450_360, batch_size=256,
                  shortcut='C', top5=7.0, ten_crop=True, params=21_797_672),
          _record('resnet50', 0, 24.0, data='imagenet2012', steps=450_360, batch_size=256,
                  shortcut='B', top5=7.2, params=25_557_032)]
  table = report.imagenet_table(report.group_runs(runs))
  lines = table.splitlines()
  r34 = next(l for l in lines if l.startswith('| ResNet-34 C'))
  assert '10-crop' in r34 and '24.19 / 7.40' in r34 and '-0.19' in r34 and '21.53 / 5.60' in r34
  r50 = next(l for l in lines if l.startswith('| ResNet-50'))
  assert 'centre crop' in r50 and '+1.15 (centre crop vs 10-crop)' in r50


def test_missing_results_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match='No finished runs'):
    report.write_report(str(tmp_path))
