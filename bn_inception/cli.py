"""What the command-line entry points share: logging, joining the other processes of a run, and how
errors the user can fix are reported (`run`)."""

import logging as std_logging
import os
import re
import signal
import sys
import traceback
from typing import Any, Callable, NoReturn

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from bn_inception import errors

_TRACEBACK = flags.DEFINE_bool(
    'traceback', False, 'Also print the Python traceback of an error in the input (config, flags, '
    'files, workdir), e.g. for a bug report.')

# How long a process may stay silent before the others declare it dead and stop: JAX's own default
# (jax.distributed.initialize(heartbeat_timeout_seconds=100), JAX 0.9-0.11). Heartbeats come from a
# background thread, so compiling or saving never delays them; a shorter timeout stops a run that
# lost a host sooner, but also one whose host merely stalled (swapping, a network hiccup).
HEARTBEAT_TIMEOUT_SECONDS = 100


def define_multihost_flags(flag_values=flags.FLAGS) -> None:
  """--coordinator_address, --num_processes, --process_id, --multihost, --heartbeat_timeout."""
  flags.DEFINE_string(
      'coordinator_address', None, 'HOST:PORT of process 0, reachable from every process (any free '
      'port). Default: detected (Slurm, Open MPI, TPU pods) or $JAX_COORDINATOR_ADDRESS.',
      flag_values=flag_values)
  flags.DEFINE_integer('num_processes', None, 'Processes in the run (usually one per host). '
                       'Default: detected.', lower_bound=1, flag_values=flag_values)
  flags.DEFINE_integer('process_id', None, 'This process: 0 ... num_processes - 1. Default: '
                       'detected.', lower_bound=0, flag_values=flag_values)
  flags.DEFINE_bool(
      'multihost', None, 'Call jax.distributed.initialize() (with the flags above, detecting '
      'whatever they leave out). Default: when one of them is given, or a cluster launcher (Slurm, '
      'Open MPI, TPU pod) or $JAX_COORDINATOR_ADDRESS is detected.', flag_values=flag_values)
  flags.DEFINE_integer(
      'heartbeat_timeout', HEARTBEAT_TIMEOUT_SECONDS, 'Seconds without a sign of life after which '
      'a process is declared dead and the others stop with an error.', lower_bound=1,
      flag_values=flag_values)


def launched_on_several_hosts() -> bool:
  """Whether a cluster launcher started this process as one of several."""
  if any(int(os.environ.get(v, '1')) > 1 for v in ('SLURM_NTASKS', 'OMPI_COMM_WORLD_SIZE')):
    return True
  return any(v in os.environ for v in ('JAX_COORDINATOR_ADDRESS', 'TPU_WORKER_HOSTNAMES'))


def quiet_orbax() -> None:
  """Orbax logs every step of every save at INFO; keep its warnings only."""
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= std_logging.WARNING or 'orbax' not in record.pathname)


def start(flag_values=flags.FLAGS) -> None:
  """Quiets Orbax, keeps TensorFlow (which only feeds data) off the accelerators' memory, joins the
  other processes of the run when there are any (define_multihost_flags' flags), and logs which
  process this is and its devices. Call it before anything touches a device.

  On CPUs the processes talk through JAX's gloo collectives, which JAX turns on by default
  (jax_cpu_collectives_implementation='gloo' since JAX 0.5.1).
  """
  # JAX is imported here, not with the module: the ensemble (numpy work) never needs it.
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  quiet_orbax()
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  given = {name: flag_values[name].value
           for name in ('coordinator_address', 'num_processes', 'process_id')}
  multihost = flag_values['multihost'].value
  if multihost is None:
    multihost = any(v is not None for v in given.values()) or launched_on_several_hosts()
  if multihost:
    try:
      jax.distributed.initialize(
          **given, heartbeat_timeout_seconds=flag_values['heartbeat_timeout'].value)
    except ValueError as e:  # e.g. "Number of processes must be defined."
      raise errors.ConfigError(
          f'{e} Outside Slurm, Open MPI and TPU pods, start every process with '
          '--coordinator_address=HOST:PORT (process 0\'s host, any free port), --num_processes=N '
          'and --process_id=0 ... N-1, or use python -m bn_inception.launch on one machine.') from e
  devices = jax.devices()
  logging.info('Process %d of %d: %d local devices, %d in all (%s); JAX %s.',
               jax.process_index(), jax.process_count(), jax.local_device_count(), len(devices),
               devices[0].device_kind, jax.__version__)
  if jax.process_count() > 1:
    # Orbax's barriers wait at the coordination service rather than run as device collectives,
    # which must never run concurrently: Orbax finalises a save on a thread while training goes on
    # (on CPUs, gloo then mixes up the messages of two barriers and aborts).
    import orbax.checkpoint  # pylint: disable=g-import-not-at-top,unused-import  # defines the flag
    flags.FLAGS.experimental_orbax_use_distributed_barrier = True
    # Here the processes are in step: form the groups through which later gathers talk. On CPUs
    # gloo gives a new group 30 s to form, and a process that finds its programs in the persistent
    # compilation cache runs ahead of one that compiles them (JAX reads the cache on every
    # process, but its keys differ between processes and only process 0 writes).
    multihost_utils.sync_global_devices('bn_inception.cli.start')


