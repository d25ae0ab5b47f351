"""Input pipeline: data sets by name, Inception-style training crops, exact multi-crop evaluation.

Data sets (`config.dataset.name`), from the registry `DATASETS`:

  imagenet2012  TFDS, prepared once from the manually downloaded ILSVRC2012_img_{train,val}.tar
  any other TFDS image-classification data set (e.g. imagenette), downloaded by TFDS itself
  digits        scikit-learn's bundled 8 x 8 handwritten digits, upscaled; numpy, no TensorFlow
  synthetic     random images and labels made on the device, for benchmarks and smoke runs

TFDS data sets live in `tfds_pipeline.py`, the only module that imports TensorFlow, and only when
such a data set is used. What every data set shares (DatasetInfo, the evaluation crops, the number
of padded evaluation batches) is in `data_spec.py`, which both import.

`train_batches` is an endless iterator over this host's part of each global batch, deterministic in
(seed, start_step): a run resumed at step k sees exactly the batches k, k+1, ... of an uninterrupted
run. TFDS data sets deliver the training crops undistorted, as uint8 pixels: the training step
distorts their colours on the device (`augment`, at `distortion_strength(config)`).
`eval_batches` yields every example of the split exactly once over all hosts, padded so that all
hosts yield the same number of batches; `mask` is False on the padding and `id` names each example.
"""

import functools
import itertools
from typing import Callable, Iterator, NamedTuple

import jax
import numpy as np

from bn_inception import data_spec
from bn_inception import errors


# ---------------------------------------------------------------------------------------------------
# Exact evaluation of the numpy data sets: each host's examples, padded
# ---------------------------------------------------------------------------------------------------

def host_range(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
  """This host's examples [start, stop) of an evaluation split; the first hosts take one more."""
  share, extra = divmod(num_examples, process_count)
  start = process_index * share + min(process_index, extra)
  return start, start + share + (process_index < extra)


def _padded_host_batches(num_examples, local_batch_size, process_index, process_count):
  """Yields (example indices [b], mask [b]) of this host's evaluation batches; padding has index 0."""
  start, stop = host_range(num_examples, process_index, process_count)
  batches = data_spec.num_eval_batches(num_examples, local_batch_size, process_count)
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
  return data_spec.DatasetInfo(10, 1797 - DIGITS_NUM_TEST, DIGITS_NUM_TEST)


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

SYNTHETIC_INFO = data_spec.DatasetInfo(num_classes=1000, num_train_examples=1_281_167,
                                       num_eval_examples=1000)


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
                                    (local_batch_size, data_spec.num_crops(crops)),
                                    config.image_size)
    yield {'image': image, 'label': label, 'mask': mask, 'id': np.where(mask, indices, -1)}


# ---------------------------------------------------------------------------------------------------
# The registry and the interface
# ---------------------------------------------------------------------------------------------------

class Source(NamedTuple):
  """A data set: functions of (config.dataset, keyword arguments) as in the interface below."""
  info: Callable[..., data_spec.DatasetInfo]
  train: Callable[..., Iterator[dict]]
  eval: Callable[..., Iterator[dict]]
  distorted: bool = False  # training distorts the colours of its (uint8) images on the device


def _from_tfds(function_name):
  def call(config, **kwargs):
    # pylint: disable=g-import-not-at-top
    if config.get('loader', 'tf_data') == 'grain':
      from bn_inception import grain_pipeline as pipeline  # no TensorFlow
    else:
      from bn_inception import tfds_pipeline as pipeline  # TensorFlow
    import tensorflow_datasets as tfds
    try:
      return getattr(pipeline, function_name)(config, **kwargs)
    except tfds.core.registered.DatasetNotFoundError:
      raise errors.ConfigError(unknown_dataset_message(config.name)) from None
  return call


TFDS = Source(_from_tfds('get_info'), _from_tfds('train_batches'), _from_tfds('eval_batches'),
              distorted=True)

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


def distortion_strength(dataset_config) -> float:
  """The strength of the colour distortions the training step applies to the data set's batches:
  config.distortion_strength for TFDS data sets, 0 (none compiled) for digits and synthetic."""
  return dataset_config.distortion_strength if _source(dataset_config).distorted else 0.0


def get_info(dataset_config) -> data_spec.DatasetInfo:
  """Number of classes and examples of the configured data set (prepares a TFDS one if needed)."""
  return _source(dataset_config).info(dataset_config)


def train_batches(dataset_config, *, local_batch_size: int, seed: int, start_step: int = 0,
                  process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict]:
  """This host's part of every global training batch from start_step on, endlessly.

  Items: {'image': [local_batch_size, S, S, 3], 'label': int32 [local_batch_size]} (numpy;
  jax.Arrays already on the device for 'synthetic'); images are uint8 pixels, undistorted, for
  TFDS data sets (see `distortion_strength`), float32 in [-1, 1] for the others. Batches are a
  function of (seed, step, process_index, process_count, local_batch_size) only, so a resumed run
  continues exactly. Epochs reshuffle with a seed derived from (seed, epoch).
  """
  process_index, process_count = _processes(process_index, process_count)
  return _source(dataset_config).train(
      dataset_config, local_batch_size=local_batch_size, seed=seed, start_step=start_step,
      process_index=process_index, process_count=process_count)


def eval_batches(dataset_config, *, local_batch_size: int, crops: str | None = None,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[dict]:
  """This host's evaluation batches: all hosts together cover the split exactly once.

  Every host yields data_spec.num_eval_batches(N, local_batch_size, process_count) batches. Items:
  {'image': float32 [local_batch_size, num_crops, S, S, 3] in [-1, 1], 'label': int32 [b],
   'mask': bool [b] (False on padding), 'id': [b] example ids (TFDS: str, digits/synthetic: int)}.
  The crops are data_spec.crop_geometry(crops)'s, each computed once: average their predictions
  with data_spec.crop_weights(crops) (144 crops are 126 distinct ones, weighted).
  """
  crops = crops or dataset_config.eval_crops
  data_spec.num_crops(crops)  # validates
  process_index, process_count = _processes(process_index, process_count)
  return _source(dataset_config).eval(
      dataset_config, local_batch_size=local_batch_size, crops=crops,
      process_index=process_index, process_count=process_count)
