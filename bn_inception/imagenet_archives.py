"""ImageNet's two training/validation archives in the real ILSVRC2012 layout, and a benchmark set
of them made from real photographs.

The layout is what a user downloads from image-net.org and TFDS's imagenet2012 builder prepares:
ILSVRC2012_img_train.tar (one nXXXXXXXX.tar per synset, holding nXXXXXXXX_N.JPEG) and
ILSVRC2012_img_val.tar (ILSVRC2012_val_%08d.JPEG). TFDS labels the validation images with the first
lines of its validation_labels.txt (it pairs the sorted file names with that file's lines), so an
archive need not hold all 50,000. tests/imagenet_fixture.py writes its odd tiny files with the same
writers; `write_photo_archives` (scripts/make_photo_imagenet.py) writes ImageNet-sized photographs
for measuring the input pipeline.
"""

import io
import os
import tarfile
from typing import Iterable

import numpy as np
from PIL import Image

TRAIN_ARCHIVE = 'ILSVRC2012_img_train.tar'
VAL_ARCHIVE = 'ILSVRC2012_img_val.tar'

# ImageNet's typical image (its most common size), and the quality of its typical JPEG (~110 KB).
PHOTO_SIZE = (375, 500)  # (height, width)
PHOTO_QUALITY = 90
# The colour photographs scikit-image ships (skimage.data, no download), as their file names.
PHOTO_FILES = ('astronaut.png', 'chelsea.png', 'coffee.png', 'hubble_deep_field.jpg',
               'motorcycle_left.png', 'retina.jpg', 'rocket.jpg', 'color.png', 'ihc.png')


def tfds_labels(name: str) -> list[str]:
  """The lines of one of TFDS's imagenet2012 label files ('labels.txt', 'validation_labels.txt')."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.core.tfds_path(f'datasets/imagenet2012/{name}').read_text().split()


def _add(tar: tarfile.TarFile, name: str, data: bytes):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_train_archive(manual_dir: str, synsets: Iterable[tuple[str, Iterable[tuple[str, bytes]]]]):
  """ILSVRC2012_img_train.tar from (synset, [(file name, encoded image)]) pairs."""
  with tarfile.open(os.path.join(manual_dir, TRAIN_ARCHIVE), 'w') as train_tar:
    for synset, files in synsets:
      synset_tar = io.BytesIO()
      with tarfile.open(fileobj=synset_tar, mode='w') as tar:
        for name, data in files:
          _add(tar, name, data)
      _add(train_tar, f'{synset}.tar', synset_tar.getvalue())


def write_val_archive(manual_dir: str, files: Iterable[tuple[str, bytes]]):
  """ILSVRC2012_img_val.tar from (file name, encoded image) pairs."""
  with tarfile.open(os.path.join(manual_dir, VAL_ARCHIVE), 'w') as val_tar:
    for name, data in files:
      _add(val_tar, name, data)


def val_name(index: int) -> str:
  """The file name of validation image `index` (from 1), as ImageNet names it."""
  return f'ILSVRC2012_val_{index:08d}.JPEG'


def load_photos() -> list[np.ndarray]:
  """scikit-image's colour sample photographs, uint8 [h, w, 3]."""
  import skimage.data  # pylint: disable=g-import-not-at-top
  directory = os.path.dirname(skimage.data.__file__)
  return [np.asarray(Image.open(os.path.join(directory, name)).convert('RGB'))
          for name in PHOTO_FILES]


def photo_jpeg(photo: np.ndarray, rng: np.random.Generator) -> bytes:
  """A random crop (70-100% of each side, shaped as PHOTO_SIZE) of a photograph, flipped half the
  time, resized to PHOTO_SIZE (landscape or, a quarter of the time, portrait) and encoded as JPEG."""
  height, width = PHOTO_SIZE if rng.random() < 0.75 else PHOTO_SIZE[::-1]
  aspect = width / height
  crop_width = min(photo.shape[1], photo.shape[0] * aspect) * rng.uniform(0.7, 1)
  crop_height = crop_width / aspect
  top = rng.uniform(0, photo.shape[0] - crop_height)
  left = rng.uniform(0, photo.shape[1] - crop_width)
  image = Image.fromarray(photo).resize(
      (width, height), Image.BICUBIC, box=(left, top, left + crop_width, top + crop_height))
  if rng.random() < 0.5:
    image = image.transpose(Image.FLIP_LEFT_RIGHT)
  buffer = io.BytesIO()
  image.save(buffer, format='JPEG', quality=PHOTO_QUALITY)
  return buffer.getvalue()


def write_photo_archives(manual_dir: str, num_train: int, num_val: int, num_synsets: int = 10,
                         seed: int = 0) -> dict[str, int]:
  """Writes the two archives of random crops of real photographs into manual_dir: `num_train`
  training images spread over the first `num_synsets` synsets of TFDS's labels.txt, and `num_val`
  validation images. Returns the counts and the mean file size in bytes."""
  if num_train < num_synsets or num_val < 1 or num_synsets < 1:
    raise ValueError(f'need num_train >= num_synsets >= 1 and num_val >= 1; got num_train='
                     f'{num_train}, num_synsets={num_synsets}, num_val={num_val}')
  os.makedirs(manual_dir, exist_ok=True)
  rng = np.random.default_rng(seed)
  photos = load_photos()
  sizes = []

  def jpeg():
    data = photo_jpeg(photos[rng.integers(len(photos))], rng)
    sizes.append(len(data))
    return data

  synsets = tfds_labels('labels.txt')[:num_synsets]
  write_train_archive(manual_dir, (
      (synset, [(f'{synset}_{i}.JPEG', jpeg()) for i in range(i_synset, num_train, num_synsets)])
      for i_synset, synset in enumerate(synsets)))
  write_val_archive(manual_dir, ((val_name(i), jpeg()) for i in range(1, num_val + 1)))
  return {'train': num_train, 'validation': num_val, 'mean_bytes': int(np.mean(sizes))}
