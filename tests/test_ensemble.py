"""bn_inception.ensemble on hand-made predictions, and the ensemble members' configs."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from bn_inception import ensemble
from bn_inception import errors
from bn_inception import layers
from bn_inception import predictions
from bn_inception.predictions import Predictions
from configs import bn_x30
from configs import ensemble as ensemble_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def member(seed, n=50, classes=10, ids=None):
  """Random predictions of n examples, with labels that depend on the id only."""
  rng = np.random.default_rng(seed)
  ids = np.arange(1000, 1000 + n) if ids is None else ids
  probs = rng.dirichlet(np.ones(classes) * 0.3, size=len(ids)).astype(np.float32)
  return Predictions(probs, (np.asarray(ids) * 7) % classes, np.asarray(ids), {'step': seed})


def shuffled(p, seed):
  order = np.random.default_rng(seed).permutation(p.num_examples)
  return Predictions(p.probs[order], p.labels[order], p.ids[order], p.meta)


def test_top5_on_hand_made_probabilities():
  """The label ranked 1st, 3rd, 5th and 6th of 6 classes: top-1 1/4, top-5 3/4."""
  probs = np.array([[.5, .3, .1, .05, .03, .02],
                    [.3, .25, .2, .1, .1, .05],
                    [.1, .15, .2, .25, .3, 0.],
                    [.3, .25, .2, .1, .1, .05]], np.float32)
  labels = np.array([0, 2, 1, 5])
  acc = predictions.accuracy(Predictions(probs, labels, np.arange(4), {}))
  assert acc == {'top1': 0.25, 'top5': 0.75}


def test_report_never_counts_a_nonfinite_row():
  """A member with NaN and inf rows: those rows are wrong in its row of the report, the finite
  member's are right; the ensemble refuses such a member (its mean would be NaN or inf there)."""
  labels = np.arange(4) % 3
  right = np.eye(3, dtype=np.float32)[labels]
  broken = right.copy()
  broken[:2] = np.nan
  broken[2] = [np.inf, 0, 0]  # label 2
  members = [Predictions(right, labels, np.arange(4), {}),
             Predictions(broken, labels, np.arange(4), {})]
  rows = ensemble.report(members, ['right', 'broken'], members[0])
  assert [(r['name'], r['top1'], r['top5']) for r in rows[:2]] == [
      ('right', 1.0, 1.0), ('broken', 0.25, 0.25)]
  with pytest.raises(errors.InputFileError, match='not finite'):
    ensemble.ensemble(members, ['right', 'broken'])


def test_ensemble_of_a_file_with_itself_is_the_file(tmp_path):
  p = member(0)
  predictions.save(str(tmp_path / 'a.npz'), shuffled(p, 1))
  combined, rows = ensemble.ensemble_files([str(tmp_path / 'a.npz')] * 2)
  np.testing.assert_array_equal(combined.probs, p.probs)
  np.testing.assert_array_equal(combined.ids, p.ids)
  np.testing.assert_array_equal(combined.labels, p.labels)
  assert rows[0]['top1'] == rows[1]['top1'] == rows[2]['top1'] == predictions.accuracy(p)['top1']


def test_member_order_and_example_order_do_not_matter():
  a, b, c = member(0), member(1), member(2)
  reference = ensemble.ensemble([a, b, c], ['a', 'b', 'c'])
  other = ensemble.ensemble([shuffled(c, 3), a, shuffled(b, 4)], ['c', 'a', 'b'])
  np.testing.assert_array_equal(other.ids, reference.ids)
  np.testing.assert_array_equal(other.labels, reference.labels)
  np.testing.assert_allclose(other.probs, reference.probs, rtol=1e-7)
  assert predictions.accuracy(other) == predictions.accuracy(reference)
  # The paper's rule: the mean of the probabilities, example by example.
  np.testing.assert_allclose(reference.probs, (a.probs + b.probs + c.probs) / 3, rtol=1e-6)


def test_ensemble_can_beat_its_members():
  """Three members right on disjoint thirds, each unsure elsewhere: only the ensemble is right
  everywhere (a sanity check of the averaging, not a claim about real networks)."""
  n, classes = 30, 10
  labels = np.arange(n) % classes
  members = []
  for k in range(3):
    probs = np.full((n, classes), 0.05, np.float32)
    probs[np.arange(n), labels] = 0.2
    right = np.arange(n) % 3 == k
    probs[~right, (labels[~right] + 1 + k) % classes] = 0.3
    probs /= probs.sum(axis=1, keepdims=True)  # rows of probabilities: the ensemble refuses others
    members.append(Predictions(probs, labels, np.arange(n), {}))
  combined = ensemble.ensemble(members, ['a', 'b', 'c'])
  rows = ensemble.report(members, ['a', 'b', 'c'], combined)
  assert [round(r['top1'], 3) for r in rows] == [0.333, 0.333, 0.333, 1.0]
  assert 'ensemble' in ensemble.format_report(rows)


