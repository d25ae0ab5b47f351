"""Train a variant from its config: a thin shell over `train.train_and_evaluate`.

  python -m bn_inception.main --config=configs/bn_x30.py --workdir=runs/bn_x30 [--config.FIELD=VALUE ...]

Rerunning the same command resumes from the newest checkpoint in the workdir. On several hosts (Slurm,
Open MPI, TPU pods) run the same command on every host: JAX's distributed runtime finds its peers.
"""

import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Training config file, e.g. '
                                          'configs/bn_x30.py or configs/bn_x30.py:digits.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, config and metrics.')
_MULTIHOST = flags.DEFINE_bool(
    'multihost', None, 'Call jax.distributed.initialize(). Default: when a cluster launcher '
    '(Slurm, Open MPI, TPU pod) or JAX_COORDINATOR_ADDRESS is detected.')
flags.mark_flags_as_required(['config', 'workdir'])



def launched_on_several_hosts() -> bool:
  """Whether a cluster launcher started this process as one of several."""
  if any(int(os.environ.get(v, '1')) > 1 for v in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE')):
    return True
  return any(v in os.environ for v in ('JAX_COORDINATOR_ADDRESS', 'TPU_WORKER_HOSTNAMES'))


def quiet_orbax() -> None:
  """Orbax logs every step of every save at INFO; keep its warnings only."""
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  quiet_orbax()
  # TensorFlow only feeds data: keep it off the accelerators' memory.
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  multihost = _MULTIHOST.value
  if multihost or (multihost is None and launched_on_several_hosts()):
    jax.distributed.initialize()
  logging.info('JAX %s, process %d of %d, devices: %s', jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  from bn_inception import train  # pylint: disable=g-import-not-at-top
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
