"""The training loop: end to end on digits, exact resume, pre-emption, divergence, devices, schedule."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_inception import checkpoints
from bn_inception import models
from bn_inception import train
from configs import bn_x30

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
  """BN-x30 at the digits scale, shrunk to a network that compiles and steps in seconds."""
  c = bn_x30.get_config('digits')
  c.model.width = 0.125
  c.model.bn_group_size = 2
  c.batch_size = 16
  c.eval_batch_size = 64
  c.num_train_steps = 4
  c.log_every_steps = c.eval_every_steps = c.checkpoint_every_steps = 2
  c.dataset.image_size = 32
  for key, value in overrides.items():
    target = c
    *path, last = key.split('.')
    for p in path:
      target = target[p]
    target[last] = value
  return c


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_trees_equal(a, b):
  for x, y in zip(leaves(a), leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def test_end_to_end_on_digits(tmp_path, caplog):
  """A digits run trains, evaluates every test example once, and leaves its workdir complete."""
  state = train.train_and_evaluate(tiny_config(), str(tmp_path))
  assert int(state.step) == 4
  metrics = read_metrics(tmp_path)
  train_lines = [m for m in metrics if 'loss' in m]
  eval_lines = [m for m in metrics if 'eval_top1' in m]
  assert [m['step'] for m in train_lines] == [2, 4]
  assert all(m['paper_step'] == m['step'] * 16 // 32 for m in metrics)
  assert all(np.isfinite(m['loss']) and m['img_per_s'] > 0 for m in train_lines)
  assert [m['eval_examples'] for m in eval_lines] == [360, 360]  # the whole digits test split
  assert all(0 <= m['eval_top1'] <= m['eval_top5'] <= 1 for m in eval_lines)
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']
  assert json.loads((tmp_path / 'config.json').read_text())['model']['width'] == 0.125
  assert os.listdir(tmp_path / 'tensorboard')

  # Rerun with a changed field: the change is reported, the finished run is not repeated.
  again = train.train_and_evaluate(tiny_config(weight_decay=0.5), str(tmp_path))
  assert 'differs from the saved one in: weight_decay: 8' in caplog.text
  assert_trees_equal(state.params, again.params)
  # Another model in the same workdir is refused, naming the mismatch.
  with pytest.raises(ValueError, match='does not fit this model.*another run'):
    train.train_and_evaluate(tiny_config(**{'model.width': 0.25}), str(tmp_path))
  # A state of another shape (EMA weights asked for, none saved) is refused too, never mistaken for
  # an unreadable checkpoint and set aside.
  with pytest.raises(ValueError, match='does not fit this model'):
    train.train_and_evaluate(tiny_config(ema_decay=0.9), str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['2', '4']


def test_resume_extend_and_corrupt_checkpoint_end_bitwise_equal_to_one_run(tmp_path, caplog):
  """Stopping at step 2 and rerunning with a larger num_train_steps ends exactly where a run
  launched with that length ends: the schedule, data and dropout depend on the step alone. An
  unreadable newest checkpoint is skipped, with a warning, for the previous one."""
  straight = train.train_and_evaluate(tiny_config(), str(tmp_path / 'straight'))
  train.train_and_evaluate(tiny_config(num_train_steps=2), str(tmp_path / 'resumed'))
  resumed = train.train_and_evaluate(tiny_config(), str(tmp_path / 'resumed'))
  assert int(resumed.step) == 4
  assert_trees_equal(straight.params, resumed.params)
  assert_trees_equal(straight.batch_stats, resumed.batch_stats)
  assert_trees_equal(straight.opt_state, resumed.opt_state)

  crashed = tmp_path / 'crashed'
  shutil.copytree(tmp_path / 'straight', crashed)
  for root, _, files in os.walk(crashed / 'checkpoints' / '4'):
    for name in files:  # every file of the newest checkpoint overwritten with garbage
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')
  recovered = train.train_and_evaluate(tiny_config(), str(crashed))
  assert 'Checkpoint 4' in caplog.text and 'using step 2 instead' in caplog.text
  assert_trees_equal(straight.params, recovered.params)


def test_one_and_eight_devices_train_the_same_parameters(tmp_path):
  """With BN groups aligned to devices, the device count does not change the result."""
  assert jax.device_count() == 8
  # Random images at 64 x 64 in BN groups of 8, a small learning rate: where a group's channel is
  # nearly constant (the digits' blank background, tiny groups, 1 x 1 maps) the gradient through BN
  # is ill-conditioned and amplifies the rounding differences between reduction orders.
  config = tiny_config(num_train_steps=3, batch_size=64, learning_rate=0.001,
                       checkpoint_every_steps=100, eval_every_steps=100,
                       **{'dataset.name': 'synthetic', 'dataset.image_size': 64,
                          'model.num_classes': 1000, 'model.bn_group_size': 8})
  one = train.train_and_evaluate(config, str(tmp_path / 'one'), devices=jax.devices()[:1])
  eight = train.train_and_evaluate(config, str(tmp_path / 'eight'))
  assert len(eight.params['logits']['kernel'].sharding.device_set) == 8
  for a, b in zip(leaves(one.params) + leaves(one.batch_stats),
                  leaves(eight.params) + leaves(eight.batch_stats), strict=True):
    assert np.abs(a - b).max() <= 2e-3 * np.abs(a).max() + 1e-7


def test_divergence_stops_with_the_step_and_keeps_checkpoints_finite(tmp_path):
  config = tiny_config(learning_rate=1e30, num_train_steps=3, checkpoint_every_steps=1,
                       log_every_steps=1, eval_every_steps=100)
  with pytest.raises(FloatingPointError, match=r'not finite at step \d+.*last good checkpoint'):
    train.train_and_evaluate(config, str(tmp_path))
  mngr = checkpoints.manager(str(tmp_path), read_only=True)
  for step in mngr.all_steps():
    _, state = checkpoints.restore_latest(mngr, step=step)
    assert all(np.isfinite(x).all() for x in leaves(state['params']))


def test_sigterm_saves_a_resumable_checkpoint_and_exits_cleanly(tmp_path):
  workdir = tmp_path / 'run'
  args = [sys.executable, '-m', 'bn_inception.main', '--config=configs/bn_x30.py:digits',
          f'--workdir={workdir}', '--config.num_train_steps=100000', '--config.log_every_steps=1',
          '--config.model.width=0.125', '--config.batch_size=16', '--config.model.bn_group_size=2',
          '--config.checkpoint_every_steps=100000', '--config.eval_every_steps=100000']
  env = dict(os.environ, XLA_FLAGS='', JAX_DISABLE_MOST_OPTIMIZATIONS='1', PYTHONPATH=REPO)
  proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 240
    while not (workdir / 'metrics.jsonl').exists() or len(read_metrics(workdir)) < 2:
      assert proc.poll() is None, proc.stdout.read().decode()
      assert time.time() < deadline, 'training did not start in time'
      time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0].decode()
  finally:
    proc.kill()
  assert proc.returncode == 0, output
  assert 'Pre-empted' in output
  steps = checkpoints.manager(str(workdir), read_only=True).all_steps()
  assert len(steps) == 1 and 2 <= steps[0] < 100000
  config = tiny_config(num_train_steps=steps[0] + 1, eval_every_steps=100000)
  state = train.train_and_evaluate(config, str(workdir))
  assert int(state.step) == steps[0] + 1  # resumed, not restarted


@pytest.mark.parametrize('batch_size, group_size, match', [
    (12, 2, 'batch_size 12 does not divide over 8 devices'),
    (16, 3, 'batch_size 16 does not divide into batch-norm groups of 3'),
])
def test_impossible_batches_are_refused_with_the_numbers(tmp_path, batch_size, group_size, match):
  config = tiny_config(batch_size=batch_size, **{'model.bn_group_size': group_size})
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(config, str(tmp_path))


def test_learning_rate_schedule_against_hand_computed_values():
  """lr = 0.045 * 64/32 * 0.96 ** floor(epoch / (8/6)), epoch = step * 64 / 1000."""
  c = tiny_config(batch_size=64, learning_rate=0.045, warmup_epochs=0.0)
  schedule = train.learning_rate_schedule(c, num_train_examples=1000)
  # 1000 / 64 = 15.625 steps per epoch; a decay every 8/6 epochs = 20.83 steps.
  expected = {0: 0.09, 20: 0.09, 21: 0.09 * 0.96, 41: 0.09 * 0.96, 42: 0.09 * 0.96**2,
              1000: 0.09 * 0.96**48}
  for step, lr in expected.items():
    np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-6)
  c.warmup_epochs = 1.0  # linear over the first 15.625 steps
  schedule = train.learning_rate_schedule(c, num_train_examples=1000)
  np.testing.assert_allclose(float(schedule(0)), 0.09 / 15.625, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(7)), 0.09 * 8 / 15.625, rtol=1e-6)
  np.testing.assert_allclose(float(schedule(15)), 0.09, rtol=1e-6)


def test_weight_decay_covers_kernels_only():
  """L2 is 0.5 * sum of squared conv and dense kernels; BN gamma/beta and biases are exempt."""
  model = models.BNInception(width=0.125, num_classes=10, use_bn=True)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))['params']
  flat = {'/'.join(k.key for k in path): v
          for path, v in jax.tree_util.tree_leaves_with_path(params)}
  expected = 0.5 * sum(float(jnp.sum(v**2)) for k, v in flat.items() if k.endswith('kernel'))
  np.testing.assert_allclose(float(train.l2_loss(params)), expected, rtol=1e-5)
  bumped = jax.tree_util.tree_map_with_path(
      lambda path, v: v if path[-1].key == 'kernel' else v + 3.0, params)
  np.testing.assert_allclose(float(train.l2_loss(bumped)), expected, rtol=1e-5)
  assert any(k.endswith('bn/scale') for k in flat) and any(k.endswith('logits/bias') for k in flat)


def test_input_convention_maps_pipeline_pixels_to_the_weights_convention():
  """Pipeline images in [-1, 1] reach Caffe-trained weights as BGR pixels minus the Caffe means."""
  config = tiny_config()
  assert train.input_convention(config) is None  # our own weights: the pipeline's [-1, 1] as is
  config.input.update(color_order='bgr', mean=(104.0, 117.0, 128.0), std=(1.0, 1.0, 1.0))
  convention = train.input_convention(config)
  rgb = np.array([[[[255, 0, 51]]]], np.float32)  # one pixel, 0-255
  out = train.to_model_input(jnp.asarray(rgb / 127.5 - 1), convention)
  np.testing.assert_allclose(out[0, 0, 0], [51 - 104, 0 - 117, 255 - 128], atol=1e-4)


def test_topk_counts_ties_against_the_label():
  probs = jnp.array([[0.5, 0.2, 0.2, 0.1], [1.0, 0.0, 0.0, 0.0]])
  np.testing.assert_array_equal(train.topk_correct(probs, jnp.array([1, 0]), 1), [0, 1])
  np.testing.assert_array_equal(train.topk_correct(probs, jnp.array([1, 3]), 2), [0, 0])
  np.testing.assert_array_equal(train.topk_correct(probs, jnp.array([1, 3]), 3), [1, 0])
