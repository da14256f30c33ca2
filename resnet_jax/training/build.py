"""One way to build a run: config -> mesh, data source, model, optimiser, schedule,
train state and the compiled steps.

`train_and_evaluate`, the benchmark, the analysis, the notebooks and the tests
all start here, so they train exactly the same thing.

    run = build(config)                  # devices, data, model, optimiser
    state = run.init_state()             # replicated over the mesh
    state, metrics = run.train_step(state, batch)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import optax

from resnet_jax import data, models
from resnet_jax.training import optim, parallel, state as state_lib, steps


class TraceCounter:
  """Counts how often a function is traced (= compiled, under jit)."""

  def __init__(self, fn: Callable):
    self.fn, self.count = fn, 0
    functools.update_wrapper(self, fn)

  def __call__(self, *args, **kwargs):
    self.count += 1
    return self.fn(*args, **kwargs)


def check_config(config) -> None:
  """Start-up checks that need no devices or data (the data source checks its own keys)."""
  for key in ('eval_every_steps', 'checkpoint_every_steps', 'log_every_steps'):
    if config[key] <= 0:
      raise ValueError(f'config.{key} must be a positive number of steps, not {config[key]}.')
  optim.check_config(config)
  models.check_model_name(config.model.name)  # before the (slow) data loading
  models.check_dtype(config.model.dtype)


@dataclasses.dataclass
class Run:
  """Everything a run is made of, built from its config by `build`."""
  config: Any
  mesh: jax.sharding.Mesh
  source: data.DataSource
  model: nn.Module
  tx: optax.GradientTransformation
  schedule: optim.Schedule
  num_steps: int
  replicated: jax.sharding.NamedSharding
  batch_sharding: jax.sharding.NamedSharding
  train_step: Callable = None   # jitted (state, batch) -> (state, metrics); donates the state
  eval_step: Callable = None    # jitted (state, batch) -> sums over the real examples
  train_traces: TraceCounter = None
  eval_traces: TraceCounter = None

  @property
  def kernels(self) -> str:
    """Which convolution/BatchNorm kernels run, in words."""
    return models.resolve_conv(self.config.model.conv, self.config.model.dtype)[1]

  def init_state(self) -> state_lib.TrainState:
    """The initial train state of config.seed, replicated over the mesh."""
    init = functools.partial(state_lib.create_train_state, self.model, self.tx,
                             self.source.image_shape)
    return jax.jit(init, static_argnums=0, out_shardings=self.replicated)(self.config.seed)


def build(config, *, source: data.DataSource | None = None) -> Run:
  """Checks `config`, starts the multi-process runtime when asked, and builds the run.

  `source` replaces the configured data source (tests, benchmarks). Raises
  ValueError / data.DataError with a message that says what to fix.
  """
  check_config(config)
  parallel.initialize_distributed(config)
  mesh = parallel.create_mesh()
  parallel.check_batch_sizes(config, mesh)
  source = source or data.create_data_source(config)  # fails fast on missing data
  model = state_lib.create_model(config, source.num_classes)
  tx = optim.create_optimizer(config)
  schedule = optim.create_schedule(config, source.steps_per_epoch)
  replicated, batch_sharding = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  train_fn = TraceCounter(functools.partial(steps.train_step, model=model, tx=tx,
                                            schedule=schedule, log_every=config.log_every_steps))
  eval_fn = TraceCounter(functools.partial(steps.eval_step, model=model))
  return Run(
      config=config, mesh=mesh, source=source, model=model, tx=tx, schedule=schedule,
      num_steps=optim.num_train_steps(config, source.steps_per_epoch),
      replicated=replicated, batch_sharding=batch_sharding,
      train_step=jax.jit(train_fn, in_shardings=(replicated, batch_sharding),
                         out_shardings=(replicated, replicated), donate_argnums=0),
      eval_step=jax.jit(eval_fn, in_shardings=(replicated, batch_sharding),
                        out_shardings=replicated),
      train_traces=train_fn, eval_traces=eval_fn)
