"""Shared defaults for every variant; the variant files are small deltas on this one.

The defaults are the paper's BN-Baseline: Figure 5 with BN and the original Inception recipe (LRN,
dropout 40%, L2 4e-5, learning rate 0.0015 decayed x0.96 every 8 epochs, full photometric
distortions, light shuffling). `accelerate()` applies the changes of paper section 4.2.1 that make
"Modified BN-Inception" (BN-x5, BN-x30, BN-x5-Sigmoid, the ensemble members).

Not a paper variant by itself: launch one of inception.py, bn_baseline.py, bn_x5.py, bn_x30.py,
bn_x5_sigmoid.py or ensemble.py. Each accepts a scale after a colon:

  --config=configs/bn_x30.py          ImageNet, 224 x 224, the full network (the paper's run)
  --config=configs/bn_x30.py:digits   the same variant in miniature on scikit-learn's digits (CPU)

ensemble.py also takes the member, 1 to 6: configs/ensemble.py:3, configs/ensemble.py:digits,3.

Learning rates are the paper's, *per 32 images*: the optimiser uses
learning_rate * batch_size / 32. Lengths are the paper's in "paper steps" of 32 images
(`paper_steps`); num_train_steps follows batch_size unless set explicitly.
"""

import ml_collections

from bn_inception import errors

SCALES = ('imagenet', 'digits')
IMAGENET_TRAIN_EXAMPLES = 1_281_167


