"""Input pipeline: crop geometry, exact evaluation, digits, synthetic, and TFDS's real imagenet2012
builder on tiny archives in the ImageNet layout (tests/imagenet_fixture.py)."""

import ast
import collections
import glob
import graphlib
import io
import itertools
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from bn_inception import data_spec
from bn_inception import input_pipeline
from bn_inception import train
from configs import default
from imagenet_fixture import tiny_imagenet  # noqa: F401  (a pytest fixture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digits_config(**overrides):
  config = default.get_config('digits').dataset
  config.update(overrides)
  return config


def _all_hosts(config, local_batch_size, process_count, **kwargs):
  """Every simulated host's evaluation batches."""
  return [list(input_pipeline.eval_batches(config, local_batch_size=local_batch_size,
                                           process_index=i, process_count=process_count, **kwargs))
          for i in range(process_count)]


def _check_exactly_once(hosts, expected_ids, local_batch_size):
  num_batches = data_spec.num_eval_batches(len(expected_ids), local_batch_size, len(hosts))
  assert [len(batches) for batches in hosts] == [num_batches] * len(hosts)
  ids = [batch['id'][batch['mask']] for batches in hosts for batch in batches]
  ids = np.concatenate(ids).tolist()
  assert sorted(ids) == sorted(expected_ids)  # every example, each once
  for batch in (batch for batches in hosts for batch in batches):
    assert batch['mask'].shape == batch['label'].shape == batch['id'].shape == (local_batch_size,)


def _png(pixels):
  buffer = io.BytesIO()
  Image.fromarray(pixels.astype(np.uint8)).save(buffer, format='PNG')
  return buffer.getvalue()


def _ramp(height, width, x_scale=1, y_scale=1):
  """An image whose red channel is x_scale * column and green channel y_scale * row."""
  y, x = np.mgrid[0:height, 0:width]
  return np.stack([x * x_scale, y * y_scale, np.zeros_like(x)], axis=-1)


# ---------------------------------------------------------------------------------------------------
# Crop geometry
# ---------------------------------------------------------------------------------------------------

def test_num_crops():
  assert [data_spec.num_crops(c) for c in ('center', '10', '144')] == [1, 10, 126]
  with pytest.raises(ValueError, match='144'):
    data_spec.num_crops('12')


def _googlenet_144_crops(height, width):
  """GoogLeNet's 144 crops, literally, as (boxes [144, 4] in pixels of the image, mirrored [144]):
  resize the shorter side to each scale; take the left, centre and right (top, centre, bottom)
  squares; from each, the 4 corner and the centre 224-crops and the whole square; mirror them all."""
  boxes = []
  short, long = min(height, width), max(height, width)
  for scale in (256, 288, 320, 352):
    factor = scale / short
    for along in (0, (long * factor - scale) / 2, long * factor - scale):
      square = (0, along) if width >= height else (along, 0)
      inside = [(0, 0, 224), (0, scale - 224, 224), (scale - 224, 0, 224),
                (scale - 224, scale - 224, 224), ((scale - 224) / 2, (scale - 224) / 2, 224),
                (0, 0, scale)]
      for y, x, side in inside:
        top, left = square[0] + y, square[1] + x
        boxes.append(np.array([top, left, top + side, left + side]) / factor)
  return np.concatenate([boxes, boxes]), np.arange(144) >= 72


def _crop_counts(boxes, mirrored, counts):
  """{(box rounded to 1e-6 pixel, mirrored): how many crops it stands for}."""
  result = collections.Counter()
  for box, flip, count in zip(boxes, mirrored, counts):
    result[(*np.round(box, 6), bool(flip))] += int(round(count))
  return result


