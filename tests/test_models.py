"""BN-Inception against the paper: Figure 5's shapes, section 1.5's parameter counts, Algorithms 1-2.

Full-size (224 x 224, width 1.0) checks trace the network with `jax.eval_shape` and never run it;
numerical checks run a quarter-width network on 64 x 64 images, each network compiled once.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bn_inception import layers
from bn_inception import models

# ----------------------------------------------------------------------------------------------
# Figure 5 as data, written out here independently of models.FIGURE_5 (paper.md section 1.1).
# ----------------------------------------------------------------------------------------------

# Output H x W per named layer at 224 x 224, and the output channels of both channel variants:
# 'paper' keeps Figure 5's columns (4c/4d sum to 608, 4e to 1056), 'slim' the printed sizes.
# The pool rows are not modules: pool1's 56 x 56 shows in conv2_reduce, pool2's 28 x 28 in 3a.
# 3c and 4e are printed 28 x 28 and 14 x 14, but they halve the resolution (stride 2).
#                  name           H x W   C paper  C slim
FIGURE_5_OUTPUTS = (
    ('conv1',         112,     64,     64),
    ('conv2_reduce',   56,     64,     64),
    ('conv2',          56,    192,    192),
    ('inception_3a',   28,    256,    256),
    ('inception_3b',   28,    320,    320),
    ('inception_3c',   14,    576,    576),
    ('inception_4a',   14,    576,    576),
    ('inception_4b',   14,    576,    576),
    ('inception_4c',   14,    608,    576),
    ('inception_4d',   14,    608,    576),
    ('inception_4e',    7,   1056,   1024),
    ('inception_5a',    7,   1024,   1024),
    ('inception_5b',    7,   1024,   1024),
)

# Figure 5's inception columns; pool_proj 0 is the "pass through" of the stride-2 modules.
#              name          1x1  3x3r  3x3  d3x3r d3x3 proj stride
FIGURE_5_COLUMNS = (
    ('inception_3a',   64,   64,   64,   64,   96,  32, 1),
    ('inception_3b',   64,   64,   96,   64,   96,  64, 1),
    ('inception_3c',    0,  128,  160,   64,   96,   0, 2),
    ('inception_4a',  224,   64,   96,   96,  128, 128, 1),
    ('inception_4b',  192,   96,  128,   96,  128, 128, 1),
    ('inception_4c',  160,  128,  160,  128,  160, 128, 1),
    ('inception_4d',   96,  128,  192,  160,  192, 128, 1),
    ('inception_4e',    0,  128,  192,  192,  256,   0, 2),
    ('inception_5a',  352,  192,  320,  160,  224, 128, 1),
    ('inception_5b',  352,  192,  320,  192,  224, 128, 1),
)
SLIM_POOL_PROJ = {'inception_4c': 96, 'inception_4d': 96}  # TF-slim / lim0606 (paper.md 1.1)


def figure_5_columns(channels):
  rows = []
  for name, n1, r3, n3, rd, nd, proj, stride in FIGURE_5_COLUMNS:
    if channels == 'slim':
      proj = SLIM_POOL_PROJ.get(name, proj)
    rows.append((name, n1, r3, n3, rd, nd, proj, stride))
  return rows


def count_parameters(channels, separable_stem, use_bn=True, num_classes=1000):
  """Parameters counted from Figure 5's columns (paper.md appendix, [CALC]).

  Conv weights Cin * Cout * k * k; per conv output channel, gamma and beta with BN or one bias
  without; the classifier 1024 x classes + bias. Returns (conv weights, BN or bias, classifier).
  """
  convs = []  # (cin, cout, k) of every conv unit, the stem's separable conv as its pointwise part
  weights = 0
  if separable_stem:
    weights += 7 * 7 * 3 * 8 + 3 * 8 * 64  # depthwise 7x7 (multiplier 8), pointwise 24 -> 64
    convs.append((3 * 8, 64, 0))
  else:
    convs.append((3, 64, 7))
  convs += [(64, 64, 1), (64, 192, 3)]  # conv2_reduce, conv2
  cin = 192
  for _, n1, r3, n3, rd, nd, proj, _ in figure_5_columns(channels):
    if n1:
      convs.append((cin, n1, 1))
    convs += [(cin, r3, 1), (r3, n3, 3), (cin, rd, 1), (rd, nd, 3), (nd, nd, 3)]
    if proj:
      convs.append((cin, proj, 1))
    cin = n1 + n3 + nd + (proj or cin)
  weights += sum(i * o * k * k for i, o, k in convs)
  per_channel = (2 if use_bn else 1) * sum(o for _, o, _ in convs)
  assert cin == 1024
  return weights, per_channel, cin * num_classes + num_classes


def param_count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def abstract_variables(model, size=224):
  return jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))


def abstract_intermediates(model):
  """Shapes of every submodule's output for one 224 x 224 image, without running the network."""

  def forward():
    variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    _, state = model.apply(variables, jnp.zeros((1, 224, 224, 3)), train=False,
                           capture_intermediates=True, mutable=['intermediates'])
    return state['intermediates']

  return jax.eval_shape(forward)


