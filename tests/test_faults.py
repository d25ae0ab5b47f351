"""Bad input and faults (issue 15): nothing is lost, nothing is silent, and a user error is one
message without a traceback.

One tiny digits run (test_train's config: checkpoints at steps 2 and 4) is trained once for the
module and copied into each test that needs a workdir. Behaviour about exit codes and output runs
the real command-line entry points in subprocesses; those stop before compiling the training step.
"""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bn_inception import checkpoints
from bn_inception import config_checks
from bn_inception import convert
from bn_inception import ensemble
from bn_inception import errors
from bn_inception import evaluate
from bn_inception import input_pipeline
from bn_inception import predictions
from bn_inception import report
from bn_inception import run_dir
from bn_inception import train
from bn_inception.predictions import Predictions
from configs import default
import imagenet_fixture
from test_train import tiny_config, tiny_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FLAGS = tiny_flags()


def run_command(module, *args, timeout=300):
  # The tests' 8 devices (conftest.py): the programs of the module's in-process run.
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def assert_one_message(result, *parts):
  """Exit status 1, no Python traceback, and the message, holding `parts`, last on stderr."""
  assert result.returncode == 1, result.stderr
  assert 'Traceback' not in result.stderr, result.stderr
  lines = result.stderr.splitlines(keepends=True)
  starts = [i for i, line in enumerate(lines) if line.startswith('Error: ')]
  assert starts, result.stderr
  message = ''.join(lines[starts[-1]:])
  for part in parts:
    assert part in message, (part, result.stderr)


def snapshot(workdir):
  """Every file under workdir, with its bytes."""
  files = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, workdir)] = f.read()
  return files