@pytest.mark.parametrize('height,width', [(300, 400), (400, 300), (250, 250)])
def test_144_crops_are_googlenets_each_computed_once(height, width):
  boxes, mirrored = data_spec.crop_boxes(height, width, '144')
  weights = data_spec.crop_weights('144')
  assert boxes.shape == (126, 4) and mirrored.shape == weights.shape == (126,)
  assert weights.dtype == np.float32 and np.sum(weights) == pytest.approx(1, rel=1e-6)
  # The computed crops, each counted for weight x 144 crops, are GoogLeNet's 144: the whole squares
  # (the same box at every scale) count for 4, the others for 1.
  expected = _googlenet_144_crops(height, width)
  assert _crop_counts(boxes, mirrored, weights * 144) == _crop_counts(*expected, np.ones(144))
  assert sorted(np.unique(np.round(weights * 144, 4))) == [1, 4]
  assert boxes.min() >= 0 and boxes[:, 2].max() <= height + 1e-9 and boxes[:, 3].max() <= width + 1e-9


class Pixels(nn.Module):
  """Logits from every pixel, large enough that different crops give different answers."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(10, kernel_init=nn.initializers.normal(0.1))(x.reshape(x.shape[0], -1))


def test_144_crop_average_is_googlenets_average_over_144():
  """train.predict with the weights of the 126 computed crops gives the mean over GoogLeNet's 144
  crops (duplicates included) that the evaluation computed before, to float rounding."""
  from bn_inception import tfds_pipeline  # pylint: disable=g-import-not-at-top
  height, width, size = 60, 80, 16
  pixels = np.random.default_rng(0).uniform(0, 255, (height, width, 3))
  crops = tfds_pipeline.eval_image(_png(pixels), size, '144').numpy()
  model = Pixels()
  variables = model.init(jax.random.key(0), crops[:1])
  weighted = train.predict(model, variables, crops[None], crop_weights=data_spec.crop_weights('144'))
  # GoogLeNet's 144 crops, duplicates included: for each, the computed crop of the same box.
  boxes, mirrored = data_spec.crop_boxes(height, width, '144')
  expected_boxes, expected_mirrored = _googlenet_144_crops(height, width)
  same = (np.abs(expected_boxes[:, None] - boxes[None]).max(axis=2) < 1e-9) & (
      expected_mirrored[:, None] == mirrored[None])
  assert (same.sum(axis=1) == 1).all()
  all_144 = crops[same.argmax(axis=1)]
  expected = np.mean(jax.nn.softmax(model.apply(variables, all_144)), axis=0)
  assert np.ptp(jax.nn.softmax(model.apply(variables, crops)), axis=0).max() > 0.1  # crops differ
  np.testing.assert_allclose(weighted[0], expected, rtol=1e-5, atol=1e-7)


def test_10_crops_and_center_crop():
  boxes, mirrored = data_spec.crop_boxes(300, 400, '10')
  side = 300 * 0.875
  corners = [(0, 0), (0, 400 - side), (300 - side, 0), (300 - side, 400 - side),
             ((300 - side) / 2, (400 - side) / 2)]
  expected = [(y, x, y + side, x + side) for y, x in corners]
  np.testing.assert_allclose(boxes, expected + expected)
  np.testing.assert_array_equal(mirrored, np.arange(10) >= 5)
  boxes, mirrored = data_spec.crop_boxes(300, 400, 'center')
  np.testing.assert_allclose(boxes, [expected[4]])
  assert not mirrored.any()


@pytest.mark.parametrize('crops', ['center', '10', '144'])
def test_eval_crops_sample_their_boxes_and_flips_flip(crops):
  from bn_inception import tfds_pipeline  # pylint: disable=g-import-not-at-top
  height, width, size = 60, 80, 32
  image = tfds_pipeline.eval_image(_png(_ramp(height, width, 3, 4)), size, crops).numpy()
  assert image.shape == (data_spec.num_crops(crops), size, size, 3)
  pixels = (image + 1) * 127.5
  boxes, mirrored = data_spec.crop_boxes(height, width, crops)
  for crop, (top, left, bottom, right), flip in zip(pixels, boxes, mirrored):
    # Bilinear sampling of a ramp returns the coordinates sampled: the output pixels' centres.
    j = np.arange(size) + 0.5
    x = left + j * (right - left) / size - 0.5
    y = top + j * (bottom - top) / size - 0.5
    np.testing.assert_allclose(crop[0, :, 0], 3 * (x[::-1] if flip else x), atol=0.02)
    np.testing.assert_allclose(crop[:, 0, 1], 4 * y, atol=0.02)


def _windows(shape, seeds):
  """Training crop windows (top, left, height, width) for an image shape, one per seed."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from bn_inception import tfds_pipeline  # pylint: disable=g-import-not-at-top
  return np.array([tfds_pipeline._random_window(tf.constant([seed, 0], tf.int64))(
      tf.constant(shape, tf.int32)).numpy() for seed in seeds])


