"""The configs: design.md section 4's table of the paper's five variants, both scales, overrides."""

import importlib
import pathlib

import jax
import jax.numpy as jnp
import pytest
from absl import flags
from ml_collections import config_flags

from bn_inception import errors
from bn_inception import models

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[1] / 'configs'
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob('*.py') if p.stem not in ('__init__', 'default'))

# design.md section 4 (paper section 4.2): the ImageNet-scale values of each variant.
#   BN, nonlinearity, LR per 32 images, decay epochs, L2, dropout, LRN, distortion, shuffle,
#   training length in 32-image paper steps.
DESIGN_TABLE = {
    'inception':     (False, 'relu',    0.0015, 8, 4e-5, 0.4, True, 1.0, 'light', 31_000_000),
    'bn_baseline':   (True,  'relu',    0.0015, 8, 4e-5, 0.4, True, 1.0, 'light', 15_000_000),
    'bn_x5':         (True,  'relu',    0.0075, 8 / 6, 8e-6, 0.0, False, 0.5, 'thorough', 6_000_000),
    'bn_x30':        (True,  'relu',    0.045,  8 / 6, 8e-6, 0.0, False, 0.5, 'thorough', 6_000_000),
    'bn_x5_sigmoid': (True,  'sigmoid', 0.0075, 8 / 6, 8e-6, 0.0, False, 0.5, 'thorough', 6_000_000),
}
LR_MULTIPLE = {'inception': 1, 'bn_baseline': 1, 'bn_x5': 5, 'bn_x30': 30, 'bn_x5_sigmoid': 5}
SEPARABLE_PAPER_PARAMS = 11_278_528  # paper.md 1.5: Figure 5 columns, separable stem, 1000 classes


def load(name, *scale):
  return importlib.import_module(f'configs.{name}').get_config(*scale)


def parse_flags(*args):
  """Parses a command line the way main.py does (absl flags + config_flags)."""
  argv = ['main.py', *args]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file('config', None, flag_values=flag_values, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_every_paper_variant_has_a_config():
  """The five variants of paper section 4.2.2 each have a config file."""
  assert set(DESIGN_TABLE) <= set(CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_loads_at_both_scales(name):
  """`get_config()` is the ImageNet run, `get_config('digits')` the miniature."""
  imagenet, digits = load(name), load(name, 'digits')
  assert imagenet.scale == 'imagenet' and load(name, 'imagenet').to_dict() == imagenet.to_dict()
  assert imagenet.dataset.image_size == 224 and imagenet.model.num_classes == 1000
  assert imagenet.model.width == 1.0
  assert digits.scale == 'digits' and digits.dataset.name == 'digits'
  assert digits.model.num_classes == 10


@pytest.mark.parametrize('name', CONFIGS)
def test_unknown_scale_raises(name):
  with pytest.raises(errors.ConfigArgumentError, match='imagenet .the default. and digits'):
    load(name, 'cifar')


@pytest.mark.parametrize('name', CONFIGS)
def test_config_builds_its_model_at_digits_scale(name):
  """`models.from_config(config.model)` builds; init and a training step trace at the config's
  batch size (which the BN group size must divide)."""
  config = load(name, 'digits')
  model = models.from_config(config.model)
  size = config.dataset.image_size
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False))
  assert ('batch_stats' in variables) == config.model.use_bn
  logits, _ = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'],
                               rngs={'dropout': jax.random.key(0)}),
      variables, jnp.zeros((config.batch_size, size, size, 3)))
  assert logits.shape == (config.batch_size, 10) and logits.dtype == jnp.float32


@pytest.mark.parametrize('name', sorted(DESIGN_TABLE))
def test_imagenet_config_builds_figure_5_network(name):
  """At ImageNet scale every paper variant's network is Figure 5 with the separable stem (11,278,528
  parameters); without BN each gamma-beta pair is replaced by one conv bias."""
  config = load(name)
  model = models.from_config(config.model)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False))
  count = sum(x.size for x in jax.tree.leaves(variables['params']))
  if config.model.use_bn:
    assert count == SEPARABLE_PAPER_PARAMS
  else:
    bn_model = models.from_config({**config.model, 'use_bn': True})
    bn_stats = jax.eval_shape(
        lambda: bn_model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False)
    )['batch_stats']
    bn_channels = sum(x.size for x in jax.tree.leaves(bn_stats)) // 2  # mean and var
    assert count == SEPARABLE_PAPER_PARAMS - bn_channels


