"""Where evaluate and ensemble write: checked before any work, never over another kind of file, an
existing predictions file only with --overwrite; ensemble members that are not probabilities."""

import os
import subprocess
import sys

import numpy as np
import pytest

from bn_inception import ensemble
from bn_inception import errors
from bn_inception import predictions
from bn_inception.predictions import Predictions
from configs import bn_x30
from test_eval_sets import random_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def member(n=4, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  probs = rng.dirichlet(np.ones(classes), size=n).astype(np.float32)
  return Predictions(probs, np.arange(n) % classes, np.arange(n), {'step': seed})


def test_output_is_checked_before_anything_is_written(tmp_path):
  (tmp_path / 'config.json').write_text('{"keep": 1}')
  with pytest.raises(errors.ConfigError, match='not a predictions file: it is never overwritten'):
    predictions.check_output(str(tmp_path / 'config.json'), overwrite=True)
  assert (tmp_path / 'config.json').read_text() == '{"keep": 1}'
  with pytest.raises(errors.ConfigError, match='is a directory'):
    predictions.check_output(str(tmp_path))
  with pytest.raises(errors.ConfigError, match='cannot create its directory'):
    predictions.check_output(str(tmp_path / 'config.json' / 'p.npz'))  # a file as its directory
  predictions.save(str(tmp_path / 'old.npz'), member())
  with pytest.raises(errors.ConfigError, match='already holds predictions: pass --overwrite'):
    predictions.check_output(str(tmp_path / 'old.npz'))
  predictions.check_output(str(tmp_path / 'old.npz'), overwrite=True)
  predictions.check_output(str(tmp_path / 'new' / 'deeper' / 'p.npz'))  # parents are created
  assert (tmp_path / 'new' / 'deeper').is_dir()


def test_command_line_refuses_the_run_config_before_evaluating(tmp_path):
  """`--output=WORKDIR/config.json`: one line, exit 1, before any evaluation; config.json kept."""
  config = bn_x30.get_config('digits')
  config.model.width = 0.125
  workdir = tmp_path / 'run'
  random_checkpoint(os.fspath(workdir), config)
  before = (workdir / 'config.json').read_bytes()
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run(
      [sys.executable, '-m', 'bn_inception.evaluate', f'--workdir={workdir}',
       f'--output={workdir / "config.json"}'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert f'Error: --output={workdir / "config.json"} exists and is not a predictions file' in (
      result.stderr)
  assert 'step 0' not in result.stdout  # nothing was evaluated
  assert (workdir / 'config.json').read_bytes() == before


@pytest.mark.parametrize('breakage, row', [('logits', 0), ('negative', 2), ('sum', 1)])
def test_ensemble_refuses_rows_that_are_not_probabilities(breakage, row):
  """Named by the file's own row (ids in reverse order here, so not the aligned order's) and id."""
  good, bad = member(seed=0), member(seed=1)
  bad = Predictions(bad.probs[::-1].copy(), bad.labels[::-1].copy(), bad.ids[::-1].copy(), {})
  ensemble.ensemble([good, bad], ['a.npz', 'b.npz'])  # probabilities: accepted
  if breakage == 'logits':  # another tool's logits: every row
    bad.probs = np.log(bad.probs) + 3
  elif breakage == 'negative':  # sums to 1, with negative entries
    bad.probs[row] = [1.5, -0.25, -0.25]
  else:
    bad.probs[row] *= 0.9
  with pytest.raises(errors.InputFileError,
                     match=rf'b\.npz: row {row} \(id {bad.ids[row]}\) is not probabilities'):
    ensemble.ensemble([good, bad], ['a.npz', 'b.npz'])


def test_ensemble_output_that_cannot_be_written_is_one_line(tmp_path):
  """A missing directory, a directory, and a full disk (/dev/full): one line each, exit 1."""
  for name in ('a', 'b'):
    predictions.save(str(tmp_path / f'{name}.npz'), member(seed=ord(name)))
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  for output, words in ((tmp_path / 'missing' / 'e.npz', 'does not exist'),
                        (tmp_path, 'is a directory'),
                        ('/dev/full', 'Could not write /dev/full: OSError')):
    result = subprocess.run(
        [sys.executable, '-m', 'bn_inception.ensemble', str(tmp_path / 'a.npz'),
         str(tmp_path / 'b.npz'), f'--output={output}'],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
    assert result.stderr.startswith('Error: ') and words in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
