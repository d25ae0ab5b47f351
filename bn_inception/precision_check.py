r"""Is bfloat16 training numerically sound? Short real training runs in bfloat16 and float32.

  python -m bn_inception.precision_check --config=configs/bn_x5.py:digits --workdir=/tmp/precision \
      --config.model.width=1.0 --config.dataset.image_size=64 --config.batch_size=64 \
      --config.num_train_steps=300 --config.log_every_steps=10

Trains the config six times with `train.train_and_evaluate` (the real loop: input pipeline,
checkpoint, evaluation at the end): compute in float32 and in bfloat16, each with seeds 0, 1 and 2
(the seed sets the initial weights and the order of the data). Prints one JSON line.

The check passes when every run stays finite (a non-finite step stops training with an error),
every run's loss falls (last logged interval below the first), and the bfloat16 runs reach the same
loss as the float32 runs to within what the seed alone changes. A run's level is its training loss
averaged over the second half of its logged intervals (the first half is the transient). The
tolerance is derived, not chosen: if bfloat16 runs were just more draws of float32 runs, the
difference of the two groups' mean levels would exceed t(1 - ALPHA/2, 2n - 2) * s * sqrt(2 / n)
(n runs per group, s the pooled standard deviation of the levels within the groups: a two-sample
t-test) in a fraction ALPHA of calls only. Comparing whole curves point by point does not work:
runs that differ in rounding alone decorrelate within a few dozen steps, so two such curves differ
about as much as curves of different seeds, and a single pair says little either way.
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
from scipy import stats

from bn_inception import benchmark
from bn_inception import cli
from bn_inception import errors
from bn_inception import report
from bn_inception import train

DTYPES = ('float32', 'bfloat16')
SEEDS = (0, 1, 2)
ALPHA = 0.01  # the check fails a sound bfloat16 in 1% of calls


def run_name(dtype: str, seed: int) -> str:
  return f'{dtype}_seed{seed}'


def level(curve: Sequence[float]) -> float:
  """The loss a run reached: the mean over the second half of its logged intervals."""
  return float(np.mean(curve[len(curve) // 2:])) if curve else float('nan')


def train_once(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """One training run; its loss curve, final evaluation and whether it stayed finite."""
  start = time.perf_counter()
  try:
    train.train_and_evaluate(config, workdir)
    error = None
  except FloatingPointError as e:  # a non-finite loss or gradient stopped the run
    error = str(e)
  metrics = report.read_metrics(workdir) if os.path.exists(
      os.path.join(workdir, 'metrics.jsonl')) else []
  evaluation = [m for m in metrics if 'eval_top1' in m]
  return {'loss': [m['loss'] for m in metrics if 'loss' in m],  # each logged interval's mean
          'finite': error is None, 'error': error,
          'eval_top1': evaluation[-1]['eval_top1'] if evaluation else None,
          'eval_loss': evaluation[-1]['eval_loss'] if evaluation else None,
          'wall_s': time.perf_counter() - start}


def compare(runs: dict[str, dict]) -> dict[str, Any]:
  """The check's verdict on the runs of `run` (see the module docstring)."""
  levels = {d: np.array([level(runs[run_name(d, s)]['loss']) for s in SEEDS]) for d in DTYPES}
  n = len(SEEDS)
  pooled_sd = float(np.sqrt((levels['float32'].var(ddof=1) + levels['bfloat16'].var(ddof=1)) / 2))
  tolerance = float(stats.t.ppf(1 - ALPHA / 2, 2 * n - 2) * pooled_sd * np.sqrt(2 / n))
  difference = float(levels['bfloat16'].mean() - levels['float32'].mean())
  finite = all(r['finite'] for r in runs.values())
  falls = all(len(r['loss']) > 1 and r['loss'][-1] < r['loss'][0] for r in runs.values())
  agrees = abs(difference) <= tolerance  # False for NaN
  return {'finite': finite, 'loss_falls': falls,
          'levels': {d: v.tolist() for d, v in levels.items()}, 'difference': difference, 'tolerance': tolerance, 'alpha': ALPHA, 'agrees': agrees,
          'passed': finite and falls and agrees}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains config in both precisions with every seed; returns the runs and the verdict."""
  if os.path.exists(workdir) and os.listdir(workdir):
    raise errors.ConfigError(f'{workdir} is not empty: training would resume its runs. Use a new '
                             '--workdir.')
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
  cli.run(main)