@pytest.mark.parametrize('name', sorted(DESIGN_TABLE))
def test_imagenet_config_matches_design_table(name):
  """Each variant's recipe is design.md section 4's (paper sections 4.2.1-4.2.2)."""
  (use_bn, activation, lr, decay_epochs, l2, dropout, lrn, distortion, shuffle,
   paper_steps) = DESIGN_TABLE[name]
  c = load(name)
  assert c.model.use_bn == use_bn
  assert c.model.activation == activation
  assert c.learning_rate == pytest.approx(lr)
  assert c.lr_decay_epochs == pytest.approx(decay_epochs)
  assert c.lr_decay_factor == 0.96
  assert c.weight_decay == pytest.approx(l2)
  assert c.model.dropout_rate == dropout
  assert c.model.lrn == lrn
  assert c.dataset.distortion_strength == distortion
  assert c.dataset.shuffle == shuffle
  assert c.momentum == 0.9
  assert c.model.separable_stem and c.model.channels == 'paper'
  assert c.model.bn_group_size == 32  # the paper's 32-image workers
  assert c.paper_steps == paper_steps
  assert c.num_train_steps * c.batch_size / 32 == paper_steps


@pytest.mark.parametrize('name', sorted(DESIGN_TABLE))
def test_digits_config_keeps_the_variant_differences(name):
  """The miniature keeps each variant's learning-rate multiple and section 4.2.1 changes."""
  c, base = load(name, 'digits'), load('bn_baseline', 'digits')
  use_bn, activation, _, decay_epochs, l2, dropout, lrn, distortion, shuffle, _ = DESIGN_TABLE[name]
  assert c.learning_rate == pytest.approx(LR_MULTIPLE[name] * base.learning_rate)
  assert c.lr_decay_epochs / base.lr_decay_epochs == pytest.approx(decay_epochs / 8)
  assert c.weight_decay == pytest.approx(l2)
  assert (c.model.use_bn, c.model.activation, c.model.dropout_rate, c.model.lrn) == (
      use_bn, activation, dropout, lrn)
  assert (c.dataset.distortion_strength, c.dataset.shuffle) == (distortion, shuffle)
  assert c.num_train_steps * c.batch_size / 32 == c.paper_steps


def test_num_train_steps_follows_batch_size():
  """Changing batch_size after loading rescales num_train_steps to the same paper length."""
  c = load('bn_x30')
  c.batch_size = 1024
  assert c.num_train_steps == 6_000_000 * 32 // 1024 == 187_500
  c.batch_size = 32
  assert c.num_train_steps == 6_000_000


def test_explicit_num_train_steps_sticks():
  """num_train_steps set explicitly stays put when batch_size or paper_steps change."""
  c = load('bn_x30')
  c.num_train_steps = 123
  c.batch_size = 512
  c.paper_steps = 1_000
  assert c.num_train_steps == 123


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')  # inside config_flags
def test_command_line_overrides():
  """`--config=FILE:scale --config.FIELD=...` as main.py parses it."""
  c = parse_flags(f'--config={CONFIG_DIR / "bn_x30.py"}', '--config.batch_size=1024')
  assert (c.batch_size, c.num_train_steps) == (1024, 187_500)
  c = parse_flags(f'--config={CONFIG_DIR / "bn_x30.py"}:digits', '--config.num_train_steps=123',
                  '--config.batch_size=128')
  assert (c.scale, c.batch_size, c.num_train_steps) == ('digits', 128, 123)
  c = parse_flags(f'--config={CONFIG_DIR / "bn_x30.py"}', '--config.model.conv_bias=True')
  assert c.model.conv_bias is True


@pytest.mark.filterwarnings('ignore:the load_module:DeprecationWarning')
def test_command_line_bn_group_size_none():
  """`--config.model.bn_group_size=None` selects one statistic over the whole batch (design.md 4)."""
  c = parse_flags(f'--config={CONFIG_DIR / "bn_x30.py"}', '--config.model.bn_group_size=None')
  assert c.model.bn_group_size is None
