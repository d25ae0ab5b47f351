"""Building blocks of BN-Inception: grouped batch normalization, the conv unit, LRN.

Batch normalization follows Ioffe & Szegedy (2015), Algorithms 1 and 2:
  * training normalises with the mini-batch mean and *biased* variance, computed jointly over the
    examples and all spatial positions of a feature map (section 3.2);
  * the population statistics used at inference are moving averages of the batch means and of the
    *unbiased* batch variances, m / (m - 1) * sigma_B^2 (Algorithm 2, step 10).
"""

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class BatchNorm(nn.Module):
  """Batch normalization whose statistics cover groups of `group_size` examples.

  The paper trained with 32-example mini-batches per worker. Grouping reproduces that on any global
  batch: the batch is reshaped to [groups, group_size, ...] and every group is normalised with its own
  statistics, so the result does not depend on how many devices the batch is split over. When the
  groups line up with the device shards, computing them needs no communication. `group_size=None`
  normalises the whole (global) batch with one statistic: synchronous BN.

  Statistics are computed in float32 whatever the input dtype. Variables: params `scale` (gamma) and
  `bias` (beta); batch_stats `mean` and `var` (population estimates).
  """

  group_size: Optional[int] = 32
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Optional[Dtype] = None

  @nn.compact
  def __call__(self, x, train: bool):
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)

    if train:
      groups = grouped(x.astype(jnp.float32), self.group_size)
      reduce_axes = tuple(range(1, groups.ndim - 1))  # examples and spatial positions of a group
      mean = groups.mean(axis=reduce_axes, keepdims=True)
      var = jnp.square(groups - mean).mean(axis=reduce_axes, keepdims=True)  # biased, Alg. 1
      y = (groups - mean) * jax.lax.rsqrt(var + self.epsilon)
      y = y.reshape(x.shape)
      if not self.is_initializing():
        m = groups[0].size // features  # values behind one group's statistic: m * p * q
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean.reshape(
            -1, features).mean(0)
        unbiased_var = var.reshape(-1, features).mean(0) * m / max(m - 1, 1)  # Alg. 2, step 10
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased_var
    else:
      y = (x.astype(jnp.float32) - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
    return (y * scale + bias).astype(self.dtype or x.dtype)


def grouped(x, group_size: Optional[int]):
  """Reshapes [N, ...] to [N // group_size, group_size, ...]; None gives a single group."""
  n = x.shape[0]
  if group_size is None:
    return x[None]
  if n % group_size:
    raise ValueError(
        f'The batch of {n} examples does not divide into batch-norm groups of {group_size} '
        f'(model.bn_group_size). Use a batch that is a multiple of {group_size}, or set '
        'model.bn_group_size to a divisor of the per-step batch (None: one statistic for the '
        'whole batch).')
  return x.reshape((n // group_size, group_size) + x.shape[1:])


def local_response_norm(x, size: int = 5, alpha: float = 1e-4, beta: float = 0.75,
                        k: float = 1.0):
  """Across-channel LRN as in GoogLeNet's Caffe definition.

  b_c = a_c / (k + alpha / size * sum_{c' in window(c)} a_c'^2) ** beta, the window being `size`
  channels centred on c (zero-padded at the ends). Caffe divides alpha by the window size.
  """
  sq = jnp.square(x.astype(jnp.float32))
  half = size // 2
  window_sum = jax.lax.reduce_window(
      sq, 0.0, jax.lax.add, window_dimensions=(1,) * (x.ndim - 1) + (size,),
      window_strides=(1,) * x.ndim, padding=((0, 0),) * (x.ndim - 1) + ((half, half),))
  return (x / (k + alpha / size * window_sum) ** beta).astype(x.dtype)


ACTIVATIONS: dict[str, Callable] = {'relu': nn.relu, 'sigmoid': nn.sigmoid}


def activation_fn(name: str) -> Callable:
  if name not in ACTIVATIONS:
    raise ValueError(f'Unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}.')
  return ACTIVATIONS[name]


class ConvUnit(nn.Module):
  """conv -> BN -> nonlinearity, the unit behind every convolution of Figure 5 (paper section 3.2).

  With BN the convolution has no bias: "its effect will be canceled by the subsequent mean
  subtraction". Without BN (the Inception baseline) it keeps one. `symmetric_padding` pads strided
  convolutions by k // 2 on every side, as Caffe does, instead of XLA's 'SAME' (which pads the
  end more than the start); it is needed only to reproduce Caffe-trained weights exactly.
  """

  features: int
  kernel: int = 1
  stride: int = 1
  depthwise_multiplier: Optional[int] = None  # separable: depthwise k x k, then pointwise 1 x 1
  use_bn: bool = True
  conv_bias: Optional[bool] = None  # None: a bias exactly when there is no BN
  activation: str = 'relu'
  symmetric_padding: bool = False
  bn_group_size: Optional[int] = 32
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  init_scale: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    bias = (not self.use_bn) if self.conv_bias is None else self.conv_bias
    # He initialisation, so that the deep no-BN baseline starts with well-scaled activations;
    # init_scale > 1 gives the "increased initial weights" of the paper's ensemble members.
    kernel_init = nn.initializers.variance_scaling(2.0 * self.init_scale**2, 'fan_in',
                                                   'truncated_normal')
    if self.symmetric_padding and self.stride > 1:
      padding = [(self.kernel // 2, self.kernel // 2)] * 2
    else:
      padding = 'SAME'
    conv = lambda features, kernel, stride, groups, use_bias, name: nn.Conv(
        features, (kernel, kernel), (stride, stride), padding=padding if kernel > 1 else 'VALID',
        feature_group_count=groups, use_bias=use_bias, kernel_init=kernel_init, dtype=self.dtype,
        param_dtype=jnp.float32, name=name)
    if self.depthwise_multiplier:
      channels = x.shape[-1]
      x = conv(channels * self.depthwise_multiplier, self.kernel, self.stride, channels, False,
               'depthwise')(x)
      x = conv(self.features, 1, 1, 1, bias, 'pointwise')(x)
    else:
      x = conv(self.features, self.kernel, self.stride, 1, bias, 'conv')(x)
    if self.use_bn:
      x = BatchNorm(self.bn_group_size, self.bn_momentum, self.bn_epsilon, self.dtype,
                    name='bn')(x, train)
    return activation_fn(self.activation)(x)


def max_pool(x, window: int, stride: int):
  return nn.max_pool(x, (window, window), (stride, stride), padding='SAME')


def avg_pool(x, window: int, stride: int):
  # Padded zeros count in the average (Caffe and Cadene's port: count_include_pad=True).
  return nn.avg_pool(x, (window, window), (stride, stride), padding='SAME',
                     count_include_pad=True)


POOLS: dict[str, Callable] = {'max': max_pool, 'avg': avg_pool}


def concat(branches: Sequence[jax.Array]):
  return jnp.concatenate(branches, axis=-1)
