"""What the command-line entry points share: logging, joining the other processes of a run, and how
errors the user can fix are reported (`run`)."""

import atexit
import json
import logging as std_logging
import os
import re
import signal
import sys
import threading
import time
import traceback
from typing import Any, Callable, NoReturn

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from bn_inception import errors
from bn_inception import run_dir

_TRACEBACK = flags.DEFINE_bool(
    'traceback', False, 'Also print the Python traceback of an error in the input (config, flags, '
    'files, workdir), e.g. for a bug report.')

# How long a process may stay silent before the others declare it dead and stop: JAX's own default
# (jax.distributed.initialize(heartbeat_timeout_seconds=100), JAX 0.9-0.11). Heartbeats come from a
# background thread, so compiling or saving never delays them; a shorter timeout stops a run that
# lost a host sooner, but also one whose host merely stalled (swapping, a network hiccup).
HEARTBEAT_TIMEOUT_SECONDS = 100
# How long, after a Python error in one process, the others may take to stop too (and the failing
# process waits for them to have read of it, and at JAX's shutdown barrier).
FAILURE_TIMEOUT_SECONDS = 60
_FAILED_KEY = 'bn_inception/failed'  # in JAX's key-value store: "PROCESS_ID: what it ran into"


def define_multihost_flags(flag_values=flags.FLAGS) -> None:
  """--coordinator_address, --num_processes, --process_id, --multihost, --heartbeat_timeout,
  --failure_timeout."""
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
  flags.DEFINE_integer(
      'failure_timeout', FAILURE_TIMEOUT_SECONDS, 'Seconds within which every process stops (exit '
      'status 1, naming the failed process) after a Python error in one of them.', lower_bound=1,
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
          **given, heartbeat_timeout_seconds=flag_values['heartbeat_timeout'].value,
          shutdown_timeout_seconds=flag_values['failure_timeout'].value)
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
    global _failure_timeout
    _failure_timeout = flag_values['failure_timeout'].value
    watcher = threading.Thread(target=_stop_when_another_fails, daemon=True)
    watcher.start()
    # Stopped before JAX's own exit handler (registered earlier, so run later) shuts the client
    # down: a call still waiting in the client then would abort the process.
    atexit.register(lambda: (_finished.set(), watcher.join()))


_failure_timeout = None  # set by `start` once this process is one of several
_finished = threading.Event()  # set at exit, for the watcher to stop asking


def _kv_store():
  # JAX's key-value store at the coordination service (no public handle; Orbax uses it so too).
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


def _stop_when_another_fails() -> None:
  """Waits (on a thread) for another process's failure; then says which failed and exits 1, rather
  than waiting in a collective or at JAX's shutdown barrier for a process that will never come."""
  import jax  # pylint: disable=g-import-not-at-top
  client, me = _kv_store(), jax.process_index()
  while not _finished.wait(1.0):  # asks once a second: a blocking wait could not be stopped
    try:
      failure = client.key_value_try_get(_FAILED_KEY)
    except Exception:  # pylint: disable=broad-except  # not set: no process failed
      continue
    failed, what = failure.split(':', 1)
    if failed == str(me):
      return  # this process failed itself: `run` stops it
    sys.stderr.write(f'Error: process {failed} of the run failed ({what.strip()}); stopping '
                     f'process {me} too.\n')
    _leave(1)


def _report_failure(error: BaseException) -> None:
  """Tells the other processes that this one failed (unless another failed first)."""
  import jax  # pylint: disable=g-import-not-at-top
  what = (f'exit status {error.code}' if isinstance(error, SystemExit)
          else errors.describe(error))
  try:
    _kv_store().key_value_set(_FAILED_KEY, f'{jax.process_index()}: {what}')
    sys.stderr.write(f'Error: process {jax.process_index()} failed; stopping the other processes '
                     'of the run.\n')
  except Exception:  # pylint: disable=broad-except  # another process failed first
    pass


def _leave(status: int) -> NoReturn:
  """Exits now, not at JAX's shutdown barrier (which would wait for processes that have stopped).
  Process 0 holds the coordination service, and the others abort when it goes: it leaves last,
  once each other process said it leaves (or after --failure_timeout)."""
  import jax  # pylint: disable=g-import-not-at-top
  sys.stdout.flush()
  sys.stderr.flush()
  client, me = _kv_store(), jax.process_index()
  try:
    if me:
      client.key_value_set(f'{_FAILED_KEY}/left/{me}', '1')
    else:
      for i in range(1, jax.process_count()):
        client.blocking_key_value_get(f'{_FAILED_KEY}/left/{i}', _failure_timeout * 1000)
      time.sleep(1)  # for the last one's exit to get under way
  except Exception:  # pylint: disable=broad-except  # gone already, or not answering
    pass
  os._exit(status)  # pylint: disable=protected-access  # other threads may be in a collective


def check_processes_agree(**values: Any) -> None:
  """Refuses, in every process, to go on when the processes of one run were started with different
  `values` (e.g. config=..., workdir=...): each would otherwise train its own thing, or fail at its
  first checkpoint. Call it after `start`, with the same keyword names in every process."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return
  mine = json.loads(json.dumps(values, default=str))
  client, me = _kv_store(), jax.process_index()
  client.key_value_set(f'bn_inception/agree/{me}', json.dumps(mine))
  for i in range(jax.process_count()):
    theirs = json.loads(client.blocking_key_value_get(f'bn_inception/agree/{i}',
                                                      _failure_timeout * 1000))
    differ = run_dir.diff(theirs if i == 0 else mine, mine if i == 0 else theirs)
    if differ:
      raise errors.ConfigError(
          f'Process {i if me == 0 else me} was started with '
          + ', '.join(f'{k}={b!r} (process 0: {a!r})' for k, (a, b) in differ.items())
          + ': start every process of a run with the same --config, overrides and --workdir.')


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

  def main_stopping_the_others(argv):
    try:
      return main_reporting_user_errors(argv)
    except BaseException as e:  # pylint: disable=broad-except
      interrupted = isinstance(e, SystemExit) and e.code in (None, 0, 128 + signal.SIGINT)
      if _failure_timeout is None or interrupted or isinstance(e, app.UsageError):
        raise
      if not isinstance(e, SystemExit):
        traceback.print_exc()
      _report_failure(e)
      _leave(e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1)

  app.run(main_stopping_the_others, flags_parser=_parse_flags)


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
