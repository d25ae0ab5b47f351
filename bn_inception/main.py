"""Train a variant from its config: a thin shell over `train.train_and_evaluate`.

  python -m bn_inception.main --config=configs/bn_x30.py --workdir=runs/bn_x30 [--config.FIELD=VALUE ...]

Rerunning the same command resumes from the newest checkpoint in the workdir. On several hosts run
the same command on every host (README.md, "Several hosts"): Slurm, Open MPI and TPU pods are
detected; elsewhere add --coordinator_address=HOST:PORT --num_processes=N --process_id=I.
"""

import os

from absl import app
from absl import flags
from ml_collections import config_flags

from bn_inception import cli
from bn_inception import config_checks
from bn_inception import run_dir

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file, e.g. '
                                          'configs/bn_x30.py or configs/bn_x30.py:digits.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, config and metrics.')
_START_OVER = flags.DEFINE_bool(
    'start_over_if_unreadable', False, 'When the workdir holds checkpoints but none can be read, '
    'set them aside (STEP.unreadable.TIME) and train from step 0, instead of stopping.')
cli.define_multihost_flags()
flags.adopt_module_key_flags(cli)  # --coordinator_address etc., --traceback in --help
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  # Bad input is refused at once, not after JAX's and the data's setup; the config before the
  # processes compare it, which derives its fields (num_train_steps from batch_size).
  config_checks.check(_CONFIG.value)
  run_dir.check_writable(_WORKDIR.value)
  cli.start()
  cli.check_processes_agree(config=_CONFIG.value.to_dict(),
                            workdir=os.path.abspath(_WORKDIR.value))
  from bn_inception import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value,
                           start_over_if_unreadable=_START_OVER.value)


if __name__ == '__main__':
  cli.run(main)
