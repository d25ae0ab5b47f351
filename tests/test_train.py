"""The training loop: learning on digits, exact resume, divergence, devices, optimiser (signals and
pre-emption: test_multihost.py).

Most tests share one kind of run (`ema_config`: dropout, an EMA, a learning-rate decay every 2.5
steps), so that they share one compiled training step (the persistent compilation cache of
conftest.py) and every part of the state moves. Those runs are sharded over two of the eight
devices (EMA_DEVICES), where a step takes a third of the time it takes over all eight; that the
device count does not change a step is test_one_and_eight_devices_take_the_same_steps's check.
"""

import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bn_inception import checkpoints
from bn_inception import errors
from bn_inception import evaluate
from bn_inception import input_pipeline
from bn_inception import metrics
from bn_inception import models
from bn_inception import run_dir
from bn_inception import train
from configs import bn_x30
import optional_deps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_TRAIN = 1437  # examples in the digits training split


# BN-x30 at the digits scale, shrunk to a network that compiles and steps in seconds.
TINY = {'model.width': 0.125, 'model.bn_group_size': 2, 'batch_size': 16, 'eval_batch_size': 64,
        'num_train_steps': 4, 'log_every_steps': 2, 'eval_every_steps': 2,
        'checkpoint_every_steps': 2, 'dataset.image_size': 32}


def tiny_config(shrunk=TINY, **overrides):
  """BN-x30 at the digits scale with the fields of `shrunk` and overrides ('model.width': ...)."""
  c = bn_x30.get_config('digits')
  for key, value in {**shrunk, **overrides}.items():
    target = c
    *path, last = key.split('.')
    for p in path:
      target = target[p]
    target[last] = value
  return c


def tiny_flags(shrunk=TINY, **overrides):
  """tiny_config(shrunk, **overrides) as command-line arguments: a command the tests start compiles
  the programs of the same config in the tests' process (conftest.py's shared cache)."""
  return ['--config=configs/bn_x30.py:digits',
          *(f'--config.{k}={v}' for k, v in {**shrunk, **overrides}.items())]


def ema_config(**overrides):
  """tiny_config with dropout, an EMA and a learning-rate decay every 2.5 steps (between steps 2
  and 3, 4 and 5, ...); BN over the whole batch of 16 and a BN-x5 rate, with which it learns in
  tens of steps."""
  return tiny_config(**{'ema_decay': 0.9, 'lr_decay_epochs': 2.5 * 16 / DIGITS_TRAIN,
                        'model.dropout_rate': 0.1, 'model.bn_group_size': 16,
                        'learning_rate': 0.05, **overrides})


