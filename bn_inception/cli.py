"""What the command-line entry points share: logging, joining the other hosts of a run, and how
errors the user can fix are reported (`run`)."""

import logging as std_logging
import os
import re
import sys
import traceback
from typing import Any, Callable, NoReturn, Optional

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from bn_inception import errors

_TRACEBACK = flags.DEFINE_bool(
    'traceback', False, 'Also print the Python traceback of an error in the input (config, flags, '
    'files, workdir), e.g. for a bug report.')


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


def run(main: Callable[[list[str]], Any]) -> None:
  """`absl.app.run(main)` for every entry point: an error the user can fix (`errors.UserError`, a
  --config.FIELD the config does not have, a --config file that is not there) is printed as one
  message on stderr, exit status 1, without the Python traceback unless --traceback is given."""
  def main_reporting_user_errors(argv):
    try:
      return main(argv)
    except errors.UserError as e:
      if _TRACEBACK.value:
        traceback.print_exc()
      exit_with_error(str(e))

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
