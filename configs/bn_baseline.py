"""BN-Baseline: Inception with BN before every nonlinearity, nothing else changed (section 4.2.2).

  python -m bn_inception.main --config=configs/bn_baseline.py --workdir=runs/bn_baseline

Paper (Figure 3): matches Inception's 72.2% after 13.3M steps (Inception: 31.0M); max 72.7%.
"""

from configs import default


def get_config(scale=None):
  return default.get_config(scale)
