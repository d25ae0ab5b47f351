"""TFDS data sets for the input pipeline: reading, Inception-style preprocessing, multi-crop.

The only module that imports TensorFlow; `input_pipeline` imports it when a TFDS data set is used.
Call it through `input_pipeline`, which defines the interface (what both share is in `data_spec`).

Training reads the TFRecord files TFDS prepared, in an order that depends only on (seed, epoch), so
that a resumed run skips straight to its position without decoding anything: every epoch shuffles
the host's files and reads them in chunks of `files` files interleaved example by example; with
thorough shuffling each chunk also goes through a buffer seeded per chunk. Whole chunks (and then
records) are skipped to reach the start. Random crops and flips are stateless random ops seeded by
(seed, host, position in the host's stream), so parallel decoding does not change a single pixel;
the colour distortions are the training step's (augment).
"""

import os
import tarfile

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from bn_inception import data_spec
from bn_inception import errors

# JAX owns the accelerators: TensorFlow must not reserve their memory. (If TensorFlow has already
# set up its devices, someone else decided; the call then raises and changes nothing.)
try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:
  pass

AUTOTUNE = tf.data.AUTOTUNE


IMAGENET_ARCHIVES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
IMAGENET_MISSING = """\
ImageNet (imagenet2012) is not prepared in {data_dir}, and {problem}.
Download ILSVRC2012_img_train.tar (138 GiB) and ILSVRC2012_img_val.tar (6.3 GiB) from
https://image-net.org/download-images (an account is needed), put both files in one directory DIR
and pass
  --config.dataset.manual_dir=DIR --config.dataset.data_dir=WHERE_THE_PREPARED_DATA_GOES
The first run prepares the data set once (hours; about 150 GB in data_dir); later runs only read
data_dir and need no manual_dir."""

# The evaluation sets' files besides ImageNet's validation archive. TFDS's builders would download
# them; one placed in manual_dir under its published name is used instead (TFDS's DownloadManager
# looks there by the file name registered with its checksum, and still verifies the checksum).
REAL_JSON = ('real.json', 'https://raw.githubusercontent.com/google-research/reassessed-imagenet/'
             'master/real.json', '380 KiB')
_V2_URL = 'https://huggingface.co/datasets/vaishaal/ImageNetV2/resolve/main/'
EVAL_SET_FILES = {
    'imagenet2012_real': (('ILSVRC2012_img_val.tar', 'https://image-net.org/download-images '
                           '(an account is needed)', '6.3 GiB'), REAL_JSON),
    **{f'imagenet_v2/{variant}': ((name, _V2_URL + name, '1.2 GiB'),) for variant, name in (
        ('matched-frequency', 'imagenetv2-matched-frequency.tar.gz'),
        ('threshold-0.7', 'imagenetv2-threshold0.7.tar.gz'),
        ('topimages', 'imagenetv2-top-images.tar.gz'))},
}
EVAL_SET_MISSING = """\
The evaluation set {name} is not prepared in {data_dir}, and {problem}.
Put these files, under these names, in one directory DIR (it may be the one holding the ImageNet
archives):
{files}
and pass
  --config.dataset.manual_dir=DIR --config.dataset.data_dir=WHERE_THE_PREPARED_DATA_GOES
The first evaluation prepares the set once; later ones only read data_dir and need no manual_dir."""


# ---------------------------------------------------------------------------------------------------
# The data set and its files
# ---------------------------------------------------------------------------------------------------