def conv_units(params, path=()):
  """Paths and params of every ConvUnit: the dicts holding a 'conv' or 'pointwise' submodule."""
  if 'conv' in params or 'pointwise' in params:
    return {'/'.join(path): params}
  units = {}
  for name, child in params.items():
    if isinstance(child, dict):
      units.update(conv_units(child, path + (name,)))
  return units


def images(n, size=32, seed=0):
  return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


# ----------------------------------------------------------------------------------------------
# Figure 5: shapes at 224 x 224.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('channels', ['paper', 'slim'])
def test_named_layer_outputs_match_figure_5(channels):
  """Every named layer's H x W x C at 224 x 224 is Figure 5's (3c at 14 x 14, 4e at 7 x 7)."""
  col = 2 if channels == 'paper' else 3
  inter = abstract_intermediates(models.BNInception(channels=channels, separable_stem=False))
  for row in FIGURE_5_OUTPUTS:
    name, hw, c = row[0], row[1], row[col]
    assert inter[name]['__call__'][0].shape == (1, hw, hw, c), name
  assert inter['logits']['__call__'][0].shape == (1, 1000)


def test_separable_stem_keeps_conv1_output():
  """The paper's separable 7x7 (depth multiplier 8) also gives 112 x 112 x 64 (paper.md 1.2)."""
  inter = abstract_intermediates(models.BNInception(separable_stem=True))
  assert inter['conv1']['depthwise']['__call__'][0].shape == (1, 112, 112, 24)
  assert inter['conv1']['__call__'][0].shape == (1, 112, 112, 64)


@pytest.mark.parametrize('channels', ['paper', 'slim'])
def test_inception_branches_match_figure_5_columns(channels):
  """Each branch has its column's width; 3c and 4e stride the 3x3s and pass the input through.

  The branch widths add up to the module's output (paper.md 1.1, last column).
  """
  inter = abstract_intermediates(models.BNInception(channels=channels))
  size, cin = 28, 192
  for name, n1, r3, n3, rd, nd, proj, stride in figure_5_columns(channels):
    branches = inter[name]
    out = size // stride
    shape = lambda branch: branches[branch]['__call__'][0].shape[1:]
    assert ('1x1' in branches) == bool(n1), name
    if n1:
      assert shape('1x1') == (size, size, n1), name
    assert shape('3x3_reduce') == (size, size, r3), name
    assert shape('3x3') == (out, out, n3), name
    assert shape('double_3x3_reduce') == (size, size, rd), name
    assert shape('double_3x3_1') == (size, size, nd), name
    assert shape('double_3x3_2') == (out, out, nd), name
    assert ('pool_proj' in branches) == bool(proj), name
    if proj:
      assert shape('pool_proj') == (out, out, proj), name
    cout = n1 + n3 + nd + (proj or cin)
    assert branches['__call__'][0].shape[1:] == (out, out, cout), name
    size, cin = out, cout


