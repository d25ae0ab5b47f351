"""bn_inception.evaluate: agreement with training, exact counts, multi-crop, weights, command line.

One tiny BN-x30 digits run (4 steps, an eighth of the width) is trained once for the module; the
multi-crop tests use one-layer models on hand-made batches, where the answer is known.
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_inception import checkpoints
from bn_inception import convert
from bn_inception import errors
from bn_inception import evaluate
from bn_inception import input_pipeline
from bn_inception import predictions
from bn_inception import train

import test_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config():
  """test_train's TINY network (test_faults trains the same program: compiled once for both), its
  checkpoint and evaluation at step 4 alone. At a rate this small its answers spread over classes
  (top-5 about 50%), which the comparisons here need: its BN groups of two give poor population
  statistics, and from 1e-3 on every answer is one class with probability 1."""
  return test_train.tiny_config(learning_rate=1e-4, eval_every_steps=4, log_every_steps=4,
                                checkpoint_every_steps=4)


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(config, workdir, final state, training's eval metrics) of a 4-step digits run."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = tiny_config()
  state = train.train_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    metrics = [json.loads(line) for line in f if 'eval_top1' in line][-1]
  return config, workdir, state, metrics


@pytest.fixture(scope='module')
def centre(run):
  """evaluate_checkpoint's predictions for the run's checkpoint, default settings."""
  config, workdir, _, _ = run
  return evaluate.evaluate_checkpoint(config, workdir)


def nll(p):
  return float(np.mean(-np.log(p.probs[np.arange(p.num_examples), p.labels] + 1e-12)))


def test_agrees_with_the_evaluation_inside_training(run, centre):
  """Same checkpoint, same numbers: top-1, top-5, loss and example count of metrics.jsonl."""
  config, _, state, metrics = run
  acc = predictions.accuracy(centre)
  assert centre.meta['step'] == metrics['step'] == 4
  assert centre.meta['weights'] == 'raw' and centre.meta['crops'] == 'center'
  assert centre.num_examples == metrics['eval_examples'] == 360
  assert acc['top1'] == pytest.approx(metrics['eval_top1'], abs=1e-9)
  assert acc['top5'] == pytest.approx(metrics['eval_top5'], abs=1e-9)
  assert 0.0 < acc['top5'] < 1.0  # not degenerate
  assert nll(centre) == pytest.approx(metrics['eval_loss'], rel=1e-5)
  assert centre.probs.dtype == np.float32 and centre.probs.shape == (360, config.model.num_classes)
  np.testing.assert_allclose(centre.probs.sum(1), 1, rtol=1e-5)
  _, variables, _ = evaluate.restore_variables(run[1])
  for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(train.eval_variables(state))):
    np.testing.assert_array_equal(a, b)


def test_counts_every_example_once_with_padding(run, centre):
  """A batch that does not divide the 360 test images (48 = 6 per device on 8 devices: 8 batches,
  the last padded): every example exactly once, with the same probabilities."""
  config, workdir, _, _ = run
  assert len(jax.devices()) == 8
  p = evaluate.evaluate_checkpoint(config, workdir, batch_size=48)
  expected_ids = np.concatenate([b['id'][b['mask']] for b in input_pipeline.eval_batches(
      config.dataset, local_batch_size=48)])
  assert p.num_examples == 360 and len(np.unique(p.ids)) == 360
  np.testing.assert_array_equal(p.ids, expected_ids)  # the pipeline's order, padding dropped
  a, b = p.sorted_by_id(), centre.sorted_by_id()
  np.testing.assert_array_equal(a.labels, b.labels)
  np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Multi-crop on models whose answer is known.
# ------------------------------------------------------------------------------------------------
class ColourMean(nn.Module):
  """Logits from the mean colour: the same for every flip or rotation of an image."""

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(7)(x.mean(axis=(1, 2)))


class Pixels(nn.Module):
  """Logits from every pixel: flips change them."""

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(7)(x.reshape(x.shape[0], -1))


def crafted_batches(images, batch_size):
  """eval_batches-style dicts from images [N, crops, S, S, 3], the last batch padded."""
  n = len(images)
  for start in range(0, n, batch_size):
    index = np.arange(start, start + batch_size)
    mask = index < n
    index = np.minimum(index, n - 1)
    yield {'image': images[index], 'label': index % 7, 'mask': mask,
           'id': np.where(mask, 100 + index, -1)}


def flips(images):
  """[N, S, S, 3] -> [N, 4, S, S, 3]: the image, mirrored, upside down, both."""
  return np.stack([images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]], axis=1)


def init(model):
  return model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 3)))


def test_multicrop_of_a_crop_invariant_model_is_the_single_crop_answer():
  images = np.random.default_rng(0).normal(size=(13, 6, 6, 3)).astype(np.float32)
  model, mesh = ColourMean(), train.make_mesh()
  variables = init(model)
  single = evaluate.predict_batches(model, variables, crafted_batches(images[:, None], 8), mesh)
  multi = evaluate.predict_batches(model, variables, crafted_batches(flips(images), 8), mesh)
  np.testing.assert_allclose(multi[0], single[0], rtol=1e-5)
  for a, b in zip(multi[1:], single[1:]):
    np.testing.assert_array_equal(a, b)
  assert len(multi[2]) == 13  # 16 rows, 3 of them padding


def test_multicrop_averages_each_examples_own_crops():
  """Probabilities are the mean over an example's crops of the softmax (not of the logits), never
  mixing crops of different examples, for examples spread over batches and devices."""
  images = flips(np.random.default_rng(1).normal(size=(13, 6, 6, 3)).astype(np.float32))
  model, mesh = Pixels(), train.make_mesh()
  variables = init(model)
  probs, labels, ids = evaluate.predict_batches(model, variables, crafted_batches(images, 8), mesh)
  for i in range(13):
    crops = jax.nn.softmax(model.apply(variables, images[i]))  # the 4 crops of example i
    np.testing.assert_allclose(probs[i], np.mean(crops, axis=0), rtol=1e-5, atol=1e-7)
    assert not np.allclose(crops[0], crops[1])  # the crops do differ
  np.testing.assert_array_equal(ids, 100 + np.arange(13))
  np.testing.assert_array_equal(labels, np.arange(13) % 7)


def test_evaluate_checkpoint_asks_the_pipeline_for_the_crops(run, centre, monkeypatch):
  """crops='10' reaches the pipeline, with fewer images per step; identical crops give the centre
  answer."""
  config, workdir, _, _ = run
  calls = []
  original = input_pipeline.eval_batches

  def ten_copies(dataset_config, *, local_batch_size, crops=None, **kwargs):
    calls.append((local_batch_size, crops))
    for b in original(dataset_config, local_batch_size=local_batch_size, **kwargs):
      yield {**b, 'image': np.repeat(b['image'], 10, axis=1)}

  monkeypatch.setattr(input_pipeline, 'eval_batches', ten_copies)
  p = evaluate.evaluate_checkpoint(config, workdir, crops='10')
  assert calls == [(8, '10')]  # 64 crops per step: 6 images, rounded to the 8 devices
  assert p.meta['crops'] == '10'
  np.testing.assert_array_equal(p.ids, centre.ids)
  np.testing.assert_allclose(p.probs, centre.probs, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Weights, checkpoints, files, command line.
# ------------------------------------------------------------------------------------------------
def test_weights_raw_ema_auto(run, centre, tmp_path):
  """Converter checkpoints (params, batch_stats only) load; --weights=ema needs EMA weights, and
  auto takes them when present."""
  config, _, state, _ = run
  variables = jax.device_get({'params': state.params, 'batch_stats': state.batch_stats})
  convert.save(str(tmp_path / 'converted'), config, variables)
  converted = evaluate.evaluate_checkpoint(config, str(tmp_path / 'converted'), weights='auto')
  assert converted.meta['weights'] == 'raw' and converted.meta['step'] == 0
  np.testing.assert_array_equal(converted.probs, centre.probs)
  with pytest.raises(errors.ConfigError, match='holds no EMA weights.*--weights=raw'):
    evaluate.evaluate_checkpoint(config, str(tmp_path / 'converted'), weights='ema')

  # EMA weights that always answer class 3, with their statistics.
  ema = jax.tree.map(lambda x: x, variables['params'])
  ema['logits']['bias'] = ema['logits']['bias'] + np.float32(100) * (np.arange(10) == 3)
  mngr = checkpoints.manager(str(tmp_path / 'ema'))
  checkpoints.save(mngr, 7, {'step': np.int32(7), 'ema_params': ema,
                             'ema_batch_stats': variables['batch_stats'], **variables})
  mngr.wait_until_finished()
  for weights in ('ema', 'auto'):
    p = evaluate.evaluate_checkpoint(config, str(tmp_path / 'ema'), weights=weights)
    assert p.meta['weights'] == 'ema' and np.all(p.probs.argmax(1) == 3)
  raw = evaluate.evaluate_checkpoint(config, str(tmp_path / 'ema'), weights='raw')
  np.testing.assert_array_equal(raw.probs, centre.probs)
  # EMA weights without their statistics (a checkpoint from before they were kept) are refused.
  checkpoints.save(mngr, 8, {'step': np.int32(8), 'ema_params': ema, **variables})
  mngr.wait_until_finished()
  with pytest.raises(errors.InputFileError,
                     match='without the EMA of the BN statistics.*--weights=raw'):
    evaluate.restore_variables(str(tmp_path / 'ema'), weights='auto')


def test_accuracy_never_counts_a_nonfinite_row():
  """predictions.accuracy on hand-made probabilities: a row with a NaN or an inf is wrong wherever
  the label's score stands (NaN compares false: it used to rank first); ties count against the
  label."""
  nan, inf = np.nan, np.inf
  probs = np.array([[nan, nan, nan, nan],  # all NaN
                    [0.1, nan, 0.6, 0.3],  # one NaN, the label 2 highest of the rest
                    [inf, 0.0, 0.0, 0.0],  # inf on the label
                    [0.4, 0.4, 0.2, 0.0],  # the label 1 tied first: top-5 only
                    [0.1, 0.6, 0.2, 0.1]], np.float32)  # right
  p = predictions.Predictions(probs, np.array([0, 2, 0, 1, 1]), np.arange(5), {})
  assert predictions.accuracy(p) == {'top1': 1 / 5, 'top5': 2 / 5}


def test_predictions_file_round_trip(tmp_path):
  """Text ids (TFDS file names) and metadata survive, and the file loads without pickles."""
  p = predictions.Predictions(
      np.eye(3, dtype=np.float32), np.array([0, 1, 2]),
      np.array(['ILSVRC2012_val_00000002.JPEG', 'b.JPEG', 'é.JPEG'], dtype=object),
      {'step': 5, 'crops': '144'})
  predictions.save(str(tmp_path / 'p.npz'), p)
  q = predictions.load(str(tmp_path / 'p.npz'))
  np.testing.assert_array_equal(q.probs, p.probs)
  assert q.ids.tolist() == p.ids.tolist() and q.meta == p.meta
  np.load(tmp_path / 'p.npz', allow_pickle=False)['ids']
  # Through the multi-host path's coding of text ids as bytes.
  np.testing.assert_array_equal(evaluate.allgather_ids(q.ids), q.ids)


def test_resolve_checkpoint(tmp_path):
  wd = str(tmp_path)
  assert evaluate.resolve_checkpoint(wd, 'latest') == (wd, None)
  assert evaluate.resolve_checkpoint(wd, 'all') == (wd, 'all')
  assert evaluate.resolve_checkpoint(wd, '1200') == (wd, 1200)
  assert evaluate.resolve_checkpoint(None, f'{wd}/checkpoints/1200/') == (wd, 1200)
  assert evaluate.resolve_checkpoint(wd, f'{wd}/checkpoints/1200/state') == (wd, 1200)
  with pytest.raises(ValueError, match='not in --workdir'):
    evaluate.resolve_checkpoint('/elsewhere', f'{wd}/checkpoints/1200')
  with pytest.raises(ValueError, match='needs --workdir'):
    evaluate.resolve_checkpoint(None, 'latest')
  with pytest.raises(ValueError, match='checkpoint directory'):
    evaluate.resolve_checkpoint(wd, 'best')


def test_command_line(run, centre, tmp_path):
  """`python -m bn_inception.evaluate --checkpoint=all --output=...`: config.json by default, the
  summary line, the table, and the predictions file (one device here)."""
  _, workdir, _, metrics = run
  output = str(tmp_path / 'val_{step}.npz')
  result = subprocess.run(
      [sys.executable, '-m', 'bn_inception.evaluate', f'--workdir={workdir}', '--checkpoint=all',
       f'--output={output}'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert f'top-1 {100 * metrics["eval_top1"]:.2f}% (error' in result.stdout
  assert '360 examples' in result.stdout and 'paper step' in result.stdout
  p = predictions.load(str(tmp_path / 'val_4.npz'))
  assert p.meta['step'] == 4 and p.meta['config']['model']['width'] == 0.125
  np.testing.assert_array_equal(p.ids, centre.ids)
  np.testing.assert_allclose(p.probs, centre.probs, atol=1e-5)
