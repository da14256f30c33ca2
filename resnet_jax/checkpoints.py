"""Checkpoints with orbax: save the whole train state, resume exactly, load for inference.

Layout: `WORKDIR/checkpoints/<step>/{state,meta}`. `state` is the full
`TrainState` (params, batch statistics, optimiser state, step, RNG, metric
accumulators); the input pipeline needs nothing else, because its position is
a function of the step. `meta` is JSON: the config fields that make a
checkpoint meaningful (model, batch size, data), checked on resume.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

# Config fields that must match for a checkpoint to make sense on resume.
# Anything else (logging, evaluation and checkpoint frequency, ...) may change.
_MUST_MATCH = ('model', 'batch_size', 'data.source', 'data.dataset', 'data.train_split',
               'seed')


def _get(config, dotted: str):
  value = config
  for part in dotted.split('.'):
    value = value[part]
  return value.to_dict() if hasattr(value, 'to_dict') else value


def fingerprint(config) -> dict[str, Any]:
  return {key: _get(config, key) for key in _MUST_MATCH}


class CheckpointMismatchError(ValueError):
  """The checkpoint in the workdir was written by an incompatible config."""


class Checkpointer:
  """Orbax `CheckpointManager` for one run's workdir."""

  def __init__(self, workdir: str, config, *, async_save: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, 'checkpoints'))
    self.config = config
    policies = [checkpoint_managers.LatestN(n=max(1, config.keep_checkpoints))]
    if config.keep_best_checkpoint:
      policies.append(checkpoint_managers.BestN(
          get_metric_fn=lambda m: m['validation_error'], reverse=True, n=1,
          keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        enable_async_checkpointing=async_save,
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=('state', 'meta'))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, state: Any, *, metrics: dict[str, float] | None = None) -> None:
    step = int(jax.device_get(state.step))
    if step in self.manager.all_steps():
      return
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(fingerprint(self.config))),
        metrics=metrics, force=True)

  def restore(self, abstract_state: Any) -> Any | None:
    """The state of the latest checkpoint, placed like `abstract_state`, or None if there is none."""
    step = self.manager.latest_step()
    if step is None:
      return None
    meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']
    expected = fingerprint(self.config)
    diffs = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if diffs:
      lines = '\n'.join(f'  {k}: checkpoint has {a!r}, config has {b!r}' for k, (a, b) in diffs.items())
      raise CheckpointMismatchError(
          f'The checkpoints in {self.directory} were written by a different experiment:\n{lines}\n'
          'Use a new --workdir for a new experiment, or restore the original config to resume.')
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    logging.info('Restored checkpoint at step %d from %s', step, self.directory)
    return restored['state']

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