def test_train_crop_windows():
  top, left, height, width = _windows((60, 80, 3), range(100)).T
  assert (top >= 0).all() and (left >= 0).all()
  assert (top + height <= 60).all() and (left + width <= 80).all()
  area = height * width / (60 * 80)
  aspect = width / height
  assert area.min() >= 0.08 and area.max() <= 1
  assert aspect.min() >= 0.75 * 0.95 and aspect.max() <= 4 / 3 * 1.05  # whole pixels bend it
  assert area.max() - area.min() > 0.5 and len(set(top)) > 10  # crops vary in size and place
  # No 8% crop of aspect 3/4-4/3 fits a 16 x 400 image: it gets the (whole-pixel) centre crop.
  np.testing.assert_array_equal(_windows((16, 400, 3), range(5)), [[1, 193, 14, 14]] * 5)
  for shape in ((3, 4, 1), (1, 1, 3)):  # tiny images still give at least a pixel
    top, left, height, width = _windows(shape, range(10)).T
    assert (height >= 1).all() and (width >= 1).all()
    assert (top + height <= shape[0]).all() and (left + width <= shape[1]).all()


def test_train_image_is_its_window_resized_and_maybe_mirrored():
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from bn_inception import tfds_pipeline  # pylint: disable=g-import-not-at-top
  pixels = _ramp(90, 120, 2, 2)
  flips = 0
  for seed in range(16):
    example_seed = tf.constant([seed, 0], tf.int64)
    image = tfds_pipeline.train_image(_png(pixels), example_seed, 24).numpy()
    assert image.dtype == np.uint8  # undistorted pixels: the training step distorts (augment)
    crop_seed = tf.random.experimental.stateless_split(example_seed, 2)[0]  # as train_image does
    top, left, height, width = tfds_pipeline._random_window(crop_seed)(
        tf.constant([90, 120, 3])).numpy()
    expected = np.round(tf.image.resize(pixels[top:top + height, left:left + width],
                                        [24, 24]).numpy())
    flipped = not np.array_equal(image, expected)
    np.testing.assert_array_equal(image, expected[:, ::-1] if flipped else expected)
    flips += flipped
  assert 3 <= flips <= 13  # about half are mirrored


# ---------------------------------------------------------------------------------------------------
# digits and synthetic (no TensorFlow)
# ---------------------------------------------------------------------------------------------------

def test_digits_split_is_fixed():
  images, labels, train, test = input_pipeline._digits(32)
  assert images.shape == (1797, 32, 32, 3) and images.dtype == np.float32
  assert images.min() == -1 and images.max() == 1
  np.testing.assert_array_equal(images[..., 0], images[..., 2])  # grey, as RGB
  assert (len(train), len(test)) == (1437, 360)
  assert sorted(np.concatenate([train, test]).tolist()) == list(range(1797))
  assert np.bincount(labels[test]).min() >= 35  # stratified
  # The same split on every machine (sklearn's stratified split with random_state=0).
  np.testing.assert_array_equal(test[:6], [21, 24, 28, 34, 35, 37])
  assert input_pipeline.get_info(_digits_config()) == (10, 1437, 360)


def test_digits_training_epochs_and_resume():
  config = _digits_config()
  batches = input_pipeline.train_batches(config, local_batch_size=479, seed=1)  # 3 per epoch
  epoch = [next(batches) for _ in range(4)]
  assert epoch[0]['image'].shape == (479, 32, 32, 3) and epoch[0]['label'].dtype == np.int32
  _, labels, train, _ = input_pipeline._digits(32)
  assert np.array_equal(np.sort(np.concatenate([b['label'] for b in epoch[:3]])),
                        np.sort(labels[train]))
  assert not np.array_equal(epoch[0]['label'], epoch[3]['label'])  # the next epoch reshuffles
  resumed = next(input_pipeline.train_batches(config, local_batch_size=479, seed=1, start_step=3))
  np.testing.assert_array_equal(resumed['image'], epoch[3]['image'])
  # Three hosts with a third of the batch each see the same global batch as one host.
  hosts = [next(input_pipeline.train_batches(config, local_batch_size=100, seed=1, start_step=2,
                                             process_index=i, process_count=3)) for i in range(3)]
  single = next(input_pipeline.train_batches(config, local_batch_size=300, seed=1, start_step=2))
  np.testing.assert_array_equal(np.concatenate([h['label'] for h in hosts]), single['label'])


