"""The TensorFlow-free loader (config.dataset.loader='grain'): Grain over TFDS array_record files,
prepared by TFDS's own imagenet2012 builder from tiny archives in the ImageNet layout."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from bn_inception import data_spec
from bn_inception import errors
from bn_inception import grain_pipeline
from bn_inception import input_pipeline
from configs import default
from imagenet_fixture import tiny_imagenet  # noqa: F401  (a pytest fixture)
from imagenet_fixture import write_archives

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(root, **overrides):
  config = default.get_config().dataset
  config.update({'data_dir': os.fspath(root / 'data'), 'manual_dir': os.fspath(root / 'manual'),
                 'image_size': 32, 'loader': 'grain', **overrides})
  return config


@pytest.fixture(scope='module')
def grain_imagenet(tmp_path_factory):
  """The fixture's archives prepared as array_record by TFDS's builder, in several files."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('grain_imagenet')
  manifest = write_archives(root / 'manual')
  tfds.builder('imagenet2012', data_dir=os.fspath(root / 'data'),
               file_format='array_record').download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(root / 'manual'),
                                                   num_shards=3))
  return types.SimpleNamespace(config=_config(root), manifest=manifest, root=root)


def test_first_run_prepares_array_record(grain_imagenet, tmp_path):
  os.symlink(grain_imagenet.root / 'manual', tmp_path / 'manual')
  config = _config(tmp_path)
  assert input_pipeline.get_info(config) == (1000, 30, 12)  # prepares (TensorFlow, once)
  assert list((tmp_path / 'data').glob('imagenet2012/*/imagenet2012-train.array_record-*'))
  config.manual_dir = None
  assert input_pipeline.get_info(config) == (1000, 30, 12)  # only reads
  missing = _config(tmp_path / 'elsewhere', manual_dir=None)
  with pytest.raises(errors.NotFoundError, match='manual_dir is not set'):
    input_pipeline.get_info(missing)


def _train(config, steps, batch=5, **kwargs):
  kwargs = {'seed': 3, 'process_index': 0, 'process_count': 1, **kwargs}
  batches = input_pipeline.train_batches(config, local_batch_size=batch, **kwargs)
  return [next(batches) for _ in range(steps)]


def test_training_and_evaluation_run_where_tensorflow_cannot_be_imported(grain_imagenet,
                                                                         tmp_path):
  blocker = tmp_path / 'no_tensorflow'
  blocker.mkdir()
  (blocker / 'tensorflow.py').write_text('raise ImportError("TensorFlow is not installed")\n')
  workdir = tmp_path / 'run'
  config = grain_imagenet.config
  args = [sys.executable, '-m', 'bn_inception.main', '--config=configs/default.py',
          f'--workdir={workdir}', f'--config.dataset.data_dir={config.data_dir}',
          '--config.dataset.loader=grain', '--config.dataset.image_size=32',
          '--config.model.width=0.125', '--config.batch_size=4', '--config.model.bn_group_size=2',
          '--config.num_train_steps=2', '--config.eval_every_steps=2',
          '--config.log_every_steps=1', '--config.checkpoint_every_steps=2']
  env = dict(os.environ, XLA_FLAGS='', JAX_DISABLE_MOST_OPTIMIZATIONS='1',
             PYTHONPATH=os.pathsep.join([os.fspath(blocker), REPO]))
  run = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                       check=False)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  metrics = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert any(any(key.startswith('eval') for key in m) for m in metrics), metrics


def test_evaluation_sees_every_image_once(grain_imagenet):
  config = grain_imagenet.config
  expected = sorted(grain_imagenet.manifest['validation'])
  for process_count, local_batch_size in ((1, 8), (2, 8), (3, 8)):
    ids, batches = [], set()
    for process_index in range(process_count):
      host = list(input_pipeline.eval_batches(config, local_batch_size=local_batch_size,
                                              crops='10', process_index=process_index,
                                              process_count=process_count))
      batches.add(len(host))
      for batch in host:
        assert batch['image'].shape == (local_batch_size, 10, 32, 32, 3)
        assert not batch['image'][~batch['mask']].any()
        ids += batch['id'][batch['mask']].tolist()
    assert len(batches) == 1  # every host yields as many batches
    assert sorted(ids) == expected


