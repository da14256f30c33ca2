"""Images/s of the training loop (input + step + logging fetch), host pipeline vs
device-resident input and several steps per dispatch. Prints, asserts nothing.

    python benchmarks/dispatch_speed.py --data_dir=/work/data/cifar10 --steps=32
"""

import argparse
import time

import jax

from resnet_jax import configs, data
from resnet_jax.training import build, multistep, parallel


def measure(config, source, warmup: int, steps: int) -> float:
  run = build.build(config, source=source)
  state = run.init_state()
  chunks = multistep.dispatches(run, 0, warmup + steps)
  start = None
  for step, n, inputs in chunks:
    if step == warmup:
      jax.block_until_ready(state)
      start = time.perf_counter()
    state, _ = multistep.train(run, state, inputs)
    if (step + n) % config.log_every_steps == 0:
      parallel.fetch(state.metric_sums)  # what the loop does on a log step
  jax.block_until_ready(state)
  return config.batch_size * steps / (time.perf_counter() - start)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--data_dir', default='/work/data/cifar10')
  p.add_argument('--model', default='cifar_resnet20')
  p.add_argument('--batch_size', type=int, default=128)
  p.add_argument('--warmup', type=int, default=8)
  p.add_argument('--steps', type=int, default=32)
  p.add_argument('--rounds', type=int, default=2)
  args = p.parse_args()
  config = configs.cifar(args.model, batch_size=args.batch_size, log_every_steps=8,
                         progress_bar=False, num_train_steps=10_000)
  config.data.source, config.data.data_dir = 'files', args.data_dir
  source = data.create_data_source(config)
  variants = [(False, 1), (True, 1), (False, 8), (True, 8)]
  rates = {v: [] for v in variants}
  for _ in range(args.rounds):  # alternate, so that load on the machine hits all alike
    for device_input, k in variants:
      c = config.copy_and_resolve_references()
      c.data.device_input, c.steps_per_dispatch = device_input, k
      rates[(device_input, k)].append(measure(c, source, args.warmup, args.steps))
  for (device_input, k), r in rates.items():
    print(f"{'device' if device_input else 'host  '} input, {k} step(s)/dispatch: "
          + ', '.join(f'{x:7.1f}' for x in r) + ' images/s')


if __name__ == '__main__':
  main()
