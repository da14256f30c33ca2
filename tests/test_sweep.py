"""The sweep: which runs, where, with which configs (no training here; see test_report)."""

import json
import os
import subprocess
import sys

import pytest

from resnet_jax import sweep


def test_groups_expand_in_order_without_repeats():
  names = sweep.expand_experiments('cifar_fig7,cifar_resnet20,cifar_table6')
  assert names == ['cifar_plain20', 'cifar_plain56', 'cifar_resnet20', 'cifar_resnet56',
                   'cifar_resnet110', 'cifar_resnet32', 'cifar_resnet44']
  assert len(sweep.expand_experiments('cifar_fig6')) == 10
  assert 'cifar_resnet1202' not in sweep.expand_experiments('cifar_table6')


def test_every_group_names_existing_experiments():
  for group, names in sweep.GROUPS.items():
    for name in names:
      assert os.path.isfile(sweep.config_path(name)), (group, name)


def test_unknown_experiment_is_a_clear_error():
  with pytest.raises(ValueError, match='No experiment .cifar_resnet21.*cifar_resnet20'):
    sweep.plan(['cifar_resnet21'], [0], '/tmp/x')


def test_plan_lays_out_results_dir_experiment_seed():
  runs = sweep.plan(['cifar_resnet20', 'cifar_plain20'], [0, 3], 'res',
                    settings=['batch_size=64'])
  assert [r.workdir for r in runs] == [os.path.join('res', e, f'seed{s}') for e in
                                       ('cifar_resnet20', 'cifar_plain20') for s in (0, 3)]
  config = sweep.parse_config(runs[1].config_file, runs[1].overrides)
  assert config.seed == 3 and config.batch_size == 64 and config.model.name == 'cifar_resnet20'
  assert config.num_train_steps == 64_000  # the experiment's own recipe otherwise


def test_digits_demo_keeps_each_experiments_network_settings():
  settings = ['num_train_steps=300', 'lr_boundaries_steps=(200,250)']
  config = sweep.experiment_config('cifar_resnet1202', data='digits', settings=settings)
  assert config.data.source == 'digits'
  assert config.model.name == 'cifar_resnet1202' and config.model.scan_blocks
  assert config.num_train_steps == 300 and tuple(config.lr_boundaries_steps) == (200, 250)
  assert sweep.experiment_config('cifar_resnet20', data='synthetic').data.source == 'synthetic'


def test_print_commands_lists_main_invocations_of_unfinished_runs(tmp_path):
  done = tmp_path / 'cifar_resnet20' / 'seed0'
  os.makedirs(done)
  config = sweep.experiment_config('cifar_resnet20', settings=['seed=0'])
  with open(done / 'result.json', 'w') as f:
    json.dump({'config': json.loads(config.to_json_best_effort())}, f)
  out = subprocess.run(
      [sys.executable, '-m', 'resnet_jax.sweep', '--experiments=cifar_resnet20,cifar_plain110',
       '--seeds=0,1', f'--results={tmp_path}', '--set=batch_size=64', '--print_commands'],
      capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 3  # cifar_resnet20/seed0 is finished
  assert lines[0].startswith('python -m resnet_jax.main --config=')
  assert 'experiments/cifar_resnet20.py' in lines[0]
  assert f'--workdir={tmp_path}/cifar_resnet20/seed1' in lines[0]
  assert lines[0].endswith('--config.batch_size=64 --config.seed=1')
  assert 'cifar_plain110.py' in lines[2] and '--config.seed=1' in lines[2]


def test_finished_run_of_another_config_is_refused(tmp_path):
  runs = sweep.plan(['cifar_resnet20'], [0], str(tmp_path))
  os.makedirs(runs[0].workdir)
  config = sweep.experiment_config('cifar_resnet20', settings=['num_train_steps=100'])
  with open(os.path.join(runs[0].workdir, 'result.json'), 'w') as f:
    json.dump({'config': json.loads(config.to_json_best_effort())}, f)
  with pytest.raises(ValueError, match='num_train_steps=100.*num_train_steps=64000'):
    sweep.run_all(runs, log=lambda _: None)