def run(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)` for every entry point: an error the user can fix (`errors.UserError`, a
  --config.FIELD the config does not have, a --config file that is not there) is printed as one
  message on stderr, exit status 1, without the Python traceback unless --traceback is given; so is
  Ctrl-C (KeyboardInterrupt), exit status 130."""
  def main_reporting_user_errors(argv):
    try:
      return main(argv)
    except errors.UserError as e:
      if _TRACEBACK.value:
        traceback.print_exc()
      exit_with_error(str(e))
    except KeyboardInterrupt as e:  # Ctrl-C: one line (training says where it resumes), no traceback
      if _TRACEBACK.value:
        traceback.print_exc()
      sys.stderr.write(f'{str(e) or "Interrupted."}\n')
      sys.exit(128 + signal.SIGINT)

  app.run(main_reporting_user_errors, flags_parser=_parse_flags)


def exit_with_error(message: str) -> NoReturn:
  sys.stderr.write(f'Error: {message}\n')
  sys.exit(1)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing and reports, plus ml_collections' errors in config overrides."""
  try:
    argv = app.parse_flags_with_usage(argv)  # absl reports its own errors (unknown flags, values)
  except (AttributeError, KeyError) as e:  # ml_collections: --config.FIELD names no field
    overrides = [a.lstrip('-').split('=', 1)[0] for a in argv[1:] if re.match(r'--?\w+\.', a)]
    if not overrides:
      raise
    if '--traceback' in argv:
      traceback.print_exc()
    exit_with_error(_unknown_field_message(e, overrides))
  except errors.ConfigArgumentError as e:  # raised by a config file's get_config
    if '--traceback' in argv:
      traceback.print_exc()
    given = next((a for a in argv[1:] if re.match(r'--?config=', a)), '--config')
    exit_with_error(f'{given}: {e}')
  if 'config' in flags.FLAGS and flags.FLAGS['config'].value is not None:
    # ml_collections defers the error of a config file that is not there to the config's first use.
    path = config_flags.get_config_filename(flags.FLAGS['config']).split(':', 1)[0]
    if not os.path.exists(path):
      exit_with_error(f'--config: {path} not found (relative paths start at {os.getcwd()}); e.g. '
                      '--config=configs/bn_x30.py.')
  return argv


def _unknown_field_message(error: Exception, overrides: list[str]) -> str:
  # ml_collections raises KeyError(name) (as AttributeError when it knows a close name, with "Did
  # you mean ..." in the message) from deep in its parser; name the flag and the suggestion.
  chain, e = [], error
  while e is not None:
    chain.append(e)
    e = e.__cause__ or e.__context__
  key = str(chain[-1].args[0]).strip('\'"') if chain[-1].args else '?'
  suggestion = re.search(r'Did you mean "([^"]+)"', ' '.join(str(e) for e in chain))
  field = next((o for o in overrides if key in o.split('.')[1:]), key)
  return (f'--{field}: the config has no field {key!r}'
          + (f'; did you mean {suggestion.group(1)!r}?' if suggestion else
             ' (configs/default.py lists the fields).'))
