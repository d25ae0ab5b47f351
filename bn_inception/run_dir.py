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
