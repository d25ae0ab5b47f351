"""Evaluate checkpoints: top-1/top-5 on the whole eval split, and a predictions file.

  python -m bn_inception.evaluate --workdir=runs/bn_x30 [--crops=center|10|144] [--output=FILE.npz]
      [--checkpoint=latest|STEP|WORKDIR/checkpoints/STEP|all] [--weights=auto|raw|ema]
      [--config=configs/bn_x30.py --config.FIELD=VALUE ...]

The config is the workdir's config.json unless --config is given. Evaluation uses the population
(running-average) BN statistics; every example is counted exactly once on any number of devices and
hosts (the pipeline pads the last batch and masks the padding). The predictions file
(bn_inception/predictions.py) holds the softmax averaged over the crops, for bn_inception.ensemble.
On several hosts run the same command on every host (README.md, "Several hosts"); host 0 prints and
writes.
"""

import json
import os
from typing import Iterator, Optional, Union

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
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  variables = jax.device_put(variables, replicated)
  probs, labels, masks, ids = [], [], [], []
  for batch, local in train.global_batches(local_batches, mesh, ('image',)):
    out = _predict(model, variables, batch['image'], convention, crop_weights)
    # This host's rows, in the order of its local batch (ids stay on the host: they may be text).
    probs.append(np.asarray(multihost_utils.global_array_to_host_local_array(
        out, mesh, jax.sharding.PartitionSpec('data'))))
    labels.append(np.asarray(local['label']))
    masks.append(np.asarray(local['mask'], bool))
    ids.append(np.asarray(local['id']))
  probs, labels, masks, ids = (np.concatenate(x) for x in (probs, labels, masks, ids))
  # Every host holds as many rows (same batch count and size), padding included, so they gather.
  probs, labels, masks = multihost_utils.process_allgather((probs, labels, masks), tiled=True)
  ids = allgather_ids(ids)
  return probs[masks], labels[masks], ids[masks]


def allgather_ids(ids: np.ndarray) -> np.ndarray:
  """Every host's ids, concatenated; text ids travel as fixed-width UTF-8 bytes."""
  if ids.dtype.kind not in 'US':
    return multihost_utils.process_allgather(ids, tiled=True)
  encoded = np.char.encode(ids.astype(str), 'utf-8')
  width = int(np.max(multihost_utils.process_allgather(np.int32(max(encoded.itemsize, 1)))))
  rows = encoded.astype(f'S{width}').view(np.uint8).reshape(len(ids), width)
  rows = multihost_utils.process_allgather(rows, tiled=True)
  return np.char.decode(np.ascontiguousarray(rows).view(f'S{width}').reshape(-1), 'utf-8')


