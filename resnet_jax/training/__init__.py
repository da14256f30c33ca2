"""Training: the train state and steps, the optimiser and schedules, devices and
hosts, checkpoints, metrics, and the run loop. `build.py` turns a config into
everything a run needs; `loop.train_and_evaluate` is the run."""