# ----------------------------------------------------------------------------------------------
# Parameter counts (paper.md section 1.5).
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('conv_bias, symmetric_padding', [(False, False), (True, True)])
def test_folded_separable_convolution_is_the_same_function(conv_bias, symmetric_padding):
  """`fold_separable` (the model's `fold_stem`): the stem's depthwise 7x7 + pointwise 1x1 as one
  dense convolution of their product kernel. Same parameters (names, shapes, initial values), same
  outputs and gradients; Caffe's padding and the port's biases too."""
  unit = functools.partial(layers.ConvUnit, 16, 7, 2, depthwise_multiplier=8, bn_group_size=4,
                           conv_bias=conv_bias, symmetric_padding=symmetric_padding)
  separable, folded = unit(), unit(fold_separable=True)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 18, 18, 3)), jnp.float32)
  variables = separable.init(jax.random.key(0), x, train=False)
  jax.tree.map(np.testing.assert_array_equal, folded.init(jax.random.key(0), x, train=False),
               variables)
  cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(4, 9, 9, 16)), jnp.float32)

  def outputs(unit):
    def loss(params, x):
      y, _ = unit.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
      return jnp.sum(y * cotangent), y
    grads, y = jax.grad(loss, argnums=(0, 1), has_aux=True)(variables['params'], x)
    return y, grads, unit.apply(variables, x, train=False)

  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-4),
               outputs(folded), outputs(separable))


def test_fold_stem_makes_the_stem_one_convolution():
  """The model's switch reaches conv1: one convolution fewer in the traced network, nothing else."""
  def convolutions(model):
    x = jnp.zeros((1, 64, 64, 3))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    text = jax.jit(lambda v: model.apply(v, x, train=False)).lower(variables).as_text()
    return text.count('stablehlo.convolution'), jax.tree.map(lambda a: a.shape, variables)

  (plain, shapes), (folded, folded_shapes) = (
      convolutions(models.BNInception(width=0.25, fold_stem=fold)) for fold in (False, True))
  assert folded == plain - 1 and folded_shapes == shapes


@pytest.mark.parametrize('channels, separable_stem, expected, millions', [
    ('paper', False, 11_285_224, 11.285),
    ('paper', True, 11_278_528, 11.279),
    ('slim', False, 11_194_984, 11.195),
])
def test_parameter_count_matches_paper_md(channels, separable_stem, expected, millions):
  """Parameter counts of paper.md 1.5 ([CALC]): 11.285M, 11.279M (separable stem), 11.195M (slim)."""
  model = models.BNInception(channels=channels, separable_stem=separable_stem)
  variables = abstract_variables(model)
  assert param_count(variables['params']) == expected
  assert sum(count_parameters(channels, separable_stem)) == expected
  assert round(expected / 1e6, 3) == millions


def test_parameter_count_breakdown_matches_paper_md():
  """paper.md 1.5: conv 10.240M + BN 0.020M + FC 1.025M; slim conv + FC 11.175M."""
  conv, bn, fc = count_parameters('paper', separable_stem=False)
  assert (round(conv / 1e6, 3), round(bn / 1e6, 3), round(fc / 1e6, 3)) == (10.240, 0.020, 1.025)
  conv, bn, fc = count_parameters('slim', separable_stem=False)
  assert round((conv + fc) / 1e6, 3) == 11.175


@pytest.mark.parametrize('channels', ['paper', 'slim'])
@pytest.mark.parametrize('separable_stem', [True, False])
def test_parameter_count_without_bn_has_one_bias_per_channel(channels, separable_stem):
  """The Inception baseline (no BN) has a conv bias per output channel in place of gamma, beta."""
  model = models.BNInception(channels=channels, separable_stem=separable_stem, use_bn=False)
  count = param_count(abstract_variables(model)['params'])
  assert count == sum(count_parameters(channels, separable_stem, use_bn=False))


# ----------------------------------------------------------------------------------------------
# Where BN sits (paper section 3.2, paper.md 1.4).
# ----------------------------------------------------------------------------------------------

