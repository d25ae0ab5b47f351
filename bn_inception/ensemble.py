"""Ensemble predictions files: the mean of the members' class probabilities (paper section 4.2.3).

  python -m bn_inception.ensemble A.npz B.npz ... [--output=ENS.npz]

Members are aligned by example id, so the order of examples within a file does not matter; files
that hold different examples, disagree on a label, or come from different evaluation sets are
refused with a message saying which, and so are rows that are not probabilities. Prints each
member's and the ensemble's top-1/top-5 accuracy and error (of ReaL members also the ReaL top-1 and
top-5: predictions.accuracy), and writes the ensemble's predictions in the members' format
(bn_inception/predictions.py), sorted by id.
"""

import os
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from bn_inception import cli
from bn_inception import errors
from bn_inception import predictions
from bn_inception.predictions import Predictions

_SHOWN = 5  # ids quoted in an error message
# How far a row's sum may be from 1: float32 softmax averaged over 144 crops is within ~1e-6.
SUM_TOLERANCE = 1e-3


def align(members: Sequence[Predictions], names: Sequence[str]) -> list[Predictions]:
  """The members sorted by id, after checking that they come from one evaluation set, hold the same
  examples, labels (and ReaL label sets), and rows of finite probabilities."""
  sets = {m.eval_set for m in members}
  if len(sets) > 1:
    raise errors.InputFileError('The members come from different evaluation sets: ' + ', '.join(
        f'{name}: {m.eval_set or "not recorded"}' for m, name in zip(members, names)) + '.')
  for member, name in zip(members, names):
    not_finite = ~np.all(np.isfinite(member.probs), axis=1)
    if np.any(not_finite):
      raise errors.InputFileError(
          f'{name} holds probabilities that are not finite (NaN or inf) for {np.sum(not_finite)} '
          f'of {len(not_finite)} examples, e.g. ids {_some(member.ids[not_finite])}: the weights '
          'it was evaluated with are broken (a diverged run?). Evaluate a good checkpoint again.')
    # Averaging anything else (logits of another tool) would weigh the members arbitrarily.
    sums = member.probs.sum(axis=1, dtype=np.float64)
    bad = np.flatnonzero(np.any(member.probs < 0, axis=1) | (np.abs(sums - 1) > SUM_TOLERANCE))
    if len(bad):
      row = bad[0]
      raise errors.InputFileError(
          f'{name}: row {row} (id {member.ids[row]}) is not probabilities (smallest '
          f'{member.probs[row].min():.4g}, sum {sums[row]:.6g}), nor are {len(bad) - 1} other '
          'rows: an ensemble averages softmax probabilities, as bn_inception.evaluate writes them.')
  aligned = [m.sorted_by_id() for m in members]
  first, first_name = aligned[0], names[0]
  for member, name in zip(aligned, names):
    unique, counts = np.unique(member.ids, return_counts=True)
    if len(unique) < len(member.ids):
      raise errors.InputFileError(f'{name} holds {np.sum(counts > 1)} ids more than once, e.g. '
                                  f'{_some(unique[counts > 1])}.')
  for member, name in zip(aligned[1:], names[1:]):
    if member.probs.shape[1] != first.probs.shape[1]:
      raise errors.InputFileError(f'{name} has {member.probs.shape[1]} classes, {first_name} '
                                  f'{first.probs.shape[1]}.')
    if len(member.ids) != len(first.ids) or np.any(member.ids != first.ids):
      missing = np.setdiff1d(first.ids, member.ids)
      extra = np.setdiff1d(member.ids, first.ids)
      differences = [f'{len(missing)} ids of {first_name} are missing from {name} '
                     f'(e.g. {_some(missing)})'] if len(missing) else []
      differences += [f'{len(extra)} ids of {name} are not in {first_name} '
                      f'(e.g. {_some(extra)})'] if len(extra) else []
      raise errors.InputFileError(f'{name} and {first_name} hold different examples: '
                                  f'{"; ".join(differences)}.')
    differ = member.labels != first.labels
    if np.any(differ):
      shown = ', '.join(f'{i}: {a} vs {b}' for i, a, b in zip(
          member.ids[differ][:_SHOWN], first.labels[differ], member.labels[differ]))
      raise errors.InputFileError(f'{first_name} and {name} disagree on the labels of '
                                  f'{np.sum(differ)} ids, e.g. {shown}.')
    if (member.real_labels is None) != (first.real_labels is None) or (
        member.real_labels is not None and np.any(member.real_labels != first.real_labels)):
      differ = (np.ones(len(first.ids), bool) if member.real_labels is None or
                first.real_labels is None else np.any(member.real_labels != first.real_labels, 1))
      raise errors.InputFileError(f'{first_name} and {name} disagree on the ReaL label sets of '
                                  f'{np.sum(differ)} ids, e.g. {_some(member.ids[differ])}.')
  return aligned


