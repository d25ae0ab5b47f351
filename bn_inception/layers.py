"""Building blocks of BN-Inception: grouped batch normalization, the conv unit, LRN.

Batch normalization follows Ioffe & Szegedy (2015), Algorithms 1 and 2:
  * training normalises with the mini-batch mean and *biased* variance, computed jointly over the
    examples and all spatial positions of a feature map (section 3.2);
  * the population statistics used at inference are moving averages of the batch means and of the
    *unbiased* batch variances, m / (m - 1) * sigma_B^2 (Algorithm 2, step 10).
"""

import functools
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

  Two opt-in ways to compute the same function with fewer passes over the activations (measured on a
  GPU by scripts/gpu_check.py, docs/benchmarks.md): `one_pass` takes the variance as
  E[x^2] - E[x]^2 from a single pass instead of E[(x - E[x])^2] after the mean's pass (float32;
  less exact when |mean| >> std); `fused_grad` replaces autodiff's backward pass (five reductions
  over the activations, two of them one after the other) by the textbook one: two sibling reductions
  per group and one elementwise pass.
  """

  group_size: Optional[int] = 32
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Optional[Dtype] = None
  one_pass: bool = False
  fused_grad: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    features = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (features,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable('batch_stats', 'var', jnp.ones, (features,), jnp.float32)

    dtype = self.dtype or x.dtype
    if train:
      normalize = fused_batch_norm if self.fused_grad else batch_norm
      y, mean, var = normalize(x, scale, bias, self.group_size, self.epsilon, self.one_pass, dtype)
      if not self.is_initializing():
        m = x.size // mean.size  # values behind one group's statistic: m * p * q
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean.mean(0)
        unbiased_var = var.mean(0) * m / max(m - 1, 1)  # Alg. 2, step 10
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased_var
      return y
    y = (x.astype(jnp.float32) - ra_mean.value) * jax.lax.rsqrt(ra_var.value + self.epsilon)
    return (y * scale + bias).astype(dtype)


def group_statistics(groups, one_pass: bool):
  """Mean and biased variance (Alg. 1) of each group over its examples and positions, keepdims."""
  axes = tuple(range(1, groups.ndim - 1))
  mean = groups.mean(axis=axes, keepdims=True)
  if one_pass:  # both sums from one pass over the activations
    var = jnp.maximum(jnp.square(groups).mean(axis=axes, keepdims=True) - jnp.square(mean), 0)
  else:
    var = jnp.square(groups - mean).mean(axis=axes, keepdims=True)
  return mean, var


def batch_norm(x, scale, bias, group_size, epsilon, one_pass, dtype):
  """Training-mode BN of x [N, ..., C] in groups: (output in dtype, mean [G, C], var [G, C])."""
  groups = grouped(x.astype(jnp.float32), group_size)
  mean, var = group_statistics(groups, one_pass)
  y = ((groups - mean) * jax.lax.rsqrt(var + epsilon)).reshape(x.shape)
  features = x.shape[-1]
  return ((y * scale + bias).astype(dtype), mean.reshape(-1, features),
          var.reshape(-1, features))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def fused_batch_norm(x, scale, bias, group_size, epsilon, one_pass, dtype):
  """`batch_norm` with the textbook backward pass; the statistics it returns get no gradient."""
  return batch_norm(x, scale, bias, group_size, epsilon, one_pass, dtype)


def _fused_batch_norm_forward(x, scale, bias, group_size, epsilon, one_pass, dtype):
  outputs = batch_norm(x, scale, bias, group_size, epsilon, one_pass, dtype)
  _, mean, var = outputs
  return outputs, (x, scale, mean, jax.lax.rsqrt(var + epsilon))


def _fused_batch_norm_backward(group_size, epsilon, one_pass, dtype, residuals, cotangents):
  """dx = rstd * scale * (dy - mean(dy) - x_hat * mean(dy * x_hat)), means over each group."""
  del epsilon, one_pass, dtype
  x, scale, mean, rstd = residuals
  dy = grouped(cotangents[0].astype(jnp.float32), group_size)  # the statistics' cotangents: none
  axes = tuple(range(1, dy.ndim - 1))
  # [G, C] -> [G, 1, ..., 1, C], to broadcast over each group's examples and positions.
  mean, rstd = (a.reshape((a.shape[0],) + (1,) * len(axes) + a.shape[1:]) for a in (mean, rstd))
  x_hat = (grouped(x.astype(jnp.float32), group_size) - mean) * rstd
  sum_dy = dy.sum(axis=axes, keepdims=True)
  sum_dy_x_hat = (dy * x_hat).sum(axis=axes, keepdims=True)
  m = dy.size // sum_dy.size
  dx = rstd * scale * (dy - sum_dy / m - x_hat * (sum_dy_x_hat / m))
  features = x.shape[-1]
  return (dx.reshape(x.shape).astype(x.dtype), sum_dy_x_hat.reshape(-1, features).sum(0),
          sum_dy.reshape(-1, features).sum(0))


fused_batch_norm.defvjp(_fused_batch_norm_forward, _fused_batch_norm_backward)


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
  bn_one_pass: bool = False  # BatchNorm.one_pass
  bn_fused_grad: bool = False  # BatchNorm.fused_grad
  fold_separable: bool = False  # the separable convolution as one dense one (see below)
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
    if self.depthwise_multiplier and self.fold_separable:
      # The same parameters and function as the two convolutions below, computed as one dense k x k
      # convolution whose kernel is their product (no nonlinearity between them): one kernel launch
      # and no intermediate activations, for k x k x C x multiplier x features extra multiply-adds.
      channels, multiplier = x.shape[-1], self.depthwise_multiplier
      depthwise, _ = ConvParams((self.kernel, self.kernel, 1, channels * multiplier), kernel_init,
                                False, name='depthwise')()
      pointwise, pointwise_bias = ConvParams((1, 1, channels * multiplier, self.features),
                                             kernel_init, bias, name='pointwise')()
      kernel = jnp.einsum('hwcm,cmo->hwco',
                          depthwise.reshape(self.kernel, self.kernel, channels, multiplier),
                          pointwise.reshape(channels, multiplier, self.features))
      x = jax.lax.conv_general_dilated(
          x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride), padding,
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      if pointwise_bias is not None:
        x = x + pointwise_bias.astype(self.dtype)
    elif self.depthwise_multiplier:
      channels = x.shape[-1]
      x = conv(channels * self.depthwise_multiplier, self.kernel, self.stride, channels, False,
               'depthwise')(x)
      x = conv(self.features, 1, 1, 1, bias, 'pointwise')(x)
    else:
      x = conv(self.features, self.kernel, self.stride, 1, bias, 'conv')(x)
    if self.use_bn:
      x = BatchNorm(self.bn_group_size, self.bn_momentum, self.bn_epsilon, self.dtype,
                    self.bn_one_pass, self.bn_fused_grad, name='bn')(x, train)
    return activation_fn(self.activation)(x)


class ConvParams(nn.Module):
  """The parameters of an nn.Conv (kernel, optional bias) without the convolution, under the same
  names, shapes and initialisers, so that checkpoints are interchangeable."""

  kernel_shape: tuple[int, ...]
  kernel_init: Callable
  use_bias: bool

  @nn.compact
  def __call__(self):
    kernel = self.param('kernel', self.kernel_init, self.kernel_shape, jnp.float32)
    bias = (self.param('bias', nn.initializers.zeros, (self.kernel_shape[-1],), jnp.float32)
            if self.use_bias else None)
    return kernel, bias


def max_pool(x, window: int, stride: int):
  return nn.max_pool(x, (window, window), (stride, stride), padding='SAME')


def avg_pool(x, window: int, stride: int):
  # Padded zeros count in the average (Caffe and Cadene's port: count_include_pad=True).
  return nn.avg_pool(x, (window, window), (stride, stride), padding='SAME',
                     count_include_pad=True)


POOLS: dict[str, Callable] = {'max': max_pool, 'avg': avg_pool}


def concat(branches: Sequence[jax.Array]):
  return jnp.concatenate(branches, axis=-1)
