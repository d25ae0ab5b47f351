"""TFDS data sets read without TensorFlow: Grain over `tfds.data_source` (array_record files).

`config.dataset.loader='grain'` routes TFDS data sets here (`input_pipeline`); the interface and the
semantics are tf.data's (`tfds_pipeline`): the same shuffling modes (data_spec.SHUFFLE), crops,
flips and exact evaluation, with TensorFlow-free JPEG decoding, so pixels differ slightly but the
distributions agree; the photometric distortions are the training step's (augment), for both.
TensorFlow is imported only to prepare a data set (TFDS's builder writing array_record), once.

Training is a Grain MapDataset over positions in the host's endless stream: position p reads the
example the epoch's order puts there, with crop and flip drawn from a generator seeded by
(seed, host, p). A batch is thus a function of its step alone: a resumed run starts at its step's
position, and Grain's threads do not change a pixel.

Public functions (stable, the benchmark may call them): `get_info`, `train_batches`, `eval_batches`,
`train_image`, `eval_image`, `decode`.
"""

import functools
import io
import os

from absl import logging
import grain
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import simplejpeg
import tensorflow_datasets as tfds

from bn_inception import data_spec
from bn_inception import errors


CONVERT_MESSAGE = """\
{name} in {data_dir} is stored as {file_format}; loader='grain' reads array_record. Add an \
array_record copy beside it once, without preparing again, where TensorFlow is installed: \
pip install apache-beam && python -m tensorflow_datasets.scripts.convert_format \
--dataset_version_dir={data_dir} --out_file_format=array_record (or use \
--config.dataset.loader=tf_data)."""


# ---------------------------------------------------------------------------------------------------
# The data set and its files
# ---------------------------------------------------------------------------------------------------

@functools.cache
def _cached_builder(name, data_dir):
  return tfds.builder(name, data_dir=data_dir)  # or DatasetNotFoundError


def _builder(config):
  """The builder of the array_record copy; prepares it first (TensorFlow, once) when needed."""
  builder = _cached_builder(config.name, config.data_dir)
  if not builder.is_prepared():
    try:
      from bn_inception import tfds_pipeline  # pylint: disable=g-import-not-at-top  # TensorFlow
    except ImportError as e:
      raise errors.NotFoundError(
          f'{config.name} is not prepared in {builder.data_dir}, and preparing it (once) needs '
          f'TensorFlow ({errors.describe(e)}): run once where TensorFlow is installed, with '
          '--config.dataset.loader=grain (it writes array_record).') from e
    tfds_pipeline.prepared_builder(config, file_format='array_record')
    _cached_builder.cache_clear()
    builder = _cached_builder(config.name, config.data_dir)
    _check_decodable(config, builder)
  array_record = tfds.core.FileFormat.ARRAY_RECORD
  # The formats from dataset_info.json (TFDS's available_file_formats() omits the alternatives
  # restored from it).
  formats = {builder.info.file_format.value, *builder.info.as_proto.alternative_file_formats}
  if array_record.value not in formats:
    raise errors.InputFileError(CONVERT_MESSAGE.format(
        name=config.name, data_dir=builder.data_dir, file_format=builder.info.file_format.value))
  if builder.info.file_format != array_record:  # a tfrecord copy converted in place
    builder.info.set_file_format(array_record, override=True, override_if_initialized=True)
  return builder


def _check_decodable(config, builder):
  """Decodes every image once after preparing (TFDS stores them as they come), rather than fail
  in some epoch's batch; the error names the images and says what to do."""
  logging.info('Checking that every image of %s decodes.', config.name)
  for split_name in builder.info.splits:
    split = _Split(config, split_name, split_name)
    def check(index, split=split):
      split.decoded(index, decode)
      return True
    ds = grain.MapDataset.range(len(split.source)).map(check)
    for _ in ds.to_iter_dataset(_read_options(1)):
      pass


