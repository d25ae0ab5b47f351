"""Input pipeline: data sets by name, Inception-style training crops, exact multi-crop evaluation.

Data sets (`config.dataset.name`), from the registry `DATASETS`:

  imagenet2012  TFDS, prepared once from the manually downloaded ILSVRC2012_img_{train,val}.tar
  any other TFDS image-classification data set (e.g. imagenette), downloaded by TFDS itself
  digits        scikit-learn's bundled 8 x 8 handwritten digits, upscaled; numpy, no TensorFlow
  synthetic     random images and labels made on the device, for benchmarks and smoke runs

TFDS data sets live in `tfds_pipeline.py`, the only module that imports TensorFlow, and only when
such a data set is used. This module holds the interface and what all data sets share: the crop
geometry and the arithmetic of exact evaluation.

`train_batches` is an endless iterator over this host's part of each global batch, deterministic in
(seed, start_step): a run resumed at step k sees exactly the batches k, k+1, ... of an uninterrupted
run. `eval_batches` yields every example of the split exactly once over all hosts, padded so that all
hosts yield the same number of batches; `mask` is False on the padding and `id` names each example.
"""

import functools
import itertools
from typing import Callable, Iterator, NamedTuple

import jax
import numpy as np

from bn_inception import errors


class DatasetInfo(NamedTuple):
  num_classes: int
  num_train_examples: int
  num_eval_examples: int


class Shuffle(NamedTuple):
  """How thoroughly training shuffles TFDS data (config.dataset.shuffle; tfds_pipeline)."""
  files: int  # read together, interleaved example by example
  buffer: int  # examples in the shuffle buffer


# 'light': the original Inception recipe: files in random order, one at a time, a small buffer, so
# examples that share a file also share mini-batches, every epoch. 'thorough' (paper section 4.2.1,
# "within-shard shuffling"): 16 files interleaved and a buffer as large as most of them, so batches
# mix examples from different files in a new combination every epoch. On ImageNet (1024 files of
# ~1250 examples, ~110 kB each) the thorough buffer holds ~1.8 GB, twice while the next chunk fills.
SHUFFLE = {'light': Shuffle(files=1, buffer=1_024), 'thorough': Shuffle(files=16, buffer=16_384)}


# ---------------------------------------------------------------------------------------------------
# Crop geometry
# ---------------------------------------------------------------------------------------------------

# GoogLeNet's multi-crop scales (shorter side) for 224-pixel crops. Other image sizes scale them with
# the crop, so every crop covers the same fraction of its square: 224/256 ... 224/352.
MULTI_CROP_SCALES = (256, 288, 320, 352)
CENTER_FRACTION = 224 / 256  # 0.875: the single centre crop and the 10 crops, of the shorter side
NUM_CROPS = {'center': 1, '10': 10, '144': 144}


def num_crops(crops: str) -> int:
  if crops not in NUM_CROPS:
    raise errors.ConfigError(f'Unknown eval crops {crops!r}; valid: {list(NUM_CROPS)}.')
  return NUM_CROPS[crops]


def _crop(vertical, horizontal, offset_y, offset_x, side):
  """Rows of the crop matrix for one box (see `crop_geometry`)."""
  top = (vertical, 0, offset_y)
  left = (0, horizontal, offset_x)
  return (top, left, (vertical, 0, offset_y + side), (0, horizontal, offset_x + side))


@functools.cache
def crop_geometry(crops: str) -> tuple[np.ndarray, np.ndarray]:
  """The evaluation crops as linear maps of the image size, and which of them are mirrored.

  Returns (matrices [n, 4, 3], mirrored [n] bool): crop i is the box
  (top, left, bottom, right) = matrices[i] @ (height - short, width - short, short) in pixels of the
  original image, short = min(height, width). One of the first two entries is always 0, so the same
  matrix gives the left/centre/right squares of a landscape image and the top/centre/bottom squares
  of a portrait one. Boxes do not depend on the output size: the scales grow with it.

  'center': the centred square of 0.875 x the shorter side (resize to 256, crop 224).
  '10': the 4 corners and the centre of 0.875 x the shorter side, and their mirror images.
  '144': GoogLeNet's protocol. 4 scales x 3 squares x (4 corners + centre of 224/scale of the square
    + the whole square) x mirror. The whole square is the same box at every scale, as in the paper.
  """
  margin = 1 - CENTER_FRACTION
  five = ((0, 0), (0, 1), (1, 0), (1, 1), (0.5, 0.5))  # corners and centre, as (y, x) fractions
  if crops == 'center':
    boxes = [_crop(0.5, 0.5, margin / 2, margin / 2, CENTER_FRACTION)]
  elif crops == '10':
    boxes = [_crop(y, x, y * margin, x * margin, CENTER_FRACTION) for y, x in five]
  elif crops == '144':
    boxes = []
    for scale in MULTI_CROP_SCALES:
      side = 224 / scale
      for square in (0, 0.5, 1):
        boxes += [_crop(square, square, y * (1 - side), x * (1 - side), side) for y, x in five]
        boxes.append(_crop(square, square, 0, 0, 1))
  else:
    num_crops(crops)  # raises
  matrices = np.array(boxes, np.float64)
  mirrored = np.zeros(len(boxes), bool)
  if crops != 'center':
    matrices = np.concatenate([matrices, matrices])
    mirrored = np.concatenate([mirrored, ~mirrored])
  return matrices, mirrored


