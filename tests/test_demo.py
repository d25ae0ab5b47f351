"""The demo: Figure 3's arithmetic on hand-made curves, and the --quick setting end to end."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bn_inception import checkpoints
from bn_inception import demo
from bn_inception import evaluate
from bn_inception import predictions

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def test_steps_to_target_is_the_first_evaluation_that_reaches_it():
  curve = [(50, 0.2), (100, 0.6), (150, 0.55), (200, 0.9)]
  assert demo.steps_to_target(curve, 0.6) == 100  # reached exactly counts
  assert demo.steps_to_target(curve, 0.58) == 100  # the first, not the last, step above it
  assert demo.steps_to_target(curve, 0.1) == 50
  assert demo.steps_to_target(curve, 0.95) is None  # never


def test_best_is_the_maximum_and_the_first_step_it_was_reached():
  assert demo.best([(50, 0.5), (100, 0.7), (150, 0.6), (200, 0.7)]) == (0.7, 100)


def test_figure3_races_to_the_baselines_best():
  """The target is Inception's maximum (not its last value); each row says when the variant first
  reached it, or None, and its own maximum."""
  curves = {
      'Inception': [(100, 0.3), (200, 0.8), (300, 0.7)],
      'BN-x5': [(100, 0.85), (200, 0.95), (300, 0.9)],
      'BN-Baseline': [(100, 0.5), (200, 0.7), (300, 0.8)],
      'BN-x5-Sigmoid': [(100, 0.2), (200, 0.4), (300, 0.6)],
  }
  target, rows = demo.figure3(curves)
  assert target == 0.8
  assert rows == [
      dict(name='Inception', steps_to_target=200, max_accuracy=0.8, max_step=200),
      dict(name='BN-x5', steps_to_target=100, max_accuracy=0.95, max_step=200),
      dict(name='BN-Baseline', steps_to_target=300, max_accuracy=0.8, max_step=300),
      dict(name='BN-x5-Sigmoid', steps_to_target=None, max_accuracy=0.6, max_step=300),
  ]


@pytest.fixture(scope='module')
def quick_demo(tmp_path_factory):
  """(output folder, run_demo's result, progress text) of `scripts/demo.py --quick`."""
  output = tmp_path_factory.mktemp('demo')
  stream = io.StringIO()
  result = demo.run_demo(str(output), quick=True, stream=stream)
  return output, result, stream.getvalue()


def test_quick_demo_trains_evaluates_and_ensembles_the_five_variants(quick_demo):
  output, result, progress = quick_demo
  text = (output / 'results.md').read_text()
  for name, module in demo.VARIANTS:
    assert f'\n| {name} | ' in text
    workdir = output / 'runs' / module
    assert sorted(os.listdir(workdir / 'checkpoints')) == ['10']
    assert predictions.load(str(workdir / 'test.npz')).num_examples == 360
    assert f'] {name}: 10 steps' in progress  # the progress display's line at the end of each run
  assert '\n| Ensemble of the 4 BN runs' in text
  assert [r['name'] for r in result['rows']] == [name for name, _ in demo.VARIANTS]
  assert len(result['ensemble']) == 5  # four members and the ensemble
  assert '## What the runs show, claim by claim' in text and '## Settings' in text
  assert str(output) in progress.splitlines()[-1]  # the folder is printed at the end


@pytest.mark.parametrize('name', ['figure2_accuracy.png', 'figure1_mlp.png'])
def test_quick_demo_writes_valid_pngs(quick_demo, name):
  path = quick_demo[0] / name
  assert path.read_bytes()[:8] == PNG_SIGNATURE
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    assert image.format == 'PNG' and image.size[0] >= 600 and image.size[1] >= 300


def test_quick_demo_checkpoints_evaluate_afterwards(quick_demo):
  """bn_inception.evaluate reads a demo run from its workdir alone, and agrees with the table."""
  workdir = str(quick_demo[0] / 'runs' / 'bn_x5')
  p = evaluate.evaluate_checkpoint(checkpoints.read_config(workdir), workdir)
  reference = predictions.load(os.path.join(workdir, 'test.npz'))
  np.testing.assert_allclose(p.sorted_by_id().probs, reference.sorted_by_id().probs, atol=1e-6)


def test_script_runs_from_another_directory(tmp_path):
  """scripts/demo.py finds the repository's configs and library wherever it is started."""
  out = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'demo.py'), '--help'],
                       cwd=tmp_path, capture_output=True, text=True, check=True)
  assert '--quick' in out.stdout and '--steps' in out.stdout
