"""The TensorFlow-free loader (config.dataset.loader='grain'): Grain over TFDS array_record files,
prepared by TFDS's own imagenet2012 builder from tiny archives in the ImageNet layout. (The entry
points on the Grain loader, on two processes and without TensorFlow: test_multihost.py.)"""

import io
import os
import shutil
import sys
import types

import jax
import numpy as np
from PIL import Image
import pytest

from bn_inception import augment
from bn_inception import data_spec
from bn_inception import errors
from bn_inception import grain_pipeline
from bn_inception import imagenet_archives
from bn_inception import input_pipeline
from imagenet_fixture import grain_config
from imagenet_fixture import grain_imagenet  # noqa: F401  (a pytest fixture)
from imagenet_fixture import tiny_imagenet  # noqa: F401  (a pytest fixture)

def test_first_run_prepares_array_record(grain_imagenet, tmp_path):  # noqa: F811
  os.symlink(grain_imagenet.root / 'manual', tmp_path / 'manual')
  config = grain_config(tmp_path)
  assert input_pipeline.get_info(config) == (1000, 30, 12)  # prepares (TensorFlow, once)
  assert list((tmp_path / 'data').glob('imagenet2012/*/imagenet2012-train.array_record-*'))
  config.manual_dir = None
  assert input_pipeline.get_info(config) == (1000, 30, 12)  # only reads
  missing = grain_config(tmp_path / 'elsewhere', manual_dir=None)
  with pytest.raises(errors.NotFoundError, match='manual_dir is not set'):
    input_pipeline.get_info(missing)


def _train(config, steps, batch=5, **kwargs):
  kwargs = {'seed': 3, 'process_index': 0, 'process_count': 1, **kwargs}
  batches = input_pipeline.train_batches(config, local_batch_size=batch, **kwargs)
  return [next(batches) for _ in range(steps)]


def test_evaluation_sees_every_image_once(grain_imagenet):  # noqa: F811
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


def test_shuffling_modes(grain_imagenet):  # noqa: F811
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
def test_resume_is_exact(grain_imagenet, shuffle):  # noqa: F811
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


