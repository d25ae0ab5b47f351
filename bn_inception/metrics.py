"""Top-k accuracy, one definition for the jitted steps (jax arrays) and the files (numpy arrays).

No imports beyond numpy's array API: predictions files and ensembles are scored without the
training stack.
"""


def topk_correct(scores, labels, k: int):
  """1.0 where the label is among the k highest of a row of scores, else 0.0 (float32, [N]).

  scores: [N, classes] logits or probabilities, numpy or jax (the result is of the same kind);
  labels: int [N]. Ties count against the label: a saturated softmax that underflows to 0 for most
  classes must not score them all as top-5 hits. A row with any non-finite score (NaN, inf) is never
  correct: NaN compares false with everything, so a NaN model would otherwise score 100%.
  """
  xp = scores.__array_namespace__()
  label_score = xp.take_along_axis(scores, labels[:, None], axis=1)
  higher_or_tied = xp.sum(scores >= label_score, axis=1) - 1  # the label itself is not counted
  finite = xp.all(xp.isfinite(scores), axis=1)
  return ((higher_or_tied < k) & finite).astype(xp.float32)
