"""The report: Figure 3 from hand-written metrics.jsonl files with known crossings, the robust
target, variant naming, the paper's numbers, refusals, and the command line."""

import importlib
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from bn_inception import errors
from bn_inception import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_run(root, name, module, curve, *, planned=None, trained=None, batch_size=32, seed=0,
             scale='digits', **overrides):
  """A workdir as training leaves it: config.json from configs/<module>.py and metrics.jsonl with
  a training log and an evaluation at each (step, top-1) of `curve`. Steps are training steps."""
  workdir = os.path.join(root, name)
  os.makedirs(workdir)
  c = importlib.import_module(f'configs.{module}').get_config(scale)
  c.batch_size, c.seed = batch_size, seed
  last = trained or curve[-1][0]
  c.num_train_steps = planned or last
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(c.to_json_best_effort())
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    evals = dict(curve)
    for step in sorted(set(evals) | {last}):
      paper = step * batch_size // 32
      f.write(json.dumps({'step': step, 'loss': 1.0, 'top1': 0.5, 'learning_rate': 0.1,
                          'img_per_s': 100.0, 'paper_step': paper}) + '\n')
      if step in evals:
        f.write(json.dumps({'step': step, 'eval_top1': evals[step], 'eval_top5': 1.0,
                            'eval_loss': 0.5, 'eval_examples': 360.0, 'paper_step': paper}) + '\n')
  return workdir


def every_100(*top1):
  return [(100 * (i + 1), a) for i, a in enumerate(top1)]


# Inception: raw maximum 0.9 at step 600 (one evaluation); best 3-evaluation average
# (0.8 + 0.9 + 0.8) / 3 at step 700, then no new best for the rest of the run (a plateau).
INCEPTION = every_100(0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 0.8, 0.7, 0.7, 0.7, 0.7, 0.7)
TARGET = (0.8 + 0.9 + 0.8) / 3


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  root = str(tmp_path_factory.mktemp('runs'))
  return {
      'inception': make_run(root, 'inception', 'inception', INCEPTION),
      # Averages 0.733 at 300, 0.867 at 400: reaches the target at step 400, 700 / 400 = 1.75x.
      'bn_x5': make_run(root, 'bn_x5', 'bn_x5', every_100(0.5, 0.8, 0.9, 0.9, 0.9)),
      # Finished its planned 600 steps, best average 0.767: never.
      'bn_x30': make_run(root, 'bn_x30', 'bn_x30', every_100(0.3, 0.5, 0.6, 0.7, 0.8, 0.8)),
      # Still training: 500 of 2,000 steps, best average 0.783 so far.
      'bn_baseline': make_run(root, 'bn_baseline', 'bn_baseline',
                              every_100(0.3, 0.5, 0.7, 0.8, 0.85), planned=2000),
      # One lucky evaluation (0.95) above the target; its best average is 0.65: never.
      'sigmoid': make_run(root, 'sigmoid', 'bn_x5_sigmoid',
                          every_100(0.5, 0.95, 0.5, 0.5, 0.6, 0.6)),
      # Batch 64, so a training step is two paper steps: reaches 0.9 average at step 300.
      'bn_x5_b64': make_run(root, 'bn_x5_b64', 'bn_x5', [(100, 0.9), (200, 0.9), (300, 0.9)],
                            batch_size=64, seed=1),
  }


@pytest.fixture(scope='module')
def written(runs, tmp_path_factory):
  """(report, output folder) of write_report on the runs above."""
  output = tmp_path_factory.mktemp('report')
  return report.write_report(list(runs.values()), str(output)), output


def figure3_cells(text: str) -> dict[str, list[str]]:
  """{run: its cells after the first} of report.md's Figure 3 table (9 columns)."""
  rows = [[c.strip() for c in line.strip('|').split('|')] for line in text.splitlines()
          if line.startswith('| ')]
  return {r[0]: r[1:] for r in rows if len(r) == 9 and r[0] != 'Run'}


def rows_by_label(rep):
  return {row.run.label: row for row in rep.rows}


