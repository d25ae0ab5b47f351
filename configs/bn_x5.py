"""BN-x5: Modified BN-Inception (section 4.2.1) with 5x the learning rate (0.0075 per 32 images).

  python -m bn_inception.main --config=configs/bn_x5.py --workdir=runs/bn_x5

Paper (Figure 3): 72.2% after 2.1M steps, 14 times fewer than Inception; max 73.0%.
"""

from configs import default


def get_config(scale=None):
  return default.accelerate(default.get_config(scale), 5)
