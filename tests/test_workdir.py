"""The workdir from the outside: a report read where only run directories were copied (no JAX, no
TensorFlow), workdirs refused at once, and what Orbax leaves or says there."""

import os
import subprocess
import sys

import pytest

from test_report import make_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_report_needs_neither_jax_nor_tensorflow(tmp_path):
  # Only the run directory is copied; importing jax or tensorflow fails, as where neither is
  # installed.
  blocked = tmp_path / 'blocked'
  blocked.mkdir()
  for module in ('jax', 'jaxlib', 'tensorflow', 'orbax', 'flax'):
    (blocked / f'{module}.py').write_text(f'raise ImportError("{module} is not installed here")\n')
  copy = make_run(str(tmp_path), 'copied_run', 'bn_x5', [(100, 0.5), (200, 0.6), (300, 0.7)])
  result = subprocess.run(
      [sys.executable, '-m', 'bn_inception.report', copy, f'--output={tmp_path / "out"}'],
      cwd=tmp_path, env={**os.environ, 'PYTHONPATH': f'{blocked}{os.pathsep}{REPO}'},
      capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  assert '| BN-x5 |' in result.stdout  # named from its config, as with JAX
  assert (tmp_path / 'out' / 'report.md').exists() and (tmp_path / 'out' / 'figure2.png').exists()
