"""The benchmark set of photographs (scripts/make_photo_imagenet.py) and the loader comparison on it."""

import io
import os
import subprocess
import sys

import numpy as np
from PIL import Image
import pytest

from bn_inception import decode_benchmark
from bn_inception import imagenet_archives
from bn_inception import input_benchmark
from configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def photo_set(tmp_path_factory):
  manual_dir = tmp_path_factory.mktemp('photos') / 'manual'
  subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'make_photo_imagenet.py'),
                  os.fspath(manual_dir), '--num_train=8', '--num_val=2', '--num_synsets=2'],
                 check=True, capture_output=True, env={**os.environ, 'PYTHONPATH': ROOT})
  config = default.get_config()
  config.dataset.manual_dir = os.fspath(manual_dir)
  config.dataset.data_dir = os.fspath(manual_dir.parent / 'data')
  config.dataset.image_size = 32
  config.batch_size = 4
  return config


def test_photographs_in_the_imagenet_layout(photo_set):
  images = decode_benchmark.read_train_jpegs(photo_set.dataset.manual_dir, limit=100)
  assert len(images) == 8
  decoded = [Image.open(io.BytesIO(data)) for data in images]
  assert all(image.format == 'JPEG' and image.size in ((500, 375), (375, 500)) for image in decoded)
  # Photographs, not noise: neighbouring pixels agree far more than random ones do.
  pixels = np.asarray(decoded[0].convert('L'), np.float32)
  assert np.abs(np.diff(pixels, axis=1)).mean() < 0.2 * np.abs(pixels - pixels.mean()).mean()
  assert len({data[:2000] for data in images}) == len(images)  # random crops, all different


def test_bad_counts_are_refused(tmp_path):
  with pytest.raises(ValueError, match='num_train >= num_synsets'):
    imagenet_archives.write_photo_archives(os.fspath(tmp_path), num_train=1, num_val=1,
                                           num_synsets=2)


def test_both_loaders_prepare_and_are_timed(photo_set):
  # TFDS's own builder prepares the archives for each loader (tfrecord, array_record).
  result = input_benchmark.compare_loaders(photo_set, steps=1, warmup_steps=0, core_counts=(1,))
  for loader in input_benchmark.LOADERS:
    assert result[f'{loader}_1core_img_per_s'] > 0
  assert os.path.isdir(os.path.join(photo_set.dataset.data_dir, 'imagenet2012'))
  assert os.path.isdir(os.path.join(input_benchmark.grain_data_dir(photo_set.dataset.data_dir),
                                    'imagenet2012'))
  assert result['grain_vs_tf_data_1core'] == pytest.approx(
      result['grain_1core_img_per_s'] / result['tf_data_1core_img_per_s'])
