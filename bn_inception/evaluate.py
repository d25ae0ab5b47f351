"""Evaluate checkpoints: top-1/top-5 on the whole eval split, and a predictions file.

  python -m bn_inception.evaluate --workdir=runs/bn_x30 [--crops=center|10|144] [--output=FILE.npz]
      [--checkpoint=latest|STEP|WORKDIR/checkpoints/STEP|all] [--weights=auto|raw|ema]
      [--eval_sets=imagenet2012,imagenet2012_real,imagenet_v2/matched-frequency,...] [--overwrite]
      [--config=configs/bn_x30.py --config.FIELD=VALUE ...]

The config is the workdir's config.json unless --config is given. Evaluation uses the population
(running-average) BN statistics; every example is counted exactly once on any number of devices and
hosts (the pipeline pads the last batch and masks the padding). Each checkpoint is restored once
and evaluated on every set of --eval_sets (default: the config's data set), each reported on its
own; ReaL is scored by its own rule beside the original labels (bn_inception/predictions.py). The
predictions file
(bn_inception/predictions.py) holds the softmax averaged over the crops, for bn_inception.ensemble.
On several hosts run the same command on every host (README.md, "Several hosts"); host 0 prints and
writes.
"""

import json
import os
from typing import Iterator, Optional, Sequence, Union

from absl import app
from absl import flags
from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from bn_inception import checkpoints
from bn_inception import cli
from bn_inception import data_spec
from bn_inception import config_checks
from bn_inception import errors
from bn_inception import input_pipeline
from bn_inception import models
from bn_inception import predictions
from bn_inception import train
from bn_inception.predictions import Predictions

WEIGHTS = ('auto', 'raw', 'ema')
# The evaluation sets of ImageNet's classes, by TFDS name, and the split each is evaluated on.
EVAL_SPLITS = {
    'imagenet2012': 'validation',  # the original labels
    predictions.REAL: 'validation',  # the same images with their ReaL label sets
    'imagenet_v2/matched-frequency': 'test',
    'imagenet_v2/threshold-0.7': 'test',
    'imagenet_v2/topimages': 'test',
}

# One compilation per network and input shape, shared by every checkpoint evaluated.
_predict = jax.jit(train.predict, static_argnums=(0, 3))


def restore_variables(workdir: str, step: Optional[int] = None,
                      weights: str = 'auto') -> tuple[int, dict, str]:
  """(step, {'params', 'batch_stats'}, weights used) of a checkpoint (default: the newest).

  `weights`: 'raw' (the weights with their running-average BN statistics), 'ema' (the Polyak/EMA
  weights with the EMA of the statistics: an error when the run kept none) or 'auto' (EMA when
  kept, as training evaluates). Only those arrays are read, as numpy arrays, so checkpoints of
  training runs (optimizer state, ...) and of the converter (params, batch_stats) both load, on any
  number of devices.
  """
  if weights not in WEIGHTS:
    raise errors.ConfigError(f'Unknown weights {weights!r}; valid: {list(WEIGHTS)}.')
  mngr = checkpoints.manager(workdir, read_only=True)
  step, state = checkpoints.restore_latest(
      mngr, step=step, only=('params', 'batch_stats', 'ema_params', 'ema_batch_stats'))
  if state is None:
    raise errors.NotFoundError(f'{checkpoints.checkpoint_dir(workdir)} holds no checkpoint.')
  if weights == 'ema' and state['ema_params'] is None:
    raise errors.ConfigError(
        f'The checkpoint at step {step} in {workdir} holds no EMA weights (the run had '
        'config.ema_decay=None): use --weights=raw.')
  used = 'ema' if weights != 'raw' and state['ema_params'] is not None else 'raw'
  if used == 'ema' and state['ema_batch_stats'] is None and state['batch_stats']:
    raise errors.InputFileError(
        f'The checkpoint at step {step} in {workdir} holds EMA weights without the EMA of the BN '
        'statistics that goes with them (it predates it): use --weights=raw.')
  prefix = 'ema_' if used == 'ema' else ''
  return step, {'params': state[prefix + 'params'],
                'batch_stats': state[prefix + 'batch_stats'] or {}}, used