def test_disagreeing_files_are_refused():
  a = member(0)
  with pytest.raises(ValueError, match=r'b\.npz and a\.npz hold different examples: 2 ids of '
                     r'a\.npz are missing from b\.npz \(e\.g\. 1000, 1001\); 1 ids of b\.npz '
                     r'are not in a\.npz \(e\.g\. 5\)\.'):
    ensemble.ensemble([a, member(1, ids=np.r_[5, np.arange(1002, 1050)])], ['a.npz', 'b.npz'])
  wrong = member(1)
  wrong.labels = wrong.labels.copy()
  wrong.labels[[3, 8]] += 1
  with pytest.raises(ValueError, match=r'disagree on the labels of 2 ids, e\.g\. 1003: 1 vs 2'):
    ensemble.ensemble([a, shuffled(wrong, 0)], ['a.npz', 'b.npz'])
  with pytest.raises(ValueError, match='b.npz holds 1 ids more than once'):
    ensemble.ensemble([a, member(1, ids=np.r_[1000, np.arange(1000, 1049)])], ['a.npz', 'b.npz'])
  with pytest.raises(ValueError, match='b.npz has 5 classes, a.npz 10'):
    ensemble.ensemble([a, member(1, classes=5)], ['a.npz', 'b.npz'])


def test_command_line(tmp_path):
  """`python -m bn_inception.ensemble A B --output=E`: the table, the file; refusals exit 1."""
  for name, p in (('a', member(0)), ('b', shuffled(member(1), 0)), ('bad', member(2, n=40))):
    predictions.save(str(tmp_path / f'{name}.npz'), p)
  command = [sys.executable, '-m', 'bn_inception.ensemble', str(tmp_path / 'a.npz'),
             str(tmp_path / 'b.npz'), f'--output={tmp_path / "ens.npz"}']
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert [line.split()[0] for line in lines[2:5]] == ['a.npz', 'b.npz', 'ensemble']
  written = predictions.load(str(tmp_path / 'ens.npz'))
  expected = ensemble.ensemble([member(0), member(1)], ['a.npz', 'b.npz'])
  np.testing.assert_array_equal(written.probs, expected.probs)
  assert [m['file'] for m in written.meta['members']] == ['a.npz', 'b.npz']

  command[4] = str(tmp_path / 'bad.npz')
  result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert ('Error: bad.npz and a.npz hold different examples: 10 ids of a.npz are missing from '
          'bad.npz (e.g. 1040, 1041, 1042, 1043, 1044, ...).') in result.stderr


# ------------------------------------------------------------------------------------------------
# The members of paper section 4.2.3.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('scale', ['imagenet', 'digits'])
def test_members_are_bn_x30_modified_as_the_table_says(scale):
  base = bn_x30.get_config(scale).to_dict()
  seen = set()
  for m, (dropout, init_scale, seed) in ensemble_config.MEMBERS.items():
    c = ensemble_config.get_config(f'{scale},{m}')
    assert ensemble_config.get_config(f'{m},{scale}').to_dict() == c.to_dict()
    assert (c.model.dropout_rate, c.model.init_scale, c.seed) == (dropout, init_scale, seed)
    assert dropout in (0.05, 0.10) and init_scale >= 1  # the paper's rates; weights not smaller
    rest = c.to_dict()
    rest['model'] = {**rest['model'], 'dropout_rate': 0.0, 'init_scale': 1.0}
    assert {**rest, 'seed': 0} == base  # everything else is BN-x30's
    seen.add((dropout, init_scale, seed))
  assert len(seen) == len(ensemble_config.MEMBERS) == 6
  assert ensemble_config.get_config(scale if scale == 'digits' else None).to_dict() == (
      ensemble_config.get_config(f'{scale},1').to_dict())  # member 1 by default
  with pytest.raises(errors.ConfigArgumentError, match='member 7; the members are 1, 2, 3, 4, 5, 6'):
    ensemble_config.get_config(f'{scale},7')


def test_init_scale_multiplies_the_initial_conv_weights():
  x = np.zeros((1, 8, 8, 3), np.float32)
  kernels = [layers.ConvUnit(16, 3, init_scale=s).init(jax.random.key(0), x, False)['params']
             ['conv']['kernel'] for s in (1.0, 2.0)]
  np.testing.assert_allclose(kernels[1], 2 * kernels[0], rtol=1e-6)


def test_ensembling_needs_no_jax():
  # Ensembling predictions files is numpy work, runnable where JAX is not installed or is slow to
  # start (a laptop reading a cluster's predictions).
  code = ('import sys; import bn_inception.ensemble; '
          'print(sorted(m for m in ("jax", "flax", "optax", "tensorflow") if m in sys.modules))')
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
  assert result.returncode == 0 and result.stdout.strip() == '[]', result.stdout + result.stderr