def test_shuffling_modes(grain_imagenet):
  files = grain_pipeline._Split(grain_imagenet.config, 'train', 'train').files
  assert len(files) == 3
  light = grain_pipeline.epoch_order(files, data_spec.SHUFFLE['light'], 3, 0, 0)
  # Light: every file read whole, in its stored order; a new file order in another epoch.
  runs = np.split(light, np.flatnonzero(np.diff(light) != 1) + 1)
  assert sorted((run[0], len(run)) for run in runs) == [(first, take) for _, first, take in files]
  orders = {tuple(grain_pipeline.epoch_order(files, data_spec.SHUFFLE['light'], 3, 0, epoch)[::10])
            for epoch in range(6)}
  assert len(orders) > 1
  # Thorough: the examples of different files mixed, every one once per epoch.
  thorough = grain_pipeline.epoch_order(files, data_spec.SHUFFLE['thorough'], 3, 0, 0)
  assert sorted(thorough) == list(range(30))
  assert np.sum(np.diff(thorough) == 1) < 10
  # And the training batches follow that order: labels in the stored order of the files.
  source = grain_pipeline._Split(grain_imagenet.config, 'train', 'train').source
  labels = np.concatenate([b['label'] for b in _train(grain_imagenet.config, 6)])
  assert labels.tolist() == [source[int(i)]['label'] for i in light]


@pytest.mark.parametrize('shuffle', ['light', 'thorough'])
def test_resume_is_exact(grain_imagenet, shuffle):
  config = grain_imagenet.config.copy_and_resolve_references()
  config.shuffle = shuffle
  run = _train(config, 9)  # 1.5 epochs of 30 images
  for start_step in (2, 5):
    for expected, batch in zip(run[start_step:], _train(config, 3, start_step=start_step)):
      np.testing.assert_array_equal(batch['image'], expected['image'])
      np.testing.assert_array_equal(batch['label'], expected['label'])
  # Two hosts read disjoint shares, each resumable.
  hosts = [_train(config, 3, batch=3, process_index=i, process_count=2) for i in range(2)]
  assert not np.array_equal(hosts[0][0]['image'], hosts[1][0]['image'])
  resumed = _train(config, 1, batch=3, start_step=2, process_index=1, process_count=2)
  np.testing.assert_array_equal(resumed[0]['image'], hosts[1][2]['image'])


def test_crop_windows_follow_tensorflows_distribution():
  tf = pytest.importorskip('tensorflow')
  height, width, n = 300, 400, 2000
  rng = np.random.default_rng(0)
  ours = np.array([data_spec.random_window(rng, height, width)[2:] for _ in range(n)], float)
  theirs = []
  for i in range(n):
    _, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        [height, width, 3], tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]), seed=[i, 0],
        min_object_covered=0.0, area_range=data_spec.AREA_RANGE,
        aspect_ratio_range=data_spec.ASPECT_RATIO_RANGE, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    theirs.append(size.numpy()[:2])
  theirs = np.array(theirs, float)
  for windows in (ours, theirs):
    assert windows[:, 0].max() <= height and windows[:, 1].max() <= width
  area = [w[:, 0] * w[:, 1] / (height * width) for w in (ours, theirs)]
  aspect = [np.log(w[:, 1] / w[:, 0]) for w in (ours, theirs)]
  for a, b in (area, aspect):
    np.testing.assert_allclose(np.quantile(a, [0.1, 0.5, 0.9]), np.quantile(b, [0.1, 0.5, 0.9]),
                               atol=0.03)


def _pixel_statistics(config, loader, strength, epochs=4):
  config = config.copy_and_resolve_references()
  config.update(loader=loader, distortion_strength=strength)
  images = np.concatenate([b['image'] for b in _train(config, 6 * epochs)])
  per_image = images.mean(axis=(1, 2))  # [n, 3]
  return np.concatenate([images.mean(axis=(0, 1, 2)), images.std(axis=(0, 1, 2)),
                         per_image.std(axis=0)])


def test_same_distribution_as_tf_data(grain_imagenet, tiny_imagenet):  # noqa: F811
  pytest.importorskip('tensorflow')
  # The same archives (write_archives' default seed), read by each loader from its own copy.
  grain_stats = _pixel_statistics(grain_imagenet.config, 'grain', 1.0)
  tf_stats = _pixel_statistics(tiny_imagenet.config, 'tf_data', 1.0)
  undistorted = _pixel_statistics(grain_imagenet.config, 'grain', 0.0)
  difference = np.abs(grain_stats - tf_stats).max()
  effect = np.abs(grain_stats - undistorted).max()
  assert difference < effect / 2, (difference, effect)


def test_tfrecord_copy_gets_the_conversion_command(tiny_imagenet):  # noqa: F811
  config = tiny_imagenet.config.copy_and_resolve_references()
  config.loader = 'grain'
  with pytest.raises(errors.InputFileError, match='tfds convert_format .*array_record'):
    input_pipeline.get_info(config)


def test_undecodable_image_is_named(grain_imagenet, monkeypatch):
  split = grain_pipeline._Split(grain_imagenet.config, 'validation', 'validation')
  example = dict(split.read(3))
  example['image'] = b'\xff\xd8 not a JPEG'
  monkeypatch.setattr(split, 'read', lambda index: example)
  with pytest.raises(errors.InputFileError, match=r"Image 'ILSVRC2012_val_\d+\.JPEG'.*record 3 of"):
    split.decoded(3, lambda data: grain_pipeline.eval_image(data, 32, 'center'))
