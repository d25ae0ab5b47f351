"""Inception: the Figure 5 network *without* batch normalization (paper section 4.2).

  python -m bn_inception.main --config=configs/inception.py --workdir=runs/inception

Paper (Figure 3): 72.2% single-crop top-1 after 31.0M steps of 32 images (its maximum).
LR 0.0015 per 32 images, LRN, dropout 40%, conv biases instead of BN.
"""

from configs import default


def get_config(scale=None):
  c = default.get_config(scale)
  c.model.use_bn = False
  if c.scale == 'imagenet':
    c.paper_steps = 31_000_000
  return c
