"""The demo's --quick setting end to end: the protocol, report.md and results.md, figures."""

import io
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from bn_inception import checkpoints
from bn_inception import demo
from bn_inception import evaluate
from bn_inception import predictions
from bn_inception import report
from bn_inception import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def quick_demo(tmp_path_factory):
  """(output folder, run_demo's result, progress text) of `scripts/demo.py --quick`."""
  output = tmp_path_factory.mktemp('demo')
  stream = io.StringIO()
  result = demo.run_demo(str(output), quick=True, stream=stream)
  return output, result, stream.getvalue()


def test_quick_demo_follows_the_protocol_and_writes_the_report(quick_demo):
  """The baseline is extended until its cap (too short to plateau), the others train for the
  paper's lengths relative to it; report.md and results.md hold the report's Figure 3 table."""
  output, result, progress = quick_demo
  rep = result['report']
  assert [r.run.label for r in rep.rows] == [name for name, _ in report.VARIANTS]
  inception = rep.rows[0].run
  assert inception.trained == demo.QUICK['baseline_budget'] and len(inception.steps) == 4
  assert rep.target == max(report.averaged(inception, report.WINDOW)[1])
  for row in rep.rows[1:]:
    assert row.run.trained == result['lengths'][row.run.variant] == 15  # a moving average's worth
    workdir = output / 'runs' / os.path.basename(row.run.workdir)
    assert sorted(os.listdir(workdir / 'checkpoints')) == ['15']
    assert predictions.load(str(workdir / 'test.npz')).num_examples == 360
  assert sorted(os.listdir(output / 'runs' / 'inception_seed0' / 'checkpoints')) == ['15', '20']
  for name, _ in report.VARIANTS:
    assert f'] {name} seed 0: ' in progress  # the line at the end of each run
  assert len(result['ensemble']) == 5  # four members and the ensemble
  report_md, results_md = (output / 'report.md').read_text(), (output / 'results.md').read_text()
  table = report.markdown(rep)
  table = table[table.index('| Run |'):table.index('\n\n', table.index('| Run |'))]
  assert table in report_md and table in results_md  # one implementation of Figure 3
  for section in ('## The paper\'s protocol, in miniature', '## What the runs show, claim by claim',
                  '## Settings'):
    assert section in results_md
  assert str(output) in progress.splitlines()[-1]  # the folder is printed at the end


@pytest.mark.parametrize('name', ['figure2.png', 'figure1_mlp.png'])
def test_quick_demo_writes_valid_pngs(quick_demo, name):
  path = quick_demo[0] / name
  assert path.read_bytes()[:8] == PNG_SIGNATURE
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    assert image.format == 'PNG' and image.size[0] >= 600 and image.size[1] >= 300


def test_quick_demo_checkpoints_evaluate_afterwards(quick_demo):
  """bn_inception.evaluate reads a demo run from its workdir alone, and agrees with the table (on
  the demo's one device: the same program; the rounding of eight differs by up to ~2e-6)."""
  workdir = str(quick_demo[0] / 'runs' / 'bn_x5_seed0')
  p = evaluate.evaluate_checkpoint(checkpoints.read_config(workdir), workdir,
                                   mesh=train.make_mesh(jax.devices()[:1]))
  reference = predictions.load(os.path.join(workdir, 'test.npz'))
  np.testing.assert_allclose(p.sorted_by_id().probs, reference.sorted_by_id().probs, atol=1e-6)


def test_script_runs_from_another_directory(tmp_path):
  """scripts/demo.py finds the repository's configs and library wherever it is started."""
  out = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'demo.py'), '--help'],
                       cwd=tmp_path, capture_output=True, text=True, check=True)
  assert '--quick' in out.stdout and '--output' in out.stdout
