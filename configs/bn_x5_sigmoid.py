"""BN-x5-Sigmoid: BN-x5 with the sigmoid nonlinearity instead of ReLU (section 4.2.2).

  python -m bn_inception.main --config=configs/bn_x5_sigmoid.py --workdir=runs/bn_x5_sigmoid

Paper (Figure 3): max 69.8%, never reaches 72.2%. Without BN the sigmoid Inception "never achieves
better than 1/1000 accuracy".
"""

from configs import default


def get_config(scale=None):
  c = default.accelerate(default.get_config(scale), 5)
  c.model.activation = 'sigmoid'
  return c
