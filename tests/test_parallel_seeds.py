"""Seeds trained together (training/seeds.py, sweep --parallel_seeds): the same runs as apart."""

import json
import os

import numpy as np
import pytest

import jax

from resnet_jax import report, sweep
from resnet_jax.training import loop, parallel, seeds
from resnet_jax.weights import loading

SETTINGS = ['batch_size=16', 'eval_batch_size=200', 'num_train_steps=4', 'eval_every_steps=4',
            'checkpoint_every_steps=2', 'log_every_steps=1', 'learning_rate=0.01',
            'progress_bar=False']


def _losses(workdir):
  return [json.loads(l)['train_loss'] for l in open(os.path.join(workdir, 'metrics.jsonl'))]


@pytest.mark.slow
def test_two_seeds_together_are_each_seeds_own_run(tmp_path):
  runs = sweep.plan(['cifar_resnet20'], [0, 1], str(tmp_path / 'together'), data='digits',
                    settings=SETTINGS)
  assert sweep.run_all(runs, parallel_seeds=True, log=lambda _: None) == []
  alone = sweep.experiment_config('cifar_resnet20', data='digits', settings=SETTINGS + ['seed=1'])
  alone_result = loop.train_and_evaluate(alone, str(tmp_path / 'alone'))

  together = [_losses(r.workdir) for r in runs]
  assert len(together[1]) == 4
  np.testing.assert_allclose(together[1], _losses(tmp_path / 'alone'), rtol=1e-4)
  assert not np.allclose(together[0], together[1], rtol=1e-3)  # each seed its own run
  finished = report.collect_runs(str(tmp_path / 'together'))
  assert sorted(r.result['seed'] for r in finished) == [0, 1]
  for r in finished:
    assert r.result['test_examples'] == 360 and r.result['steps'] == 4
    assert [m['step'] for m in r.metrics] == [1, 2, 3, 4]
    assert loading.checkpoint_info(r.workdir)['step'] == 4
  seed1 = [r for r in finished if r.result['seed'] == 1][0]
  assert seed1.result['test_error'] == pytest.approx(alone_result['test_error'], abs=0.6)
  # Both seeds read the same images, and say so: one experiment in the report.
  assert [r.result['train_data'] for r in finished] == [alone_result['train_data']] * 2
  assert len(report.group_runs(finished)) == 1
  # The checkpoints hold each seed's own weights: seed 1's are those of its run alone.
  expected = jax.tree.leaves(parallel.fetch(alone_result['state'].params))
  loaded = [jax.tree.leaves(loading.load_variables(r.workdir)['params']) for r in runs]
  distance = lambda a, b: np.sqrt(sum(((x - y) ** 2).sum() for x, y in zip(a, b))
                                  / sum((y ** 2).sum() for y in b))
  assert distance(loaded[1], expected) < 1e-4
  assert distance(loaded[0], expected) > 1e-2


def test_seeds_at_different_steps_do_not_resume_together(tmp_path):
  configs = [sweep.experiment_config('cifar_resnet20', data='digits',
                                     settings=SETTINGS + [f'seed={s}']) for s in (0, 1)]
  with pytest.raises(ValueError, match='differs from seed 0 in'):
    other = sweep.experiment_config('cifar_resnet20', data='digits',
                                    settings=SETTINGS + ['seed=1', 'batch_size=8'])
    seeds.check_configs([configs[0], other])
  short = sweep.experiment_config('cifar_resnet20', data='digits',
                                  settings=SETTINGS + ['seed=1', 'num_train_steps=2'])
  loop.train_and_evaluate(short, str(tmp_path / 'seed1'))  # seed 1 is at step 2
  with pytest.raises(ValueError, match='seed 0: step 0, seed 1: step 2'):
    seeds.train_seeds(configs, [str(tmp_path / 'seed0'), str(tmp_path / 'seed1')])