def crop_boxes(height: float, width: float, crops: str) -> tuple[np.ndarray, np.ndarray]:
  """The evaluation crops of a height x width image: boxes [n, 4] (top, left, bottom, right) in
  pixel edges of the original image, and mirrored [n]."""
  matrices, mirrored = crop_geometry(crops)
  short = min(height, width)
  return matrices @ np.array([height - short, width - short, short], np.float64), mirrored


# ---------------------------------------------------------------------------------------------------
# Exact evaluation: padding and masks
# ---------------------------------------------------------------------------------------------------

def num_eval_batches(num_examples: int, local_batch_size: int, process_count: int) -> int:
  """Batches every host yields: enough for the host with the most examples."""
  return -(-num_examples // (local_batch_size * process_count))


def host_range(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
  """This host's examples [start, stop) of an evaluation split; the first hosts take one more."""
  share, extra = divmod(num_examples, process_count)
  start = process_index * share + min(process_index, extra)
  return start, start + share + (process_index < extra)


def _padded_host_batches(num_examples, local_batch_size, process_index, process_count):
  """Yields (example indices [b], mask [b]) of this host's evaluation batches; padding has index 0."""
  start, stop = host_range(num_examples, process_index, process_count)
  batches = num_eval_batches(num_examples, local_batch_size, process_count)
  indices = np.arange(batches * local_batch_size).reshape(batches, local_batch_size) + start
  for batch in indices:
    mask = batch < stop
    yield np.where(mask, batch, 0), mask


# ---------------------------------------------------------------------------------------------------
# digits: scikit-learn's 1,797 handwritten digits, 8 x 8 pixels, 10 classes
# ---------------------------------------------------------------------------------------------------
# No augmentation: the miniature compares how fast the variants optimise, and an 8%-area crop of an
# 8 x 8 digit (or a mirror image) is no longer that digit. Evaluation therefore sees whole images too.

DIGITS_NUM_TEST = 360


@functools.cache
def _digits(image_size: int):
  """(images [1797, S, S, 3] float32 in [-1, 1], labels int32, train indices, test indices)."""
  from sklearn import datasets, model_selection  # pylint: disable=g-import-not-at-top
  digits = datasets.load_digits()
  images = digits.images.astype(np.float32) / 8 - 1  # 0 ... 16 -> -1 ... 1
  images = jax.image.resize(images, (len(images), image_size, image_size), 'linear')
  images = np.repeat(np.asarray(images)[..., None], 3, axis=-1)
  labels = digits.target.astype(np.int32)
  # A fixed stratified split: 1,437 training and 360 test images, the same on every machine.
  train, test = model_selection.train_test_split(
      np.arange(len(labels)), test_size=DIGITS_NUM_TEST, stratify=labels, random_state=0)
  return images, labels, np.sort(train), np.sort(test)


def _digits_info(config):
  del config
  return DatasetInfo(10, 1797 - DIGITS_NUM_TEST, DIGITS_NUM_TEST)


def _digits_train(config, *, local_batch_size, seed, start_step, process_index, process_count):
  images, labels, train, _ = _digits(config.image_size)
  # The stream is the concatenation of per-epoch permutations; global batch k is its positions
  # [k * global_batch, (k + 1) * global_batch), and each host takes its slice of that.
  global_batch = local_batch_size * process_count
  for step in itertools.count(start_step):
    positions = step * global_batch + process_index * local_batch_size + np.arange(local_batch_size)
    epochs, offsets = np.divmod(positions, len(train))
    chosen = np.empty_like(positions)
    for epoch in np.unique(epochs):
      order = np.random.default_rng([seed, epoch]).permutation(len(train))
      chosen[epochs == epoch] = order[offsets[epochs == epoch]]
    chosen = train[chosen]
    yield {'image': images[chosen], 'label': labels[chosen]}


def _digits_eval(config, *, local_batch_size, crops, process_index, process_count):
  if crops != 'center':
    raise errors.ConfigError(
        f"digits evaluates whole images (crops='center'); got crops={crops!r}: its training uses "
        'no crops, and its 8 x 8 images have nothing to crop.')
  images, labels, _, test = _digits(config.image_size)

  def batch(indices, mask):
    chosen = test[indices]
    return {'image': np.where(mask[:, None, None, None], images[chosen], 0)[:, None],
            'label': np.where(mask, labels[chosen], 0),
            'mask': mask,
            'id': np.where(mask, chosen, -1)}

  return (batch(indices, mask) for indices, mask in _padded_host_batches(
      len(test), local_batch_size, process_index, process_count))


# ---------------------------------------------------------------------------------------------------
# synthetic: random tensors on the device, ImageNet-sized, for benchmarks and smoke runs
# ---------------------------------------------------------------------------------------------------

SYNTHETIC_INFO = DatasetInfo(num_classes=1000, num_train_examples=1_281_167, num_eval_examples=1000)


def _synthetic_batch(key, batch_shape, image_size):
  image_key, label_key = jax.random.split(key)
  image = jax.random.uniform(image_key, (*batch_shape, image_size, image_size, 3), minval=-1,
                             maxval=1)
  label = jax.random.randint(label_key, batch_shape[:1], 0, SYNTHETIC_INFO.num_classes)
  return image, label


def _synthetic_train(config, *, local_batch_size, seed, start_step, process_index, process_count):
  """One fixed random batch, again and again: measures the step, not the data."""
  del start_step, process_count
  key = jax.random.fold_in(jax.random.key(seed), process_index)
  image, label = _synthetic_batch(key, (local_batch_size,), config.image_size)
  while True:
    yield {'image': image, 'label': label}


def _synthetic_eval(config, *, local_batch_size, crops, process_index, process_count):
  key = jax.random.key(0)
  for indices, mask in _padded_host_batches(SYNTHETIC_INFO.num_eval_examples, local_batch_size,
                                            process_index, process_count):
    image, label = _synthetic_batch(jax.random.fold_in(key, indices[0]),
                                    (local_batch_size, num_crops(crops)), config.image_size)
    yield {'image': image, 'label': label, 'mask': mask, 'id': np.where(mask, indices, -1)}


# ---------------------------------------------------------------------------------------------------
# The registry and the interface
# ---------------------------------------------------------------------------------------------------

class Source(NamedTuple):
  """A data set: functions of (config.dataset, keyword arguments) as in the interface below."""
  info: Callable[..., DatasetInfo]
  train: Callable[..., Iterator[dict]]
  eval: Callable[..., Iterator[dict]]


def _from_tfds(function_name):
  def call(*args, **kwargs):
    from bn_inception import tfds_pipeline  # pylint: disable=g-import-not-at-top  # TensorFlow
    return getattr(tfds_pipeline, function_name)(*args, **kwargs)
  return call


TFDS = Source(_from_tfds('get_info'), _from_tfds('train_batches'), _from_tfds('eval_batches'))

# Any name not listed here is looked up in TFDS's catalogue.
DATASETS = {
    'imagenet2012': TFDS,  # from the two manually downloaded archives (config.dataset.manual_dir)
    'digits': Source(_digits_info, _digits_train, _digits_eval),
    'synthetic': Source(lambda config: SYNTHETIC_INFO, _synthetic_train, _synthetic_eval),
}


def unknown_dataset_message(name: str) -> str:
  return (f'Unknown data set {name!r}; valid: {sorted(DATASETS)} or any TFDS image-classification '
          'data set name (https://www.tensorflow.org/datasets/catalog/overview).')


def _source(config) -> Source:
  return DATASETS.get(config.name, TFDS)


def _processes(process_index, process_count):
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, process_count={process_count}).')
  return process_index, process_count


def get_info(dataset_config) -> DatasetInfo:
  """Number of classes and examples of the configured data set (prepares a TFDS one if needed)."""
  return _source(dataset_config).info(dataset_config)


def train_batches(dataset_config, *, local_batch_size: int, seed: int, start_step: int = 0,
                  process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict]:
  """This host's part of every global training batch from start_step on, endlessly.

  Items: {'image': float32 [local_batch_size, S, S, 3] in [-1, 1], 'label': int32 [local_batch_size]}
  (numpy; jax.Arrays already on the device for 'synthetic'). Batches are a function of
  (seed, step, process_index, process_count, local_batch_size) only, so a resumed run continues
  exactly. Epochs reshuffle with a seed derived from (seed, epoch).
  """
  process_index, process_count = _processes(process_index, process_count)
  return _source(dataset_config).train(
      dataset_config, local_batch_size=local_batch_size, seed=seed, start_step=start_step,
      process_index=process_index, process_count=process_count)


def eval_batches(dataset_config, *, local_batch_size: int, crops: str | None = None,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict]:
  """This host's evaluation batches: all hosts together cover the split exactly once.

  Every host yields num_eval_batches(N, local_batch_size, process_count) batches. Items:
  {'image': float32 [local_batch_size, num_crops, S, S, 3] in [-1, 1], 'label': int32 [b],
   'mask': bool [b] (False on padding), 'id': [b] example ids (TFDS: str, digits/synthetic: int)}.
  """
  crops = crops or dataset_config.eval_crops
  num_crops(crops)  # validates
  process_index, process_count = _processes(process_index, process_count)
  return _source(dataset_config).eval(
      dataset_config, local_batch_size=local_batch_size, crops=crops,
      process_index=process_index, process_count=process_count)