def predict_batches(model, variables, local_batches: Iterator[dict], mesh: jax.sharding.Mesh,
                    convention: Optional[train.InputConvention] = None,
                    crop_weights: Optional[np.ndarray] = None,
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(probs, labels, ids) of every real example of the eval batches, on every host.

  `local_batches` are this host's eval batches (input_pipeline.eval_batches): images
  [B, crops, H, W, 3], label, mask, id. Probabilities are the softmax averaged over the crops with
  `crop_weights` (train.predict). Rows come in the pipeline's order (host by host on several
  hosts); the padding is dropped.
  """
  return predict_examples(model, variables, local_batches, mesh, convention, crop_weights)[:3]


def predict_examples(model, variables, local_batches: Iterator[dict], mesh: jax.sharding.Mesh,
                     convention: Optional[train.InputConvention] = None,
                     crop_weights: Optional[np.ndarray] = None,
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Optional[np.ndarray]]:
  """predict_batches, and the ReaL label sets (bool [N, classes]) of batches that carry them
  (real_labels), else None."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  variables = jax.device_put(variables, replicated)
  probs, labels, masks, ids, real = [], [], [], [], []
  for batch, local in train.global_batches(local_batches, mesh, ('image',)):
    out = _predict(model, variables, batch['image'], convention, crop_weights)
    # This host's rows, in the order of its local batch (ids stay on the host: they may be text).
    probs.append(np.asarray(multihost_utils.global_array_to_host_local_array(
        out, mesh, jax.sharding.PartitionSpec('data'))))
    labels.append(np.asarray(local['label']))
    masks.append(np.asarray(local['mask'], bool))
    ids.append(np.asarray(local['id']))
    if 'real_labels' in local:
      real.append(np.asarray(local['real_labels'], bool))
  probs, labels, masks, ids = (np.concatenate(x) for x in (probs, labels, masks, ids))
  real = np.concatenate(real) if real else np.zeros((len(ids), 0), bool)
  # Every host holds as many rows (same batch count and size), padding included, so they gather.
  probs, labels, masks, real = multihost_utils.process_allgather((probs, labels, masks, real),
                                                                 tiled=True)
  ids = allgather_ids(ids)
  return probs[masks], labels[masks], ids[masks], real[masks] if real.shape[1] else None


def allgather_ids(ids: np.ndarray) -> np.ndarray:
  """Every host's ids, concatenated; text ids travel as fixed-width UTF-8 bytes."""
  if ids.dtype.kind not in 'US':
    return multihost_utils.process_allgather(ids, tiled=True)
  encoded = np.char.encode(ids.astype(str), 'utf-8')
  width = int(np.max(multihost_utils.process_allgather(np.int32(max(encoded.itemsize, 1)))))
  rows = encoded.astype(f'S{width}').view(np.uint8).reshape(len(ids), width)
  rows = multihost_utils.process_allgather(rows, tiled=True)
  return np.char.decode(np.ascontiguousarray(rows).view(f'S{width}').reshape(-1), 'utf-8')


def eval_set_config(config: ml_collections.ConfigDict,
                    eval_set: Optional[str]) -> ml_collections.ConfigDict:
  """`config` evaluating on `eval_set` (an EVAL_SPLITS name or the config's own data set; None:
  the config's), with the same data_dir, manual_dir, image size and crops."""
  if eval_set is None or eval_set == config.dataset.name:
    return config
  if eval_set not in EVAL_SPLITS:
    raise errors.ConfigError(f'Unknown evaluation set {eval_set!r}; valid: {list(EVAL_SPLITS)} '
                             f'or the config\'s data set {config.dataset.name!r}.')
  config = config.copy_and_resolve_references()
  config.dataset.name = eval_set
  config.dataset.eval_split = EVAL_SPLITS[eval_set]
  return config


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        step: Optional[int] = None, crops: Optional[str] = None,
                        weights: str = 'auto', batch_size: Optional[int] = None,
                        mesh: Optional[jax.sharding.Mesh] = None,
                        eval_set: Optional[str] = None) -> Predictions:
  """Predictions of a checkpoint of `workdir` (default: the newest) on config's eval split, or on
  `eval_set` (eval_set_config).

  crops: 'center' | '10' | '144' (default config.dataset.eval_crops); batch_size: images per step
  over all devices and hosts (default: train.eval_batch_size). `predictions.accuracy(result)` gives
  top-1/top-5.
  """
  return evaluate_sets(config, workdir, [eval_set], step=step, crops=crops, weights=weights,
                       batch_size=batch_size, mesh=mesh)[0]


