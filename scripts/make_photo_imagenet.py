r"""Writes ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar of real photographs to OUT_DIR, for
measuring the input pipeline on images that decode like ImageNet's.

The images are random crops and flips of scikit-image's sample photographs, at ImageNet's typical
500 x 375 and JPEG quality 90 (about 110 KB each), in the real archive layout, which TFDS's
imagenet2012 builder prepares (bn_inception/imagenet_archives.py):

  python scripts/make_photo_imagenet.py /tmp/photos/manual --num_train=2000 --num_val=200
  python scripts/benchmark.py --mode=input --config.dataset.manual_dir=/tmp/photos/manual \
      --config.dataset.data_dir=/tmp/photos/data
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bn_inception import imagenet_archives  # noqa: E402  pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('out_dir', help='Where to write the two archives (a manual_dir).')
  parser.add_argument('--num_train', type=int, default=2000, help='Training images.')
  parser.add_argument('--num_val', type=int, default=200, help='Validation images.')
  parser.add_argument('--num_synsets', type=int, default=10, help='Classes of the training set.')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  try:
    counts = imagenet_archives.write_photo_archives(
        args.out_dir, args.num_train, args.num_val, num_synsets=args.num_synsets, seed=args.seed)
  except ValueError as error:
    parser.error(str(error))
  print(f'Wrote {counts["train"]} training and {counts["validation"]} validation photographs '
        f'({counts["mean_bytes"] / 1000:.0f} KB on average) to {args.out_dir}')


if __name__ == '__main__':
  main()
