r"""Is bfloat16 training numerically sound? Short real training runs in bfloat16 and float32.

  python -m bn_inception.precision_check --config=configs/bn_x5.py:digits --workdir=/tmp/precision \
      --config.model.width=1.0 --config.dataset.image_size=64 --config.batch_size=64 \
      --config.num_train_steps=300 --config.log_every_steps=10

Trains the config four times with `train.train_and_evaluate` (the real loop: input pipeline,
checkpoint, evaluation at the end): compute in float32 and in bfloat16, each with seeds 0 and 1 (the
seed sets the initial weights and the order of the data). Prints one JSON line.

The check passes when every run stays finite (a non-finite step stops training with an error),
every run's loss falls (last logged interval below the first), and bfloat16 changes the loss curve
less than a change of seed does: for each seed, the distance between the bfloat16 and float32 curves
is at most the distance between the two float32 curves. A curve is the training loss averaged over
each log interval; the distance of two curves is the mean absolute difference over the second half
of the logged intervals (the first half is the initial transient, where runs from different initial
weights differ most and the tolerance would be loosest). The tolerance is thus measured, in the same
call, as the variation that training already has and that no one would call a numerical problem.
"""

import json
import os
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags
import numpy as np

from bn_inception import benchmark
from bn_inception import demo
from bn_inception import train

DTYPES = ('float32', 'bfloat16')
SEEDS = (0, 1)


def run_name(dtype: str, seed: int) -> str:
  return f'{dtype}_seed{seed}'


def loss_curve(workdir: str) -> list[float]:
  """The training loss of every logged interval, in step order (metrics.jsonl)."""
  return [m['loss'] for m in demo.read_metrics(workdir) if 'loss' in m]


def curve_distance(a: Sequence[float], b: Sequence[float]) -> float:
  """Mean absolute difference of two loss curves over the second half of their intervals."""
  n = min(len(a), len(b))
  half = slice(n // 2, n)
  return float(np.mean(np.abs(np.asarray(a[:n])[half] - np.asarray(b[:n])[half])))


def train_once(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """One training run; its loss curve, final evaluation and whether it stayed finite."""
  start = time.perf_counter()
  try:
    train.train_and_evaluate(config, workdir)
    error = None
  except FloatingPointError as e:  # a non-finite loss or gradient stopped the run
    error = str(e)
  metrics = demo.read_metrics(workdir) if os.path.exists(
      os.path.join(workdir, 'metrics.jsonl')) else []
  evaluation = [m for m in metrics if 'eval_top1' in m]
  return {'loss': loss_curve(workdir) if metrics else [], 'finite': error is None, 'error': error,
          'eval_top1': evaluation[-1]['eval_top1'] if evaluation else None,
          'eval_loss': evaluation[-1]['eval_loss'] if evaluation else None,
          'wall_s': time.perf_counter() - start}


def compare(runs: dict[str, dict]) -> dict[str, Any]:
  """The check's verdict on the runs of `run` (see the module docstring)."""
  tolerance = curve_distance(*(runs[run_name('float32', s)]['loss'] for s in SEEDS))
  distances = {s: curve_distance(runs[run_name('bfloat16', s)]['loss'],
                                 runs[run_name('float32', s)]['loss']) for s in SEEDS}
  finite = all(r['finite'] for r in runs.values())
  falls = all(len(r['loss']) > 1 and r['loss'][-1] < r['loss'][0] for r in runs.values())
  agrees = all(d <= tolerance for d in distances.values())
  return {'finite': finite, 'loss_falls': falls, 'tolerance': tolerance,
          'precision_distance': max(distances.values()),
          'precision_distance_by_seed': {str(s): d for s, d in distances.items()},
          'agrees': agrees, 'passed': finite and falls and agrees}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains config in both precisions with both seeds; returns the runs and the verdict."""
  if os.path.exists(workdir) and os.listdir(workdir):
    raise FileExistsError(f'{workdir} is not empty: training would resume its runs. Use a new '
                          'directory.')
  config = ml_collections.ConfigDict(config.to_dict())
  # One evaluation and one checkpoint, at the end: the loss curve is what is compared.
  config.eval_every_steps = config.checkpoint_every_steps = config.num_train_steps
  runs = {}
  for dtype in DTYPES:
    for seed in SEEDS:
      c = ml_collections.ConfigDict(config.to_dict())
      c.model.dtype, c.seed = dtype, seed
      name = run_name(dtype, seed)
      logging.info('Training %s.', name)
      runs[name] = train_once(c, os.path.join(workdir, name))
  return {**benchmark.describe(config, 'precision', config.num_train_steps, 0),
          'dtype': list(DTYPES), 'dataset': config.dataset.name,
          'learning_rate': config.learning_rate, 'log_every_steps': config.log_every_steps,
          **compare(runs), 'runs': runs}


_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/bn_x5.py:digits', 'Training config (a data set without TensorFlow: digits).')
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for the runs; must not hold older ones.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  print(json.dumps(run(_CONFIG.value, _WORKDIR.value)))


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
