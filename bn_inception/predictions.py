"""Predictions files (design.md section 7): what `evaluate` writes and `ensemble` reads and writes.

One `.npz` per checkpoint and crop setting, loadable with plain `np.load` (no pickles):
  probs   float32 [N, classes]  softmax probabilities, averaged over the crops (and the members)
  labels  int64 [N]             the true classes
  ids     [N]                   the data set's example ids (ints, or file names for TFDS)
  meta    str                   JSON: config, step, crops, weights, eval_set, ... (see evaluate,
                                ensemble)
  real_labels_bits  uint8 [N, ceil(classes / 8)]  ReaL files only: each image's ReaL label set, a
                    row of np.packbits over the classes (an empty set is a row of zeros)
Example order carries no meaning: files are aligned by id.

ReaL (Beyer et al. 2020, "Are we done with ImageNet?", the `imagenet2012_real` evaluation set)
scores a prediction as correct when it is in the image's set of plausible labels; images whose set
is empty are left out of the ReaL accuracy (and counted), but not of the original labels' accuracy,
which is reported beside it.
"""

import dataclasses
import json
import os
import re
from typing import Any, Optional, Sequence
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
  real_labels: Optional[np.ndarray] = None  # bool [N, classes]: the ReaL label sets, or None

  @property
  def num_examples(self) -> int:
    return len(self.labels)

  @property
  def eval_set(self) -> Optional[str]:
    """The evaluation set's name (evaluate's --eval_sets), None in files that do not say."""
    return self.meta.get('eval_set') if self.meta else None

  def sorted_by_id(self) -> 'Predictions':
    order = np.argsort(self.ids, kind='stable')
    real = None if self.real_labels is None else self.real_labels[order]
    return Predictions(self.probs[order], self.labels[order], self.ids[order], self.meta, real)


REAL = 'imagenet2012_real'
# The ReaL set's images: ImageNet's 50,000 validation images, by the file names TFDS gives them.
REAL_IDS = re.compile(r'ILSVRC2012_val_(\d{8})\.JPEG')
REAL_NUM_IMAGES = 50_000


def accuracy(p: Predictions) -> dict[str, float]:
  """Top-1 and top-5 accuracy of the averaged probabilities, over every example once; with ReaL
  label sets also `real_top1`, `real_top5` over the images whose set is not empty, and
  `real_examples` / `real_left_out`: how many images they count and leave out."""
  probs = np.asarray(p.probs)
  correct = {k: metrics.topk_correct(probs, np.asarray(p.labels), k) for k in (1, 5)}
  result = {f'top{k}': float(c.sum(dtype=np.float64)) / p.num_examples
            for k, c in correct.items()}
  if p.real_labels is not None:
    labelled = p.real_labels.any(axis=1)
    n = int(labelled.sum())
    for k in (1, 5):
      hits = real_topk_correct(probs[labelled], p.real_labels[labelled], k)
      result[f'real_top{k}'] = float(hits.sum(dtype=np.float64)) / n if n else float('nan')
    result['real_examples'] = n
    result['real_left_out'] = p.num_examples - n
  return result


def real_topk_correct(probs: np.ndarray, label_sets: np.ndarray, k: int) -> np.ndarray:
  """1.0 where one of the k highest probabilities of a row is in its label set (bool [N, classes],
  none empty), else 0.0: the set's most probable label is in the top k, with ties counting against
  it as in metrics.topk_correct."""
  best = np.argmax(np.where(label_sets, probs, -np.inf), axis=1)
  return metrics.topk_correct(probs, best, k)


def check_real_ids(ids: np.ndarray, name: str) -> None:
  """Refuses (errors.InputFileError) ids that are not images of the ReaL set, naming the first."""
  for row, example_id in enumerate(np.asarray(ids).tolist()):
    match = REAL_IDS.fullmatch(str(example_id))
    if not match or not 1 <= int(match.group(1)) <= REAL_NUM_IMAGES:
      raise errors.InputFileError(
          f'{name}: example {row} has id {example_id!r}, which is not an image of the ReaL set '
          f'(ILSVRC2012_val_00000001.JPEG ... ILSVRC2012_val_{REAL_NUM_IMAGES:08d}.JPEG): its '
          'ReaL labels are unknown, so it cannot be scored by them. Evaluate with '
          f'--eval_sets={REAL}.')


def save(path: str, p: Predictions) -> None:
  ids = np.asarray(p.ids)
  if ids.dtype == object:  # file names: a fixed-width unicode array loads without pickles
    ids = ids.astype(str)
  real = {} if p.real_labels is None else {
      'real_labels_bits': np.packbits(np.asarray(p.real_labels, bool), axis=1)}
  with open(path, 'wb') as f:  # a file object: np.savez would append '.npz' to other names
    np.savez(f, probs=np.asarray(p.probs, np.float32), labels=np.asarray(p.labels, np.int64),
             ids=ids, meta=json.dumps(p.meta), **real)


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
  if 'real_labels_bits' in arrays:
    bits = arrays['real_labels_bits']
    if bits.shape != (n, -(-p.probs.shape[1] // 8)):
      raise errors.InputFileError(f'{not_one}: real_labels_bits {bits.shape} is not '
                                  '[N, classes / 8].')
    p.real_labels = np.unpackbits(bits, axis=1, count=p.probs.shape[1]).astype(bool)
  if p.eval_set == REAL:
    if p.real_labels is None:
      raise errors.InputFileError(f'{path} is of the ReaL set but holds no ReaL labels.')
    check_real_ids(p.ids, path)
  return p


def check_output(path: str, overwrite: bool = False) -> None:
  """Refuses, before anything is computed, a path a predictions file cannot be written to: a
  directory, an existing file that is not a predictions file, an existing predictions file unless
  `overwrite`, a directory that cannot be written. Creates missing parent directories."""
  if os.path.isdir(path):
    raise errors.ConfigError(f'--output={path} is a directory: name a file in it, e.g. '
                             f'{os.path.join(path, "predictions.npz")}.')
  if os.path.lexists(path):
    try:
      load(path)
    except errors.UserError as e:
      raise errors.ConfigError(f'--output={path} exists and is not a predictions file: it is '
                               'never overwritten. Name another file.') from e
    if not overwrite:
      raise errors.ConfigError(f'--output={path} already holds predictions: pass --overwrite to '
                               'replace them, or name another file.')
  parent = os.path.dirname(os.path.abspath(path))
  try:
    os.makedirs(parent, exist_ok=True)
  except OSError as e:
    raise errors.ConfigError(f'--output={path}: cannot create its directory ({errors.describe(e)}).'
                             ) from e
  if not os.access(parent, os.W_OK | os.X_OK):
    raise errors.ConfigError(f'--output={path}: the directory {parent} is not writable.')


def save_checked(path: str, p: Predictions) -> None:
  """save(), with a failure to write (a full disk) as one line, the partial file removed."""
  try:
    save(path, p)
  except OSError as e:
    if os.path.isfile(path):
      os.remove(path)
    raise errors.UserError(f'Could not write {path}: {errors.describe(e)}.') from e


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
