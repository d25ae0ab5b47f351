r"""`make demo`: the paper's five variants in miniature on a CPU, in minutes (bn_inception/demo.py).

  python scripts/demo.py [--output=demo_output] [--quick]

Trains Inception, BN-Baseline, BN-x5, BN-x30 and BN-x5-Sigmoid on scikit-learn's digits under the
paper's protocol (Inception until its accuracy stops improving, the others for the paper's relative
lengths; two seeds each), evaluates and ensembles them, runs the paper's Figure 1 MLP experiment, and
writes results.md, report.md, two figures and the checkpoints into --output. --quick: a tiny version
of the same (seconds of training; for tests).
"""

import argparse
import os
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir)
sys.path.insert(0, REPO)  # configs/ is imported from the repository, not installed
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402  pylint: disable=g-import-not-at-top

from bn_inception import demo  # noqa: E402  pylint: disable=g-import-not-at-top


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--output', default='demo_output', help='folder for everything it writes')
  parser.add_argument('--quick', action='store_true', help='a tiny run of the whole pipeline')
  args = parser.parse_args(argv)
  os.makedirs(args.output, exist_ok=True)
  # A rerun loads the compiled programs instead of compiling them again.
  jax.config.update('jax_compilation_cache_dir', os.path.join(args.output, 'jax_cache'))
  if args.quick:  # a few steps: compilation is nearly all the time, so compile less carefully
    jax.config.update('jax_disable_most_optimizations', True)
  command = ' '.join(['python scripts/demo.py', *(argv if argv is not None else sys.argv[1:])])
  demo.run_demo(args.output, quick=args.quick, command=command)


if __name__ == '__main__':
  main()