@pytest.fixture(scope='module')
def small_photographs():
  """scikit-image's nine colour photographs at a quarter of their size (75-352 pixels a side), as
  JPEGs of ImageNet's typical quality."""
  jpegs = []
  for photo in imagenet_archives.load_photos():
    buffer = io.BytesIO()
    Image.fromarray(photo).resize((photo.shape[1] // 4, photo.shape[0] // 4), Image.BICUBIC).save(
        buffer, format='JPEG', quality=imagenet_archives.PHOTO_QUALITY)
    jpegs.append(buffer.getvalue())
  return jpegs


def _crops(loader, jpegs, crops_per_image=200, size=32):
  """uint8 training crops of each image by one loader's preprocessing (each with its own random
  crop and flip), every image as often."""
  if loader == 'grain':
    return np.stack([grain_pipeline.train_image(data, np.random.default_rng([i, j]), size)
                     for i, data in enumerate(jpegs) for j in range(crops_per_image)])
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from bn_inception import tfds_pipeline  # pylint: disable=g-import-not-at-top
  count = len(jpegs) * crops_per_image
  seeds = np.stack([np.zeros(count, np.int64), np.arange(count)], axis=1)
  ds = tf.data.Dataset.from_tensor_slices((np.repeat(np.array(jpegs, object), crops_per_image),
                                           seeds))
  ds = ds.map(lambda data, seed: tfds_pipeline.train_image(data, seed, size),
              num_parallel_calls=2).batch(count)
  return next(iter(ds)).numpy()


def _channel_statistics(crops, strength):
  """Per-channel mean and std, on the network's [-1, 1], of the crops as the training step sees
  them: colour-distorted on the device at `strength` (the same draws for either loader's crops)."""
  keys = augment.example_keys(jax.random.PRNGKey(0), 0, len(crops))
  images = (augment.distort_colour(crops, keys, strength) * 2 - 1 if strength else
            crops / 127.5 - 1)
  images = np.asarray(images)
  return np.concatenate([images.mean(axis=(0, 1, 2)), images.std(axis=(0, 1, 2))])


# Per-channel mean and std of 1,800 crops of the photographs, in [-1, 1]: grain against tf.data
# differ by 0.005-0.017 (about what two tf.data runs with different seeds differ by, 0.011: crops
# of a photograph differ); the distortions (strength 1 against 0) move them by 0.09.
SAME_DISTRIBUTION_TOLERANCE = 0.03


def test_same_distribution_as_tf_data(small_photographs):
  pytest.importorskip('tensorflow')
  grain_crops, tf_crops = _crops('grain', small_photographs), _crops('tf_data', small_photographs)
  assert grain_crops.dtype == tf_crops.dtype == np.uint8
  grain_statistics = _channel_statistics(grain_crops, 1.0)
  tf_statistics = _channel_statistics(tf_crops, 1.0)
  undistorted = _channel_statistics(tf_crops, 0.0)
  difference = np.abs(grain_statistics - tf_statistics).max()
  effect = np.abs(tf_statistics - undistorted).max()
  assert effect > 2.5 * SAME_DISTRIBUTION_TOLERANCE, effect  # the test can tell
  assert difference < SAME_DISTRIBUTION_TOLERANCE, (difference, effect)


def test_jpegs_decode_to_tensorflows_pixels(small_photographs):
  # TensorFlow's default decoding (the fast integer DCT, fancy upsampling): the accurate DCT would
  # differ by up to 8 levels, Pillow's or the fast upsampling's by more.
  tf = pytest.importorskip('tensorflow')
  for data in small_photographs:
    ours = grain_pipeline.decode(data)
    assert ours.dtype == np.uint8 and ours.shape[2] == 4
    np.testing.assert_array_equal(ours[..., :3], tf.io.decode_jpeg(data, channels=3).numpy())


def test_resampling_is_tensorflows(small_photographs):
  # Bilinear at the output pixels' centres without antialiasing, down and up, as tf.image.resize.
  tf = pytest.importorskip('tensorflow')
  photo = grain_pipeline.decode(small_photographs[5])
  for size in (32, 500):
    ours = grain_pipeline._resample(photo, (0, 0, *photo.shape[:2]), size)
    theirs = tf.image.resize(photo[..., :3], [size, size], method='bilinear').numpy()
    np.testing.assert_allclose(ours, theirs, atol=0.01)
    # Rounded to uint8 as tfds_pipeline.train_image rounds: equal but where TensorFlow's value is
    # within the float difference of a half (truncating would differ at half the pixels).
    rounded = grain_pipeline._resample(photo, (0, 0, *photo.shape[:2]), size, np.uint8)
    differ = rounded != np.round(theirs)
    assert np.all(np.abs(theirs[differ] % 1 - 0.5) < 0.01), theirs[differ]
  # A box inside the image, at fractional pixel edges (as evaluation crops are), against scipy's
  # bilinear interpolation at the output pixels' centres, clamped to the image.
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  top, left, bottom, right = box = (10.5, 3.25, photo.shape[0] - 7.75, photo.shape[1] - 20.5)
  centres = (np.arange(24) + 0.5) / 24
  y, x = np.meshgrid(top + centres * (bottom - top) - 0.5, left + centres * (right - left) - 0.5,
                     indexing='ij')
  theirs = np.stack([ndimage.map_coordinates(photo[..., c].astype(float), [y, x], order=1,
                                             mode='nearest') for c in range(3)], -1)
  np.testing.assert_allclose(grain_pipeline._resample(photo, box, 24), theirs, atol=0.01)


def test_tfrecord_copy_gets_the_conversion_command(tiny_imagenet):  # noqa: F811
  config = tiny_imagenet.config.copy_and_resolve_references()
  config.loader = 'grain'
  command = 'apache-beam.*tensorflow_datasets.scripts.convert_format .*array_record'
  with pytest.raises(errors.InputFileError, match=command):
    input_pipeline.get_info(config)


def test_a_tfrecord_copy_converted_by_tfds_is_read(tiny_imagenet, tmp_path,  # noqa: F811
                                                   monkeypatch):
  # TFDS's own conversion, the one CONVERT_MESSAGE names, adds array_record files beside the
  # tfrecord ones and says so in dataset_info.json. Its module imports Apache Beam for its Beam
  # path only: a stand-in lets the sequential path run here, without installing Beam.
  monkeypatch.setitem(sys.modules, 'apache_beam', types.SimpleNamespace(DoFn=object))
  # pylint: disable-next=g-import-not-at-top
  from tensorflow_datasets.scripts.cli import convert_format_utils
  converted = tmp_path / 'data' / 'imagenet2012' / '5.1.0'
  shutil.copytree(os.path.join(tiny_imagenet.config.data_dir, 'imagenet2012', '5.1.0'), converted)
  convert_format_utils.convert_dataset(out_dir=None, out_file_format='array_record',
                                       dataset_version_dir=[converted], num_workers=1)
  assert list(converted.glob('imagenet2012-train.array_record-*'))
  config = grain_config(tmp_path, manual_dir=None)
  assert input_pipeline.get_info(config) == (1000, 30, 12)
  ids = [i for b in input_pipeline.eval_batches(config, local_batch_size=8, crops='center',
                                                process_index=0, process_count=1)
         for i in b['id'][b['mask']]]
  assert sorted(ids) == sorted(tiny_imagenet.manifest['validation'])
  labels = np.concatenate([b['label'] for b in _train(config, 6)])  # 30 images, each once
  synsets = tiny_imagenet.manifest['train'].values()
  assert sorted(labels) == sorted(tiny_imagenet.label_index[synset] for synset in synsets)


def test_undecodable_image_is_named(grain_imagenet, monkeypatch):  # noqa: F811
  split = grain_pipeline._Split(grain_imagenet.config, 'validation', 'validation')
  example = dict(split.read(3))
  example['image'] = b'\xff\xd8 not a JPEG'
  monkeypatch.setattr(split, 'read', lambda index: example)
  with pytest.raises(errors.InputFileError, match=r"Image 'ILSVRC2012_val_\d+\.JPEG'.*record 3 of"):
    split.decoded(3, lambda data: grain_pipeline.eval_image(data, 32, 'center'))
