"""BN-x30: Modified BN-Inception (section 4.2.1) with 30x the learning rate (0.045 per 32 images).

  python -m bn_inception.main --config=configs/bn_x30.py --workdir=runs/bn_x30

Paper (Figure 3): 72.2% after 2.7M steps; max 74.8% after about 6M steps. Trains "somewhat slower
initially" than BN-x5 but ends higher.
"""

from configs import default


def get_config(scale=None):
  return default.accelerate(default.get_config(scale), 30)
