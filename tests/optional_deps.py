"""The test extra's heavy dependencies: torch (CPU) and the PyTorch port (pretrainedmodels, --no-deps).

A test that needs one skips where it is missing, so that `pip install -e '.[test]'` alone runs the
rest. `make test` (and so CI) sets BN_INCEPTION_REQUIRE_TORCH=1: there a missing one fails the test,
saying what to install, so that the converter's parity tests never go quietly unrun.
"""

import importlib
import os

import pytest

REQUIRE = 'BN_INCEPTION_REQUIRE_TORCH'


def load(loader=lambda: importlib.import_module('torch')):
  """loader() (default: import torch), or a skip (a failure under BN_INCEPTION_REQUIRE_TORCH=1)."""
  try:
    return loader()
  except ModuleNotFoundError as error:
    missing = error
  message = (f'{missing}: install the test extra as `make install` does (torch==2.13.0, and '
             'pretrainedmodels==0.7.4 with --no-deps)')
  if os.environ.get(REQUIRE) == '1':
    pytest.fail(f'{message}; {REQUIRE}=1 (make test) runs every test.', pytrace=False)
  pytest.skip(message)
