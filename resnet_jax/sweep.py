r"""Run several experiments over several seeds, one after another, into one results directory.

    python -m resnet_jax.sweep --experiments=cifar_fig6 --seeds=0,1,2,3,4 --results=results/cifar
    python -m resnet_jax.sweep --experiments=cifar_fig6 --seeds=0,1,2,3,4 --results=results/cifar \
        --print_commands > jobs.txt          # one command per run, for a cluster scheduler
    python -m resnet_jax.sweep --experiments=cifar_resnet20,cifar_plain20 --seeds=0,1 \
        --results=demo --data=digits --in_process --set=num_train_steps=200 \
        '--set=lr_boundaries_steps=(100,150)'

--experiments takes experiment names (files in experiments/) and group names:
cifar_table6 (ResNet-20..110), cifar_table6_all (+ ResNet-1202), cifar_fig6
(plain and ResNet 20..110), cifar_fig7, cifar_all, imagenet_table3. Each
--set=key=value is passed on as --config.key=value.

Run k of experiment E goes to RESULTS/E/seed<k>/. A run whose result.json
exists is skipped; an interrupted one resumes from its checkpoints (that is
what `loop.train_and_evaluate` does in a workdir that holds some). So the same
command can be run again until everything is done, then
`python -m resnet_jax.report RESULTS` makes the tables and figures.

Each run is a `python -m resnet_jax.main` subprocess by default (a crash or an
out-of-memory error ends that run only); `--in_process` runs them all in this
process instead (no start-up cost per run: for short CPU runs and tests).
`--parallel_seeds` trains the unfinished seeds of each experiment together in
this process, one compiled step vmapped over the seeds
(`training/seeds.py`); each seed still writes its own RESULTS/E/seed<k>/.
`--data=digits` runs each experiment's network with the offline digits recipe
(a demonstration, not a reproduction); `--data=synthetic` on random images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from typing import Sequence

from absl import app, flags

from resnet_jax import configs

# Named groups of experiments (files in experiments/).
_CIFAR_RES = [f'cifar_resnet{d}' for d in (20, 32, 44, 56, 110)]
_CIFAR_PLAIN = [f'cifar_plain{d}' for d in (20, 32, 44, 56, 110)]
GROUPS = {
    # Table 6 (ResNet-1202 is its own, long, group).
    'cifar_table6': _CIFAR_RES,
    'cifar_table6_all': _CIFAR_RES + ['cifar_resnet1202'],
    # Fig. 6: plain (left) and residual (right) nets of 20-110 layers.
    'cifar_fig6': _CIFAR_PLAIN + _CIFAR_RES,
    # Fig. 7: the nets whose layer responses the paper plots.
    'cifar_fig7': ['cifar_plain20', 'cifar_plain56', 'cifar_resnet20', 'cifar_resnet56',
                   'cifar_resnet110'],
    'cifar_all': _CIFAR_PLAIN + _CIFAR_RES + ['cifar_resnet1202'],
    # Tables 3-4 (ImageNet).
    'imagenet_table3': ['imagenet_plain18', 'imagenet_resnet18', 'imagenet_plain34',
                        'imagenet_resnet34_optionA', 'imagenet_resnet34',
                        'imagenet_resnet34_optionC', 'imagenet_resnet50', 'imagenet_resnet101',
                        'imagenet_resnet152'],
}
# --data=digits: every experiment's network on the bundled digits, with this recipe.
DIGITS_CONFIG = 'digits_resnet20'


experiments_dir = configs.experiments_dir


def expand_experiments(spec: str | Sequence[str]) -> list[str]:
  """Experiment names from a comma-separated list of names and group names, without repeats."""
  items = spec.split(',') if isinstance(spec, str) else list(spec)
  out = []
  for item in (s.strip() for s in items):
    if not item:
      continue
    for name in GROUPS.get(item, [item]):
      if name not in out:
        out.append(name)
  return out


def config_path(experiment: str) -> str:
  """experiments/<experiment>.py, or the path itself if `experiment` is a .py file."""
  try:
    return configs.experiment_path(experiment)
  except ValueError as e:
    raise ValueError(f'{e} Groups: {", ".join(GROUPS)}.') from None


def parse_config(path: str, overrides: Sequence[str] = ()):
  """The locked ConfigDict `python -m resnet_jax.main --config=path *overrides` would build."""
  return configs.load(path, overrides)


def _flag_value(value) -> str:
  if isinstance(value, (list, tuple)):
    return '(' + ','.join(str(v) for v in value) + (',)' if len(value) == 1 else ')')
  return str(value)


@dataclasses.dataclass
class Run:
  experiment: str
  seed: int
  workdir: str
  config_file: str
  overrides: list[str]   # '--config.key=value' flags

  def command(self) -> list[str]:
    return [sys.executable, '-m', 'resnet_jax.main', f'--config={self.config_file}',
            f'--workdir={self.workdir}', *self.overrides]

  def shell_command(self) -> str:
    args = ['python', *self.command()[1:]]
    return ' '.join(shlex.quote(a) for a in args)

  @property
  def finished(self) -> bool:
    return os.path.exists(os.path.join(self.workdir, 'result.json'))


def run_overrides(experiment: str, *, data: str = '',
                  settings: Sequence[str] = ()) -> tuple[str, list[str]]:
  """(config file, '--config.key=value' overrides) of `experiment` with these options.

  `data`: '' or 'tfds' keeps the experiment's own data; 'digits' runs its
  network (and model settings) with the digits demo recipe instead;
  'synthetic' feeds it random images. `settings` are 'key=value' overrides.
  """
  path = config_path(experiment)
  overrides = []
  if data == 'digits':
    model = parse_config(path).model
    path = config_path(DIGITS_CONFIG)
    base = parse_config(path).model
    overrides += [f'--config.model.{k}={_flag_value(v)}' for k, v in model.items()
                  if base[k] != v]
  elif data == 'synthetic':
    overrides.append('--config.data.source=synthetic')
  elif data not in ('', 'tfds'):
    raise ValueError(f"data must be '' or 'tfds' (each experiment's own data), 'digits' or "
                     f"'synthetic', not {data!r}.")
  for s in settings:
    if '=' not in s:
      raise ValueError(f'A setting is key=value, not {s!r}.')
    overrides.append(f'--config.{s}')
  return _display_path(path), overrides


def experiment_config(experiment: str, *, data: str = '', settings: Sequence[str] = ()):
  """The locked config of `experiment` (a name in experiments/) with these options.

  Built exactly as `python -m resnet_jax.main` builds it; see `run_overrides`.
  """
  return parse_config(*run_overrides(experiment, data=data, settings=settings))


def plan(experiments: Sequence[str], seeds: Sequence[int], results: str, *,
         data: str = '', settings: Sequence[str] = ()) -> list[Run]:
  """One `Run` per (experiment, seed), in experiment-major order (see `run_overrides`)."""
  runs = []
  for experiment in experiments:
    path, overrides = run_overrides(experiment, data=data, settings=settings)
    for seed in seeds:
      workdir = os.path.join(results, experiment, f'seed{seed}')
      runs.append(Run(experiment, seed, workdir, path, overrides + [f'--config.seed={seed}']))
  return runs


def _display_path(path: str) -> str:
  rel = os.path.relpath(path)
  return path if rel.startswith('..') else rel


_CHECKED = ('model.name', 'seed', 'batch_size', 'num_train_steps', 'num_epochs', 'data.source',
            'data.dataset')


def check_finished(run: Run, config) -> None:
  """Raises if `run`'s result.json was written by a config that differs in a key setting."""
  with open(os.path.join(run.workdir, 'result.json')) as f:
    done = json.load(f)['config']
  for key in _CHECKED:
    a, b = done, config
    for part in key.split('.'):
      a, b = a.get(part) if isinstance(a, dict) else None, b[part]
    if a != b:
      raise ValueError(
          f'{run.workdir} holds a finished run with {key}={a!r}, but this sweep asks for '
          f'{key}={b!r}. Use another --results directory, or remove that run.')