def prepared_builder(config, file_format: str = 'tfrecord') -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder; prepares it first (once) when needed, in `file_format`."""
  builder = tfds.builder(config.name, data_dir=config.data_dir,
                         file_format=file_format)  # or DatasetNotFoundError
  if builder.is_prepared():
    return builder
  _check_manual_files(config, builder)
  logging.info('Preparing %s in %s, once.', config.name, builder.data_dir)
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=config.manual_dir))
  except tfds.core.download.download_manager.NonMatchingChecksumError as e:
    raise errors.InputFileError(_wrong_file_message(config, e)) from e
  if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
    return builder  # checked by its reader (grain_pipeline)
  # TFDS stores the images as they come, decodable or not: decode each once now (little, against
  # the hours of preparing ImageNet), rather than fail in some epoch's batch.
  logging.info('Checking that every image of %s decodes.', config.name)
  bad = {split: _undecodable_images(builder, split) for split in builder.info.splits}
  if any(bad.values()):
    raise errors.InputFileError(_undecodable_message(builder, bad))
  return builder


def _check_manual_files(config, builder) -> None:
  """Refuses, with what to download and where to put it, to prepare ImageNet or an evaluation set
  whose files are not in manual_dir (rather than let TFDS try the network)."""
  if config.name == 'imagenet2012':
    if problem := _lacking(config.manual_dir, IMAGENET_ARCHIVES):
      raise errors.NotFoundError(IMAGENET_MISSING.format(data_dir=builder.data_dir,
                                                         problem=problem))
    _check_imagenet_archives(config.manual_dir)
  files = EVAL_SET_FILES.get(config.name, ())
  if problem := _lacking(config.manual_dir, [name for name, _, _ in files]):
    raise errors.NotFoundError(EVAL_SET_MISSING.format(
        name=config.name, data_dir=builder.data_dir, problem=problem, files='\n'.join(
            f'  {name} ({size}) from {source}' for name, source, size in files)))


def _lacking(manual_dir, names) -> str:
  """What keeps manual_dir from holding all of `names` ('' when it does)."""
  missing = [name for name in names
             if not manual_dir or not os.path.exists(os.path.join(manual_dir, name))]
  if not missing:
    return ''
  return (f'manual_dir={manual_dir} lacks {" and ".join(missing)}' if manual_dir else
          'config.dataset.manual_dir is not set')


def _wrong_file_message(config, error) -> str:
  """A file in manual_dir whose checksum is not the one TFDS registered for it."""
  names = [name for name, _, _ in EVAL_SET_FILES.get(config.name, ()) if name in str(error)]
  path = os.path.join(config.manual_dir or '', names[0]) if names else 'a downloaded file'
  return (f'{path} is not the file {config.name} is prepared from: its size or checksum differs '
          f'from the published one (TFDS: {str(error).splitlines()[0]}). Download it again.')


def _check_imagenet_archives(manual_dir: str) -> None:
  """Refuses an archive that is not a tar of what ImageNet ships (the training archive holds one
  tar per synset, the validation archive JPEGs): an HTML login page saved under the archive's
  name, or an empty file, which TFDS's builder only reports in a long traceback naming neither.
  Reads the first member only, not the 138 GiB."""
  first_member_suffix = dict(zip(IMAGENET_ARCHIVES, ('.tar', '.JPEG')))
  for name, suffix in first_member_suffix.items():
    path = os.path.join(manual_dir, name)
    try:
      with tarfile.open(path, 'r:') as archive:
        first = archive.next()
    except tarfile.TarError:
      problem = 'not a tar file'
    else:
      if first is not None and first.isfile() and first.name.endswith(suffix):
        continue
      problem = f'its first member is {first.name}' if first else 'an empty tar'
    with open(path, 'rb') as f:
      start = f.read(32)
    raise errors.InputFileError(
        f'{path} is not a tar of {"synset tars of JPEGs" if suffix == ".tar" else "JPEGs"} as '
        f'ImageNet ships it ({problem}; {os.path.getsize(path)} bytes, starting {start!r}): a '
        'failed download (a login page saved under the archive\'s name)? Download it again from '
        'https://image-net.org/download-images.')


def _undecodable_images(builder, split: str) -> list[str]:
  """The ids (file names) of the images of `split` that TensorFlow cannot decode."""
  image_key, _, id_key = _keys(builder)
  parse = _parser(builder, (image_key, id_key))

  def example_id(record, fallback_id):
    return parse(record)[id_key] if id_key else fallback_id

  def decoded(record, fallback_id):  # the shape, else tf.data would prune the unused decode
    image = tf.io.decode_image(parse(record)[image_key], channels=3, expand_animations=False)
    return example_id(record, fallback_id), tf.shape(image)

  examples = _records_with_ids(builder.info.splits[split].file_instructions)
  good = {i for i, _ in examples.map(decoded, num_parallel_calls=AUTOTUNE).ignore_errors()
          .as_numpy_iterator()}
  return [i.decode() for i in examples.map(example_id).as_numpy_iterator() if i not in good]


def _undecodable_message(builder, bad: dict[str, list[str]]) -> str:
  """What is wrong and how to recover: which archive to replace, which directory to delete."""
  found = '; '.join(f'{split}: {", ".join(ids[:10])}{" ..." if len(ids) > 10 else ""}'
                    for split, ids in bad.items() if ids)
  message = (f'{sum(map(len, bad.values()))} image(s) of {builder.info.name} cannot be decoded '
             f'({found}), and preparing the data set stored them as they are in '
             f'{builder.data_dir}. ')
  if builder.info.name == 'imagenet2012':
    archive = dict(zip(('train', 'validation'), IMAGENET_ARCHIVES))
    archives = sorted({archive.get(split.split('[')[0], f'the archive of the {split} split')
                       for split, ids in bad.items() if ids})
    return message + (
        f'They come from {" and ".join(archives)} in the manual_dir, which is damaged (an '
        'interrupted download?). Download it again from https://image-net.org/download-images, '
        f'then delete {builder.data_dir} so that the next run prepares the data set again.')
  return message + f'Delete {builder.data_dir} so that the next run prepares it again.'


def _naming_undecodable_images(batches, config, split: str):
  """`batches`, with an image that fails to decode named (a data set prepared elsewhere, or by an
  earlier version, was not checked when it was prepared)."""
  try:
    yield from batches
  except tf.errors.InvalidArgumentError as e:
    builder = prepared_builder(config)
    logging.warning('Reading %s failed (%s); looking for images that cannot be decoded.',
                    config.name, errors.describe(e))
    bad = _undecodable_images(builder, split)
    if not bad:
      raise
    raise errors.InputFileError(_undecodable_message(builder, {split: bad})) from e


def _keys(builder):
  """(image key, label key, id key or None) of an image-classification data set in TFRecord."""
  keys = data_spec.image_keys(builder.info)
  if builder.info.file_format != tfds.core.FileFormat.TFRECORD:
    raise errors.ConfigError(
        f'{builder.info.name} in {builder.data_dir} is stored as {builder.info.file_format.value}; '
        "loader='tf_data' reads tfrecord: use --config.dataset.loader=grain.")
  return keys


def get_info(config) -> data_spec.DatasetInfo:
  builder = prepared_builder(config)
  _, label, _ = _keys(builder)
  return data_spec.DatasetInfo(
      num_classes=builder.info.features[label].num_classes,
      # Evaluation sets (ReaL, ImageNet-V2) have no training split.
      num_train_examples=(builder.info.splits[config.train_split].num_examples
                          if config.train_split in builder.info.splits else 0),
      num_eval_examples=builder.info.splits[config.eval_split].num_examples)


def _parser(builder, keys):
  """Parses the given features of a serialized example; images stay encoded."""
  spec = builder.info.features.tf_example_spec
  spec = {key: spec[key] for key in keys if key is not None}
  return lambda record: tf.io.parse_single_example(record, spec)


# ---------------------------------------------------------------------------------------------------
# Decoding and cropping
# ---------------------------------------------------------------------------------------------------

def _decode_window(data, window_fn):
  """Decodes the crop window_fn(shape) = [top, left, height, width] of an encoded image as RGB uint8.

  JPEGs are decoded and cropped in one step (only the crop is decompressed). Grayscale and CMYK JPEGs
  come out as RGB; PNGs (ImageNet has one named .JPEG), GIFs and BMPs take the slower general path.
  """
  def jpeg():
    window = window_fn(tf.image.extract_jpeg_shape(data))
    return tf.image.decode_and_crop_jpeg(data, window, channels=3)

  def other():
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    top, left, height, width = tf.unstack(window_fn(tf.shape(image)))
    return image[top:top + height, left:left + width]

  return tf.cond(tf.io.is_jpeg(data), jpeg, other)


def _center_window(shape):
  """The evaluation centre crop (crops='center') rounded to whole pixels."""
  height, width = shape[0], shape[1]
  side = tf.cast(data_spec.CENTER_FRACTION * tf.cast(tf.minimum(height, width), tf.float32),
                 tf.int32)
  side = tf.maximum(side, 1)
  return tf.stack([(height - side) // 2, (width - side) // 2, side, side])


def _random_window(seed):
  """A window function: a random crop of 8-100% of the area and aspect ratio 3/4-4/3, or the
  centre crop when ten tries find none (very wide or tall images)."""
  def window(shape):
    whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4])
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, whole_image, seed=seed, min_object_covered=0.0, area_range=data_spec.AREA_RANGE,
        aspect_ratio_range=data_spec.ASPECT_RATIO_RANGE, max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    failed = tf.reduce_all(tf.equal(size[:2], shape[:2]))  # it returns the whole image then
    return tf.cond(failed, lambda: _center_window(shape),
                   lambda: tf.concat([begin[:2], size[:2]], axis=0))
  return window


def train_image(data, seed, image_size: int):
  """Inception-style training crop of an encoded image, flipped at random: uint8 [S, S, 3] (the
  training step distorts its colours: augment)."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  image = _decode_window(data, _random_window(crop_seed))
  image = tf.image.resize(image, [image_size, image_size], method='bilinear')
  image = tf.image.stateless_random_flip_left_right(image, flip_seed)
  return tf.cast(tf.round(image), tf.uint8)  # bilinear weights keep it in [0, 255]


