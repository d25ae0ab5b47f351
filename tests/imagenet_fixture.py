"""Tiny ImageNet archives in the real ILSVRC2012 layout, and session fixtures that prepare them.

`write_archives(manual_dir)` writes the two files a user downloads from image-net.org, in miniature
(bn_inception/imagenet_archives.py writes the layout), with the odd files real ImageNet has: grayscale,
CMYK, PNG named .JPEG (some under the names TFDS's builder converts, some not), progressive JPEG,
images smaller than any crop, very wide and very tall ones. TFDS's own imagenet2012 builder prepares
them; scripts/make_tiny_imagenet.py writes them for a command-line run.
"""

import io
import os
import types

import numpy as np
from PIL import Image
import pytest

from bn_inception import imagenet_archives

SYNSETS = ('n01440764', 'n01739381', 'n02105855', 'n04596742', 'n15075141')
IMAGES_PER_SYNSET = 6
NUM_VAL = 12

# file name -> (kind, (height, width)); every other image is a baseline RGB JPEG of 40-100 pixels.
# n01739381_1309 and n02105855_2933 are on the builder's own CMYK and PNG lists (it re-encodes them);
# the other odd files reach the input pipeline as they are.
ODD_TRAIN = {
    'n01739381_1309.JPEG': ('cmyk', None),
    'n02105855_2933.JPEG': ('png', None),
    'n01440764_1.JPEG': ('cmyk', None),
    'n01440764_2.JPEG': ('progressive', None),
    'n04596742_3.JPEG': ('png', None),
    'n15075141_1.JPEG': ('gray', None),
    'n02105855_4.JPEG': ('rgb', (5, 7)),
    'n04596742_5.JPEG': ('rgb', (20, 320)),
    'n15075141_5.JPEG': ('rgb', (240, 20)),
}
ODD_VAL = {
    1: ('gray', None),
    2: ('cmyk', None),
    3: ('png', None),
    4: ('progressive', None),
    5: ('rgb', (3, 4)),
    6: ('rgb', (16, 400)),
}


def _encode(rng, kind, size, noise=0.0):
  """A smooth random image (so JPEG keeps it faithfully) encoded as `kind`; `noise` (the std of
  added pixel noise) gives JPEGs the entropy, and so the decoding cost, of photographs."""
  height, width = size or rng.integers(40, 101, size=2)
  y, x = np.mgrid[0:height, 0:width] / max(height, width)
  colours = rng.uniform(0, 255, size=(3, 3))  # at the top left, bottom left and top right
  pixels = (colours[0] + np.multiply.outer(y, colours[1] - colours[0]) +
            np.multiply.outer(x, colours[2] - colours[0]))
  if noise:
    pixels = pixels + rng.normal(0, noise, pixels.shape)
  image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
  buffer = io.BytesIO()
  if kind == 'png':
    image.save(buffer, format='PNG')
  else:
    mode = {'gray': 'L', 'cmyk': 'CMYK'}.get(kind, 'RGB')
    image.convert(mode).save(buffer, format='JPEG', quality=95, progressive=kind == 'progressive')
  return buffer.getvalue()


def write_archives(manual_dir, seed=0, images_per_synset=IMAGES_PER_SYNSET, size=None,
                   damaged=()):
  """Writes the two archives into manual_dir; returns {'train': {file: synset}, 'validation': ...}.

  `images_per_synset` and `size` ((height, width) of the ordinary images, with photo-like noise;
  default: 40-100 pixels, smooth) make larger archives for measuring the input pipeline. The files
  named in `damaged` are cut to their first half, as an interrupted download leaves them.
  """
  os.makedirs(manual_dir, exist_ok=True)
  rng = np.random.default_rng(seed)

  def damage(name, data):
    return data[:len(data) // 2] if name in damaged else data

  manifest = {'train': {}, 'validation': {}}
  train_files = []
  for synset in SYNSETS:
    odd = [name for name in ODD_TRAIN if name.startswith(synset)]
    plain = [f'{synset}_{i}.JPEG' for i in range(images_per_synset)]
    names = odd + [name for name in plain if name not in odd][:images_per_synset - len(odd)]
    files = []
    for name in names:
      kind, odd_size = ODD_TRAIN.get(name, ('rgb', None))
      files.append((name, damage(name, _encode(rng, kind, odd_size or size,
                                               noise=8.0 if size else 0.0))))
      manifest['train'][name] = synset
    train_files.append((synset, files))
  imagenet_archives.write_train_archive(manual_dir, train_files)
  val_synsets = imagenet_archives.tfds_labels('validation_labels.txt')
  val_files = []
  for i in range(1, NUM_VAL + 1):
    name = imagenet_archives.val_name(i)
    val_files.append((name, damage(name, _encode(rng, *ODD_VAL.get(i, ('rgb', None))))))
    manifest['validation'][name] = val_synsets[i - 1]
  imagenet_archives.write_val_archive(manual_dir, val_files)
  return manifest


def label_index() -> dict[str, int]:
  """Synset -> TFDS's imagenet2012 class index."""
  return {synset: i for i, synset in enumerate(imagenet_archives.tfds_labels('labels.txt'))}


def dataset_config(root, **overrides):
  """A config.dataset for the archives in root/manual, prepared into root/data, at 32 x 32."""
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config().dataset
  config.update({'data_dir': os.fspath(root / 'data'), 'manual_dir': os.fspath(root / 'manual'),
                 'image_size': 32, **overrides})
  return config


def grain_config(root, **overrides):
  return dataset_config(root, loader='grain', **overrides)


def _prepared(tmp_path_factory, name, **builder_kwargs):
  """The archives, prepared by TFDS's imagenet2012 builder into several shards (so that
  interleaving files and per-host file ranges are exercised): a namespace of `root`, `manifest`
  (write_archives'), `label_index` (synset -> TFDS class index)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp(name)
  manifest = write_archives(root / 'manual')
  tfds.builder('imagenet2012', data_dir=os.fspath(root / 'data'),
               **builder_kwargs).download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=os.fspath(root / 'manual'),
                                                   num_shards=3))
  return types.SimpleNamespace(root=root, manifest=manifest, label_index=label_index())


@pytest.fixture(scope='session')
def tiny_imagenet(tmp_path_factory):
  """_prepared's namespace for the default (tfrecord) files, with their `config` (dataset_config)."""
  prepared = _prepared(tmp_path_factory, 'imagenet')
  prepared.config = dataset_config(prepared.root)
  return prepared


@pytest.fixture(scope='session')
def grain_imagenet(tmp_path_factory):
  """_prepared's namespace for array_record files, with their `config` (grain_config)."""
  prepared = _prepared(tmp_path_factory, 'grain_imagenet', file_format='array_record')
  prepared.config = grain_config(prepared.root)
  return prepared
