"""Several train steps per dispatch (training/multistep.py): the same run as one step per call."""

import json

import jax
import numpy as np

from resnet_jax import configs
from resnet_jax.training import loop, multistep


def test_chunks_end_on_every_boundary_and_take_two_sizes():
  chunks = list(multistep.plan(3, 40, 8, (10, 25)))
  assert [s for s, _ in chunks] == sorted(s for s, _ in chunks)
  assert chunks[0][0] == 3 and sum(n for _, n in chunks) == 37
  assert {n for _, n in chunks} == {1, 8}
  ends = {s + n for s, n in chunks}
  assert {10, 20, 25, 30, 40} <= ends  # every boundary is the end of a chunk
  for s, n in chunks:
    assert not any(s < b < s + n for b in (10, 20, 25, 30))
  assert list(multistep.plan(0, 16, 4, (4, 8))) == [(0, 4), (4, 4), (8, 4), (12, 4)]


def _run(workdir, **overrides):
  config = configs.digits('cifar_resnet20', batch_size=16, eval_batch_size=200,
                          num_train_steps=6, eval_every_steps=6, checkpoint_every_steps=6,
                          log_every_steps=4, progress_bar=False)
  config.update(overrides)
  return loop.train_and_evaluate(config, str(workdir))


def test_four_steps_per_dispatch_on_device_input_is_the_same_run(tmp_path):
  one = _run(tmp_path / 'one')
  four = _run(tmp_path / 'four', steps_per_dispatch=4, data={'device_input': True})
  # Steps 0-3 in one call of 4, then 4 and 5 one by one (the log boundary at 4).
  assert four['compilations']['train_step'] == 2
  logs = [[json.loads(l) for l in open(tmp_path / d / 'metrics.jsonl')] for d in ('one', 'four')]
  assert [r['step'] for r in logs[0]] == [r['step'] for r in logs[1]] == [4, 6]
  for a, b in zip(*logs):
    np.testing.assert_allclose(b['train_loss'], a['train_loss'], rtol=1e-5)
    np.testing.assert_allclose(b['learning_rate'], a['learning_rate'], rtol=1e-6)
  np.testing.assert_allclose(four['test_error'], one['test_error'])
  assert int(four['state'].step) == 6
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               one['state'].params, four['state'].params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               one['state'].batch_stats, four['state'].batch_stats)
