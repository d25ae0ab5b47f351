"""Predictions files (design.md section 7): what `evaluate` writes and `ensemble` reads and writes.

One `.npz` per checkpoint and crop setting, loadable with plain `np.load` (no pickles):
  probs   float32 [N, classes]  softmax probabilities, averaged over the crops (and the members)
  labels  int64 [N]             the true classes
  ids     [N]                   the data set's example ids (ints, or file names for TFDS)
  meta    str                   JSON: config, step, crops, weights, ... (see evaluate/ensemble)
Example order carries no meaning: files are aligned by id.
"""

import dataclasses
import json
import os
from typing import Any, Sequence
import zipfile

import numpy as np

from bn_inception import errors
from bn_inception import metrics


@dataclasses.dataclass
class Predictions:
  probs: np.ndarray  # float32 [N, classes]
  labels: np.ndarray  # int [N]
  ids: np.ndarray  # [N]
  meta: dict[str, Any]

  @property
  def num_examples(self) -> int:
    return len(self.labels)

  def sorted_by_id(self) -> 'Predictions':
    order = np.argsort(self.ids, kind='stable')
    return Predictions(self.probs[order], self.labels[order], self.ids[order], self.meta)


def accuracy(p: Predictions) -> dict[str, float]:
  """Top-1 and top-5 accuracy of the averaged probabilities, over every example once."""
  correct = {k: metrics.topk_correct(np.asarray(p.probs), np.asarray(p.labels), k)
             for k in (1, 5)}
  return {f'top{k}': float(c.sum(dtype=np.float64)) / p.num_examples for k, c in correct.items()}


def save(path: str, p: Predictions) -> None:
  ids = np.asarray(p.ids)
  if ids.dtype == object:  # file names: a fixed-width unicode array loads without pickles
    ids = ids.astype(str)
  with open(path, 'wb') as f:  # a file object: np.savez would append '.npz' to other names
    np.savez(f, probs=np.asarray(p.probs, np.float32), labels=np.asarray(p.labels, np.int64),
             ids=ids, meta=json.dumps(p.meta))


def load(path: str) -> Predictions:
  """Reads a predictions file; one that is missing, damaged or of another kind is an error that
  names it (errors.NotFoundError, errors.InputFileError)."""
  if not os.path.isfile(path):
    raise errors.NotFoundError(f'{path}: no such predictions file.')
  not_one = f'{path} is not a predictions file (an .npz that bn_inception.evaluate --output writes)'
  if not zipfile.is_zipfile(path):  # np.load would try it as a pickle, and refuse to unpickle
    raise errors.InputFileError(f'{not_one}: it is not an .npz (zip) archive.')
  try:
    with np.load(path) as f:
      arrays = {name: f[name] for name in f.files}
    meta = json.loads(str(arrays['meta'])) if 'meta' in arrays else None
  except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:  # damaged, pickled, not JSON
    raise errors.InputFileError(f'{not_one}: {errors.describe(e)}') from e
  missing = {'probs', 'labels', 'ids', 'meta'} - set(arrays)
  if missing:
    raise errors.InputFileError(f'{not_one}: it lacks {sorted(missing)}.')
  p = Predictions(arrays['probs'], arrays['labels'], arrays['ids'], meta)
  n = len(p.labels)
  if p.probs.ndim != 2 or p.labels.shape != (n,) or p.ids.shape != (n,):
    raise errors.InputFileError(
        f'{not_one}: probs {p.probs.shape}, labels {p.labels.shape} and ids {p.ids.shape} are '
        'not [N, classes], [N] and [N].')
  return p


def format_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A plain-text table, columns right-aligned except the first."""
  cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
  lines = ['  '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                     enumerate(zip(row, widths))) for row in cells]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines)


def percent(x: float) -> str:
  return f'{100 * x:.2f}%'