# conv1, conv2_reduce, conv2; 7 units per module with a 1x1 and a pool projection, 5 in 3c and 4e.
NUM_CONV_UNITS = 3 + sum(5 + bool(row[1]) + bool(row[6]) for row in FIGURE_5_COLUMNS)


def test_bn_convolutions_have_no_bias():
  """With BN every conv drops its bias (beta subsumes it) and has BN; the classifier keeps one."""
  variables = abstract_variables(models.BNInception(), size=32)
  units = conv_units(variables['params'])
  assert len(units) == NUM_CONV_UNITS == 69
  for path, unit in units.items():
    assert set(unit) in ({'conv', 'bn'}, {'depthwise', 'pointwise', 'bn'}), path
    for conv in ('conv', 'depthwise', 'pointwise'):
      if conv in unit:
        assert set(unit[conv]) == {'kernel'}, path
    assert set(unit['bn']) == {'scale', 'bias'}, path
  assert set(variables['params']['logits']) == {'kernel', 'bias'}
  assert param_count(variables['batch_stats']) == 2 * sum(
      unit['bn']['scale'].size for unit in units.values())


def test_no_bn_convolutions_have_biases_and_no_batch_stats():
  """The Inception baseline: every conv has a bias, no unit has BN, no `batch_stats` collection."""
  model = models.BNInception(use_bn=False, width=0.125)
  variables = abstract_variables(model, size=32)
  assert set(variables) == {'params'}
  units = conv_units(variables['params'])
  assert len(units) == NUM_CONV_UNITS
  for path, unit in units.items():
    assert 'bn' not in unit, path
    assert set(unit.get('conv', unit.get('pointwise'))) == {'kernel', 'bias'}, path


def test_no_bn_training_produces_no_batch_stats():
  """Training the baseline with mutable=['batch_stats'] has nothing to update."""
  model = models.BNInception(use_bn=False, width=0.125, num_classes=10)
  variables = abstract_variables(model, size=32)
  logits, updates = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'],
                               rngs={'dropout': jax.random.key(1)}),
      variables, jnp.zeros((2, 32, 32, 3)))
  assert logits.shape == (2, 10)
  assert not jax.tree.leaves(updates)


# ----------------------------------------------------------------------------------------------
# Batch normalization: Algorithm 1 (training) and Algorithm 2 (inference), grouped statistics.
# ----------------------------------------------------------------------------------------------


