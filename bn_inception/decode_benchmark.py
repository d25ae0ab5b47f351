"""The TensorFlow-free JPEG decoders, measured on one core: decode + Inception random-size crop +
resize to uint8 S x S, and the Grain loader's own training preprocessing.

`run_decode(manual_dir, ...)` reads the JPEGs of a training archive (scripts/make_photo_imagenet.py
writes one of photographs), pins this process to one core and times each candidate on the same
images in interleaved rounds (so that a busy neighbour slows all of them alike); it returns img/s per
candidate, the best round of each.
"""

import functools
import io
import os
import tarfile
import time
from typing import Any, Callable

import numpy as np
import PIL
from PIL import Image
import simplejpeg

from bn_inception import data_spec
from bn_inception import grain_pipeline
from bn_inception import imagenet_archives


def read_train_jpegs(manual_dir: str, limit: int) -> list[bytes]:
  """The first `limit` files of ILSVRC2012_img_train.tar (in its per-synset tars)."""
  images = []
  with tarfile.open(os.path.join(manual_dir, imagenet_archives.TRAIN_ARCHIVE)) as train_tar:
    for member in train_tar:
      with tarfile.open(fileobj=train_tar.extractfile(member)) as synset_tar:
        for image in synset_tar:
          images.append(synset_tar.extractfile(image).read())
          if len(images) == limit:
            return images
  return images


def _pillow(data, rng, size, draft):
  image = Image.open(io.BytesIO(data))
  top, left, height, width = data_spec.random_window(rng, image.height, image.width)
  if draft:  # DCT-domain downscaling by 1/2, 1/4 or 1/8 while the window keeps >= size pixels
    full_height = image.height
    image.draft('RGB', (int(np.ceil(image.width * size / min(height, width))),
                        int(np.ceil(image.height * size / min(height, width)))))
    scale = image.height / full_height
    top, left, height, width = (round(v * scale) for v in (top, left, height, width))
  image = image.convert('RGB')
  return np.asarray(image.resize((size, size), Image.BILINEAR,
                                 box=(left, top, left + width, top + height)))


def _simplejpeg(data, rng, size, dct_scaling):
  height, width, _, _ = simplejpeg.decode_jpeg_header(data)
  top, left, crop_height, crop_width = data_spec.random_window(rng, height, width)
  # DCT-domain downscaling as far as keeps the window at least `size` pixels a side.
  scale = max(min(crop_height, crop_width) / size, 1) if dct_scaling else 1
  image = simplejpeg.decode_jpeg(data, colorspace='RGB', min_height=int(np.ceil(height / scale)),
                                 min_width=int(np.ceil(width / scale)))
  y_scale, x_scale = image.shape[0] / height, image.shape[1] / width
  box = (left * x_scale, top * y_scale, (left + crop_width) * x_scale,
         (top + crop_height) * y_scale)
  return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR, box=box))


CANDIDATES: dict[str, Callable[[bytes, np.random.Generator, int], np.ndarray]] = {
    'pillow': functools.partial(_pillow, draft=False),
    'pillow_draft': functools.partial(_pillow, draft=True),
    'simplejpeg_pillow_resize': functools.partial(_simplejpeg, dct_scaling=False),
    'simplejpeg_dct_scaling': functools.partial(_simplejpeg, dct_scaling=True),
    # What the Grain loader does per training image: full-size decode, resampling as
    # tf.image.resize (numpy gathers, XLA blends), flip.
    'grain_train_image': grain_pipeline.train_image,
}


def run_decode(manual_dir: str, *, num_images: int = 200, image_size: int = 224, rounds: int = 3,
               core: int | None = None) -> dict[str, Any]:
  """img/s of each of CANDIDATES on one core (the first this process may use, or `core`)."""
  core = min(os.sched_getaffinity(0)) if core is None else core
  os.sched_setaffinity(0, {core})
  images = read_train_jpegs(manual_dir, num_images)
  if not images:
    raise ValueError(f'No training images in {manual_dir}/{imagenet_archives.TRAIN_ARCHIVE}.')
  best = {name: 0.0 for name in CANDIDATES}
  for _ in range(rounds):
    for name, candidate in CANDIDATES.items():
      rng = np.random.default_rng(0)
      start = time.perf_counter()
      for data in images:
        out = candidate(data, rng, image_size)
      best[name] = max(best[name], len(images) / (time.perf_counter() - start))
      assert out.shape == (image_size, image_size, 3) and out.dtype == np.uint8, out.shape
  return {
      'mode': 'decode', 'core': core, 'num_images': len(images), 'image_size': image_size,
      'mean_jpeg_bytes': int(np.mean([len(d) for d in images])), 'rounds': rounds,
      'pillow_version': PIL.__version__, 'simplejpeg_version': simplejpeg.__version__,
      'numpy_version': np.__version__,
      **{f'{name}_img_per_s': round(value, 1) for name, value in best.items()},
  }
