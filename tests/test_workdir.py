"""The workdir from the outside: a report read where only run directories were copied (no JAX, no
TensorFlow), workdirs refused at once, and what Orbax leaves or says there."""

import asyncio
import os
import subprocess
import sys

import numpy as np
import pytest

from bn_inception import checkpoints
from bn_inception import errors
from bn_inception import run_dir
from test_faults import damage
from test_report import make_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_report_needs_neither_jax_nor_tensorflow(tmp_path):
  # Only the run directory is copied; importing jax or tensorflow fails, as where neither is
  # installed.
  blocked = tmp_path / 'blocked'
  blocked.mkdir()
  for module in ('jax', 'jaxlib', 'tensorflow', 'orbax', 'flax'):
    (blocked / f'{module}.py').write_text(f'raise ImportError("{module} is not installed here")\n')
  copy = make_run(str(tmp_path), 'copied_run', 'bn_x5', [(100, 0.5), (200, 0.6), (300, 0.7)])
  result = subprocess.run(
      [sys.executable, '-m', 'bn_inception.report', copy, f'--output={tmp_path / "out"}'],
      cwd=tmp_path, env={**os.environ, 'PYTHONPATH': f'{blocked}{os.pathsep}{REPO}'},
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert '| BN-x5 |' in result.stdout  # named from its config, as with JAX
  assert (tmp_path / 'out' / 'report.md').exists() and (tmp_path / 'out' / 'figure2.png').exists()


@pytest.mark.parametrize('where', ['an existing file', 'a path under a file'])
def test_a_workdir_that_cannot_be_one_is_refused_at_once(tmp_path, where):
  # Refused before JAX, Orbax or TFDS start (which take tens of seconds), and nothing written.
  existing_file = tmp_path / 'notes.txt'
  existing_file.write_text('not a workdir')
  workdir = existing_file if where == 'an existing file' else existing_file / 'run'
  result = subprocess.run(
      [sys.executable, '-m', 'bn_inception.main', '--config=configs/bn_x30.py:digits',
       f'--workdir={workdir}'], cwd=REPO, env={**os.environ, 'PYTHONPATH': REPO},
      capture_output=True, text=True, timeout=10)
  assert result.returncode == 1, result.stderr
  assert 'Traceback' not in result.stderr, result.stderr
  errors = [line for line in result.stderr.splitlines() if line.startswith('Error:')]
  assert len(errors) == 1 and str(existing_file) in errors[0], result.stderr
  assert 'is a file, not a directory' in errors[0], result.stderr
  assert os.listdir(tmp_path) == ['notes.txt'] and existing_file.read_text() == 'not a workdir'


def test_a_workdir_this_user_cannot_write_is_refused(tmp_path, monkeypatch):
  # The tests run as root, whom permissions do not stop: the permission is what os.access says.
  run_dir.check_writable(str(tmp_path / 'new' / 'run'))  # to be created: fine, and not created
  assert os.listdir(tmp_path) == []
  monkeypatch.setattr(os, 'access', lambda path, mode: os.path.realpath(path) != str(tmp_path))
  with pytest.raises(errors.ConfigError, match='the directory is not writable by this user'):
    run_dir.check_writable(str(tmp_path))
  with pytest.raises(errors.ConfigError, match=f'cannot be created: {tmp_path} is not writable'):
    run_dir.check_writable(str(tmp_path / 'new' / 'run'))


def test_a_damaged_checkpoint_is_one_warning_without_event_loop_policies(tmp_path, monkeypatch,
                                                                          caplog):
  # Event-loop policies are deprecated from Python 3.14: here using one fails. (The flood of
  # unraisable errors the restore guards against needs a real model's checkpoint: test_faults.)
  def deprecated(*args):
    raise DeprecationWarning('asyncio event-loop policies are deprecated')
  state = {f'layer_{i}': np.random.default_rng(i).normal(size=(64, 256)).astype(np.float32)
           for i in range(40)}
  mngr = checkpoints.manager(str(tmp_path))
  for step in (1, 2):
    checkpoints.save(mngr, step, state)
  mngr.close()
  damage(str(tmp_path), 2)
  monkeypatch.setattr(asyncio, 'set_event_loop_policy', deprecated)
  monkeypatch.setattr(asyncio, 'get_event_loop_policy', deprecated)
  unraisable = []  # tensorstore reports its callbacks' errors here, not through Python's stack
  monkeypatch.setattr(sys, 'unraisablehook', unraisable.append)
  mngr = checkpoints.manager(str(tmp_path), read_only=True)
  step, restored = checkpoints.restore_latest(mngr, state)
  mngr.close()
  assert step == 1 and np.array_equal(restored['layer_39'], state['layer_39'])
  assert unraisable == []
  warnings = [r.getMessage() for r in caplog.records if 'cannot be read' in r.getMessage()]
  assert len(warnings) == 1 and 'Checkpoint 2' in warnings[0], warnings