def bn_by_hand(x, scale, bias, eps):
  """Algorithm 1 over one group: biased variance over the examples and all positions."""
  x = np.asarray(x, np.float64)
  mean = x.mean(axis=(0, 1, 2))
  var = x.var(axis=(0, 1, 2))
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def bn_inputs(n=8, seed=0):
  """A batch whose halves have different statistics, so grouping matters."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 3, 3, 5)).astype(np.float32)
  x[n // 2:] = 3 * x[n // 2:] + 2
  return x


def bn_variables(bn, x, seed=1):
  """BatchNorm variables with non-trivial gamma and beta."""
  variables = bn.init(jax.random.key(0), x, train=False)
  rng = np.random.default_rng(seed)
  features = x.shape[-1]
  variables = flax.core.unfreeze(variables)
  variables['params'] = {'scale': jnp.asarray(rng.uniform(0.5, 2.0, features), jnp.float32),
                         'bias': jnp.asarray(rng.normal(size=features), jnp.float32)}
  return variables


def test_batchnorm_train_normalises_each_group_by_hand():
  """Training output is (x - mu_B) / sqrt(sigma_B^2 + eps) * gamma + beta per group (Alg. 1)."""
  bn = layers.BatchNorm(group_size=4, epsilon=1e-3)
  x = bn_inputs(8)
  variables = bn_variables(bn, x)
  y, _ = bn.apply(variables, x, train=True, mutable=['batch_stats'])
  gamma, beta = (np.asarray(variables['params'][k]) for k in ('scale', 'bias'))
  expected = np.concatenate([bn_by_hand(x[:4], gamma, beta, 1e-3),
                             bn_by_hand(x[4:], gamma, beta, 1e-3)])
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  # Not the whole-batch statistic: the two halves differ, so grouping changes the result.
  assert not np.allclose(y, bn_by_hand(x, gamma, beta, 1e-3), atol=1e-2)


def test_batchnorm_group_size_none_uses_the_whole_batch():
  """`group_size=None` is one statistic over the whole batch (sync BN), as a single group of N."""
  x = bn_inputs(8)
  bn = layers.BatchNorm(group_size=None, epsilon=1e-3)
  variables = bn_variables(bn, x)
  y, stats = bn.apply(variables, x, train=True, mutable=['batch_stats'])
  gamma, beta = (np.asarray(variables['params'][k]) for k in ('scale', 'bias'))
  np.testing.assert_allclose(y, bn_by_hand(x, gamma, beta, 1e-3), rtol=1e-5, atol=1e-5)
  y8, stats8 = layers.BatchNorm(group_size=8, epsilon=1e-3).apply(
      variables, x, train=True, mutable=['batch_stats'])
  np.testing.assert_allclose(y, y8, rtol=1e-6, atol=1e-6)
  jax.tree.map(np.testing.assert_allclose, stats, stats8)


def test_batchnorm_running_averages_follow_algorithm_2():
  """Population stats: momentum average of the mean of group means and m/(m-1) * sigma_B^2.

  m counts every value behind one statistic: group_size * H * W (paper section 3.2).
  """
  momentum, group = 0.8, 4
  bn = layers.BatchNorm(group_size=group, momentum=momentum)
  x1, x2 = bn_inputs(8, seed=0), bn_inputs(8, seed=2)
  variables = bn_variables(bn, x1)
  m = group * 3 * 3
  mean, var = np.zeros(5), np.ones(5)  # initial population statistics
  for x in (x1, x2):
    _, updates = bn.apply(variables, x, train=True, mutable=['batch_stats'])
    groups = x.astype(np.float64).reshape(2, group, 3, 3, 5)
    group_means = groups.mean(axis=(1, 2, 3))
    group_unbiased_vars = groups.var(axis=(1, 2, 3), ddof=1)  # = m / (m - 1) * biased
    np.testing.assert_allclose(group_unbiased_vars,
                               groups.var(axis=(1, 2, 3)) * m / (m - 1), rtol=1e-12)
    mean = momentum * mean + (1 - momentum) * group_means.mean(0)
    var = momentum * var + (1 - momentum) * group_unbiased_vars.mean(0)
    np.testing.assert_allclose(updates['batch_stats']['mean'], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(updates['batch_stats']['var'], var, rtol=1e-5, atol=1e-6)
    variables = {**variables, **updates}


def test_batchnorm_rejects_batch_not_divisible_by_group_size():
  """A batch that does not split into whole groups is an error naming both numbers."""
  bn = layers.BatchNorm(group_size=4)
  x = bn_inputs(6)
  variables = bn.init(jax.random.key(0), x, train=False)
  with pytest.raises(ValueError, match=r'(?s)\b6\b.*\b4\b'):
    bn.apply(variables, x, train=True, mutable=['batch_stats'])


def test_batchnorm_eval_uses_population_statistics():
  """Inference normalises with the running mean and variance (Alg. 2, step 11), stats untouched."""
  bn = layers.BatchNorm(group_size=4, epsilon=1e-3)
  x = bn_inputs(8)
  variables = bn_variables(bn, x)
  rng = np.random.default_rng(3)
  pop_mean, pop_var = rng.normal(size=5), rng.uniform(0.5, 3.0, 5)
  variables['batch_stats'] = {'mean': jnp.asarray(pop_mean, jnp.float32),
                              'var': jnp.asarray(pop_var, jnp.float32)}
  y, updates = bn.apply(variables, x, train=False, mutable=['batch_stats'])
  gamma, beta = (np.asarray(variables['params'][k]) for k in ('scale', 'bias'))
  expected = (x - pop_mean) / np.sqrt(pop_var + 1e-3) * gamma + beta
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  jax.tree.map(np.testing.assert_array_equal, updates['batch_stats'], variables['batch_stats'])
  # One example's output does not depend on the rest of the batch, nor on the batch size.
  y_alone = bn.apply(variables, x[5:6], train=False)
  np.testing.assert_allclose(y_alone, y[5:6], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('one_pass, fused_grad', [(True, False), (False, True), (True, True)])
def test_batchnorm_opt_ins_compute_the_same_function_and_gradients(one_pass, fused_grad):
  """The opt-in speed-ups (one-pass statistics, the written-out backward pass) change rounding
  only: outputs, population statistics and the gradients of x, gamma and beta match the default."""
  x = bn_inputs(8)  # halves with means 0 and 2: the one-pass variance must subtract E[x]^2
  cotangent = jnp.asarray(np.random.default_rng(4).normal(size=x.shape), jnp.float32)

  def outputs(bn):
    variables = bn_variables(bn, x)

    def loss(params, x):
      y, updates = bn.apply({**variables, 'params': params}, x, train=True,
                            mutable=['batch_stats'])
      return jnp.sum(jnp.tanh(y) * cotangent), (y, updates)

    grads, (y, updates) = jax.grad(loss, argnums=(0, 1), has_aux=True)(variables['params'], x)
    return y, updates, grads

  expected = outputs(layers.BatchNorm(group_size=4))
  got = outputs(layers.BatchNorm(group_size=4, one_pass=one_pass, fused_grad=fused_grad))
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5), got, expected)


def full_size_reductions(bn, shape):
  """Reductions over whole activation tensors in BN's lowered forward and backward pass."""
  x = jnp.zeros(shape, jnp.bfloat16)
  variables = bn.init(jax.random.key(0), x, train=False)

  def loss(params, x):
    y, _ = bn.apply({**variables, 'params': params}, x, train=True, mutable=['batch_stats'])
    return jnp.sum(y.astype(jnp.float32))

  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables['params'], x).as_text()
  shapes = ['x'.join(map(str, s)) + 'x' for s in (shape, (2, 4) + shape[1:])]  # grouped too
  return sum('stablehlo.reduce' in line and any(s in line for s in shapes)
             for line in text.splitlines())