def _read_options(local_batch_size: int) -> grain.ReadOptions:
  """A thread over images per CPU core this process may use (the work is decoding, not waiting
  for files: more threads only contend for the cores and the GIL, 1.7x slower at 16 threads on one
  core), two batches of images read ahead."""
  threads = len(os.sched_getaffinity(0))
  return grain.ReadOptions(num_threads=threads,
                           prefetch_buffer_size=max(2 * local_batch_size, threads))


def get_info(config) -> data_spec.DatasetInfo:
  builder = _builder(config)
  _, label, _ = data_spec.image_keys(builder.info)
  return data_spec.DatasetInfo(
      num_classes=builder.info.features[label].num_classes,
      # Evaluation sets (ReaL, ImageNet-V2) have no training split.
      num_train_examples=(builder.info.splits[config.train_split].num_examples
                          if config.train_split in builder.info.splits else 0),
      num_eval_examples=builder.info.splits[config.eval_split].num_examples)


class _Split:
  """A split's records by index, and where each of this host's records lives."""

  def __init__(self, config, split: str, host_split):
    builder = _builder(config)
    self.name = config.name
    self.info = builder.info
    self.keys = data_spec.image_keys(builder.info)
    # Images stay encoded: decoded here, by our decoder, not by TFDS (which would need TensorFlow).
    self.source = builder.as_data_source(
        split=split, decoders={self.keys[0]: tfds.decode.SkipDecoding()})
    # The index in `source` of each file's record 0.
    self.file_start, start = {}, 0
    for instruction in builder.info.splits[split].file_instructions:
      self.file_start[instruction.filename] = start - instruction.skip
      start += instruction.take
    # The host's files as ranges of indices into `source`, in their stored order.
    self.files = [(instruction.filename, self.file_start[instruction.filename] + instruction.skip,
                   instruction.take)
                  for instruction in builder.info.splits[host_split].file_instructions]

  def locate(self, index: int) -> tuple[str, int]:
    """(file, record in the file) of an index into `source`."""
    filename = max((start, name) for name, start in self.file_start.items() if start <= index)[1]
    return filename, index - self.file_start[filename]

  def read(self, index: int) -> dict:
    return self.source[int(index)]

  def example_id(self, example, index: int) -> str:
    id_key = self.keys[2]
    if id_key:
      value = example[id_key]
      return value.decode() if isinstance(value, bytes) else str(value)
    filename, record = self.locate(index)
    return f'{os.path.basename(filename)}__{record}'  # TFDS's id, as on the tf.data path

  def decoded(self, index: int, decode):
    """decode(encoded image) of record `index`, with a record that does not decode named."""
    example = self.read(index)
    try:
      return example, decode(example[self.keys[0]])
    except Exception as e:  # pylint: disable=broad-except  # whatever the decoder raises
      filename, record = self.locate(index)
      raise errors.InputFileError(
          f'Image {self.example_id(example, index)!r} of {self.name} (record {record} of '
          f'{filename}) cannot be decoded ({errors.describe(e)}). Delete '
          f'{os.path.dirname(filename)} so that the next run prepares the data set again from '
          'intact archives.') from e


# ---------------------------------------------------------------------------------------------------
# Decoding and resampling
# ---------------------------------------------------------------------------------------------------

def decode(data: bytes) -> np.ndarray:
  """uint8 [H, W, 4]: an encoded image as RGBX (X is padding), four bytes a pixel so that a pixel
  is one uint32 to gather (`_resample`).

  JPEGs are decoded by simplejpeg (libjpeg-turbo) as TensorFlow decodes them by default (the fast
  integer DCT, fancy upsampling), so their pixels are tf.data's; other formats by Pillow.
  """
  if data[:2] == b'\xff\xd8':
    return simplejpeg.decode_jpeg(data, colorspace='RGBX', fastdct=True, fastupsample=False)
  return np.asarray(Image.open(io.BytesIO(data)).convert('RGBX'))


def _sample_points(start, stop, size, image_size):
  """Bilinear sample positions at the centres of the output pixels, clamped to the image: the
  lower pixel index, the upper one and the weight of the upper."""
  half_step = (stop - start) / (2 * image_size)
  points = np.clip(np.linspace(start + half_step, stop - half_step, image_size) - 0.5, 0, size - 1)
  low = np.floor(points).astype(int)
  return low, np.minimum(low + 1, size - 1), (points - low).astype(np.float32)


