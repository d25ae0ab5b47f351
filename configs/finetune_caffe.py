"""Fine-tunes the Caffe-trained BN-Inception of pretrainedmodels, converted by bn_inception.convert.

  python -m bn_inception.convert --torch_checkpoint=bn_inception-52deb4733.pth --workdir=runs/caffe
  python -m bn_inception.main --config=configs/finetune_caffe.py --workdir=runs/caffe_ft \
      [--config.init_from=runs/caffe]

The network and its input convention are the port's (convert.CAFFE_MODEL: plain 7x7 stem, conv
biases, Caffe padding; convert.CAFFE_INPUT: BGR, 0-255, Caffe means), so the run starts from what
the port reports: 73.52% top-1 / 91.56% top-5 on the ImageNet validation centre crops. Training
follows Modified BN-Inception (section 4.2.1) at a learning rate near the end of BN-x30's schedule,
for 5 epochs.
At the digits scale it is the same recipe in miniature, from scratch (there are no digits weights).
"""

from bn_inception import convert
from configs import default


def get_config(scale=None):
  c = default.accelerate(default.get_config(scale), 1)  # no dropout or LRN, L2 / 5, faster decay
  c.model.update(convert.CAFFE_MODEL)
  c.input.update(convert.CAFFE_INPUT)
  if c.scale == 'imagenet':
    c.init_from = 'runs/caffe'  # the converter's workdir in the command above
    # BN-x30 decays 0.045 by 0.96 every 4/3 epochs; after its ~150 epochs that is ~0.0005: a
    # converged network wants about that, not a fresh run's rate.
    c.learning_rate = 0.0005  # per 32 images
    c.paper_steps = 5 * default.IMAGENET_TRAIN_EXAMPLES // 32
  return c