def evaluate_sets(config: ml_collections.ConfigDict, workdir: str,
                  eval_sets: Sequence[Optional[str]], *, step: Optional[int] = None,
                  crops: Optional[str] = None, weights: str = 'auto',
                  batch_size: Optional[int] = None,
                  mesh: Optional[jax.sharding.Mesh] = None) -> list[Predictions]:
  """evaluate_checkpoint on each of `eval_sets`, from one restore of the checkpoint."""
  configs = [eval_set_config(config, name) for name in eval_sets]  # unknown names before anything
  for c in configs:
    config_checks.check(c, training=False)
  mesh = mesh or train.make_mesh()
  crops = crops or config.dataset.eval_crops
  batch_size = batch_size or train.eval_batch_size(config, crops, mesh)
  train.check_batch(batch_size, None, mesh)  # no BN groups at inference
  train.check_memory(config, batch_size * data_spec.num_crops(crops), mesh, training=False,
                     field='eval_batch_size')
  infos = [input_pipeline.get_info(c.dataset) for c in configs]  # prepared, or how to prepare
  for c, info in zip(configs, infos):
    config_checks.check_num_classes(c, info)
  step, variables, used = restore_variables(workdir, step, weights)
  model = models.from_config(config.model)
  # The same check as training's: a checkpoint of another network is refused by name and shape.
  size = config.dataset.image_size
  checkpoints.check_fits(variables, jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)), step, workdir)
  return [_predict_set(c, info, model, variables, step, used, workdir, crops, batch_size, mesh)
          for c, info in zip(configs, infos)]


