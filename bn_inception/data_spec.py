"""What every data source shares: DatasetInfo, the shuffle modes, the evaluation crops, padded batches.

Shared by `input_pipeline` (the interface and the numpy sources), `tfds_pipeline` (TensorFlow) and
`grain_pipeline` (Grain, no TensorFlow). numpy only; image_keys imports TFDS (not TensorFlow).
"""

import functools
from typing import NamedTuple

import numpy as np

from bn_inception import errors


class DatasetInfo(NamedTuple):
  num_classes: int
  num_train_examples: int
  num_eval_examples: int


# How TFDS data sets are read (config.dataset.loader): tfds_pipeline (tf.data over tfrecord) or
# grain_pipeline (Grain over array_record, no TensorFlow).
LOADERS = ('tf_data', 'grain')
# An evaluation set whose supervised label is a set of labels: (its single label, the label set).
LABEL_SETS = {'imagenet2012_real': ('original_label', 'real_label')}


def image_keys(info) -> tuple[str, str, str | None]:
  """(image key, label key, id key or None) of an image-classification data set's tfds info."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  # no TensorFlow
  image, label = info.supervised_keys or (None, None)
  label = LABEL_SETS.get(info.name, (label,))[0]
  features = dict(info.features.items())
  if not (isinstance(features.get(image), tfds.features.Image) and
          isinstance(features.get(label), tfds.features.ClassLabel)):
    raise errors.ConfigError(
        f'{info.name} is not an image-classification data set: its supervised keys are '
        f'{info.supervised_keys}, its features {info.features}.')
  ids = [key for key in ('file_name', 'id') if isinstance(features.get(key), tfds.features.Text)]
  return image, label, (ids[0] if ids else None)


class Shuffle(NamedTuple):
  """How thoroughly training shuffles TFDS data (config.dataset.shuffle; tfds_pipeline)."""
  files: int  # read together, interleaved example by example
  buffer: int  # examples in the shuffle buffer; 0: none, the examples come in their stored order


# 'light' (Inception, BN-Baseline): no within-shard shuffling. Every epoch reads the host's files in
# a new random order, one at a time, each in its stored order (TFDS's, fixed when it prepared the
# data), so examples that are neighbours in a file share mini-batches in every epoch. No buffer.
# 'thorough' (Modified BN-Inception, paper section 4.2.1, change 6: "within-shard shuffling"): 16
# files interleaved example by example through a buffer as large as most of them, so batches mix
# examples from different files in a new combination every epoch. On ImageNet (1024 files of ~1250
# examples, ~110 kB each) that buffer holds ~1.8 GB, twice while the next chunk fills.
SHUFFLE = {'light': Shuffle(files=1, buffer=0), 'thorough': Shuffle(files=16, buffer=16_384)}


# Training crops of both TFDS loaders (Inception / GoogLeNet): 8%-100% of the area, aspect 3/4-4/3.
AREA_RANGE = (0.08, 1.0)
ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)
# Photometric distortions at strength 1.0 (Andrew Howard's, as in TF-slim's Inception preprocessing).
MAX_BRIGHTNESS_DELTA = 32 / 255
MAX_SATURATION_FACTOR = 0.5  # factor in 1 +- this
MAX_HUE_DELTA = 0.2
MAX_CONTRAST_FACTOR = 0.5  # factor in 1 +- this


def center_window(height: int, width: int) -> tuple[int, int, int, int]:
  """The evaluation centre crop (crops='center') in whole pixels: (top, left, height, width)."""
  side = max(int(CENTER_FRACTION * min(height, width)), 1)
  return (height - side) // 2, (width - side) // 2, side, side


def random_window(rng: np.random.Generator, height: int, width: int) -> tuple[int, int, int, int]:
  """A random crop (top, left, height, width) of 8-100% of the area and aspect ratio (width /
  height) 3/4-4/3, or the centre crop when ten tries find none (very wide or tall images). Drawn
  as TensorFlow's sample_distorted_bounding_box draws them: the aspect ratio uniform, then the
  height uniform among the whole numbers that keep the area in range."""
  min_area, max_area = AREA_RANGE[0] * height * width, AREA_RANGE[1] * height * width
  for _ in range(10):
    aspect = rng.uniform(*ASPECT_RATIO_RANGE)
    crop_height = round(np.sqrt(min_area / aspect))
    max_height = min(round(np.sqrt(max_area / aspect)), int((width + 0.5) / aspect), height)
    crop_height = min(crop_height, max_height)
    crop_height += int(rng.integers(max_height - crop_height + 1))
    crop_width = round(crop_height * aspect)
    if crop_width * crop_height < min_area:
      crop_height += 1
      crop_width = round(crop_height * aspect)
    if (min_area <= crop_width * crop_height <= max_area and 0 < crop_width <= width
        and 0 < crop_height <= height):
      return (int(rng.integers(height - crop_height + 1)), int(rng.integers(width - crop_width + 1)),
              crop_height, crop_width)
  return center_window(height, width)


# ---------------------------------------------------------------------------------------------------
# Evaluation crops
# ---------------------------------------------------------------------------------------------------

# GoogLeNet's multi-crop scales (shorter side) for 224-pixel crops. Other image sizes scale them with
# the crop, so every crop covers the same fraction of its square: 224/256 ... 224/352.
MULTI_CROP_SCALES = (256, 288, 320, 352)
CENTER_FRACTION = 224 / 256  # 0.875: the single centre crop and the 10 crops, of the shorter side
CROPS = ('center', '10', '144')


class CropGeometry(NamedTuple):
  """The distinct crops of an evaluation protocol (see `crop_geometry`)."""
  matrices: np.ndarray  # [n, 4, 3]: box (top, left, bottom, right) = matrices[i] @ (h - s, w - s, s)
  mirrored: np.ndarray  # [n] bool
  weights: np.ndarray  # [n], sum 1: the share of the protocol's crops that are this one


def _crop(vertical, horizontal, offset_y, offset_x, side):
  """Rows of the crop matrix for one box (see `crop_geometry`)."""
  top = (vertical, 0, offset_y)
  left = (0, horizontal, offset_x)
  return (top, left, (vertical, 0, offset_y + side), (0, horizontal, offset_x + side))


@functools.cache
def crop_geometry(crops: str) -> CropGeometry:
  """The evaluation crops as linear maps of the image size, each computed once, with its weight.

  Crop i is the box (top, left, bottom, right) = matrices[i] @ (height - short, width - short, short)
  in pixels of the original image, short = min(height, width). One of the first two entries is always
  0, so the same matrix gives the left/centre/right squares of a landscape image and the
  top/centre/bottom squares of a portrait one. Boxes do not depend on the output size: the scales
  grow with it. The mirrored crops come after the others, in the same order.

  'center': the centred square of 0.875 x the shorter side (resize to 256, crop 224).
  '10': the 4 corners and the centre of 0.875 x the shorter side, and their mirror images.
  '144': GoogLeNet's protocol. 4 scales x 3 squares x (4 corners + centre of 224/scale of the square
    + the whole square) x mirror. The whole square is the same box at every scale, so it is computed
    once per square and mirror and weighs 4/144: 126 distinct crops stand for the 144.
  """
  if crops not in CROPS:
    raise errors.ConfigError(f'Unknown eval crops {crops!r}; valid: {list(CROPS)}.')
  margin = 1 - CENTER_FRACTION
  five = ((0, 0), (0, 1), (1, 0), (1, 1), (0.5, 0.5))  # corners and centre, as (y, x) fractions
  if crops == 'center':
    weighted = [(_crop(0.5, 0.5, margin / 2, margin / 2, CENTER_FRACTION), 1)]
  elif crops == '10':
    weighted = [(_crop(y, x, y * margin, x * margin, CENTER_FRACTION), 1) for y, x in five]
  else:
    weighted = []
    for square in (0, 0.5, 1):
      # The whole square is the same box at every scale: computed once, it counts once per scale.
      weighted.append((_crop(square, square, 0, 0, 1), len(MULTI_CROP_SCALES)))
      for scale in MULTI_CROP_SCALES:
        side = 224 / scale
        weighted += [(_crop(square, square, y * (1 - side), x * (1 - side), side), 1)
                     for y, x in five]
  boxes, counts = zip(*weighted)
  matrices, counts = np.array(boxes, np.float64), np.array(counts, np.float64)
  mirrored = np.zeros(len(boxes), bool)
  if crops != 'center':
    matrices, counts = np.concatenate([matrices, matrices]), np.concatenate([counts, counts])
    mirrored = np.concatenate([mirrored, ~mirrored])
  return CropGeometry(matrices, mirrored, counts / counts.sum())


def num_crops(crops: str) -> int:
  """Crops computed per image: 1, 10, or 126 for the 144 (see `crop_geometry`)."""
  return len(crop_geometry(crops).weights)


def crop_weights(crops: str) -> np.ndarray:
  """float32 [num_crops]: each computed crop's weight in the average of the crops' predictions."""
  return crop_geometry(crops).weights.astype(np.float32)


def crop_boxes(height: float, width: float, crops: str) -> tuple[np.ndarray, np.ndarray]:
  """The evaluation crops of a height x width image: boxes [n, 4] (top, left, bottom, right) in
  pixel edges of the original image, and mirrored [n]."""
  matrices, mirrored, _ = crop_geometry(crops)
  short = min(height, width)
  return matrices @ np.array([height - short, width - short, short], np.float64), mirrored


# ---------------------------------------------------------------------------------------------------
# Exact evaluation: padding and masks
# ---------------------------------------------------------------------------------------------------

def num_eval_batches(num_examples: int, local_batch_size: int, process_count: int) -> int:
  """Batches every host yields: enough for the host with the most examples."""
  return -(-num_examples // (local_batch_size * process_count))
