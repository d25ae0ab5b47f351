"""Input the run cannot work with is refused in one line, naming the field, before anything is
written: config arguments, batch sizes, image sizes, a checkpoint of another network as init_from."""

import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bn_inception import checkpoints
from bn_inception import config_checks
from bn_inception import errors
from bn_inception import train
from configs import bn_x5

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, timeout=120):
  return subprocess.run([sys.executable, '-m', *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env={**os.environ, 'PYTHONPATH': REPO})


def assert_one_line_error(result, *expected):
  assert result.returncode == 1, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  errors_ = [line for line in result.stderr.splitlines() if line.startswith('Error:')]
  assert len(errors_) == 1, result.stderr[-3000:]
  for text in expected:
    assert text in errors_[0], errors_[0]


@pytest.mark.parametrize('config, expected', [
    ('configs/bn_x5.py:digitz', "--config=configs/bn_x5.py:digitz: unknown scale 'digitz'; the "
                                'scales are imagenet (the default) and digits'),
    ('configs/ensemble.py:digits,9', 'unknown ensemble member 9; the members are 1, 2, 3, 4, 5, 6'),
])
def test_an_unknown_config_argument_is_one_line(config, expected):
  assert_one_line_error(cli('bn_inception.evaluate', f'--config={config}', '--workdir=unused'),
                        expected)


def problems(**fields):
  config = bn_x5.get_config('digits')
  for key, value in fields.items():
    section = config
    *parents, last = key.split('__')
    for parent in parents:
      section = section[parent]
    section[last] = value
  with pytest.raises(errors.ConfigError) as e:
    config_checks.check(config)
  return str(e.value)


def test_every_batch_size_message_names_batch_size():
  # 0 used to crash the check itself: num_train_steps is derived as paper_steps * 32 // batch_size.
  assert problems(batch_size=0).splitlines()[1:] == ['  batch_size = 0: must be an integer >= 1']
  # A batch longer than the whole run makes the derived num_train_steps 0: say why.
  message = problems(batch_size=2 ** 40)
  assert 'num_train_steps = 0' in message and 'batch_size 1,099,511,627,776' in message
  assert 'lower batch_size or set num_train_steps' in message


def test_a_paper_steps_of_0_is_named_rather_than_the_batch_size():
  assert problems(paper_steps=0).splitlines()[1:] == [
      '  num_train_steps = 0: must be an integer >= 1 (it follows paper_steps = 0, the length in '
      '32-image steps: set paper_steps >= 1 or num_train_steps)']


@pytest.mark.parametrize('command', ['bn_inception.main', 'bn_inception.evaluate'])
def test_a_batch_size_of_0_on_the_command_line_is_the_checks_message(command, tmp_path):
  """The commands check the config before they compare it between processes, which derives its
  fields (there a batch_size of 0 used to end in a ZeroDivisionError traceback)."""
  workdir = tmp_path / 'run'
  if command == 'bn_inception.evaluate':
    workdir.mkdir()  # evaluate resolves its workdir first
  result = cli(command, '--config=configs/bn_x5.py:digits', '--config.batch_size=0',
               f'--workdir={workdir}')
  assert_one_line_error(result, 'Invalid config')
  assert '  batch_size = 0: must be an integer >= 1' in result.stderr.splitlines()
  assert sorted(os.listdir(tmp_path)) == (['run'] if command == 'bn_inception.evaluate' else [])


def test_images_smaller_than_the_network_downsamples_are_refused():
  assert 'dataset.image_size = 31: must be an integer >= 32' in problems(dataset__image_size=31)
  config = bn_x5.get_config('digits')
  config.dataset.image_size = 32
  config_checks.check(config)
  config_checks.check(config, training=False)


def test_a_batch_that_cannot_fit_is_refused_before_the_workdir_is_written(tmp_path):
  workdir = tmp_path / 'run'
  base = ('bn_inception.main', '--config=configs/bn_x5.py:digits', f'--workdir={workdir}',
          '--config.num_train_steps=5')
  # Larger than the host's memory by the estimate, not numpy's MemoryError after the workdir exists.
  assert_one_line_error(cli(*base, '--config.batch_size=1099511627776'),
                        'batch_size 1,099,511,627,776 cannot fit', 'an estimate')
  # Larger than the in-memory training split.
  assert_one_line_error(cli(*base, '--config.batch_size=2048'),
                        'batch_size 2,048 is larger than the training split (1,437 examples')
  # 144 crops of each image in an evaluation step.
  assert_one_line_error(cli(*base, '--config.eval_batch_size=68719476736',
                            '--config.dataset.eval_crops=144'),
                        'an evaluation step', 'Use a smaller eval_batch_size')
  assert not workdir.exists()


def test_the_memory_estimate_passes_the_configs_batches():
  mesh = train.make_mesh()
  config = bn_x5.get_config('digits')
  train.check_memory(config, config.batch_size, mesh, training=True)
  with pytest.raises(errors.ConfigError, match='batch_size .* cannot fit'):
    train.check_memory(config, 2 ** 36, mesh, training=True)


def zeros_state(config):
  """A state of zeros shaped as `config`'s network's, with no initialisation compiled: what
  load_pretrained matches is paths and shapes."""
  abstract = train.setup(config, 1437, train.make_mesh()).abstract_state
  return jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)


@pytest.fixture(scope='module')
def saved_tiny_run(tmp_path_factory):
  """A checkpoint of a width-0.125 digits network (random values), saved as training saves."""
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda a: rng.normal(size=a.shape).astype(a.dtype),
                       zeros_state(tiny_config(width=0.125)))
  workdir = str(tmp_path_factory.mktemp('source'))
  mngr = checkpoints.manager(workdir)
  checkpoints.save(mngr, 0, state)
  mngr.wait_until_finished()
  mngr.close()
  return workdir, state


def tiny_config(width, num_classes=10):
  c = bn_x5.get_config('digits')
  c.model.width, c.model.num_classes, c.model.bn_group_size = width, num_classes, 2
  c.dataset.image_size, c.batch_size = 32, 16
  return c


def test_init_from_refuses_a_network_that_hardly_matches(saved_tiny_run):
  workdir, _ = saved_tiny_run
  other_width = zeros_state(tiny_config(width=0.25))
  with pytest.raises(errors.InputFileError, match=r'config.init_from: \d of \d+ arrays of this '
                                                  r'model match .* of them by shape.*same network'):
    train.load_pretrained(other_width, workdir)


def test_init_from_warns_for_a_partial_load(saved_tiny_run, caplog):
  workdir, source = saved_tiny_run
  five_classes = zeros_state(tiny_config(width=0.125, num_classes=5))
  with caplog.at_level(logging.INFO):
    loaded = train.load_pretrained(five_classes, workdir)
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING and 'initialis' in r.getMessage()]
  assert len(warnings) == 1 and 'Partial initialisation: 346 of 348' in warnings[0], warnings
  assert 'logits/kernel' in warnings[0] and 'do not' in warnings[0]
  assert (loaded.params['conv1']['pointwise']['kernel'] == source.params['conv1']['pointwise']['kernel']).all()