@pytest.mark.parametrize('local_batch_size,process_count',
                         [(1, 1), (7, 8), (32, 3), (45, 8), (360, 1), (500, 2)])
def test_digits_eval_covers_every_example_once(local_batch_size, process_count):
  config = _digits_config()
  hosts = _all_hosts(config, local_batch_size, process_count)
  _check_exactly_once(hosts, input_pipeline._digits(32)[3].tolist(), local_batch_size)
  assert hosts[0][0]['image'].shape == (local_batch_size, 1, 32, 32, 3)


def test_eval_batches_shard_over_8_devices():
  assert jax.device_count() == 8
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ('data',))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  count = 0
  for batch in input_pipeline.eval_batches(_digits_config(), local_batch_size=48):
    count += int(jnp.sum(jax.device_put(batch['mask'], sharding)))
  assert count == 360


def test_digits_has_only_whole_image_evaluation():
  with pytest.raises(ValueError, match='center'):
    input_pipeline.eval_batches(_digits_config(), local_batch_size=8, crops='144')


def test_synthetic():
  config = _digits_config(name='synthetic', image_size=16)
  assert input_pipeline.get_info(config) == input_pipeline.SYNTHETIC_INFO
  batches = input_pipeline.train_batches(config, local_batch_size=4, seed=0)
  first, second = next(batches), next(batches)
  assert first['image'] is second['image']  # one batch, already on the device
  assert first['image'].shape == (4, 16, 16, 3) and first['label'].shape == (4,)
  assert -1 <= float(first['image'].min()) and float(first['image'].max()) <= 1
  hosts = _all_hosts(config, 64, 3, crops='10')
  _check_exactly_once(hosts, list(range(1000)), 64)
  assert hosts[0][0]['image'].shape == (64, 10, 16, 16, 3)


def test_tensorflow_is_imported_only_for_tfds():
  code = """if True:
      import sys
      from bn_inception import input_pipeline
      from configs import default
      for name in ('digits', 'synthetic'):
        config = default.get_config('digits').dataset
        config.name = name
        input_pipeline.get_info(config)
        next(input_pipeline.train_batches(config, local_batch_size=2, seed=0))
        next(input_pipeline.eval_batches(config, local_batch_size=2))
      assert 'tensorflow' not in sys.modules, 'TensorFlow was imported'
  """
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO, env=env, timeout=120)


def test_no_module_imports_one_that_imports_it():
  """No import cycles in bn_inception, counting imports inside functions (the pipeline's lazy
  import of tfds_pipeline included)."""
  graph = {}
  for path in glob.glob(os.path.join(REPO, 'bn_inception', '*.py')):
    imported = set()
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.ImportFrom) and node.module == 'bn_inception':
        imported.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('bn_inception.'):
        imported.add(node.module.split('.')[1])
      elif isinstance(node, ast.Import):
        imported.update(alias.name.split('.')[1] for alias in node.names
                        if alias.name.startswith('bn_inception.'))
    graph[os.path.basename(path)[:-3]] = imported
  assert 'input_pipeline' in graph['evaluate'] and 'tfds_pipeline' in graph['input_pipeline']
  tuple(graphlib.TopologicalSorter(graph).static_order())  # raises graphlib.CycleError


# ---------------------------------------------------------------------------------------------------
# TFDS: imagenet2012 from tiny archives in the real layout, prepared by TFDS's own builder
# ---------------------------------------------------------------------------------------------------