def test_batchnorm_fused_grad_reads_the_activations_fewer_times():
  """What the opt-ins are for (docs/benchmarks.md): autodiff's backward pass reduces over the
  activations five times; the written-out one twice (per-group sums of dy and dy * x_hat), and with
  one-pass statistics the forward pass's two reductions read the same input (sibling reductions)."""
  shape = (8, 3, 3, 5)
  plain = full_size_reductions(layers.BatchNorm(group_size=4), shape)
  fused = full_size_reductions(layers.BatchNorm(group_size=4, one_pass=True, fused_grad=True),
                               shape)
  assert fused == 4 and plain > fused


# ----------------------------------------------------------------------------------------------
# The whole network, narrow and small: train vs eval mode, grouping.
# ----------------------------------------------------------------------------------------------

# 64 x 64 images leave 2 x 2 positions in 4e-5b, so every statistic covers m >= 16 values.
# With fewer (m = 2 at 1 x 1), BN at initialisation is chaotic: it amplifies rounding noise.
SMALL = dict(width=0.25, num_classes=10, bn_group_size=4)
BATCH = images(8, size=64)


def random_variables(model, size=64, seed=0):
  """Random variables of the model's structure, without compiling its init.

  He-normal kernels, gamma around 1 and small betas and biases; population statistics 0 and 1.
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      values = rng.normal(size=leaf.shape) * np.sqrt(2 / np.prod(leaf.shape[:-1]))
    elif name == 'scale':
      values = rng.uniform(0.5, 1.5, leaf.shape)
    elif name == 'bias':
      values = 0.1 * rng.normal(size=leaf.shape)
    else:
      values = np.zeros(leaf.shape) if name == 'mean' else np.ones(leaf.shape)
    return jnp.asarray(values, leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, abstract_variables(model, size))


@functools.partial(jax.jit, static_argnums=(0, 3))
def run(model, variables, x, train):
  """One forward pass: logits and {'batch_stats', 'intermediates'} (every submodule's output)."""
  return model.apply(variables, x, train=train, capture_intermediates=True,
                     mutable=['batch_stats', 'intermediates'])


@pytest.fixture(scope='module')
def small_net():
  model = models.BNInception(**SMALL)
  return model, random_variables(model)


def test_train_mode_updates_every_batch_statistic(small_net):
  """Training (mutable=['batch_stats']) moves every BN's population mean and variance."""
  model, variables = small_net
  _, state = run(model, variables, BATCH, True)
  old = flax.traverse_util.flatten_dict(variables['batch_stats'])
  new = flax.traverse_util.flatten_dict(state['batch_stats'])
  assert old.keys() == new.keys() and len(new) == 2 * NUM_CONV_UNITS
  for path in old:
    assert new[path].dtype == jnp.float32, path
    assert not np.allclose(old[path], new[path]), path


def test_eval_mode_keeps_statistics_and_is_batch_independent(small_net):
  """Evaluation uses the population statistics: stats unchanged, each example on its own."""
  model, variables = small_net
  _, state = run(model, variables, BATCH, True)
  trained = {'params': variables['params'], 'batch_stats': state['batch_stats']}
  logits, after = run(model, trained, BATCH, False)
  jax.tree.map(np.testing.assert_array_equal, after['batch_stats'], trained['batch_stats'])
  # The first examples' logits do not change when the rest of the batch does.
  others = jnp.concatenate([BATCH[:3], images(5, size=64, seed=7)])
  logits_others, _ = run(model, trained, others, False)
  np.testing.assert_allclose(logits_others[:3], logits[:3], rtol=1e-5, atol=1e-6)
  assert not np.allclose(logits_others[3:], logits[3:], atol=1e-3)


def test_grouped_network_equals_groups_run_separately(small_net):
  """BN groups of 4 in a batch of 8 give what two whole-batch runs on each half give.

  Outputs agree, and as the running averages take the mean of the groups' statistics, they are
  the average of the two halves' updates (design.md section 3).
  """
  model, variables = small_net
  logits, state = run(model, variables, BATCH, True)
  whole_batch = models.BNInception(**{**SMALL, 'bn_group_size': None})
  halves = [run(whole_batch, variables, half, True) for half in (BATCH[:4], BATCH[4:])]
  np.testing.assert_allclose(logits, np.concatenate([h[0] for h in halves]),
                             rtol=1e-3, atol=1e-4)
  jax.tree.map(lambda g, a, b: np.testing.assert_allclose(g, (a + b) / 2, rtol=1e-4, atol=1e-5),
               state['batch_stats'], halves[0][1]['batch_stats'], halves[1][1]['batch_stats'])


# ----------------------------------------------------------------------------------------------
# Nonlinearities and LRN against direct formulas.
# ----------------------------------------------------------------------------------------------

DIRECT_ACTIVATIONS = {
    'relu': lambda z: np.maximum(z, 0.0),
    'sigmoid': lambda z: 1.0 / (1.0 + np.exp(-z)),  # g(t) = 1 / (1 + e^-t), paper section 4.2.2
}


@pytest.mark.parametrize('activation', sorted(DIRECT_ACTIVATIONS))
def test_conv_unit_is_activation_of_bn_of_conv(activation, small_net):
  """A conv unit of the network computes g(BN(W * u)), g applied after BN (paper section 3.2).

  conv2 (3x3, stride 1) is recomputed in numpy from its input, conv2_reduce's output, with each
  group of 4 examples normalised on its own statistics.
  """
  model = models.BNInception(**{**SMALL, 'activation': activation})
  variables = small_net[1]
  _, state = run(model, variables, BATCH, True)
  inter = state['intermediates']
  u = np.asarray(inter['conv2_reduce']['__call__'][0], np.float64)
  params = variables['params']['conv2']
  kernel = np.asarray(params['conv']['kernel'], np.float64)  # 3 x 3 x Cin x Cout
  h, w = u.shape[1:3]
  padded = np.pad(u, ((0, 0), (1, 1), (1, 1), (0, 0)))
  wu = sum(np.einsum('nhwc,cd->nhwd', padded[:, i:i + h, j:j + w], kernel[i, j])
           for i in range(3) for j in range(3))
  gamma, beta = np.asarray(params['bn']['scale']), np.asarray(params['bn']['bias'])
  bn = np.concatenate([bn_by_hand(group, gamma, beta, model.bn_epsilon)
                       for group in np.split(wu, 2)])
  expected = DIRECT_ACTIVATIONS[activation](bn)
  np.testing.assert_allclose(inter['conv2']['__call__'][0], expected, rtol=1e-4, atol=1e-5)
  if activation == 'sigmoid':
    assert 0 < float(expected.min()) and float(expected.max()) < 1


def lrn_by_hand(a, size, alpha, beta, k):
  """b_c = a_c / (k + alpha / size * sum_{c'=max(0, c-n/2)}^{min(C-1, c+n/2)} a_c'^2) ** beta."""
  a = np.asarray(a, np.float64)
  channels = a.shape[-1]
  b = np.empty_like(a)
  for c in range(channels):
    window = a[..., max(0, c - size // 2):min(channels - 1, c + size // 2) + 1]
    b[..., c] = a[..., c] / (k + alpha / size * np.sum(window**2, axis=-1))**beta
  return b


@pytest.mark.parametrize('kwargs', [
    {},  # GoogLeNet's size 5, alpha 1e-4, beta 0.75, k 1
    dict(size=5, alpha=1.0, beta=0.5, k=2.0),
    dict(size=3, alpha=0.3, beta=0.75, k=1.0),
])
def test_local_response_norm_matches_direct_formula(kwargs):
  """LRN across channels as Caffe defines it, edges of the channel window clipped."""
  a = 20.0 * np.random.default_rng(0).normal(size=(2, 3, 3, 7)).astype(np.float32)
  defaults = dict(size=5, alpha=1e-4, beta=0.75, k=1.0)
  expected = lrn_by_hand(a, **{**defaults, **kwargs})
  b = layers.local_response_norm(jnp.asarray(a), **kwargs)
  np.testing.assert_allclose(b, expected, rtol=1e-5, atol=1e-6)
  assert not np.allclose(expected, a, rtol=1e-3)  # the normalisation is not a no-op here


# ----------------------------------------------------------------------------------------------
# bfloat16.
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize('train', [True, False])
def test_bfloat16_forward_pass(train, small_net):
  """bfloat16 compute keeps params, BN statistics and logits float32, close to float32's logits.

  In training mode BN at initialisation amplifies small differences with depth (0.4% noise on the
  input moves these float32 logits by 18%, bfloat16 by 19%), so there the comparison is loose;
  the first layers, before the amplification, match to bfloat16 precision. In eval mode: 1.2%.
  """
  model32, variables = small_net  # width 0.25, 10 classes
  model16 = models.BNInception(dtype=jnp.bfloat16, **SMALL)
  for leaf in jax.tree.leaves(abstract_variables(model16, size=64)):
    assert leaf.dtype == jnp.float32
  logits16, state16 = run(model16, variables, BATCH, train)
  logits32, state32 = run(model32, variables, BATCH, train)
  for name in ('conv1', 'conv2', 'inception_3a'):
    out16 = state16['intermediates'][name]['__call__'][0]
    out32 = state32['intermediates'][name]['__call__'][0]
    assert out16.dtype == jnp.bfloat16, name
    np.testing.assert_allclose(out16.astype(jnp.float32), out32,
                               atol=0.05 * float(np.abs(out32).max()))
  assert logits16.dtype == jnp.float32
  for leaf in jax.tree.leaves(state16['batch_stats']):
    assert leaf.dtype == jnp.float32
  assert np.isfinite(logits16).all()
  error = np.linalg.norm(logits16 - logits32) / np.linalg.norm(logits32)
  assert error < (0.5 if train else 0.05)
