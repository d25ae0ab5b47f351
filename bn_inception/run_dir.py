"""A run's directory as its readers see it: config.json, and the units its metrics are in.

No imports beyond ml_collections: the report reads run directories copied to a machine without
JAX or TensorFlow. Checkpoints (Orbax) are `checkpoints`' business.
"""

import json
import os

import ml_collections

from bn_inception import errors

PAPER_BATCH = 32  # the paper's mini-batch: learning rates and "paper steps" are per 32 images
CONFIG = 'config.json'


def read_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG)
  if not os.path.exists(path):
    raise errors.NotFoundError(f'{path} not found: is {workdir} a bn_inception workdir?')
  try:
    with open(path) as f:
      return ml_collections.ConfigDict(json.load(f))
  except (ValueError, TypeError) as e:  # not JSON (JSONDecodeError, UnicodeDecodeError), or no dict
    raise errors.InputFileError(
        f'{path} cannot be read as a config ({errors.describe(e)}). Restore it, or replace it '
        'with the config the run was started with: evaluation accepts --config=FILE instead, and '
        'training writes it anew once the file is deleted.') from e


def check_writable(workdir: str, flag: str = '--workdir') -> None:
  """Refuses a workdir that training could not create or write (a file, a path under a file, a
  directory this user may not write), before the minutes of setup that would end in a traceback."""
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = 'is' if existing == path else f'cannot be created: {existing} is'
    raise errors.ConfigError(f'{flag}={workdir} {where} a file, not a directory. Name a directory '
                             '(training creates it), e.g. --workdir=runs/bn_x30.')
  if not os.access(existing, os.W_OK | os.X_OK):
    what = 'the directory' if existing == path else f'cannot be created: {existing}'
    raise errors.ConfigError(f'{flag}={workdir}: {what} is not writable by this user. Choose a '
                             'directory you can write, or change its permissions.')