@functools.cache
def _host_cpu():
  """The host's CPU, where the loader blends (also where an accelerator trains), or the default
  device where JAX was told to start no CPU backend."""
  try:
    return jax.local_devices(backend='cpu')[0]
  except RuntimeError:
    return jax.local_devices()[0]


@functools.partial(jax.jit, static_argnames='dtype')
def _blend(taps, weights, dtype):
  """[S, S, 3] of `dtype` (uint8: rounded): the bilinear blends of taps [2S, 2S] (RGBX pixels as
  uint32: the two rows of each output row, interleaved, and likewise the columns) with weights
  [2, S] (of the second row and the second column), in TensorFlow's order of operations.

  One fused pass of XLA on the host's CPU, ~10x faster than numpy's dozen passes over the taps."""
  size = weights.shape[-1]
  pixels = jax.lax.bitcast_convert_type(taps, jnp.uint8).reshape(size, 2, size, 2, 4)
  pixels = pixels[..., :3].astype(jnp.float32)
  top_left, top_right = pixels[:, 0, :, 0], pixels[:, 0, :, 1]
  bottom_left, bottom_right = pixels[:, 1, :, 0], pixels[:, 1, :, 1]
  x_weight, y_weight = weights[1][None, :, None], weights[0][:, None, None]
  top = top_left + (top_right - top_left) * x_weight
  bottom = bottom_left + (bottom_right - bottom_left) * x_weight
  image = top + (bottom - top) * y_weight
  return jnp.round(image).astype(dtype) if dtype == jnp.uint8 else image.astype(dtype)


def _resample(image: np.ndarray, box, image_size: int, dtype=np.float32) -> np.ndarray:
  """[S, S, 3] in [0, 255]: the box (top, left, bottom, right) of a uint8 RGBX image resampled as
  TensorFlow resizes: bilinearly, at the output pixels' centres, clamped to the image, without
  antialiasing (Pillow's resize averages the whole footprint, and its images come out smoother
  than tf.data's).

  numpy gathers each output pixel's four neighbours as uint32 (fast; three-byte pixels are not),
  and XLA blends them (`_blend`)."""
  top, left, bottom, right = box
  y0, y1, y_weight = _sample_points(top, bottom, image.shape[0], image_size)
  x0, x1, x_weight = _sample_points(left, right, image.shape[1], image_size)
  rows = np.stack([y0, y1], axis=1).ravel()
  columns = np.stack([x0, x1], axis=1).ravel()
  taps = image.view(np.uint32)[rows, :, 0][:, columns]
  with jax.default_device(_host_cpu()):  # numpy arguments: no copy (a device_put makes one)
    return np.asarray(_blend(taps, np.stack([y_weight, x_weight]), np.dtype(dtype)))


def train_image(data: bytes, rng: np.random.Generator, image_size: int) -> np.ndarray:
  """Inception-style training crop of an encoded image, flipped at random: uint8 [S, S, 3] (the
  training step distorts its colours: augment)."""
  # Decoded at full size (no DCT-domain downscaling), as TensorFlow decodes: downscaling while
  # decoding averages pixels, and the images would come out smoother than tf.data's.
  image = decode(data)
  top, left, height, width = data_spec.random_window(rng, *image.shape[:2])
  window = image[top:top + height, left:left + width]
  crop = _resample(window, (0, 0, height, width), image_size, np.uint8)
  return crop[:, ::-1] if rng.random() < 0.5 else crop


def eval_image(data: bytes, image_size: int, crops: str) -> np.ndarray:
  """The evaluation crops of an encoded image: float32 [num_crops, S, S, 3] in [-1, 1], the boxes
  of `data_spec.crop_boxes` resampled bilinearly as tfds_pipeline.eval_image does."""
  image = decode(data)
  boxes, mirrored = data_spec.crop_boxes(*image.shape[:2], crops)
  images = np.stack([_resample(image, box, image_size) for box in boxes[~mirrored]]) / 127.5 - 1
  if mirrored.any():
    images = np.concatenate([images, images[:, :, ::-1]])
  return images.astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------

