"""Checks a config once, before anything is written or compiled.

`check(config)` (training and the benchmark) and `check(config, training=False)` (evaluation) raise
one `errors.ConfigError` listing every field whose value cannot work, each with the values it
allows, e.g. "batch_size = -32: an integer >= 1". What depends on the devices or the data set is
checked where those are known: `train.check_batch` (the batch over devices and BN groups),
`check_num_classes` (the data set's classes).
"""

import math
from typing import Any, Callable

import ml_collections

from bn_inception import errors
from bn_inception import data_spec
from bn_inception import layers
from bn_inception import models

Rule = tuple[Callable[[Any], bool], str]  # (is the value allowed?, the allowed values in words)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def integer(minimum: int) -> Rule:
  return (lambda v: _is_int(v) and v >= minimum), f'an integer >= {minimum}'


def number(low: float, high: float = math.inf, *, low_open=False, high_open=False) -> Rule:
  def allowed(v):
    return (_is_number(v) and (low < v if low_open else low <= v)
            and (v < high if high_open else v <= high))
  if high == math.inf:
    words = f'a number {">" if low_open else ">="} {low:g}'
  else:
    words = f'a number in {"(" if low_open else "["}{low:g}, {high:g}{")" if high_open else "]"}'
  return allowed, words


def one_of(values) -> Rule:
  return (lambda v: v in values), f'one of {sorted(values)}'


def or_none(rule: Rule, meaning: str) -> Rule:
  allowed, words = rule
  return (lambda v: v is None or allowed(v)), f'None ({meaning}) or {words}'


BOOLEAN: Rule = (lambda v: isinstance(v, bool)), 'True or False'
TEXT: Rule = (lambda v: isinstance(v, str) and bool(v)), 'a non-empty string'
COLOUR_VALUES: Rule = (
    lambda v: isinstance(v, (tuple, list)) and len(v) == 3 and all(map(_is_number, v)),
    'three numbers, one per channel')

# What evaluation needs: the network, its input, the evaluation data and batches.
EVALUATION: dict[str, Rule] = {
    'model.num_classes': integer(1),
    'model.use_bn': BOOLEAN,
    'model.activation': one_of(layers.ACTIVATIONS),
    'model.lrn': BOOLEAN,
    'model.dropout_rate': number(0, 1, high_open=True),
    'model.separable_stem': BOOLEAN,
    'model.channels': one_of(models.CHANNELS),
    'model.width': number(0, low_open=True),
    'model.bn_momentum': number(0, 1),
    'model.bn_epsilon': number(0, low_open=True),
    'model.bn_group_size': or_none(integer(1), 'one BN statistic over the whole batch'),
    'model.dtype': one_of(('float32', 'bfloat16', 'float16')),
    'model.init_scale': number(0, low_open=True),
    'model.symmetric_padding': BOOLEAN,
    'model.conv_bias': or_none(BOOLEAN, 'a bias exactly when use_bn is False'),
    'model.bn_one_pass': BOOLEAN,
    'model.bn_fused_grad': BOOLEAN,
    'model.fold_stem': BOOLEAN,
    'input.color_order': one_of(models.COLOR_ORDERS),
    'input.mean': COLOUR_VALUES,
    'input.std': (lambda v: COLOUR_VALUES[0](v) and all(x > 0 for x in v),
                  'three numbers > 0, one per channel'),
    'dataset.name': TEXT,
    # 32 x 32 ends at 1 x 1 after the network's five stride-2 stages; smaller inputs are mostly padding.
    'dataset.image_size': (integer(32)[0], 'an integer >= 32 (the network downsamples 32x)'),
    'dataset.eval_split': TEXT,
    'dataset.eval_crops': one_of(data_spec.CROPS),
    'dataset.loader': one_of(data_spec.LOADERS),
    'batch_size': integer(1),
    'eval_batch_size': or_none(integer(1), 'batch_size'),
}

# Training (and the benchmark, which times its step) needs these too.
TRAINING: dict[str, Rule] = {
    **EVALUATION,
    'dataset.train_split': TEXT,
    'dataset.shuffle': one_of(data_spec.SHUFFLE),
    # Beyond 2 the saturation and contrast factors, 1 +- 0.5 x strength (tfds_pipeline), go negative.
    'dataset.distortion_strength': number(0, 2),
    'num_train_steps': integer(1),
    'log_every_steps': integer(1),
    'eval_every_steps': integer(1),
    'checkpoint_every_steps': integer(1),
    # 0 would let Orbax delete every checkpoint, the newest too.
    'keep_checkpoints': integer(1),
    'keep_checkpoint_every_steps': (integer(0)[0], 'an integer >= 0 (0: none kept for good)'),
    'learning_rate': number(0, low_open=True),
    'lr_decay_factor': number(0, 1, low_open=True),
    'lr_decay_epochs': number(0, low_open=True),
    'warmup_epochs': number(0),
    'momentum': number(0, 1, high_open=True),
    'nesterov': BOOLEAN,
    'weight_decay': number(0),
    'ema_decay': or_none(number(0, 1, high_open=True), 'no EMA weights'),
    'seed': integer(0),
    'init_from': or_none(TEXT, 'train from scratch'),
}


def check(config: ml_collections.ConfigDict, *, training: bool = True) -> None:
  """Raises errors.ConfigError naming every field of `config` whose value is not allowed (fields
  it lacks, as a config.json of another version may, are left to their defaults)."""
  problems = []
  for field, (allowed, words) in (TRAINING if training else EVALUATION).items():
    *parents, key = field.split('.')
    section = config
    for parent in parents:
      section = section.get(parent, {})
    if key not in section:
      continue
    try:
      value = section[key]
    except ZeroDivisionError:  # num_train_steps derived from a batch_size of 0, named already
      continue
    if not allowed(value):
      problems.append(f'{field} = {value!r}: must be {words}{_derived_from_batch(config, field)}')
  if problems:
    raise errors.ConfigError('Invalid config (set with --config.FIELD=VALUE):\n  '
                             + '\n  '.join(problems))


def _derived_from_batch(config: ml_collections.ConfigDict, field: str) -> str:
  """Why a num_train_steps the user did not set is wrong: it follows from paper_steps and
  batch_size, one of which the user set."""
  if field != 'num_train_steps' or not _is_int(config.get('paper_steps')):
    return ''
  if config.num_train_steps != config.paper_steps * 32 // max(1, config.batch_size):
    return ''
  if config.paper_steps < 1:
    return (f' (it follows paper_steps = {config.paper_steps:,}, the length in 32-image steps: set '
            'paper_steps >= 1 or num_train_steps)')
  return (f' (paper_steps {config.paper_steps:,} of 32 images at batch_size '
          f'{config.batch_size:,}: a batch_size above {config.paper_steps * 32:,} images is longer '
          'than the whole run; lower batch_size or set num_train_steps)')


def check_num_classes(config: ml_collections.ConfigDict,
                      info: data_spec.DatasetInfo) -> None:
  if info.num_classes != config.model.num_classes:
    raise errors.ConfigError(
        f'{config.dataset.name} has {info.num_classes} classes but model.num_classes is '
        f'{config.model.num_classes}: set --config.model.num_classes={info.num_classes}.')