def run_all(runs: Sequence[Run], *, in_process: bool = False, parallel_seeds: bool = False,
            log=print) -> list[Run]:
  """Runs the unfinished `runs` in order; returns those that failed.

  parallel_seeds: the unfinished seeds of each experiment train together in
  this process (`training.seeds.train_seeds`).

  An interrupted run (SIGINT/SIGTERM) stops the sweep: it re-raises
  `loop.RunInterrupted` (in process) or exits with the run's status.
  """
  configs = {id(r): parse_config(r.config_file, r.overrides) for r in runs}
  for r in runs:  # before spending any time, refuse to mix incompatible runs
    if r.finished:
      check_finished(r, configs[id(r)])
  todo = [r for r in runs if not r.finished]
  log(f'{len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run.')
  if parallel_seeds:
    return _run_parallel_seeds(todo, configs, log)
  failed = []
  for i, r in enumerate(todo):
    log(f'[{i + 1}/{len(todo)}] {r.experiment} seed {r.seed} -> {r.workdir}')
    start = time.time()
    if in_process:
      from resnet_jax.training import loop  # pylint: disable=g-import-not-at-top
      try:
        loop.train_and_evaluate(configs[id(r)], r.workdir)
        ok = True
      except loop.RunInterrupted:
        raise
      except Exception as e:  # pylint: disable=broad-except
        log(f'  failed: {type(e).__name__}: {e}')
        ok = False
    else:
      code = subprocess.run(r.command(), check=False).returncode
      if code > 128:  # killed or interrupted: stop the sweep too
        log(f'  interrupted (exit status {code}); run the same command again to resume.')
        sys.exit(code)
      ok = code == 0
      if not ok:
        log(f'  failed with exit status {code}')
    if ok:
      log(f'  done in {time.time() - start:.0f} s')
    else:
      failed.append(r)
  return failed