LEARN_STEPS, RESUME_STEP = 80, 76  # ema_run: long enough to learn; checkpoints at 76 and 80
EMA_DEVICES = jax.devices()[:2]  # ema_config's runs (the module docstring)


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_trees_equal(a, b):
  """Every leaf, and the structure (a None where the other has arrays fails)."""
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(leaves(a), leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def global_train_batches(config, mesh):
  batches = input_pipeline.train_batches(config.dataset, local_batch_size=config.batch_size,
                                         seed=config.seed)
  return train.global_batches(batches, mesh, ('image', 'label'))


@pytest.fixture(scope='module')
def ema_run(tmp_path_factory):
  """(config, workdir, final state) of an ema_config run of LEARN_STEPS steps on digits."""
  workdir = tmp_path_factory.mktemp('ema_run')
  config = ema_config(num_train_steps=LEARN_STEPS, log_every_steps=20, eval_every_steps=40,
                      checkpoint_every_steps=RESUME_STEP)
  return config, workdir, train.train_and_evaluate(config, str(workdir), EMA_DEVICES)


@pytest.fixture
def initialisations(monkeypatch):
  """The list of train_and_evaluate's calls of Program.init (a fresh state), by config."""
  calls, setup = [], train.setup

  def counted(config, *args, **kwargs):
    program = setup(config, *args, **kwargs)
    return program._replace(init=lambda: calls.append(config) or program.init())

  monkeypatch.setattr(train, 'setup', counted)
  return calls


def test_end_to_end_on_digits_learns(ema_run, caplog, tmp_path, initialisations):
  """A digits run learns (the loss falls, test accuracy ends far above chance), evaluates every
  test example once, and leaves its workdir complete. Reruns on it (nothing to train, another
  model) restore or refuse without initialising a state."""
  config, workdir, state = ema_run
  assert int(state.step) == LEARN_STEPS
  lines = read_metrics(workdir)
  train_lines = [m for m in lines if 'loss' in m]
  eval_lines = [m for m in lines if 'eval_top1' in m]
  assert [m['step'] for m in train_lines] == [20, 40, 60, 80]
  assert [m['step'] for m in eval_lines] == [40, 80]
  assert all(m['paper_step'] == m['step'] * 16 // 32 for m in lines)
  assert all(m['img_per_s'] > 0 for m in train_lines)
  losses = [m['loss'] for m in train_lines]
  assert losses[0] > 2.0 and losses[-1] < 0.8 * losses[0], losses  # from chance, ln 10 = 2.3
  assert [m['eval_examples'] for m in eval_lines] == [360, 360]  # the whole digits test split
  assert all(0 <= m['eval_top1'] <= m['eval_top5'] <= 1 for m in eval_lines)
  assert eval_lines[-1]['eval_top1'] > 0.3, eval_lines  # chance: 0.1
  assert sorted(os.listdir(workdir / 'checkpoints')) == [str(RESUME_STEP), str(LEARN_STEPS)]
  assert json.loads((workdir / 'config.json').read_text())['model']['width'] == 0.125
  assert os.listdir(workdir / 'tensorboard')

  # Rerun with a changed field: the change is reported, the finished run is not repeated, and
  # config.json still says what its steps ran under.
  config_json = (workdir / 'config.json').read_text()
  changed = config.copy_and_resolve_references()
  changed.weight_decay = 0.5
  again = train.train_and_evaluate(changed, str(workdir), EMA_DEVICES)
  assert 'differs from the saved one in: weight_decay: 8' in caplog.text
  assert 'nothing to train' in caplog.text
  assert_trees_equal(state, again)
  assert (workdir / 'config.json').read_text() == config_json
  # A new length is how a run is extended (or cut short): no warning about a changed config.
  caplog.clear()
  shorter = config.copy_and_resolve_references()
  shorter.num_train_steps = LEARN_STEPS - 1
  train.train_and_evaluate(shorter, str(workdir), EMA_DEVICES)  # nothing to train: at step 80
  assert 'nothing to train' in caplog.text and 'differs from the saved one' not in caplog.text
  assert (workdir / 'config.json').read_text() == config_json
  assert run_dir.read_config_history(str(workdir)) == [(0, json.loads(config_json))]
  # Another model in the same workdir is refused, naming the mismatch.
  with pytest.raises(ValueError, match='does not fit this model.*another run'):
    train.train_and_evaluate(ema_config(**{'model.width': 0.25}), str(workdir), EMA_DEVICES)
  # A state of another shape (no EMA asked for, one saved) is refused too, never mistaken for an
  # unreadable checkpoint and set aside.
  with pytest.raises(ValueError, match='does not fit this model'):
    train.train_and_evaluate(ema_config(ema_decay=None), str(workdir), EMA_DEVICES)
  assert sorted(os.listdir(workdir / 'checkpoints')) == [str(RESUME_STEP), str(LEARN_STEPS)]
  assert not initialisations


def test_resume_across_decays_with_dropout_and_ema_is_bitwise_equal_to_one_run(
    ema_run, tmp_path, caplog, initialisations):
  """A run restarted from a checkpoint ends exactly where the uninterrupted run ended, in every
  leaf of the state (parameters, BN statistics, optimizer state, EMA weights and statistics, RNG,
  step), with dropout on and a learning-rate decay (between steps 77 and 78) in the resumed part:
  the schedule, data and dropout depend on the step alone. Here the newest checkpoint is unreadable
  (every file garbage): it is skipped, with a warning, for the previous one. The resumed run never
  initialises a state (nor compiles the initialisation): it restores into the abstract one."""
  config, workdir, straight = ema_run
  schedule = train.learning_rate_schedule(config, DIGITS_TRAIN)
  assert float(schedule(78)) == pytest.approx(0.96 * float(schedule(77)))  # floor(step / 2.5)
  assert not np.array_equal(straight.ema_params['logits']['kernel'],
                            straight.params['logits']['kernel'])

  crashed = tmp_path / 'crashed'
  shutil.copytree(workdir, crashed)
  for root, _, files in os.walk(crashed / 'checkpoints' / str(LEARN_STEPS)):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')
  resumed = train.train_and_evaluate(config, str(crashed), EMA_DEVICES)
  assert f'Checkpoint {LEARN_STEPS}' in caplog.text
  assert f'using step {RESUME_STEP} instead' in caplog.text
  assert_trees_equal(straight, resumed)
  assert not initialisations
  train.train_and_evaluate(ema_config(num_train_steps=1), str(tmp_path / 'new'),
                           EMA_DEVICES)  # it counts
  assert len(initialisations) == 1


def test_ema_weights_are_evaluated_with_their_own_statistics(ema_run):
  """Training's evaluation and bn_inception.evaluate (--weights=auto|ema) pair the EMA weights with
  the EMA of the BN statistics, raw weights with the running statistics; init_from starts the EMA
  from the loaded weights and statistics."""
  _, workdir, state = ema_run
  ema = {'params': state.ema_params, 'batch_stats': state.ema_batch_stats}
  raw = {'params': state.params, 'batch_stats': state.batch_stats}
  assert not np.array_equal(state.ema_batch_stats['conv1']['bn']['var'],
                            state.batch_stats['conv1']['bn']['var'])
  assert_trees_equal(train.eval_variables(state), ema)
  for weights, expected in (('auto', ema), ('ema', ema), ('raw', raw)):
    step, variables, used = evaluate.restore_variables(str(workdir), weights=weights)
    assert step == LEARN_STEPS and used == ('raw' if weights == 'raw' else 'ema')
    assert_trees_equal(variables, expected)

  loaded = train.load_pretrained(state, str(workdir))
  assert_trees_equal(loaded.ema_params, state.params)
  assert_trees_equal(loaded.ema_batch_stats, state.batch_stats)


@pytest.fixture
def inf_learning_rate_from_step_3(monkeypatch):
  """The learning rate becomes inf at step 3, so that the parameters overflow with a finite loss and
  finite gradients: an inf decay factor, which no config may ask for (config_checks refuses it),
  patched into the step's hyperparameters. ema_config decays between steps 2 and 3 (inf ** 0 = 1
  before), and the step is the very program of ema_config's runs (its hyperparameters are
  arguments)."""
  hyperparameters = train.hyperparameters
  monkeypatch.setattr(train, 'hyperparameters', lambda config: {
      **hyperparameters(config), 'lr_decay_factor': np.float32(np.inf)})


def overflowing(batch):
  """Images x 1e20: the first BN's variance overflows to inf; normalised by it, the activations are
  0, and the loss stays finite (from the initial state, the gradients too)."""
  return dict(batch, image=batch['image'] * 1e20)


@pytest.mark.usefixtures('inf_learning_rate_from_step_3')
def test_train_step_updates_the_ema_by_hand_and_freezes_from_a_nonfinite_step():
  """Two finite steps move the EMA of the weights and of the BN statistics with the warmed-up decays
  min(0.9, 1/10) = 0.1 and min(0.9, 2/11). At step 3 the learning rate is inf: from that step on
  every array of the state stays as it was after step 2, the last finite step, and nonfinite_step
  names step 3. A batch that overflows the BN variances (finite loss and gradients, an infinite
  running variance) is caught the same way, and a finite step after it changes nothing either."""
  config = ema_config()
  mesh = train.make_mesh(EMA_DEVICES)
  program = train.setup(config, DIGITS_TRAIN, mesh)
  batches = [batch for batch, _ in itertools.islice(global_train_batches(config, mesh), 5)]
  state = program.init()
  history = [jax.device_get(state)]
  for batch in batches:
    state, step_metrics = program.train_step(state, batch, program.hyperparameters)
    history.append(jax.device_get(state))
    assert np.isfinite(step_metrics['loss'])  # the guard must look past the loss

  s0, s1, s2, s3 = history[:4]
  for ema_name, name in (('ema_params', 'params'), ('ema_batch_stats', 'batch_stats')):
    ema1 = jax.tree.map(lambda e, x: 0.1 * e + 0.9 * x, getattr(s0, ema_name), getattr(s1, name))
    ema2 = jax.tree.map(lambda e, x: 2 / 11 * e + 9 / 11 * x, ema1, getattr(s2, name))
    for expected, s in ((ema1, s1), (ema2, s2)):
      for a, b in zip(leaves(getattr(s, ema_name)), leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

  arrays = lambda s: s.replace(step=0, nonfinite_step=0)
  assert not np.array_equal(s3.params['logits']['kernel'], s2.params['logits']['kernel'])
  assert [int(s.step) for s in history] == [0, 1, 2, 3, 4, 5]
  assert [int(s.nonfinite_step) for s in history] == [-1, -1, -1, -1, 3, 3]
  for s in history[4:]:
    assert_trees_equal(arrays(s), arrays(s3))

  # s0 placed as the program's state is (a host copy would compile another program), then donated.
  s0_replicated = jax.device_put(s0, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
  state, step_metrics = program.train_step(s0_replicated, overflowing(batches[0]),
                                           program.hyperparameters)
  assert np.isfinite(step_metrics['loss'])
  state, _ = program.train_step(state, batches[1], program.hyperparameters)  # finite, yet frozen
  assert (int(state.step), int(state.nonfinite_step)) == (2, 0)
  assert_trees_equal(arrays(jax.device_get(state)), arrays(s0))


def test_the_finiteness_check_sees_every_array():
  """train.all_finite (the step's guard) is False for one NaN or inf in any array of a tree, the
  last included; finite values near float32's limit pass."""
  tree = {'params': [np.ones((2, 3), np.float32), np.zeros((), np.float32)],
          'batch_stats': {'mean': np.full(4, 3e38, np.float32)}}
  assert train.all_finite(tree)
  for i in range(3):
    for bad in (np.nan, np.inf, -np.inf):
      arrays = [x.copy() for x in jax.tree.leaves(tree)]
      arrays[i].flat[-1] = bad
      assert not train.all_finite(jax.tree.unflatten(jax.tree.structure(tree), arrays)), (i, bad)


@pytest.mark.usefixtures('inf_learning_rate_from_step_3')
def test_divergence_stops_the_run_naming_the_step_and_keeps_checkpoints_finite(tmp_path):
  """The loop stops at its next check after a non-finite step, naming that step and the last good
  checkpoint; every checkpoint written is finite."""
  config = ema_config(num_train_steps=8, checkpoint_every_steps=1, log_every_steps=1,
                            eval_every_steps=100)
  with pytest.raises(errors.TrainingDivergedError, match=r'not finite at step 3 \(paper step 1\)\. The '
                     r'last good checkpoint is step 3 in'):
    train.train_and_evaluate(config, str(tmp_path), EMA_DEVICES)
  mngr = checkpoints.manager(str(tmp_path), read_only=True)
  assert mngr.latest_step() == 3
  for step in mngr.all_steps():
    _, state = checkpoints.restore_latest(mngr, step=step)
    assert all(np.isfinite(x).all() for x in leaves(state))


def test_one_and_eight_devices_take_the_same_steps():
  """With BN groups aligned to devices, the device count does not change what a step does: the
  change of every parameter and statistic over three steps agrees to 2% of its largest value on
  one device and on eight. Measured (2026-11-27, CPU, jax 0.10.2): 0.33% at most from rounding;
  a wrong grouping on the eight devices (groups of 16, or strided groups taking one example from
  every device) differs by 280-320%.
  """
  assert jax.device_count() == 8
  # Random images at 64 x 64 in BN groups of 8, a small learning rate: where a group's channel is
  # nearly constant (the digits' blank background, tiny groups, 1 x 1 maps) the gradient through BN
  # is ill-conditioned and amplifies the rounding differences between reduction orders.
  config = tiny_config(batch_size=64, learning_rate=0.001,
                       **{'dataset.name': 'synthetic', 'dataset.image_size': 64,
                          'model.num_classes': 1000, 'model.bn_group_size': 8})
  changes, start = [], None
  for devices in (jax.devices(), jax.devices()[:1]):
    mesh = train.make_mesh(devices)
    program = train.setup(config, input_pipeline.SYNTHETIC_INFO.num_train_examples, mesh)
    variables = lambda s: jax.device_get((s.params, s.batch_stats))
    # One initialisation, compiled for the eight devices and replicated on each mesh: the program
    # test_benchmark's evaluation compiles too (the same parameters), read from the cache there.
    if start is None:
      start = jax.device_get(program.init())
    state = jax.device_put(start, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    initial = variables(state)
    for batch, _ in itertools.islice(global_train_batches(config, mesh), 3):
      state, _ = program.train_step(state, batch, program.hyperparameters)
    assert len(state.params['logits']['kernel'].sharding.device_set) == len(devices)
    changes.append(jax.tree.map(np.subtract, variables(state), initial))
  for eight, one in zip(leaves(changes[0]), leaves(changes[1]), strict=True):
    assert np.abs(one - eight).max() <= 2e-2 * np.abs(one).max()


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
  c.warmup_epochs = 2.0  # x (step + 1) / 31.25 over the first 31.25 steps, across the first decay
  schedule = train.learning_rate_schedule(c, num_train_examples=1000)
  expected = {0: 0.09 / 31.25, 7: 0.09 * 8 / 31.25, 20: 0.09 * 21 / 31.25,
              21: 0.09 * 0.96 * 22 / 31.25, 30: 0.09 * 0.96 * 31 / 31.25, 31: 0.09 * 0.96,
              42: 0.09 * 0.96**2}
  for step, lr in expected.items():
    np.testing.assert_allclose(float(schedule(step)), lr, rtol=1e-6)


def test_optimizer_by_hand_momentum_and_l2_on_kernels_only():
  """Heavy-ball: trace = g + wd * w + momentum * trace, update = -lr * trace, with wd * w on conv
  and dense kernels only (the gradient of 0.5 * wd * |w|^2); Nesterov's first update is
  -lr * (1 + momentum) * (g + wd * w)."""
  model = models.BNInception(width=0.125, num_classes=10)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  rng = np.random.default_rng(0)
  params, grads1, grads2 = (
      jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
      for _ in range(3))
  config = tiny_config(weight_decay=0.01, momentum=0.9)
  lr = 0.5
  # Jitted: op by op, the updates of ~200 arrays of distinct shapes would compile ~200 programs.
  tx = train.optimizer(config, lambda step: lr)
  updates1, opt_state = jax.jit(tx.update)(grads1, jax.jit(tx.init)(params), params)
  params2 = jax.jit(optax.apply_updates)(params, updates1)
  updates2, _ = jax.jit(tx.update)(grads2, opt_state, params2)
  config.nesterov = True
  tx = train.optimizer(config, lambda step: lr)
  nesterov1, _ = jax.jit(tx.update)(grads1, jax.jit(tx.init)(params), params)

  flat = lambda tree: {jax.tree_util.keystr(path): np.asarray(x)
                       for path, x in jax.tree_util.tree_leaves_with_path(tree)}
  w, g1, g2, u1, u2, n1 = map(flat, (params, grads1, grads2, updates1, updates2, nesterov1))
  for name in w:
    wd = 0.01 if name.endswith("['kernel']") else 0.0
    trace1 = g1[name] + wd * w[name]
    trace2 = g2[name] + wd * (w[name] - lr * trace1) + 0.9 * trace1
    np.testing.assert_allclose(u1[name], -lr * trace1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(u2[name], -lr * trace2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(n1[name], -lr * 1.9 * trace1, rtol=1e-5, atol=1e-6)
  assert any(n.endswith("['bn']['scale']") for n in w) and "['logits']['bias']" in w


def test_metrics_are_written_without_importing_torch(tmp_path):
  """tensorboardX imports torch where it is installed (1-2 s at every start, and CUDA libraries on
  a GPU host): the metric writer keeps it out of the process, and torch stays importable."""
  # torch installed, not imported here: find_spec, or the import's error for optional_deps.
  optional_deps.load(lambda: importlib.util.find_spec('torch') or importlib.import_module('torch'))
  code = """if True:
      import sys
      from bn_inception import train
      writer = train.MetricWriter(sys.argv[1])
      writer.write(1, {'loss': 2.5})
      writer.close()
      assert 'torch' not in sys.modules, 'torch was imported'
      import torch
  """
  subprocess.run([sys.executable, '-c', code, str(tmp_path)], check=True, cwd=REPO,
                 env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
  assert json.loads((tmp_path / 'metrics.jsonl').read_text()) == {'step': 1, 'loss': 2.5}
  (events,) = (tmp_path / 'tensorboard').iterdir()
  assert b'loss' in events.read_bytes()


def test_input_convention_maps_pipeline_pixels_to_the_weights_convention():
  """Pipeline images in [-1, 1] reach Caffe-trained weights as BGR pixels minus the Caffe means."""
  config = tiny_config()
  assert train.input_convention(config) is None  # our own weights: the pipeline's [-1, 1] as is
  config.input.update(color_order='bgr', mean=(104.0, 117.0, 128.0), std=(1.0, 1.0, 1.0))
  convention = train.input_convention(config)
  rgb = np.array([[[[255, 0, 51]]]], np.float32)  # one pixel, 0-255
  out = train.to_model_input(jnp.asarray(rgb / 127.5 - 1), convention)
  np.testing.assert_allclose(out[0, 0, 0], [51 - 104, 0 - 117, 255 - 128], atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Metrics and evaluation batches.
# ------------------------------------------------------------------------------------------------
class GivenLogits(nn.Module):
  """A 'network' whose logits are its input, so that a test chooses them."""

  @nn.compact
  def __call__(self, x, train=False):
    return x.reshape(x.shape[0], -1)


def test_a_nonfinite_score_never_counts_as_correct_in_training_evaluation():
  """Training's evaluation step on chosen logits: rows with a NaN or an inf are wrong (softmax
  turns either into NaN), ties count against the label; the padding row is not counted."""
  nan, inf = np.nan, np.inf
  logits = np.array([[nan, nan, nan, nan],  # all NaN: wrong (it was a hit)
                     [0., nan, 9., 1.],  # one NaN, the label 2 highest of the rest: wrong
                     [inf, 0., 0., 0.],  # inf on the label: wrong
                     [2., 2., 1., 0.],  # the label 1 tied first: top-1 wrong, top-5 right
                     [0., 3., 1., 2.],  # right
                     [nan, nan, nan, nan]], np.float32)  # padding
  batch = {'image': jnp.asarray(logits[:, None, :, None, None]),
           'label': jnp.array([0, 2, 0, 1, 1, 0]),
           'mask': jnp.array([True] * 5 + [False])}
  sums = jax.device_get(train.eval_step({}, batch, model=GivenLogits()))
  assert (sums['top1'], sums['top5'], sums['count']) == (1, 2, 5)


@pytest.mark.parametrize('xp', [np, jnp])
def test_topk_counts_ties_against_the_label(xp):
  probs = xp.array([[0.5, 0.2, 0.2, 0.1], [1.0, 0.0, 0.0, 0.0]])
  np.testing.assert_array_equal(metrics.topk_correct(probs, xp.array([1, 0]), 1), [0, 1])
  np.testing.assert_array_equal(metrics.topk_correct(probs, xp.array([1, 3]), 2), [0, 0])
  np.testing.assert_array_equal(metrics.topk_correct(probs, xp.array([1, 3]), 3), [1, 0])


def test_evaluation_inside_training_counts_crops_in_its_batch():
  """eval_batch_size counts crops, in training's evaluation as in bn_inception.evaluate (one rule,
  train.eval_batch_size): with 144 crops (126 computed), 4032 crops per step are 32 images, not 4032."""
  mesh = train.make_mesh()
  config = tiny_config(eval_batch_size=4032, **{'dataset.name': 'synthetic',
                                                'dataset.image_size': 8,
                                                'dataset.eval_crops': '144'})
  shapes = []

  def eval_fn(variables, batch):
    del variables
    shapes.append(batch['image'].shape)
    count = jnp.sum(batch['mask'])
    return {'top1': count, 'top5': count, 'loss': 0.0 * count, 'count': count}

  result = train.evaluate({}, eval_fn, config, mesh)
  assert set(shapes) == {(32, 126, 8, 8, 3)} and result['eval_examples'] == 1000
  assert train.eval_batch_size(tiny_config(eval_batch_size=64), '10', mesh) == 8  # 6, rounded up
  assert train.eval_batch_size(tiny_config(eval_batch_size=None), 'center', mesh) == 16


def test_optimiser_values_are_arguments_of_one_compiled_step():
  """Runs that differ only in learning rate, decay factor, weight decay or momentum (BN-x5 and
  BN-x30, a resume at another rate) lower to the same program, compiled once for all of them; the
  values still take effect (the inf rate of the divergence tests above). Within a process they
  share the jitted programs themselves (with a length or intervals of their own too), traced once;
  another seed, width or evaluation gets its own."""
  mesh = train.make_mesh(EMA_DEVICES)
  configs = (ema_config(), ema_config(learning_rate=0.3, lr_decay_factor=0.5, weight_decay=0.1,
                                      momentum=0.5, num_train_steps=7, log_every_steps=3))
  programs = []
  for config in configs:
    train._programs.cache_clear()  # pylint: disable=protected-access  (lowered afresh)
    program = train.setup(config, DIGITS_TRAIN, mesh)
    batch, _ = next(global_train_batches(config, mesh))
    programs.append(program.train_step.lower(program.abstract_state, batch,
                                            program.hyperparameters))
  assert programs[0].as_text() == programs[1].as_text()
  first, second = (train.setup(config, DIGITS_TRAIN, mesh) for config in configs)
  assert first.hyperparameters != second.hyperparameters
  for name in ('init', 'train_step', 'eval_step'):
    assert getattr(first, name) is getattr(second, name), name
  for other in (ema_config(seed=1), ema_config(**{'model.width': 0.25}),
                ema_config(**{'dataset.eval_crops': '10'}), ema_config(ema_decay=None)):
    assert train.setup(other, DIGITS_TRAIN, mesh).train_step is not first.train_step
