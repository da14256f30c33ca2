"""One way to build a run: config -> mesh, data source, model, optimiser, schedule,
train state and the compiled steps.

`train_and_evaluate`, the benchmark, the analysis, the notebooks and the tests
all start here, so they train exactly the same thing.

    run = build(config)                  # devices, data, model, optimiser
    state = run.init_state()             # replicated over the mesh
    state, metrics = run.train_step(state, batch)

`run.train_inputs(start_step)` yields what the train step takes, step by step:
image batches, or with `config.data.device_input` the small index/crop/flip
arrays from which the step gathers its batch from the images held on the
devices (`data/device.py`). With `config.steps_per_dispatch=k > 1`,
`run.train_steps` runs k steps in one call on inputs stacked on a leading axis
(`multistep.py` plans the chunks so that they end on every boundary).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import optax

from resnet_jax import data, models
from resnet_jax.data import device as device_data
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
  if config.steps_per_dispatch < 1:
    raise ValueError(f'config.steps_per_dispatch must be a positive number of steps, not '
                     f'{config.steps_per_dispatch}.')
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
  train_steps: Callable = None  # jitted (state, stacked inputs) -> (state, metrics); k > 1 only
  steps_per_dispatch: int = 1
  device_input: device_data.DeviceInput | None = None
  device_arrays: Any = None     # the resident training set (device_input only)

  def train_inputs(self, start_step: int = 0):
    """Host-side inputs of the train step for steps start_step, ... (infinite)."""
    if self.device_input is not None:
      return self.device_input.train_params(start_step)
    return self.source.train_batches(start_step)

  def input_sharding(self, *leading: int) -> jax.sharding.NamedSharding:
    """Sharding of inputs with `len(leading)` extra leading axes (steps, seeds)."""
    spec = (None,) * len(leading) + (parallel.DATA_AXIS,)
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(*spec))

  def compile_train(self, *, stacked: bool = False, seeds: bool = False) -> Callable:
    """The jitted train step: (state, inputs) -> (state, metrics), state donated.

    stacked: inputs carry a leading step axis, run in one `lax.scan`.
    seeds: the state and the inputs carry a leading seed axis (`jax.vmap`),
      after the step axis when both; the resident data is shared.
    """
    step_fn, arrays = self.train_traces, self.device_arrays
    if self.device_input is not None:
      make = functools.partial(device_data.make_batch, pad=self.device_input.pad,
                               augment=self.device_input.augment)
      one = lambda state, inputs, arrays: step_fn(state, make(arrays, inputs))
    else:
      one = lambda state, inputs, arrays: step_fn(state, inputs)
    if seeds:
      one = jax.vmap(one, in_axes=(0, 0, None))
    fn = one
    if stacked:
      fn = lambda state, inputs, arrays: steps.train_steps(
          state, inputs, step_fn=lambda s, x: one(s, x, arrays))
    sharding = self.input_sharding(*([0] * (stacked + seeds)))
    jitted = jax.jit(fn, in_shardings=(self.replicated, sharding, self.replicated),
                     out_shardings=(self.replicated, self.replicated), donate_argnums=0)
    def call(state, inputs):
      return jitted(state, inputs, arrays)
    call.jitted, call.extra_args = jitted, (arrays,)  # for ahead-of-time compilation
    return call

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
  run = Run(
      config=config, mesh=mesh, source=source, model=model, tx=tx, schedule=schedule,
      num_steps=optim.num_train_steps(config, source.steps_per_epoch),
      replicated=replicated, batch_sharding=batch_sharding,
      eval_step=jax.jit(eval_fn, in_shardings=(replicated, batch_sharding),
                        out_shardings=replicated),
      train_traces=train_fn, eval_traces=eval_fn,
      steps_per_dispatch=config.steps_per_dispatch)
  if config.data.device_input:
    run.device_input = device_data.DeviceInput(source)
    run.device_arrays = run.device_input.device_arrays(replicated)
  run.train_step = run.compile_train()
  if run.steps_per_dispatch > 1:
    run.train_steps = run.compile_train(stacked=True)
  return run