def test_figure3_from_handwritten_runs(runs):
  rep = report.figure3(report.read_runs(list(runs.values())))
  assert rep.target == pytest.approx(TARGET, abs=1e-12)
  assert rep.baseline_steps == 700 and rep.baseline_plateaued
  rows = rows_by_label(rep)
  assert list(rows) == ['Inception', 'BN-Baseline', 'BN-x5 seed 0', 'BN-x5 seed 1', 'BN-x30',
                        'BN-x5-Sigmoid']  # the paper's order; seeds where a variant has two runs
  expected = {  # steps to target (paper steps), best average, its step
      'Inception': (700, TARGET, 700),
      'BN-x5 seed 0': (400, 0.9, 500),
      'BN-x5 seed 1': (600, 0.9, 600),  # 300 steps of 64 images
      'BN-x30': (None, (0.7 + 0.8 + 0.8) / 3, 600),
      'BN-Baseline': (None, (0.7 + 0.8 + 0.85) / 3, 500),
      'BN-x5-Sigmoid': (None, (0.5 + 0.95 + 0.5) / 3, 300),  # the lucky one, a third of it
  }
  for label, (steps, top, top_step) in expected.items():
    row = rows[label]
    assert row.steps_to_target == steps, label
    assert row.max_accuracy == pytest.approx(top, abs=1e-12) and row.max_step == top_step, label
  assert report.far_enough(rows['BN-x5 seed 0']) == 'yes: reached it'
  assert report.far_enough(rows['BN-x30']) == 'yes: not within its planned 600 steps'
  assert report.far_enough(rows['BN-Baseline']) == (
      'not yet: 500 of its planned 2,000 steps (25%)')


def test_report_md_and_figure(written):
  rep, output = written
  text = (output / 'report.md').read_text()
  table = figure3_cells(text)
  assert '| Steps to 83.3% |' in text  # the target, in the header
  assert table['BN-x5 seed 0'][:3] == ['400', '1.8x', '90.0%']  # 700 / 400 = 1.75
  assert table['BN-x30'][:2] == ['never', '–']
  assert table['BN-Baseline'][4] == 'not yet: 500 of its planned 2,000 steps (25%)'
  assert 'BN-x5 (2 runs): steps to the target 400–600' in text  # the seed-to-seed spread
  assert '3 consecutive evaluations' in text  # the definition of the target is stated
  png = output / 'figure2.png'
  with Image.open(png) as image:
    assert image.format == 'PNG' and image.size[0] >= 600
  # Same data, a plateaued baseline; the batch-64 run evaluated every 200 paper steps.
  assert len(rep.notes) == 1 and 'different intervals (100, 200 paper steps)' in rep.notes[0]


def paper_md() -> pathlib.Path | None:
  """../shared/paper.md of the project's checkout (the lead's notes; absent from a bare clone)."""
  for parent in pathlib.Path(REPO).resolve().parents:
    if (parent / 'shared' / 'paper.md').exists():
      return parent / 'shared' / 'paper.md'
  return None


# Written out from ../shared/paper.md section 4.1 (the paper's Figure 3).
PAPER_MD_4_1 = {
    'Inception': ('31.0·10⁶', '72.2%'),
    'BN-Baseline': ('13.3·10⁶', '72.7%'),
    'BN-x5': ('2.1·10⁶', '73.0%'),
    'BN-x30': ('2.7·10⁶', '74.8%'),
    'BN-x5-Sigmoid': ('— (never reaches 72.2%)', '69.8%'),
}


def parse_paper_md(path: pathlib.Path) -> dict[str, tuple[str, str]]:
  section = path.read_text().split('### 4.1')[1].split('###')[0]
  rows = {}
  for line in section.splitlines():
    cells = [c.strip() for c in line.strip('|').split('|')]
    if line.startswith('| ') and cells[0] in report.PAPER_FIGURE3:
      rows[cells[0]] = (cells[1], cells[2])
  return rows