def eval_image(data, image_size: int, crops: str):
  """The evaluation crops of an encoded image: float32 [num_crops, S, S, 3] in [-1, 1].

  Every crop is a box of `data_spec.crop_geometry` resampled bilinearly to S x S (sample points
  at the centres of the output pixels, clamped to the image), then mirrored if its flag says so.
  """
  image = tf.cast(tf.io.decode_image(data, channels=3, expand_animations=False), tf.float32)
  matrices, mirrored, _ = data_spec.crop_geometry(crops)
  # crop_geometry lists the mirrored crops after the others, in the same order: resample each box
  # once and mirror the copies.
  num_boxes = int(np.sum(~mirrored))
  matrices = matrices[:num_boxes]
  height, width = tf.unstack(tf.cast(tf.shape(image)[:2], tf.float32))
  short = tf.minimum(height, width)
  boxes = tf.linalg.matvec(tf.constant(matrices, tf.float32),
                           tf.stack([height - short, width - short, short]))
  top, left, bottom, right = tf.unstack(boxes, axis=1)

  def sample_range(start, stop, size):
    # crop_and_resize puts its first and last samples at the box's ends: move them to the centres
    # of the first and last output pixels, in pixel-index coordinates normalised by size - 1.
    half_step = (stop - start) / (2 * image_size)
    first = tf.clip_by_value(start + half_step - 0.5, 0, size - 1)
    last = tf.clip_by_value(stop - half_step - 0.5, 0, size - 1)
    return first / tf.maximum(size - 1, 1), last / tf.maximum(size - 1, 1)

  y0, y1 = sample_range(top, bottom, height)
  x0, x1 = sample_range(left, right, width)
  images = tf.image.crop_and_resize(image[None], tf.stack([y0, x0, y1, x1], axis=1),
                                    tf.zeros([num_boxes], tf.int32), [image_size, image_size])
  images = images / 127.5 - 1
  if mirrored.any():
    images = tf.concat([images, tf.reverse(images, axis=[2])], axis=0)
  return images


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------