def epoch_order(files, shuffle: data_spec.Shuffle, seed: int, process_index: int,
                epoch: int) -> np.ndarray:
  """The record indices of one epoch of the host's stream.

  The host's files in a random order drawn from (seed, host, epoch), `shuffle.files` at a time;
  with a buffer (thorough) each chunk's examples are shuffled together (Grain reads by index, so
  the chunk is permuted as a whole, a buffer as large as the chunk); without (light) each file is
  read in its stored order.
  """
  rng = np.random.default_rng([seed, process_index, epoch, 0])
  ranges = [np.arange(first, first + take) for _, first, take in files]
  order = rng.permutation(len(ranges))
  chunks = [np.concatenate([ranges[i] for i in order[c:c + shuffle.files]])
            for c in range(0, len(order), shuffle.files)]
  if shuffle.buffer:
    chunks = [rng.permutation(chunk) for chunk in chunks]
  return np.concatenate(chunks)


def train_batches(config, *, local_batch_size, seed, start_step, process_index, process_count):
  # Every host reads its own share of the files (as on the tf.data path).
  host_split = tfds.even_splits(config.train_split, n=process_count,
                                drop_remainder=True)[process_index]
  split = _Split(config, config.train_split, host_split)
  if not split.files:
    raise ValueError(f'{config.train_split} has fewer examples than there are hosts.')
  shuffle = data_spec.SHUFFLE[config.shuffle]
  epoch_size = sum(take for _, _, take in split.files)
  order = functools.lru_cache(maxsize=2)(functools.partial(
      epoch_order, split.files, shuffle, seed, process_index))

  def preprocess(position):
    epoch, offset = divmod(position, epoch_size)
    index = order(epoch)[offset]
    rng = np.random.default_rng([seed, process_index, position, 1])
    example, image = split.decoded(index, lambda data: train_image(data, rng, config.image_size))
    return {'image': image, 'label': np.int32(example[split.keys[1]])}

  start = start_step * local_batch_size
  positions = grain.MapDataset.range(start, start + 2**62)  # endless, in practice
  ds = positions.map(preprocess).to_iter_dataset(_read_options(local_batch_size))
  return iter(ds.batch(local_batch_size, drop_remainder=True))


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------

def eval_batches(config, *, local_batch_size, crops, process_index, process_count):
  host_split = tfds.even_splits(config.eval_split, n=process_count)[process_index]
  split = _Split(config, config.eval_split, host_split)
  num_examples = len(split.source)
  indices = np.concatenate([np.arange(first, first + take) for _, first, take in split.files])
  num_batches = data_spec.num_eval_batches(num_examples, local_batch_size, process_count)
  padded = np.full(num_batches * local_batch_size, -1)
  padded[:len(indices)] = indices
  shape = (data_spec.num_crops(crops), config.image_size, config.image_size, 3)
  set_key = data_spec.LABEL_SETS.get(config.name, (None, None))[1]
  num_classes = split.info.features[split.keys[1]].num_classes

  def preprocess(index):
    if index < 0:
      out = {'image': np.zeros(shape, np.float32), 'label': np.int32(0), 'mask': False, 'id': ''}
    else:
      example, image = split.decoded(index,
                                     lambda data: eval_image(data, config.image_size, crops))
      out = {'image': image, 'label': np.int32(example[split.keys[1]]), 'mask': True,
             'id': split.example_id(example, index)}
    if set_key:  # the label set as a row of booleans over the classes (an empty set: all False)
      out['real_labels'] = np.zeros(num_classes, bool)
      if index >= 0:
        out['real_labels'][np.asarray(example[set_key], int)] = True
    return out

  ds = grain.MapDataset.source(padded).map(preprocess).to_iter_dataset(
      _read_options(local_batch_size))
  for batch in ds.batch(local_batch_size):
    yield {**batch, 'id': np.asarray(batch['id'], dtype=str)}
