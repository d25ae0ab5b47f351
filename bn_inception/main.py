"""Train a variant from its config: a thin shell over `train.train_and_evaluate`.

  python -m bn_inception.main --config=configs/bn_x30.py --workdir=runs/bn_x30 [--config.FIELD=VALUE ...]

Rerunning the same command resumes from the newest checkpoint in the workdir. On several hosts run
the same command on every host (README.md, "Several hosts"): Slurm, Open MPI and TPU pods are
detected; elsewhere add --coordinator_address=HOST:PORT --num_processes=N --process_id=I.
"""

import signal
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from bn_inception import cli

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file, e.g. '
                                          'configs/bn_x30.py or configs/bn_x30.py:digits.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, config and metrics.')
cli.define_multihost_flags()
flags.adopt_module_key_flags(cli)  # --coordinator_address etc. in --help
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.start()
  from bn_inception import train  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except KeyboardInterrupt as e:  # Ctrl-C: one line saying where the run resumes, no traceback
    print(e or 'Interrupted.', file=sys.stderr)
    sys.exit(128 + signal.SIGINT)


if __name__ == '__main__':
  app.run(main)