def evaluate_checkpoint(config: ml_collections.ConfigDict, workdir: str, *,
                        step: Optional[int] = None, crops: Optional[str] = None,
                        weights: str = 'auto', batch_size: Optional[int] = None,
                        mesh: Optional[jax.sharding.Mesh] = None) -> Predictions:
  """Predictions of a checkpoint of `workdir` (default: the newest) on config's eval split.

  crops: 'center' | '10' | '144' (default config.dataset.eval_crops); batch_size: images per step
  over all devices and hosts (default: train.eval_batch_size). `predictions.accuracy(result)` gives
  top-1/top-5.
  """
  config_checks.check(config, training=False)
  mesh = mesh or train.make_mesh()
  crops = crops or config.dataset.eval_crops
  batch_size = batch_size or train.eval_batch_size(config, crops, mesh)
  train.check_batch(batch_size, None, mesh)  # no BN groups at inference
  train.check_memory(config, batch_size * data_spec.num_crops(crops), mesh, training=False,
                     field='eval_batch_size')
  info = input_pipeline.get_info(config.dataset)
  config_checks.check_num_classes(config, info)
  step, variables, used = restore_variables(workdir, step, weights)
  model = models.from_config(config.model)
  # The same check as training's: a checkpoint of another network is refused by name and shape.
  size = config.dataset.image_size
  checkpoints.check_fits(variables, jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)), step, workdir)
  batches = input_pipeline.eval_batches(
      config.dataset, local_batch_size=batch_size // jax.process_count(), crops=crops)
  probs, labels, ids = predict_batches(model, variables, batches, mesh,
                                       train.input_convention(config),
                                       data_spec.crop_weights(crops))
  if len(ids) != info.num_eval_examples or len(np.unique(ids)) != len(ids):
    logging.warning('Evaluated %d examples (%d distinct ids); %s has %d.', len(ids),
                    len(np.unique(ids)), config.dataset.name, info.num_eval_examples)
  meta = {
      'workdir': os.path.abspath(workdir), 'step': step,
      'paper_step': step * config.batch_size // train.PAPER_BATCH, 'crops': crops,
      'weights': used, 'num_examples': len(ids), 'dataset': config.dataset.name,
      'split': config.dataset.eval_split, 'config': json.loads(config.to_json_best_effort()),
  }
  return Predictions(probs, labels, ids, meta)


def summary(p: Predictions) -> str:
  """One line, as the paper reports: top-1/top-5 accuracy and error."""
  acc = predictions.accuracy(p)
  m = p.meta
  return (f'step {m["step"]} (paper step {m["paper_step"]}), crops={m["crops"]}, {m["weights"]} '
          f'weights: top-1 {predictions.percent(acc["top1"])} (error '
          f'{predictions.percent(1 - acc["top1"])}), top-5 {predictions.percent(acc["top5"])} '
          f'(error {predictions.percent(1 - acc["top5"])}), {p.num_examples} examples')


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


def output_path(output: str, step: int, several: bool) -> str:
  """--output, with {step} filled in; several checkpoints without {step} get '_step<N>' added."""
  if '{step}' in output:
    return output.format(step=step)
  if several:
    root, ext = os.path.splitext(output)
    return f'{root}_step{step}{ext}'
  return output


# ------------------------------------------------------------------------------------------------
# Command line.
# ------------------------------------------------------------------------------------------------
def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  cli.start()
  workdir, step = resolve_checkpoint(FLAGS.workdir, FLAGS.checkpoint)
  config = _CONFIG.value or checkpoints.read_config(workdir)
  steps = ([step] if step != 'all' else
           sorted(checkpoints.manager(workdir, read_only=True).all_steps()))
  if not steps:
    raise errors.NotFoundError(f'{checkpoints.checkpoint_dir(workdir)} holds no checkpoint.')
  report = jax.process_index() == 0
  rows = []
  for s in steps:
    p = evaluate_checkpoint(config, workdir, step=s, crops=FLAGS.crops, weights=FLAGS.weights,
                            batch_size=FLAGS.batch_size)
    acc = predictions.accuracy(p)
    rows.append((p.meta['step'], p.meta['paper_step'], predictions.percent(acc['top1']),
                 predictions.percent(acc['top5'])))
    if report:
      print(summary(p), flush=True)
      if FLAGS.output:
        path = output_path(FLAGS.output, p.meta['step'], step == 'all')
        predictions.save(path, p)
        print(f'Wrote {path}', flush=True)
  if report and step == 'all':
    print(predictions.format_table(('step', 'paper step', 'top-1', 'top-5'), rows))


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
  flags.DEFINE_string('output', None, 'Predictions file to write (.npz); "{step}" in the name '
                      'is replaced by the step.')
  cli.define_multihost_flags()
  flags.adopt_module_key_flags(cli)
  return config_flags.DEFINE_config_file(
      'config', None, 'Config file, e.g. configs/bn_x30.py:digits; default: WORKDIR/config.json. '
      'Overrides (--config.FIELD=VALUE) need it.')


FLAGS = flags.FLAGS

if __name__ == '__main__':
  _CONFIG = define_flags()
  cli.run(main)