def ensemble(members: Sequence[Predictions], names: Sequence[str]) -> Predictions:
  """The mean of the members' probabilities, example by example (sorted by id)."""
  aligned = align(members, names)
  # Summed in float64, so the mean does not depend on the order of the members (to float32), one
  # member at a time (six ImageNet members at once would take 2.4 GB).
  total = sum(m.probs.astype(np.float64) for m in aligned)
  probs = (total / len(aligned)).astype(np.float32)
  crops = sorted({str(m.meta.get('crops')) for m in aligned})
  meta = {'members': [{'file': n, **m.meta} for n, m in zip(names, aligned)],
          'crops': crops[0] if len(crops) == 1 else crops, 'rule': 'mean of probabilities',
          'num_examples': len(aligned[0].ids), 'eval_set': aligned[0].eval_set}
  return Predictions(probs, aligned[0].labels, aligned[0].ids, meta, aligned[0].real_labels)


def report(members: Sequence[Predictions], names: Sequence[str],
           combined: Predictions) -> list[dict]:
  """Rows {name, top1, top5 (, real_top1, real_top5, ...)} for each member and the ensemble (last):
  predictions.accuracy."""
  return [{'name': name, **predictions.accuracy(p)}
          for name, p in zip([*names, 'ensemble'], [*members, combined])]


def format_report(rows: Sequence[dict]) -> str:
  """The table; with ReaL columns (and how many images ReaL leaves out) for ReaL members."""
  pct = predictions.percent
  real = 'real_top1' in rows[0]
  header = ('', 'top-1', 'top-5', 'top-1 error', 'top-5 error') + (
      ('ReaL top-1', 'ReaL top-5') if real else ())
  table = predictions.format_table(header, [
      (r['name'], pct(r['top1']), pct(r['top5']), pct(1 - r['top1']), pct(1 - r['top5']))
      + ((pct(r['real_top1']), pct(r['real_top5'])) if real else ()) for r in rows])
  if real:
    table += (f'\nReaL: {rows[0]["real_examples"]} images with labels; '
              f'{rows[0]["real_left_out"]} left out (an empty label set).')
  return table


def ensemble_files(paths: Sequence[str],
                   output: str | None = None) -> tuple[Predictions, list[dict]]:
  """Loads the members, ensembles them, writes `output` if given; returns it and the report rows.

  `output` may not be one of the members (it would overwrite it); a member given twice counts
  twice, with a warning.
  """
  real = [os.path.realpath(p) for p in paths]
  if output and os.path.realpath(output) in real:
    raise errors.ConfigError(f'--output={output} is one of the members: writing the ensemble '
                             'there would overwrite it. Name another file.')
  if output:
    _check_writable(output)
  for path in sorted({p for p in real if real.count(p) > 1}):
    logging.warning('%s is given %d times: it counts as many times in the mean.', path,
                    real.count(path))
  members = [predictions.load(p) for p in paths]
  names = _short_names(paths)
  combined = ensemble(members, names)
  if output:
    predictions.save_checked(output, combined)
  return combined, report(members, names, combined)


def _check_writable(output: str) -> None:
  """Refuses, before the members are read, an output that cannot be written."""
  parent = os.path.dirname(os.path.abspath(output))
  if os.path.isdir(output):
    raise errors.ConfigError(f'--output={output} is a directory: name a file in it.')
  if not os.path.isdir(parent):
    raise errors.ConfigError(f'--output={output}: the directory {parent} does not exist.')
  if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(output) and
                                                  not os.access(output, os.W_OK)):
    raise errors.ConfigError(f'--output={output} cannot be written (permission denied).')


def _short_names(paths: Sequence[str]) -> list[str]:
  """The paths without their common directory (runs/a/val.npz, runs/b/val.npz -> a/val.npz, ...)."""
  if len(paths) == 1:
    return list(paths)
  common = os.path.commonpath([os.path.abspath(p) for p in paths])
  names = [os.path.relpath(os.path.abspath(p), common) for p in paths]
  return names if len(set(names)) == len(names) and '.' not in names else list(paths)


def _some(ids) -> str:
  return ', '.join(map(str, ids[:_SHOWN])) + (', ...' if len(ids) > _SHOWN else '')


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError('Name the predictions files to ensemble: A.npz B.npz ...')
  _, rows = ensemble_files(paths, flags.FLAGS.output)
  print(format_report(rows))
  if flags.FLAGS.output:
    print(f'Wrote {flags.FLAGS.output}')


if __name__ == '__main__':
  flags.DEFINE_string('output', None, "Where to write the ensemble's predictions (.npz).")
  cli.run(main)