def _chunks(lengths, files_per_chunk: int, seed, start: int) -> tf.data.Dataset:
  """The chunks of a host's endless stream from position `start` on.

  lengths: examples in each of the host's files. Epoch e reads the files in a random order drawn
  from (seed, e), files_per_chunk at a time. Elements: (file indices, the chunk's shuffle seed,
  records to skip after shuffling: non-zero only in the first chunk, to reach `start`).
  """
  num_files = len(lengths)
  num_chunks = -(-num_files // files_per_chunk)

  def epoch_order(epoch):
    epoch_seed = tf.random.experimental.stateless_fold_in(seed, epoch)
    order_seed, chunk_seed = tf.unstack(tf.random.experimental.stateless_split(epoch_seed, 2))
    order = tf.random.experimental.stateless_shuffle(tf.range(num_files, dtype=tf.int64),
                                                     order_seed)
    chunk_seeds = tf.random.stateless_uniform([num_chunks], chunk_seed, minval=0, maxval=2**62,
                                              dtype=tf.int64)
    return order, chunk_seeds

  def epoch_chunks(epoch):
    order, chunk_seeds = epoch_order(epoch)
    return tf.data.Dataset.zip(tf.data.Dataset.from_tensor_slices(order).batch(files_per_chunk),
                               tf.data.Dataset.from_tensor_slices(chunk_seeds))

  # Whole epochs and chunks before `start` are skipped without reading a record.
  epoch, offset = divmod(start, int(sum(lengths)))
  order, _ = epoch_order(tf.constant(epoch, tf.int64))  # the same ops as in the graph: same order
  chunk_ends = np.cumsum(np.add.reduceat(np.asarray(lengths)[order.numpy()],
                                         np.arange(0, num_files, files_per_chunk)))
  chunk = int(np.searchsorted(chunk_ends, offset, side='right'))
  skip = offset - (int(chunk_ends[chunk - 1]) if chunk else 0)
  chunks = tf.data.Dataset.counter(epoch).flat_map(epoch_chunks).skip(chunk)
  skips = tf.data.Dataset.from_tensors(np.int64(skip)).concatenate(
      tf.data.Dataset.from_tensors(np.int64(0)).repeat())
  return tf.data.Dataset.zip(chunks, skips).map(lambda chunk, skip: (*chunk, skip))


def _records_with_ids(instructions) -> tf.data.Dataset:
  """(record, id) of the examples tfds FileInstructions name, in order. The id is TFDS's for data
  sets without an id feature: "<file name>__<index in the file>"."""

  def read(filename, skip, take):
    records = tf.data.TFRecordDataset(filename).skip(skip).take(take)
    ids = tf.data.Dataset.range(skip, skip + take).map(lambda index: tf.strings.join(
        [tf.strings.split(filename, '/')[-1], '__', tf.strings.as_string(index)]))
    return tf.data.Dataset.zip(records, ids)

  return tf.data.Dataset.from_tensor_slices(_read(instructions)).flat_map(read)


def _read(instructions):
  """tfds FileInstructions as constant tensors (filenames, records to skip, records to take)."""
  return (tf.constant([i.filename for i in instructions], tf.string),
          tf.constant([i.skip for i in instructions], tf.int64),
          tf.constant([i.take for i in instructions], tf.int64))


def _train_records(instructions, shuffle: data_spec.Shuffle, seed, start: int) -> tf.data.Dataset:
  """The host's endless stream of serialized training examples from position `start` on.

  instructions: tfds FileInstructions of the host's share; seed: a stateless seed of the order.
  """
  filenames, skips, takes = _read(instructions)

  def chunk_records(files, chunk_seed, skip):
    records = tf.data.Dataset.from_tensor_slices(
        (tf.gather(filenames, files), tf.gather(skips, files), tf.gather(takes, files)))
    records = records.interleave(
        lambda name, skip, take: tf.data.TFRecordDataset(name).skip(skip).take(take),
        cycle_length=shuffle.files, block_length=1, num_parallel_calls=AUTOTUNE,
        deterministic=True)
    if shuffle.buffer:
      records = records.shuffle(shuffle.buffer, seed=chunk_seed)
    return records.skip(skip)

  # cycle_length=1 reads the chunks in order, like flat_map, but opens the next chunk (and fills
  # its shuffle buffer) in the background.
  return _chunks([i.take for i in instructions], shuffle.files, seed, start).interleave(
      chunk_records, cycle_length=1, num_parallel_calls=1, deterministic=True)


def train_batches(config, *, local_batch_size, seed, start_step, process_index, process_count):
  builder = prepared_builder(config)
  image_key, label_key, _ = _keys(builder)
  shuffle = data_spec.SHUFFLE[config.shuffle]  # a known name: config_checks
  # Equal shares keep the hosts' epochs in step; fewer than process_count examples are left out.
  host_split = tfds.even_splits(config.train_split, n=process_count,
                                drop_remainder=True)[process_index]
  instructions = builder.info.splits[host_split].file_instructions
  if not instructions:
    raise ValueError(f'{config.train_split} has fewer examples than there are hosts.')
  # Seeded by host too: hosts read different files, and draw different crops.
  order_seed, example_seed = tf.unstack(tf.random.experimental.stateless_split(
      tf.constant([seed, process_index], tf.int64), 2))
  start = start_step * local_batch_size
  records = _train_records(instructions, shuffle, order_seed, start)
  parse = _parser(builder, (image_key, label_key))

  def preprocess(position, record):
    example = parse(record)
    return {'image': train_image(example[image_key],
                                 tf.random.experimental.stateless_fold_in(example_seed, position),
                                 config.image_size),
            'label': tf.cast(example[label_key], tf.int32)}

  ds = tf.data.Dataset.zip(tf.data.Dataset.counter(start), records)
  ds = ds.map(preprocess, num_parallel_calls=AUTOTUNE, deterministic=True)
  ds = ds.batch(local_batch_size, drop_remainder=True).prefetch(AUTOTUNE)
  return _naming_undecodable_images(ds.as_numpy_iterator(), config, config.train_split)


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------

def eval_batches(config, *, local_batch_size, crops, process_index, process_count):
  ds = _eval_dataset(config, local_batch_size, crops, process_index, process_count)
  return ({**batch, 'id': np.char.decode(batch['id'].astype(bytes), 'utf-8')} for batch in
          _naming_undecodable_images(ds.as_numpy_iterator(), config, config.eval_split))


def _eval_dataset(config, local_batch_size, crops, process_index, process_count):
  builder = prepared_builder(config)
  image_key, label_key, id_key = _keys(builder)
  num_examples = builder.info.splits[config.eval_split].num_examples
  host_split = tfds.even_splits(config.eval_split, n=process_count)[process_index]
  instructions = builder.info.splits[host_split].file_instructions
  host_examples = sum(i.take for i in instructions)
  set_key = data_spec.LABEL_SETS.get(builder.info.name, (None, None))[1]
  parse = _parser(builder, (image_key, label_key, id_key, set_key))
  num_classes = builder.info.features[label_key].num_classes

  def preprocess(record, fallback_id):
    example = parse(record)
    out = {'image': eval_image(example[image_key], config.image_size, crops),
           'label': tf.cast(example[label_key], tf.int32),
           'mask': True,
           'id': example[id_key] if id_key else fallback_id}
    if set_key:  # the label set as a row of booleans over the classes (an empty set: all False)
      out['real_labels'] = tf.reduce_any(
          tf.one_hot(example[set_key], num_classes, on_value=True, off_value=False), axis=0)
    return out

  ds = _records_with_ids(instructions).map(preprocess, num_parallel_calls=AUTOTUNE,
                                           deterministic=True)
  num_batches = data_spec.num_eval_batches(num_examples, local_batch_size, process_count)
  padding = {'image': tf.zeros(ds.element_spec['image'].shape), 'label': 0, 'mask': False, 'id': ''}
  if set_key:
    padding['real_labels'] = tf.zeros([num_classes], tf.bool)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(padding).repeat(
      num_batches * local_batch_size - host_examples))
  return ds.batch(local_batch_size, drop_remainder=True).prefetch(1)