@pytest.mark.parametrize('source', ['written out', 'paper.md'])
def test_the_papers_numbers_are_paper_md_section_4_1(source, written):
  if source == 'paper.md':
    path = paper_md()
    if path is None:
      pytest.skip('../shared/paper.md is not beside this checkout')
    expected = parse_paper_md(path)
  else:
    expected = PAPER_MD_4_1
  assert set(expected) == {name for name, _ in report.VARIANTS}
  as_number = lambda s: float(re.match(r'[\d.]+', s).group()) * 1e6 if '10⁶' in s else None
  for name, (steps, top) in expected.items():
    paper = report.PAPER_FIGURE3[name]
    assert paper.steps_to_target == as_number(steps), name
    assert f'{100 * paper.max_accuracy:.1f}%' == top, name
  # And the report shows them in each variant's row, with the ratio to Inception's 31.0M.
  table = figure3_cells((written[1] / 'report.md').read_text())
  for name, (steps, top) in expected.items():
    number = as_number(steps)
    cells = table.get(name) or table[f'{name} seed 0']
    assert cells[-3:] == [f'{number / 1e6:.1f}M' if number else 'never',
                          f'{31.0 / (number / 1e6):.1f}x' if number else '–', top], name


def test_several_baseline_runs_set_the_lowest_best_as_the_target(tmp_path):
  """Every baseline run reaches the target; the baseline's steps are the median of theirs."""
  low = make_run(str(tmp_path), 'low', 'inception', every_100(0.5, 0.7, 0.8, 0.8, 0.8, 0.8))
  high = make_run(str(tmp_path), 'high', 'inception', every_100(0.5, 0.8, 0.9, 0.9, 0.9, 0.9),
                  seed=1)
  rep = report.figure3(report.read_runs([low, high]))
  assert rep.target == pytest.approx(0.8)  # low's best average, at 500; high's average reaches it at 400
  assert [r.steps_to_target for r in rep.rows] == [500, 400] and rep.baseline_steps == 450


def test_another_baseline_sets_the_target_and_names_the_column(tmp_path):
  """--baseline: the chosen runs' best average is the target, the ratio column is named after
  them; a workdir that is not among those reported is refused."""
  inception = make_run(str(tmp_path), 'inception', 'inception', every_100(0.5, 0.9, 0.95, 0.95))
  bn = make_run(str(tmp_path), 'bn', 'bn_baseline', every_100(0.5, 0.7, 0.8, 0.8, 0.8))
  rep = report.write_report([inception, bn], str(tmp_path / 'out'), baseline=[bn])
  assert rep.target == pytest.approx(0.8) and rep.baseline_steps == 500  # averages .67 .77 .8
  text = (tmp_path / 'out' / 'report.md').read_text()
  assert '| Run | Steps to 80.0% | BN-Baseline / it |' in text, text
  assert '"BN-Baseline / it" divides the baseline\'s steps (500)' in text, text
  with pytest.raises(errors.ConfigError, match='not among those reported'):
    report.write_report([inception], str(tmp_path / 'out2'), baseline=[bn])


def test_robust_target_on_a_noisy_curve(tmp_path):
  """One lucky evaluation moves the target by a third of its luck (window 3), not all of it, and
  a run above the target for one evaluation has not reached it."""
  rng = np.random.default_rng(0)
  noisy = 0.9 + rng.uniform(-0.01, 0.01, size=40)
  noisy[20] = 0.99  # lucky
  steps = np.arange(1, 41) * 100
  averages = report.moving_average(steps, noisy, 3)[1]
  target = max(averages)
  assert max(noisy) == 0.99
  assert 0.9 + 0.09 / 3 - 0.01 <= target <= 0.9 + 0.09 / 3 + 0.01  # not 0.99
  challenger = np.full(10, 0.85)
  challenger[4] = 0.99  # above the target once
  assert report.first_reaching(*report.moving_average(steps[:10], challenger, 3), target) is None
  challenger[4], challenger[5:8] = 0.85, 0.95  # three evaluations above it: reached at the third
  assert report.first_reaching(*report.moving_average(steps[:10], challenger, 3), target) == 800


def test_plateau_is_no_new_best_in_the_last_quarter():
  steps = np.arange(1, 13) * 100
  rising = np.linspace(0.5, 0.9, 12)
  assert not report.plateaued(steps, rising)
  flat_after_900 = np.minimum(rising, rising[8])  # best first reached at 900 of 1200
  assert report.plateaued(steps, flat_after_900)
  flat_after_1000 = np.minimum(rising, rising[9])  # 1000 > 3/4 of 1200
  assert not report.plateaued(steps, flat_after_1000)