def get_config(scale: str | None = None) -> ml_collections.ConfigDict:
  scale = scale or 'imagenet'
  if scale not in SCALES:
    raise errors.ConfigArgumentError(
        f'unknown scale {scale!r}; the scales are {SCALES[0]} (the default) and '
        f'{", ".join(SCALES[1:])}, e.g. configs/bn_x30.py:digits.')
  c = ml_collections.ConfigDict()
  c.scale = scale

  c.model = ml_collections.ConfigDict(dict(
      num_classes=1000,
      use_bn=True,
      activation='relu',
      lrn=True,
      dropout_rate=0.4,
      separable_stem=True,
      channels='paper',
      width=1.0,
      # Per training step: running = 0.9 * running + 0.1 * batch statistic (PyTorch's momentum=0.1).
      # The population statistics then average about the last 1 / (1 - 0.9) = 10 steps: 320 images
      # at batch 32, 40,960 at batch 4096 (the paper gives no value; see README, Training).
      bn_momentum=0.9,
      bn_epsilon=1e-5,
      bn_group_size=ml_collections.FieldReference(32, field_type=object),  # None: whole batch
      bn_one_pass=False,  # opt-in speed-ups, the same function (docs/benchmarks.md)
      bn_fused_grad=False,
      fold_stem=False,
      dtype='float32',
      init_scale=1.0,
      symmetric_padding=False,
      conv_bias=ml_collections.FieldReference(None, field_type=object),
  ))

  # How RGB pixels in [0, 255] become the network's input (models.normalize_pixels): bound to the
  # weights, so that converted weights carry their own convention (bn_inception.convert).
  c.input = ml_collections.ConfigDict(dict(
      color_order='rgb',  # 'rgb' | 'bgr': the channel order the weights expect
      mean=(127.5, 127.5, 127.5),  # per channel, in color_order, on the 0-255 scale
      std=(127.5, 127.5, 127.5),  # (pixels - mean) / std: [-1, 1] by default
  ))

  c.dataset = ml_collections.ConfigDict(dict(
      name='imagenet2012',
      data_dir=ml_collections.FieldReference(None, field_type=str),  # TFDS data dir
      manual_dir=ml_collections.FieldReference(None, field_type=str),  # ILSVRC2012_img_*.tar
      image_size=224,
      train_split='train',
      eval_split='validation',
      distortion_strength=1.0,  # scales the photometric distortions
      # 'light': the files in a new order every epoch, each read in its stored order (no buffer) |
      # 'thorough': within-shard shuffling, 16 files interleaved through a 16,384-example buffer
      # (about 2 x 1.8 GB of host memory on ImageNet). See data_spec.SHUFFLE.
      shuffle='light',
      eval_crops='center',  # 'center' | '10' | '144'
      # TFDS data sets: 'tf_data' (TensorFlow, tfrecord files) | 'grain' (no TensorFlow,
      # array_record files; see README). See input_pipeline.LOADERS.
      loader='tf_data',
  ))

  # Optimisation (paper section 4.2; design.md section 4 says which values are ours).
  c.learning_rate = 0.0015  # per 32 images
  c.momentum = 0.9
  # False: heavy-ball momentum, v = momentum * v + gradient, w -= lr * v. The paper's "SGD with
  # momentum (Sutskever et al., 2013)" cites a study of both heavy-ball and Nesterov's momentum
  # without saying which it used; heavy-ball is the default of TensorFlow's MomentumOptimizer and
  # Caffe's SGD solver. True: Nesterov's (optax.sgd(nesterov=True)).
  c.nesterov = False
  c.weight_decay = 4e-5  # L2 on conv and dense kernels: 0.5 * wd * |w|^2, as the gradient wd * w
  c.lr_decay_factor = 0.96
  c.lr_decay_epochs = 8.0  # staircase: x lr_decay_factor every lr_decay_epochs
  c.warmup_epochs = 0.0
  # Polyak/EMA of the weights *and* of the BN statistics (evaluated together), with the decay warmed
  # up as min(ema_decay, (1 + step) / (10 + step)); None: no EMA. E.g. 0.9999.
  c.ema_decay = ml_collections.FieldReference(None, field_type=object)

  c.batch_size = 256  # global, over all devices and hosts
  # Crops per evaluation step (images: this // crops per image, a multiple of the devices); None:
  # batch_size.
  c.eval_batch_size = ml_collections.FieldReference(None, field_type=object)
  c.paper_steps = 15_000_000  # training length in 32-image steps
  c.num_train_steps = c.get_ref('paper_steps') * 32 // c.get_ref('batch_size')
  c.seed = 0

  c.log_every_steps = 100
  c.eval_every_steps = 5000
  c.checkpoint_every_steps = 5000
  c.keep_checkpoints = 3  # the newest N ...
  c.keep_checkpoint_every_steps = 100_000  # ... plus one every K steps, kept for good
  c.init_from = ml_collections.FieldReference(None, field_type=str)  # checkpoint dir to start from

  if scale == 'digits':
    # The paper in miniature: 8 x 8 handwritten digits upscaled to 32 x 32, a quarter-width net.
    c.model.num_classes = 10
    c.model.width = 0.25
    c.dataset.name = 'digits'
    c.dataset.image_size = 32
    # The base the variants multiply (x1, x1, x5, x30, x5). The paper's 0.0015 barely moves in 600
    # steps; 0.01 trained Inception (the baseline) best of 0.005 / 0.01 / 0.02: max test top-1 in
    # 600 steps 97.5% against 94.7% / 89.2% (one run each, 2026-11-25).
    c.learning_rate = 0.01
    # The paper's 32-image mini-batch, one BN group: a step is a paper step. 600 steps (13 epochs)
    # keep the five variants of the CPU demo within minutes.
    c.batch_size = 32
    c.paper_steps = 600
    c.lr_decay_epochs = 8.0
    c.log_every_steps = 25
    c.eval_every_steps = 50
    c.checkpoint_every_steps = 200
    c.keep_checkpoint_every_steps = 0
  return c


def accelerate(c: ml_collections.ConfigDict, lr_multiple: float) -> ml_collections.ConfigDict:
  """"Modified BN-Inception" (paper section 4.2.1): the changes BN allows, with the LR x lr_multiple."""
  c.learning_rate *= lr_multiple          # 1. increase the learning rate
  c.model.dropout_rate = 0.0              # 2. remove dropout
  c.weight_decay /= 5                     # 3. reduce the L2 weight regularisation 5x
  c.lr_decay_epochs /= 6                  # 4. decay the learning rate 6x faster
  c.model.lrn = False                     # 5. remove local response normalisation
  c.dataset.shuffle = 'thorough'          # 6. shuffle more thoroughly: within shards too
  c.dataset.distortion_strength = 0.5     # 7. fewer photometric distortions (amount: ours)
  c.paper_steps = 6_000_000 if c.scale == 'imagenet' else c.paper_steps
  return c
