"""BN-Inception (Ioffe & Szegedy, 2015, Appendix, Figure 5) in Flax Linen.

The network is the table below, row for row as Figure 5 prints it. Every convolution is a `ConvUnit`:
conv (no bias) -> BN -> ReLU; with `use_bn=False` it is the paper's "Inception" baseline (conv with
bias -> ReLU). Submodules carry the paper's layer names (`conv1`, `conv2_reduce`, `conv2`,
`inception_3a` ... `inception_5b`, `logits`); inside a module the branches are named after Figure 5's
columns (`1x1`, `3x3_reduce`, `3x3`, `double_3x3_reduce`, `double_3x3_1`, `double_3x3_2`,
`pool_proj`).

Variables are `{'params', 'batch_stats'}`. Train with
`model.apply(variables, images, train=True, mutable=['batch_stats'], rngs={'dropout': key})`;
evaluate with `model.apply(variables, images, train=False)`, which uses the population statistics.
Images are NHWC.
"""

import functools
from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from bn_inception import layers


class Inception(NamedTuple):
  """One row of Figure 5 for an inception module. 0 means the branch is absent."""
  name: str
  n1x1: int
  n3x3_reduce: int
  n3x3: int
  double_3x3_reduce: int
  double_3x3: int
  pool: str  # 'avg' or 'max'
  pool_proj: int  # 0: "pass through" (3c, 4e)
  stride: int = 1


# Figure 5, from inception (3a) to (5b).
#             name            #1x1  #3x3r #3x3  d#3x3r d#3x3 pool  proj stride
FIGURE_5 = (
    Inception('inception_3a',   64,   64,   64,   64,   96, 'avg',  32),
    Inception('inception_3b',   64,   64,   96,   64,   96, 'avg',  64),
    Inception('inception_3c',    0,  128,  160,   64,   96, 'max',   0, 2),
    Inception('inception_4a',  224,   64,   96,   96,  128, 'avg', 128),
    Inception('inception_4b',  192,   96,  128,   96,  128, 'avg', 128),
    Inception('inception_4c',  160,  128,  160,  128,  160, 'avg', 128),
    Inception('inception_4d',   96,  128,  192,  160,  192, 'avg', 128),
    Inception('inception_4e',    0,  128,  192,  192,  256, 'max',   0, 2),
    Inception('inception_5a',  352,  192,  320,  160,  224, 'avg', 128),
    Inception('inception_5b',  352,  192,  320,  192,  224, 'max', 128),
)

# Figure 5's columns for 4c and 4d add up to 608 channels (and 4e to 1056), not the 576 (1024) printed
# as their output sizes. 'paper' keeps the columns, as the Caffe, MXNet and CNTK ports do; 'slim'
# keeps the printed sizes with pool-proj 96 in 4c and 4d, as TF-slim's inception_v2 does.
CHANNELS = {
    'paper': FIGURE_5,
    'slim': tuple(row._replace(pool_proj=96) if row.name in ('inception_4c', 'inception_4d')
                  else row for row in FIGURE_5),
}


class InceptionModule(nn.Module):
  """The branches of one Figure 5 row, concatenated along channels."""

  row: Inception
  width: float
  conv: Callable[..., nn.Module]  # ConvUnit with the network's shared settings

  @nn.compact
  def __call__(self, x, train: bool):
    r, c, s = self.row, self.channels, self.row.stride
    branches = []
    if r.n1x1:
      branches.append(self.conv(c(r.n1x1), name='1x1')(x, train))
    y = self.conv(c(r.n3x3_reduce), name='3x3_reduce')(x, train)
    branches.append(self.conv(c(r.n3x3), 3, s, name='3x3')(y, train))
    y = self.conv(c(r.double_3x3_reduce), name='double_3x3_reduce')(x, train)
    y = self.conv(c(r.double_3x3), 3, name='double_3x3_1')(y, train)
    branches.append(self.conv(c(r.double_3x3), 3, s, name='double_3x3_2')(y, train))
    y = layers.POOLS[r.pool](x, 3, s)
    if r.pool_proj:
      y = self.conv(c(r.pool_proj), name='pool_proj')(y, train)
    branches.append(y)  # without a projection: the "pass through" of 3c and 4e
    return layers.concat(branches)

  def channels(self, n: int) -> int:
    return scaled(n, self.width)


def scaled(channels: int, width: float) -> int:
  return max(1, int(round(channels * width)))