def test_tiny_imagenet_counts_labels_and_shapes(tiny_imagenet):  # noqa: F811
  config = tiny_imagenet.config
  assert input_pipeline.get_info(config) == (1000, 30, 12)
  val = tiny_imagenet.manifest['validation']
  for crops in ('center', '10', '144'):
    batches = list(input_pipeline.eval_batches(config, local_batch_size=5, crops=crops,
                                               process_index=0, process_count=1))
    assert len(batches) == 3
    image = np.concatenate([b['image'] for b in batches])
    assert image.shape == (15, data_spec.num_crops(crops), 32, 32, 3)
    assert image.dtype == np.float32 and image.min() >= -1 and image.max() <= 1
  ids = np.concatenate([b['id'][b['mask']] for b in batches])
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  assert sorted(ids) == sorted(val)
  # TFDS labels validation images with the lines of its validation_labels.txt.
  assert labels.tolist() == [tiny_imagenet.label_index[val[i]] for i in ids]
  assert np.ptp(image[:12].reshape(12, -1), axis=1).min() > 0  # every odd image decoded to pixels


@pytest.mark.parametrize('shuffle', ['light', 'thorough'])
def test_tiny_imagenet_training(tiny_imagenet, shuffle):  # noqa: F811
  config = tiny_imagenet.config.copy_and_resolve_references()
  config.shuffle = shuffle
  batches = input_pipeline.train_batches(config, local_batch_size=5, seed=3, process_index=0,
                                         process_count=1)
  run = [next(batches) for _ in range(9)]  # 1.5 epochs of 30 images
  assert run[0]['image'].shape == (5, 32, 32, 3) and run[0]['image'].dtype == np.uint8
  assert run[0]['label'].dtype == np.int32
  # The first epoch is every training image once (all 30, odd ones included).
  expected = [tiny_imagenet.label_index[s] for s in tiny_imagenet.manifest['train'].values()]
  assert sorted(np.concatenate([b['label'] for b in run[:6]])) == sorted(expected)
  # Resuming at any step continues bit for bit, across the epoch boundary too.
  for start_step in (2, 5):
    resumed = input_pipeline.train_batches(config, local_batch_size=5, seed=3,
                                           start_step=start_step, process_index=0, process_count=1)
    for expected_batch in run[start_step:start_step + 3]:
      batch = next(resumed)
      np.testing.assert_array_equal(batch['image'], expected_batch['image'])
      np.testing.assert_array_equal(batch['label'], expected_batch['label'])
  other_seed = next(input_pipeline.train_batches(config, local_batch_size=5, seed=4,
                                                 process_index=0, process_count=1))
  assert not np.array_equal(other_seed['image'], run[0]['image'])


