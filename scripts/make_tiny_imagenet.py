r"""Writes tiny ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar, in the real layout, to OUT_DIR.

For trying the ImageNet path end to end in a few minutes on a CPU (the archives hold 30 training and
12 validation images of 5 synsets, odd ones included: grayscale, CMYK, PNG, progressive, tiny, very
wide and very tall):

  python scripts/make_tiny_imagenet.py /tmp/tiny/manual
  python -m bn_inception.main --config=configs/bn_x30.py --workdir=/tmp/tiny/run \
      --config.dataset.manual_dir=/tmp/tiny/manual --config.dataset.data_dir=/tmp/tiny/data \
      --config.dataset.image_size=32 --config.model.width=0.25 --config.batch_size=8 \
      --config.model.bn_group_size=8 --config.num_train_steps=20

`--imagenet_sized` writes 200 ordinary training images per synset at ImageNet's typical 375 x 500,
with photo-like noise, for measuring the input pipeline:

  python scripts/make_tiny_imagenet.py /tmp/sized/manual --imagenet_sized
  python scripts/benchmark.py --config=configs/bn_x30.py --mode=input \
      --config.dataset.manual_dir=/tmp/sized/manual --config.dataset.data_dir=/tmp/sized/data

The archives are the test suite's (tests/imagenet_fixture.py, which needs pillow and pytest:
`pip install -e '.[test]'`), so what a person runs is what the tests check.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, 'tests'))

import imagenet_fixture  # noqa: E402  pylint: disable=g-import-not-at-top


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n', 1)[0],
                                   epilog=__doc__.split('\n\n', 1)[1],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('out_dir', help='where to write the two archives (created if missing)')
  parser.add_argument('--imagenet_sized', action='store_true',
                      help='200 training images per synset at 375 x 500, for benchmarking input')
  args = parser.parse_args(argv)
  kwargs = dict(images_per_synset=200, size=(375, 500)) if args.imagenet_sized else {}
  manifest = imagenet_fixture.write_archives(args.out_dir, **kwargs)
  print(f'Wrote {len(manifest["train"])} training and {len(manifest["validation"])} validation '
        f'images to {args.out_dir}/ILSVRC2012_img_{{train,val}}.tar')


if __name__ == '__main__':
  main()