class BNInception(nn.Module):
  """BN-Inception and its variants (design.md section 3 lists the knobs)."""

  num_classes: int = 1000
  use_bn: bool = True
  activation: str = 'relu'  # 'relu' | 'sigmoid' (BN-x5-Sigmoid)
  lrn: bool = False  # GoogLeNet's local response normalisation after pool1 and conv2
  dropout_rate: float = 0.0  # before the classifier
  separable_stem: bool = True  # conv1 as 7x7 depthwise (multiplier 8) + 1x1, as the paper says
  channels: str = 'paper'  # 'paper' | 'slim', see CHANNELS
  width: float = 1.0  # multiplies every layer's channels
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  bn_group_size: Optional[int] = 32  # examples per BN statistic; None: the whole batch
  # Opt-in ways to compute the same network faster on accelerators (docs/benchmarks.md):
  bn_one_pass: bool = False  # BN's mean and variance from one pass over the activations
  bn_fused_grad: bool = False  # BN's backward pass written out instead of autodiff's
  fold_stem: bool = False  # the separable stem as one dense 7x7 convolution, same parameters
  dtype: Any = jnp.float32  # compute dtype; parameters, BN statistics and logits stay float32
  init_scale: float = 1.0  # multiplies the initial conv weights (the ensemble's "larger" init)
  # Caffe compatibility, for the converted Caffe-trained weights (bn_inception.convert):
  symmetric_padding: bool = False  # pad strided convs k // 2 on every side, as Caffe
  conv_bias: Optional[bool] = None  # None: biases exactly when use_bn is False

  @nn.compact
  def __call__(self, images, train: bool = False):
    if self.channels not in CHANNELS:
      raise ValueError(f'Unknown channels {self.channels!r}; valid: {sorted(CHANNELS)}.')
    # Every convolution of the network shares these settings.
    conv = functools.partial(
        layers.ConvUnit, use_bn=self.use_bn, conv_bias=self.conv_bias,
        activation=self.activation, symmetric_padding=self.symmetric_padding,
        bn_group_size=self.bn_group_size, bn_momentum=self.bn_momentum,
        bn_epsilon=self.bn_epsilon, bn_one_pass=self.bn_one_pass,
        bn_fused_grad=self.bn_fused_grad, init_scale=self.init_scale, dtype=self.dtype)
    c = lambda n: scaled(n, self.width)
    x = images.astype(self.dtype)

    # Figure 5, first rows: the stem.
    x = conv(c(64), 7, 2, depthwise_multiplier=8 if self.separable_stem else None,
             fold_separable=self.fold_stem, name='conv1')(x, train)       # 112 x 112 x 64
    x = layers.max_pool(x, 3, 2)                                          # 56 x 56 x 64
    if self.lrn:
      x = layers.local_response_norm(x)
    x = conv(c(64), 1, name='conv2_reduce')(x, train)
    x = conv(c(192), 3, name='conv2')(x, train)                           # 56 x 56 x 192
    if self.lrn:
      x = layers.local_response_norm(x)
    x = layers.max_pool(x, 3, 2)                                          # 28 x 28 x 192

    # Inception (3a) ... (5b); 3c and 4e halve the resolution.
    for row in CHANNELS[self.channels]:
      x = InceptionModule(row, self.width, conv, name=row.name)(x, train)  # ... 7 x 7 x 1024

    # Global average pool (7 x 7 at 224 x 224 input), dropout, the 1000-way classifier (no BN).
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=nn.initializers.normal(0.01), name='logits')(x)
    return x.astype(jnp.float32)


COLOR_ORDERS = ('rgb', 'bgr')


def normalize_pixels(images, input_config):
  """RGB pixels in [0, 255] -> the network's input, as `config.input` describes it for its weights.

  `color_order` is the channel order the weights expect; `mean` and `std` are per channel, in that
  order, on the 0-255 scale: (pixels - mean) / std. Our default (rgb, 127.5, 127.5) gives [-1, 1];
  the Caffe-trained weights want BGR minus the Caffe means (bn_inception.convert). NHWC float arrays
  of numpy, JAX or TensorFlow (integer numpy/JAX images are promoted to float32).
  """
  if input_config.color_order not in COLOR_ORDERS:
    raise ValueError(
        f'Unknown input.color_order {input_config.color_order!r}; valid: {list(COLOR_ORDERS)}.')
  if input_config.color_order == 'bgr':
    images = images[..., ::-1]
  # numpy constants: they broadcast against numpy, JAX and TensorFlow arrays alike.
  mean = np.asarray(input_config.mean, np.float32)
  std = np.asarray(input_config.std, np.float32)
  return (images - mean) / std


def from_config(model_config) -> BNInception:
  """Builds the network from `config.model` (dtype given by name, e.g. 'bfloat16')."""
  kwargs = dict(model_config)
  kwargs['dtype'] = jnp.dtype(kwargs['dtype'])
  return BNInception(**kwargs)