def _run_parallel_seeds(todo: Sequence[Run], configs: dict[int, object], log) -> list[Run]:
  from resnet_jax.training import loop, seeds  # pylint: disable=g-import-not-at-top
  groups: dict[str, list[Run]] = {}
  for r in todo:
    groups.setdefault(r.experiment, []).append(r)
  failed = []
  for i, (experiment, group) in enumerate(groups.items()):
    log(f'[{i + 1}/{len(groups)}] {experiment} seeds {[r.seed for r in group]} together -> '
        f'{os.path.dirname(group[0].workdir)}')
    start = time.time()
    try:
      seeds.train_seeds([configs[id(r)] for r in group], [r.workdir for r in group])
    except loop.RunInterrupted:
      raise
    except Exception as e:  # pylint: disable=broad-except
      log(f'  failed: {type(e).__name__}: {e}')
      failed.extend(group)
      continue
    log(f'  done in {time.time() - start:.0f} s')
  return failed


FLAGS = flags.FLAGS
flags.DEFINE_list('experiments', None, 'Experiment names (files in experiments/) and group names: '
                  + ', '.join(GROUPS) + '.')
flags.DEFINE_list('seeds', ['0'], 'Seeds; each run sets config.seed.')
flags.DEFINE_string('results', None, 'Results directory: runs go to RESULTS/<experiment>/seed<k>/.')
flags.DEFINE_multi_string('set', [], "Config override key=value, passed on as --config.key=value "
                          "(repeatable), e.g. --set=batch_size=64.")
flags.DEFINE_enum('data', '', ['', 'tfds', 'digits', 'synthetic'],
                  "'' or 'tfds': each experiment's own data; 'digits': each experiment's network "
                  "on the bundled digits with the demo recipe (a demonstration, not a "
                  "reproduction); 'synthetic': random images (benchmarks).")
flags.DEFINE_bool('print_commands', False, 'Print the commands of the unfinished runs and exit.')
flags.DEFINE_bool('in_process', False, 'Run in this process instead of a subprocess per run.')
flags.DEFINE_bool('parallel_seeds', False, 'Train the seeds of each experiment together in this '
                  'process (one step vmapped over the seeds); each seed keeps its own workdir.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not FLAGS.experiments or not FLAGS.results:
    raise app.UsageError('--experiments and --results are required.')
  logging.getLogger('absl').setLevel(logging.WARNING)
  try:
    seeds = [int(s) for s in FLAGS.seeds]
    runs = plan(expand_experiments(FLAGS.experiments), seeds, FLAGS.results, data=FLAGS.data,
                settings=FLAGS.set)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if FLAGS.print_commands:
    for r in runs:
      if not r.finished:
        print(r.shell_command())
    return
  from resnet_jax.training import loop  # pylint: disable=g-import-not-at-top
  try:
    failed = run_all(runs, in_process=FLAGS.in_process, parallel_seeds=FLAGS.parallel_seeds)
  except loop.RunInterrupted as e:
    print(e, file=sys.stderr)
    sys.exit(128 + e.signum)
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
  if failed:
    print(f'{len(failed)} run(s) failed: ' + ', '.join(r.workdir for r in failed), file=sys.stderr)
    sys.exit(1)
  print(f'All runs finished. Report: python -m resnet_jax.report {FLAGS.results}')


if __name__ == '__main__':
  app.run(main)