def damage(workdir, step):
  """Cuts every array file of a checkpoint short, as a full disk or a broken copy would."""
  data = os.path.join(workdir, 'checkpoints', str(step), 'state', 'ocdbt.process_0', 'd')
  for name in os.listdir(data):
    path = os.path.join(data, name)
    os.truncate(path, min(64, os.path.getsize(path) // 2))


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """(config, workdir, final state) of a 4-step run with checkpoints at steps 2 and 4."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  config = tiny_config()
  state = train.train_and_evaluate(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']
  return config, workdir, state


@pytest.fixture
def workdir(trained, tmp_path):
  """A copy of the module's run."""
  shutil.copytree(trained[1], tmp_path / 'run')
  return str(tmp_path / 'run')


# ------------------------------------------------------------------------------------------------
# 1-3: checkpoints and config.json are never lost, a resume is never silent.
# ------------------------------------------------------------------------------------------------
def test_keep_checkpoints_0_is_refused_and_deletes_nothing(workdir):
  before = snapshot(workdir)
  result = run_command('bn_inception.main', *TINY_FLAGS, f'--workdir={workdir}',
                       '--config.keep_checkpoints=0', '--config.num_train_steps=8')
  assert_one_message(result, 'keep_checkpoints = 0: must be an integer >= 1')
  assert snapshot(workdir) == before


def test_a_refused_resume_changes_no_file(workdir):
  before = snapshot(workdir)
  result = run_command('bn_inception.main', *TINY_FLAGS, f'--workdir={workdir}',
                       '--config.model.width=0.5')
  assert_one_message(result, 'does not fit this model')
  assert 'differs from the saved one in: model.width: 0.125 -> 0.5' in result.stderr
  assert snapshot(workdir) == before  # config.json still says 0.125: evaluate still works


def test_a_resume_under_another_config_keeps_the_history_and_the_report_names_it(trained, workdir):
  config = trained[0].copy_and_resolve_references()
  first_rate = config.learning_rate
  config.learning_rate = first_rate / 2
  config.num_train_steps = 6
  train.train_and_evaluate(config, workdir)
  history = run_dir.read_config_history(workdir)
  assert [(s, c['learning_rate'], c['num_train_steps']) for s, c in history] == [
      (0, first_rate, 4), (4, first_rate / 2, 6)]
  assert run_dir.read_config(workdir).learning_rate == first_rate / 2
  # Steps 1-4 ran at the first rate: the report says so (batch 16: step 4 is paper step 2).
  assert report.read_run(workdir).config_changes == [
      f'from step 4 (paper step 2): learning_rate {first_rate} -> {first_rate / 2}']
  assert not (Path(workdir) / run_dir.LOCK).exists()  # released at the end


def test_a_second_training_in_a_workdir_is_refused_naming_the_first(trained, workdir, caplog):
  """While one training holds the workdir, another is refused before it writes anything; a lock
  left by a process that was killed is taken over with a warning naming it."""
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from bn_inception import run_dir; '
       'lock = run_dir.WorkdirLock(sys.argv[1]); print("held", flush=True); time.sleep(300)',
       workdir], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == 'held\n'
    before = snapshot(workdir)
    config = trained[0].copy_and_resolve_references()
    config.num_train_steps = 6
    with pytest.raises(errors.ConfigError, match=f'in use by another training \\(process '
                       f'{holder.pid} on host {socket.gethostname()}, since '):
      train.train_and_evaluate(config, workdir)
    assert snapshot(workdir) == before
  finally:
    holder.kill()
    holder.wait()
  lock = run_dir.WorkdirLock(workdir)
  lock.release()
  assert f'Taking over {workdir}/lock, left by process {holder.pid} on host' in caplog.text


def test_unreadable_checkpoints_stop_the_run_every_time(trained, workdir):
  config, _, state = trained
  for step in (2, 4):
    damage(workdir, step)
  before = snapshot(workdir)
  # The first attempt (as training resumes) and the rerun of the command both stop, and change
  # nothing.
  with pytest.raises(checkpoints.UnreadableCheckpointsError, match='None of the checkpoints'):
    checkpoints.resume(workdir, config, state)
  assert snapshot(workdir) == before
  result = run_command('bn_inception.main', *TINY_FLAGS, f'--workdir={workdir}')
  assert_one_message(result, 'None of the checkpoints', 'step 4: ', 'step 2: ',
                     'Restore the checkpoints', '--start_over_if_unreadable', 'new --workdir')
  assert snapshot(workdir) == before

  # Starting over is explicit: the checkpoints are set aside, kept, and training starts at 0.
  assert checkpoints.resume(workdir, config, state, start_over_if_unreadable=True) == (None, None)
  kept = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  assert [name.split('.unreadable.')[0] for name in kept] == ['2', '4']
  # A workdir left with set-aside checkpoints only still stops, until one is readable again.
  with pytest.raises(checkpoints.UnreadableCheckpointsError, match='only ones set aside earlier'):
    checkpoints.resume(workdir, config, state)


# ------------------------------------------------------------------------------------------------
# 4: a damaged checkpoint is one warning, not a flood.
# ------------------------------------------------------------------------------------------------
def test_a_damaged_checkpoint_is_one_warning(workdir, caplog, monkeypatch):
  damage(workdir, 4)
  unraisable = []  # tensorstore reports its callbacks' errors here, not through Python's stack
  monkeypatch.setattr(sys, 'unraisablehook', unraisable.append)
  step, variables, _ = evaluate.restore_variables(workdir)  # as `evaluate` and init_from read
  assert step == 2 and variables['params']
  assert unraisable == []
  warnings = [r.getMessage() for r in caplog.records if r.levelname == 'WARNING'
              and 'cannot be read' in r.getMessage()]
  assert len(warnings) == 1 and 'Checkpoint 4' in warnings[0] and 'using step 2' in warnings[0]
  assert len(warnings[0].splitlines()) == 1


# ------------------------------------------------------------------------------------------------
# 5: an image that cannot be decoded is named, with the way to recover.
# ------------------------------------------------------------------------------------------------
def test_undecodable_images_are_named_at_preparation_and_when_read(tmp_path):
  damaged = ('n01440764_3.JPEG', 'ILSVRC2012_val_00000009.JPEG')
  imagenet_fixture.write_archives(tmp_path / 'manual', damaged=damaged)
  config = imagenet_fixture.dataset_config(tmp_path)
  prepared = os.path.join(tmp_path, 'data', 'imagenet2012')
  with pytest.raises(errors.InputFileError) as refused:
    input_pipeline.get_info(config)
  message = str(refused.value)
  assert all(name in message for name in damaged)
  assert 'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar' in message
  assert f'delete {prepared}/' in message  # the prepared version's directory
  # Data prepared without the check (here: the same, now prepared) names the image when read.
  batches = input_pipeline.train_batches(config, local_batch_size=6, seed=0)
  with pytest.raises(errors.InputFileError, match='train: n01440764_3.JPEG.*img_train.tar'):
    for _ in range(5):  # 30 images: every one is read
      next(batches)


# ------------------------------------------------------------------------------------------------
# 6: invalid numbers are refused before anything is written or compiled.
# ------------------------------------------------------------------------------------------------
def test_invalid_numbers_are_refused_before_anything_is_written(tmp_path):
  workdir = tmp_path / 'run'
  result = run_command('bn_inception.main', '--config=configs/bn_x30.py:digits',
                       f'--workdir={workdir}', '--config.batch_size=-32',
                       '--config.checkpoint_every_steps=0', '--config.learning_rate=-0.1',
                       '--config.model.bn_group_size=abc', '--config.dataset.eval_crops=12')
  assert_one_message(
      result, 'batch_size = -32: must be an integer >= 1',
      'num_train_steps = -600: must be an integer >= 1',  # follows batch_size
      'checkpoint_every_steps = 0: must be an integer >= 1',
      'learning_rate = -0.1: must be a number > 0',
      "model.bn_group_size = 'abc': must be None (one BN statistic over the whole batch) or an "
      'integer >= 1',
      "dataset.eval_crops = '12': must be one of ['10', '144', 'center']")
  assert not workdir.exists() and 'Compiling' not in result.stderr


@pytest.mark.parametrize('name', ['inception', 'bn_baseline', 'bn_x5', 'bn_x30', 'bn_x5_sigmoid',
                                  'ensemble', 'finetune_caffe'])
def test_every_config_passes_the_checks(name):
  module = __import__(f'configs.{name}', fromlist=['get_config'])
  for scale in ('imagenet', 'digits'):
    config_checks.check(module.get_config(scale))


def test_every_config_field_has_a_rule():
  """A new config field gets a rule (or is named here, with the reason it needs none)."""
  unchecked = {'scale': 'chosen by the config argument',
               'paper_steps': 'num_train_steps is derived from it and checked',
               'dataset.data_dir': 'a path, checked by TFDS', 'dataset.manual_dir': 'likewise'}

  def fields(section, prefix=''):
    for key, value in section.items():
      if isinstance(value, dict):
        yield from fields(value, f'{prefix}{key}.')
      else:
        yield prefix + key

  assert set(fields(default.get_config().to_dict())) - set(unchecked) == set(config_checks.TRAINING)


def test_num_train_steps_0_is_refused():
  with pytest.raises(errors.ConfigError, match='num_train_steps = 0: must be an integer >= 1'):
    train.train_and_evaluate(tiny_config(num_train_steps=0), '/nonexistent/never/written')


# ------------------------------------------------------------------------------------------------
# Messages: one line, the field or file named, no traceback.
# ------------------------------------------------------------------------------------------------
def test_ctrl_c_outside_training_says_interrupted():
  """A bare KeyboardInterrupt (Ctrl-C in evaluate, the ensemble, the benchmark): one line, 130."""
  code = ('from bn_inception import cli\n'
          'def main(argv):\n'
          '  raise KeyboardInterrupt\n'
          'cli.run(main)\n')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu'), timeout=120)
  assert result.returncode == 130 and result.stderr == 'Interrupted.\n', result.stderr


def test_unknown_config_field_is_one_message(tmp_path):
  args = ('--config=configs/bn_x30.py:digits', f'--workdir={tmp_path / "run"}',
          '--config.lerning_rate=0.1')
  assert_one_message(run_command('bn_inception.main', *args),
                     "--config.lerning_rate: the config has no field 'lerning_rate'; did you "
                     "mean 'learning_rate'?")
  verbose = run_command('bn_inception.main', *args, '--traceback')
  assert verbose.returncode == 1 and 'Traceback' in verbose.stderr  # for bug reports


def test_evaluate_names_the_workdir_and_the_config_file(workdir, tmp_path):
  missing = str(tmp_path / 'elsewhere')
  assert_one_message(run_command('bn_inception.evaluate', f'--workdir={missing}'),
                     f'{missing}/config.json not found: is {missing} a bn_inception workdir?')
  path = os.path.join(workdir, 'config.json')
  with open(path, 'w') as f:
    f.write('{"model": {"width": 0.1')  # cut short
  with pytest.raises(errors.InputFileError, match=f'{path} cannot be read as a config'):
    checkpoints.read_config(workdir)


def test_evaluate_refuses_a_checkpoint_of_another_model_by_shape(workdir):
  with pytest.raises(checkpoints.CheckpointMismatchError,
                     match=r'step 4 .* does not fit this model.*\(8,\) stored, \(16,\) expected'):
    evaluate.evaluate_checkpoint(tiny_config(**{'model.width': 0.25}), workdir)


def test_predictions_files_that_are_not_name_themselves(tmp_path):
  text, npy = tmp_path / 'notes.npz', tmp_path / 'probs.npz'
  text.write_text('top-1 73.5%\n')
  with open(npy, 'wb') as f:
    np.save(f, np.eye(3))
  for path in (text, npy):
    with pytest.raises(errors.InputFileError, match=f'{path} is not a predictions file'):
      predictions.load(str(path))
  with pytest.raises(errors.NotFoundError, match='nowhere.npz: no such predictions file'):
    predictions.load(str(tmp_path / 'nowhere.npz'))


def test_a_text_file_given_as_pth_names_itself(tmp_path):
  pytest.importorskip('torch')
  path = tmp_path / 'bn_inception-52deb4733.pth'
  path.write_text('<html>404 Not Found</html>\n')  # what a failed download leaves
  with pytest.raises(errors.InputFileError, match=f'{path} is not a PyTorch checkpoint'):
    convert.load_torch_checkpoint(str(path))


def member(seed, n=20, classes=10):
  rng = np.random.default_rng(seed)
  probs = rng.dirichlet(np.ones(classes), size=n).astype(np.float32)
  return Predictions(probs, np.arange(n) % classes, np.arange(n), {'step': seed})


def test_ensemble_protects_its_inputs_and_refuses_non_finite_probabilities(tmp_path, caplog):
  a, b = str(tmp_path / 'a.npz'), str(tmp_path / 'b.npz')
  predictions.save(a, member(0))
  predictions.save(b, member(1))
  before = snapshot(tmp_path)
  with pytest.raises(errors.ConfigError, match='is one of the members'):
    ensemble.ensemble_files([a, b], output=a)
  assert snapshot(tmp_path) == before

  ensemble.ensemble_files([a, b, a])
  assert 'a.npz is given 2 times' in caplog.text

  diverged = member(2)
  diverged.probs[3] = np.nan
  predictions.save(str(tmp_path / 'nan.npz'), diverged)
  with pytest.raises(errors.InputFileError, match=r'nan.npz holds probabilities that are not '
                     r'finite \(NaN or inf\) for 1 of 20 examples, e.g. ids 3'):
    ensemble.ensemble_files([a, str(tmp_path / 'nan.npz')])