def _stream(config, shuffle, seed, count):
  """The first `count` records of the training stream as (file, index in the file) pairs, the
  files' stored order read independently of the pipeline."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from bn_inception import tfds_pipeline  # pylint: disable=g-import-not-at-top
  instructions = tfds_pipeline.prepared_builder(config).info.splits['train'].file_instructions
  stored = {}
  for file in sorted({i.filename for i in instructions}):
    for index, record in enumerate(tf.data.TFRecordDataset(file).as_numpy_iterator()):
      stored[record] = (os.path.basename(file), index)
  records = tfds_pipeline._train_records(instructions, data_spec.SHUFFLE[shuffle],
                                         tf.constant([seed, 0], tf.int64), 0)
  return [stored[record] for record in records.take(count).as_numpy_iterator()]


def _batch_mates(epoch, batch_size=5):
  """The pairs of examples that share a mini-batch."""
  return {frozenset(pair) for start in range(0, len(epoch), batch_size)
          for pair in itertools.combinations(epoch[start:start + batch_size], 2)}


def test_light_shuffling_keeps_files_in_stored_order_thorough_mixes_them(tiny_imagenet):  # noqa: F811
  """Paper section 4.2.1, change 6. Without within-shard shuffling (Inception, BN-Baseline) every
  file is read in its stored order, the files in a new order every epoch, so the same examples
  share mini-batches epoch after epoch; "within-shard shuffling" ('thorough') prevents that."""
  n, epochs = 30, 4  # 3 files of 10
  streams = {shuffle: _stream(tiny_imagenet.config, shuffle, seed=0, count=epochs * n)
             for shuffle in ('light', 'thorough')}
  kept_together = {}
  for shuffle, stream in streams.items():
    per_epoch = [stream[i:i + n] for i in range(0, epochs * n, n)]
    for epoch in per_epoch:
      assert sorted(epoch) == sorted(per_epoch[0]) and len(set(epoch)) == n  # every example once
    # Of the 60 pairs that share a batch of 5 in one epoch, the share that do in the next.
    kept_together[shuffle] = np.mean([len(_batch_mates(a) & _batch_mates(b)) / len(_batch_mates(a))
                                      for a, b in zip(per_epoch, per_epoch[1:])])
    if shuffle == 'light':
      file_orders = set()
      for epoch in per_epoch:
        files = [file for file, _ in itertools.groupby(epoch, key=lambda example: example[0])]
        assert len(files) == len(set(files)) == 3  # each file read in one go ...
        in_order = sorted(epoch, key=lambda example: (files.index(example[0]), example[1]))
        assert epoch == in_order  # ... in its stored order
        file_orders.add(tuple(files))
      assert len(file_orders) > 1  # a new order of the files
  # Light: files of 10 fill whole batches of 5, so every pair stays; thorough: about 4/29 do.
  assert kept_together['light'] > 0.9 and kept_together['thorough'] < 0.3, kept_together


def test_tiny_imagenet_training_hosts_split_the_data(tiny_imagenet):  # noqa: F811
  labels = collections.Counter()
  for i in range(2):
    batches = input_pipeline.train_batches(tiny_imagenet.config, local_batch_size=5, seed=0,
                                           process_index=i, process_count=2)
    labels.update(np.concatenate([next(batches)['label'] for _ in range(3)]).tolist())
  expected = [tiny_imagenet.label_index[s] for s in tiny_imagenet.manifest['train'].values()]
  assert labels == collections.Counter(expected)


@pytest.mark.parametrize('local_batch_size,process_count', [(1, 8), (5, 3), (16, 1), (2, 5)])
def test_tiny_imagenet_eval_covers_every_example_once(tiny_imagenet, local_batch_size,  # noqa: F811
                                                      process_count):
  hosts = _all_hosts(tiny_imagenet.config, local_batch_size, process_count)
  _check_exactly_once(hosts, list(tiny_imagenet.manifest['validation']), local_batch_size)


def test_tiny_imagenet_eval_on_a_host_without_examples(tiny_imagenet):  # noqa: F811
  batches = list(input_pipeline.eval_batches(tiny_imagenet.config, local_batch_size=2,
                                             process_index=12, process_count=13))
  assert len(batches) == 1 and not batches[0]['mask'].any()
  assert batches[0]['image'].shape == (2, 1, 32, 32, 3)


def test_prepares_imagenet_from_manual_dir(tiny_imagenet, tmp_path):  # noqa: F811
  config = tiny_imagenet.config.copy_and_resolve_references()
  config.data_dir = os.fspath(tmp_path / 'prepared')
  assert input_pipeline.get_info(config) == (1000, 30, 12)
  config.manual_dir = None  # prepared: the archives are no longer needed
  assert input_pipeline.get_info(config) == (1000, 30, 12)


def test_missing_imagenet_says_what_to_download(tmp_path):
  config = default.get_config().dataset
  config.data_dir = os.fspath(tmp_path / 'data')
  with pytest.raises(FileNotFoundError) as error:
    input_pipeline.get_info(config)
  for words in ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar', 'image-net.org',
                '--config.dataset.manual_dir=DIR', 'manual_dir is not set'):
    assert words in str(error.value)
  config.manual_dir = os.fspath(tmp_path)
  with pytest.raises(FileNotFoundError, match='lacks ILSVRC2012_img_train.tar and ILSVRC2012_img_v'):
    input_pipeline.get_info(config)


def test_unknown_dataset_lists_the_valid_names():
  config = _digits_config(name='no_such_dataset')
  with pytest.raises(ValueError) as error:
    input_pipeline.get_info(config)
  for words in ('digits', 'synthetic', 'imagenet2012', 'any TFDS image-classification'):
    assert words in str(error.value)
