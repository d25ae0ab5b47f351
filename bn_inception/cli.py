"""What the command-line entry points share: logging, and joining the other hosts of a run."""

import logging as std_logging
import os
from typing import Optional

from absl import flags
from absl import logging
import jax


def define_multihost_flag(flag_values=flags.FLAGS) -> flags.FlagHolder:
  return flags.DEFINE_bool(
      'multihost', None, 'Call jax.distributed.initialize(). Default: when a cluster launcher '
      '(Slurm, Open MPI, TPU pod) or JAX_COORDINATOR_ADDRESS is detected.', flag_values=flag_values)


def launched_on_several_hosts() -> bool:
  """Whether a cluster launcher started this process as one of several."""
  if any(int(os.environ.get(v, '1')) > 1 for v in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE')):
    return True
  return any(v in os.environ for v in ('JAX_COORDINATOR_ADDRESS', 'TPU_WORKER_HOSTNAMES'))


def quiet_orbax() -> None:
  """Orbax logs every step of every save at INFO; keep its warnings only."""
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname)


def start(multihost: Optional[bool]) -> None:
  """Quiet Orbax, keep TensorFlow (which only feeds data) off the accelerators' memory, and join
  the other hosts when there are any (`multihost`: the --multihost flag)."""
  quiet_orbax()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if multihost or (multihost is None and launched_on_several_hosts()):
    jax.distributed.initialize()
  logging.info('JAX %s, process %d of %d, devices: %s', jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