def test_variants_are_named_from_their_configs(tmp_path):
  # Another length, batch, seed and width: still the variant; another learning rate: none.
  named = make_run(str(tmp_path), 'a', 'bn_x30', [(100, 0.5)], batch_size=64, seed=3,
                   **{'model.width': 0.5, 'paper_steps': 123})
  other_lr = make_run(str(tmp_path), 'b', 'bn_x30', [(100, 0.5)], learning_rate=0.5)
  member = make_run(str(tmp_path), 'c', 'ensemble', [(100, 0.5)])  # BN-x30 with dropout
  imagenet = make_run(str(tmp_path), 'd', 'bn_x5_sigmoid', [(100, 0.5)], scale='imagenet')
  runs = report.read_runs([named, other_lr, member, imagenet])
  assert [(r.variant, r.label) for r in runs] == [
      ('BN-x30', 'BN-x30'), ('BN-x5-Sigmoid', 'BN-x5-Sigmoid'), (None, other_lr),
      (None, member)]
  # A run at the paper's scale is measured against the paper's length for its variant.
  assert report.paper_length(runs[1]) == (6_000_000, 'the paper\'s')


def test_refusals_and_notes(runs, tmp_path):
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(ValueError, match=f'{empty} has no metrics.jsonl'):
    report.read_runs([runs['inception'], str(empty)])
  other_data = make_run(str(tmp_path), 'crops', 'bn_x5', every_100(0.5, 0.6, 0.7),
                        **{'dataset.eval_crops': '10'})
  rep = report.figure3(report.read_runs([runs['inception'], other_data]))
  assert any('evaluated on different data or crops' in n and '10' in n for n in rep.notes)
  rising = make_run(str(tmp_path), 'rising', 'inception', every_100(0.2, 0.4, 0.6, 0.8))
  rep = report.figure3(report.read_runs([rising]))
  assert rep.target == pytest.approx(0.6) and not rep.baseline_plateaued
  assert any('target may still rise' in n for n in rep.notes)
  just_started = make_run(str(tmp_path), 'started', 'bn_x5', every_100(0.3, 0.5), planned=1000)
  rep = report.figure3(report.read_runs([runs['bn_x5'], just_started]))
  assert rep.target is None and any('No Inception run' in n for n in rep.notes)
  assert any('Fewer than 3 evaluations yet' in n and just_started in n for n in rep.notes)
  assert rep.rows[1].max_accuracy is None  # shown, without an average yet


def test_metrics_of_a_resumed_run_and_a_line_being_written(tmp_path):
  """A run that crashed after step 500 and resumed from its checkpoint at 200 logs 300 and 400
  again: what it logs replaces everything after 200 (500 included); a last line without its
  newline (being written) is left for the next read."""
  workdir = make_run(str(tmp_path), 'r', 'inception', every_100(0.1, 0.2, 0.3, 0.4, 0.5))
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    f.write(json.dumps({'step': 300, 'eval_top1': 0.35, 'eval_examples': 360}) + '\n')
    f.write(json.dumps({'step': 400, 'eval_top1': 0.45, 'eval_examples': 360}) + '\n')
    f.write('{"step": 500, "eval_to')
  run = report.read_run(workdir)
  assert run.steps.tolist() == [100, 200, 300, 400]
  assert run.top1.tolist() == [0.1, 0.2, 0.35, 0.45] and run.trained == 400


def test_log_scale_when_steps_span_decades():
  assert report.spans_decades(np.array([40_000, 400_000, 4_000_000]))
  assert not report.spans_decades(np.array([50, 100, 2500]))


def test_command_line(runs, tmp_path):
  out = subprocess.run(
      [sys.executable, '-m', 'bn_inception.report', runs['inception'], runs['bn_x5'],
       f'--output={tmp_path}'], cwd=tmp_path, env={**os.environ, 'PYTHONPATH': REPO},
      capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  assert '| BN-x5 | 400 | 1.8x |' in out.stdout
  assert (tmp_path / 'report.md').exists() and (tmp_path / 'figure2.png').exists()
  refused = subprocess.run(
      [sys.executable, '-m', 'bn_inception.report', runs['inception'], str(tmp_path)],
      cwd=tmp_path, env={**os.environ, 'PYTHONPATH': REPO}, capture_output=True, text=True)
  assert refused.returncode != 0 and 'Traceback' not in refused.stderr
  assert f'Error: {tmp_path} has no metrics.jsonl' in refused.stderr
