"""The ensemble members of paper section 4.2.3: six BN-x30 networks, each modified. The argument
after the colon picks the member (1-6) and optionally the scale:

  for m in 1 2 3 4 5 6; do
    python -m bn_inception.main --config=configs/ensemble.py:$m --workdir=runs/member_$m
    python -m bn_inception.evaluate --workdir=runs/member_$m --crops=144 \
        --output=runs/member_$m/val144.npz
  done
  python -m bn_inception.ensemble runs/member_*/val144.npz --output=runs/ensemble144.npz

  --config=configs/ensemble.py:digits,3   member 3 in miniature (no member given: member 1)

Paper (Figure 4, ImageNet validation, 144 crops): 20.1% top-1 / 4.9% top-5 error (4.82% top-5 on
the test server); each member "reached its maximum accuracy after about 6 * 10^6 training steps".

The paper: "Each was based on BN-x30, modified via some of the following: increased initial weights
in the convolutional layers; using Dropout (with the Dropout probability of 5% or 10%, vs. 40% for
the original Inception); and using non-convolutional, per-activation Batch Normalization with last
hidden layers of the model." It does not say which member had which change, nor by how much the
initial weights were increased: MEMBERS below is OUR assignment, a grid of the two dropout rates it
names and three initial scales (`model.init_scale` multiplies the He-normal conv weights; 1.5 and 2
are OUR choice), every member with its own seed (which also changes its data order).
Per-activation BN of the "last hidden layers" is NOT implemented: Figure 5's network, like ours, has
no hidden fully-connected layer (global pooling feeds the classifier directly); the phrase may refer
to auxiliary heads that the paper never describes (../shared/paper.md section 1.3).
"""

from bn_inception import errors
from configs import bn_x30

# member: (dropout before the classifier, init_scale of the conv weights, seed) -- OUR assignment.
MEMBERS = {
    1: (0.05, 1.0, 1),
    2: (0.10, 1.0, 2),
    3: (0.05, 1.5, 3),
    4: (0.10, 1.5, 4),
    5: (0.05, 2.0, 5),
    6: (0.10, 2.0, 6),
}


def get_config(arg=None):
  """arg: 'MEMBER', 'SCALE' or 'SCALE,MEMBER' (either order), e.g. '3' or 'digits,3'."""
  scale, member = None, 1
  for token in (arg or '').split(','):
    if token.strip().isdigit():
      member = int(token)
    elif token.strip():
      scale = token.strip()
  if member not in MEMBERS:
    raise errors.ConfigArgumentError(
        f'unknown ensemble member {member}; the members are {", ".join(map(str, MEMBERS))}, e.g. '
        'configs/ensemble.py:3 or configs/ensemble.py:digits,3.')
  c = bn_x30.get_config(scale)
  c.model.dropout_rate, c.model.init_scale, c.seed = MEMBERS[member]
  return c

