"""Checkpoints at the edges: what Orbax says on a fresh workdir, a checkpoint missing its metadata,
the leftovers of an interrupted save, and a disk that fills during a save. Checkpoints here are
small dicts of numpy arrays saved through bn_inception.checkpoints: no training."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from bn_inception import checkpoints
from configs import bn_x30
from test_faults import assert_one_message, run_command

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_state(seed=0):
  rng = np.random.default_rng(seed)
  return {f'layer_{i}': rng.normal(size=(32, 64)).astype(np.float32) for i in range(4)}


def save_steps(workdir, steps, state):
  mngr = checkpoints.manager(workdir)
  for step in steps:
    checkpoints.save(mngr, step, state)
  mngr.close()


def orbax_warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelname == 'WARNING']


def test_no_read_only_warning_on_a_writable_workdir(tmp_path, caplog):
  fresh, config = str(tmp_path / 'fresh'), bn_x30.get_config('digits')
  assert checkpoints.resume(fresh, config, small_state()) == (None, None)  # a new run
  assert not os.path.exists(fresh)
  resumed = str(tmp_path / 'resumed')
  save_steps(resumed, [1], small_state())
  step, _ = checkpoints.resume(resumed, config, small_state())
  assert step == 1
  assert not any('read only' in w for w in orbax_warnings(caplog)), orbax_warnings(caplog)


def test_evaluate_without_checkpoints_says_only_that(tmp_path):
  workdir = str(tmp_path / 'run')
  checkpoints.write_config(workdir, bn_x30.get_config('digits'), 0)
  result = run_command('bn_inception.evaluate', f'--workdir={workdir}', timeout=120)
  assert_one_message(result, 'holds no checkpoint')
  assert 'read only' not in result.stderr, result.stderr


def test_a_checkpoint_without_its_metadata_file_is_named_in_words(tmp_path, caplog):
  workdir, state = str(tmp_path), small_state()
  save_steps(workdir, [1, 2], state)
  os.remove(os.path.join(workdir, 'checkpoints', '2', checkpoints.ITEM, '_METADATA'))
  for kwargs in ({'target': state}, {'only': ('layer_0',)}):  # training's and evaluate's restore
    caplog.clear()
    mngr = checkpoints.manager(workdir, read_only=True)
    step, restored = checkpoints.restore_latest(mngr, **kwargs)
    mngr.close()
    assert step == 1 and np.array_equal(restored['layer_0'], state['layer_0'])
    warnings = orbax_warnings(caplog)
    assert len(warnings) == 1, warnings  # no Orbax warning about handler registries before it
    assert 'Checkpoint 2' in warnings[0] and '_METADATA' in warnings[0], warnings
    assert 'does not exist' in warnings[0] and 'NoneType' not in warnings[0], warnings


INTERRUPTED_SAVE = '''
import os, sys
import numpy as np
from bn_inception import checkpoints
rng = np.random.default_rng(0)
state = {f'layer_{i}': rng.normal(size=(256, 256)).astype(np.float32) for i in range(8)}
mngr = checkpoints.manager(sys.argv[1])
checkpoints.save(mngr, 1, state)
mngr.wait_until_finished()
checkpoints.save(mngr, 2, state)  # written in the background: cut short once data is on disk
tmp = os.path.join(sys.argv[1], 'checkpoints', '2.orbax-checkpoint-tmp')
while not os.path.isdir(os.path.join(sys.argv[1], 'checkpoints', '2')):  # the save has finished
  if any(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(tmp) for f in fs):
    os._exit(1)
os._exit(3)
'''


def test_an_interrupted_save_is_removed_and_named_at_the_next_start(tmp_path, caplog):
  workdir = str(tmp_path)
  done = subprocess.run([sys.executable, '-c', INTERRUPTED_SAVE, workdir], cwd=REPO, timeout=120,
                        env={**os.environ, 'PYTHONPATH': REPO}, capture_output=True, text=True)
  assert done.returncode == 1, done.stderr  # 3: the save finished before it could be cut short
  leftover = tmp_path / 'checkpoints' / '2.orbax-checkpoint-tmp'
  assert leftover.is_dir(), os.listdir(tmp_path / 'checkpoints')
  size = sum(f.stat().st_size for f in leftover.rglob('*') if f.is_file())
  assert size > 0
  mngr = checkpoints.manager(workdir)  # what training opens
  checkpoints.save(mngr, 3, small_state())
  mngr.close()
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['1', '3']
  named = [w for w in orbax_warnings(caplog) if '2.orbax-checkpoint-tmp' in w]
  assert len(named) == 1, orbax_warnings(caplog)
  shown = checkpoints.format_bytes(size)  # the size counted here, as the message writes sizes
  assert shown in named[0] and str(tmp_path / 'checkpoints') in named[0], (shown, named)
  # A reader (evaluate) removes nothing: a save may be under way.
  leftover.mkdir()
  checkpoints.manager(workdir, read_only=True).close()
  assert leftover.is_dir()


# Orbax's writers run in background threads, and a failed write surfaces at the next save or when
# training waits for its last one. Where a disk fills up, tensorstore raises this ValueError (the
# text seen on a full tmpfs); here the first array write of a save raises it, the others carry on
# and find their event loop closed, as on a real disk.
FULL_DISK = '''
import os, sys
import numpy as np
import orbax.checkpoint as ocp
from bn_inception import checkpoints, cli

write = ocp.type_handlers.NumpyHandler._open_and_write
disk = {'full': False, 'failed': False}

async def write_unless_full(self, value, tspec, ts_context):
  if disk['full'] and not disk['failed']:
    disk['failed'] = True
    raise ValueError('RESOURCE_EXHAUSTED: Error writing "layer_0/0.0" in OCDBT database at local '
                     f'file "{sys.argv[1]}": Failed to write 1828123 bytes to file 5: No space '
                     "left on device [os_error_code='28']")
  await write(self, value, tspec, ts_context)

ocp.type_handlers.NumpyHandler._open_and_write = write_unless_full

def main(argv):
  rng = np.random.default_rng(0)
  state = {f'layer_{i}': rng.normal(size=(64, 256)).astype(np.float32) for i in range(40)}
  mngr = checkpoints.manager(sys.argv[1], keep=2)  # as training uses it
  try:
    checkpoints.save(mngr, 1, state)
    mngr.wait_until_finished()
    disk['full'] = True
    checkpoints.save(mngr, 2, state)
    if sys.argv[2] == 'then another save':
      checkpoints.save(mngr, 3, state)
  finally:
    mngr.wait_until_finished()
    mngr.close()

cli.run(main)
'''


@pytest.mark.parametrize('surfaces_at', ['then another save', 'then the end of training'])
def test_a_full_disk_during_a_save_is_one_message(tmp_path, surfaces_at):
  workdir = str(tmp_path / 'run')
  result = subprocess.run([sys.executable, '-c', FULL_DISK, workdir, surfaces_at], cwd=REPO,
                          env={**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'},
                          capture_output=True, text=True, timeout=120)
  directory = os.path.join(workdir, 'checkpoints')
  size = sum(f.stat().st_size for f in (tmp_path / 'run' / 'checkpoints' / '1').rglob('*')
             if f.is_file())
  assert_one_message(result, 'The disk is full: the checkpoint of step 2 could not be written in '
                     f'{directory}', f'A checkpoint takes {checkpoints.format_bytes(size)}',
                     'keep_checkpoints=2 needs room for 3', 'resumes from step 1')
  assert 'Event loop is closed' not in result.stderr, result.stderr
  # Orbax's INFO lines aside (the entry points hide them), the message alone: no writer's traceback.
  shown = [line for line in result.stderr.splitlines() if not re.match(r'I\d{4} ', line)]
  assert len(shown) == 1, result.stderr
  assert sorted(os.listdir(directory))[0] == '1'  # intact


def test_an_ensemble_output_this_user_cannot_write_is_refused_first(tmp_path, monkeypatch):
  # The tests run as root, whom permissions do not stop: the permission is what os.access says.
  from bn_inception import ensemble  # pylint: disable=g-import-not-at-top
  from bn_inception import errors  # pylint: disable=g-import-not-at-top
  locked = tmp_path / 'locked'
  locked.mkdir()
  monkeypatch.setattr(os, 'access', lambda path, mode: os.path.realpath(path) != str(locked))
  with pytest.raises(errors.ConfigError, match='cannot be written'):
    ensemble.ensemble_files([str(tmp_path / 'never_read.npz')] * 2, str(locked / 'e.npz'))