def _predict_set(config, info, model, variables, step, used, workdir, crops, batch_size, mesh):
  batches = input_pipeline.eval_batches(
      config.dataset, local_batch_size=batch_size // jax.process_count(), crops=crops)
  probs, labels, ids, real = predict_examples(model, variables, batches, mesh,
                                              train.input_convention(config),
                                              data_spec.crop_weights(crops))
  if len(ids) != info.num_eval_examples or len(np.unique(ids)) != len(ids):
    logging.warning('Evaluated %d examples (%d distinct ids); %s has %d.', len(ids),
                    len(np.unique(ids)), config.dataset.name, info.num_eval_examples)
  if config.dataset.name == predictions.REAL:
    predictions.check_real_ids(ids, f'{config.dataset.name} in {config.dataset.data_dir}')
  meta = {
      'workdir': os.path.abspath(workdir), 'step': step,
      'paper_step': step * config.batch_size // train.PAPER_BATCH, 'crops': crops,
      'weights': used, 'num_examples': len(ids), 'dataset': config.dataset.name,
      'eval_set': config.dataset.name, 'split': config.dataset.eval_split,
      'config': json.loads(config.to_json_best_effort()),
  }
  return Predictions(probs, labels, ids, meta, real)


def summary(p: Predictions) -> str:
  """One line, as the paper reports: top-1/top-5 accuracy and error."""
  acc = predictions.accuracy(p)
  m = p.meta
  return (f'step {m["step"]} (paper step {m["paper_step"]}), crops={m["crops"]}, {m["weights"]} '
          f'weights: top-1 {predictions.percent(acc["top1"])} (error '
          f'{predictions.percent(1 - acc["top1"])}), top-5 {predictions.percent(acc["top5"])} '
          f'(error {predictions.percent(1 - acc["top5"])}), {p.num_examples} examples'
          + (f'; ReaL top-1 {predictions.percent(acc["real_top1"])}, top-5 '
             f'{predictions.percent(acc["real_top5"])} over the {acc["real_examples"]} images with '
             f'ReaL labels ({acc["real_left_out"]} left out: an empty label set)'
             if 'real_top1' in acc else '') + f' [{p.eval_set}]')


def resolve_checkpoint(workdir: Optional[str],
                       checkpoint: str) -> tuple[str, Union[int, str, None]]:
  """--workdir and --checkpoint -> (workdir, step), step None for the newest or 'all'.

  checkpoint: 'latest', 'all', a step, or a checkpoint directory WORKDIR/checkpoints/STEP (which
  names the workdir too).
  """
  named = {'latest': None, 'all': 'all'}
  if checkpoint in named or checkpoint.isdigit():
    if not workdir:
      raise errors.ConfigError(f'--checkpoint={checkpoint} needs --workdir.')
    return workdir, named[checkpoint] if checkpoint in named else int(checkpoint)
  path = os.path.abspath(checkpoint.rstrip('/'))
  if os.path.basename(path) == checkpoints.ITEM:
    path = os.path.dirname(path)
  step, parent = os.path.basename(path), os.path.dirname(path)
  if not step.isdigit() or os.path.basename(parent) != 'checkpoints':
    raise errors.ConfigError(f'--checkpoint={checkpoint} is not latest, all, a step or a '
                             'checkpoint directory WORKDIR/checkpoints/STEP.')
  path_workdir = os.path.dirname(parent)
  if workdir and os.path.abspath(workdir) != path_workdir:
    raise errors.ConfigError(f'--checkpoint={checkpoint} is not in --workdir={workdir}.')
  return path_workdir, int(step)


def output_path(output: str, step: int, several: bool, eval_set: str = '',
                several_sets: bool = False) -> str:
  """--output, with {step} and {eval_set} ('/' written '_') filled in; several checkpoints without
  {step} get '_step<N>' added, several evaluation sets without {eval_set} '_<set>'."""
  eval_set = eval_set.replace('/', '_')
  root, ext = os.path.splitext(output)
  if several and '{step}' not in output:
    root += f'_step{step}'
  if several_sets and '{eval_set}' not in output:
    root += f'_{eval_set}'
  return (root + ext).replace('{step}', str(step)).replace('{eval_set}', eval_set)


# ------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.start()
  workdir, step = resolve_checkpoint(FLAGS.workdir, FLAGS.checkpoint)
  config = _CONFIG.value or checkpoints.read_config(workdir)
  eval_sets = FLAGS.eval_sets or [config.dataset.name]
  for name in eval_sets:
    eval_set_config(config, name)  # an unknown name, before anything else
  config_checks.check(config, training=False)  # before its fields are derived to be compared
  cli.check_processes_agree(config=config.to_dict(), workdir=os.path.abspath(workdir),
                            step=step, eval_sets=eval_sets, crops=FLAGS.crops,
                            weights=FLAGS.weights, batch_size=FLAGS.batch_size)
  stored = sorted(checkpoints.manager(workdir, read_only=True).all_steps())
  if not stored:
    raise errors.NotFoundError(f'{checkpoints.checkpoint_dir(workdir)} holds no checkpoint.')
  steps = stored if step == 'all' else [step]  # None: the newest that reads back
  report = jax.process_index() == 0
  checked = set()

  def checked_output(s: int, eval_set: str) -> str:
    path = output_path(FLAGS.output, s, step == 'all', eval_set, len(eval_sets) > 1)
    if path not in checked:
      predictions.check_output(path, FLAGS.overwrite)
      checked.add(path)
    return path

  if FLAGS.output and report:
    # Every file, checked before the first evaluation: a result that cannot be written is lost.
    for s in steps:
      for name in eval_sets:
        checked_output(stored[-1] if s is None else s, name)
  rows = []
  for s in steps:
    for p in evaluate_sets(config, workdir, eval_sets, step=s, crops=FLAGS.crops,
                           weights=FLAGS.weights, batch_size=FLAGS.batch_size):
      acc = predictions.accuracy(p)
      rows.append((p.meta['step'], p.meta['paper_step'], p.eval_set,
                   predictions.percent(acc['top1']), predictions.percent(acc['top5']),
                   predictions.percent(acc['real_top1']) if 'real_top1' in acc else '-',
                   predictions.percent(acc['real_top5']) if 'real_top5' in acc else '-'))
      if report:
        print(summary(p), flush=True)
        if FLAGS.output:
          # Another step than expected when the newest checkpoint could not be read.
          path = checked_output(p.meta['step'], p.eval_set)
          predictions.save_checked(path, p)
          print(f'Wrote {path}', flush=True)
  if report and (step == 'all' or len(eval_sets) > 1):
    print(predictions.format_table(('step', 'paper step', 'eval set', 'top-1', 'top-5',
                                    'ReaL top-1', 'ReaL top-5'), rows))


def define_flags() -> flags.FlagHolder:
  """The command line's flags (defined by the entry point only: main.py defines some too)."""
  flags.DEFINE_string('workdir', None, "The run's directory (checkpoints/, config.json).")
  flags.DEFINE_string('checkpoint', 'latest', 'latest | STEP | WORKDIR/checkpoints/STEP | all '
                      '(every checkpoint of the workdir, as a table).')
  flags.DEFINE_enum('crops', None, ['center', '10', '144'],
                    'Crops per image; default config.dataset.eval_crops.')
  flags.DEFINE_enum('weights', 'auto', list(WEIGHTS),
                    'raw, ema (Polyak/EMA) or auto (EMA when the run kept it, as training does).')
  flags.DEFINE_integer('batch_size', None, 'Images per step over all devices and hosts; default: '
                       'about config.eval_batch_size crops.')
  flags.DEFINE_string('output', None, 'Predictions file to write (.npz); "{step}" and '
                      '"{eval_set}" in the name are replaced by the step and the evaluation set.')
  flags.DEFINE_bool('overwrite', False, 'Replace existing predictions files named by --output '
                    '(a file that is not one is never replaced).')
  flags.DEFINE_list('eval_sets', None, 'Evaluation sets by TFDS name, each reported on its own: '
                    f'{", ".join(EVAL_SPLITS)}; default: the config\'s data set.')
  cli.define_multihost_flags()
  flags.adopt_module_key_flags(cli)
  return config_flags.DEFINE_config_file(
      'config', None, 'Config file, e.g. configs/bn_x30.py:digits; default: WORKDIR/config.json. '
      'Overrides (--config.FIELD=VALUE) need it.')


FLAGS = flags.FLAGS

if __name__ == '__main__':
  _CONFIG = define_flags()
  cli.run(main)
