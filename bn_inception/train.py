"""Training and evaluation: `train_and_evaluate(config, workdir)`, one linear loop.

Data parallel with `jax.jit` over a one-axis device mesh ('data'): every batch is sharded over all
devices of all hosts, the train state is replicated and donated. Batch-norm statistics cover groups of
`config.model.bn_group_size` examples (the paper's 32-image workers); when the groups line up with the
device shards they need no communication and the result does not depend on the device count.

A run is a pure function of its config and its step: the learning rate depends on the step alone, the
input pipeline reproduces the batches of any step, and dropout and colour-distortion keys are folded
from the step. So a run restarted from a checkpoint continues exactly as if it had never stopped,
and a finished run extended with a larger `num_train_steps` continues as if launched with that
length.
"""

import functools
import itertools
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Iterator, NamedTuple, Optional

from absl import logging
import flax
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from bn_inception import augment
from bn_inception import checkpoints
from bn_inception import data_spec
from bn_inception import config_checks
from bn_inception import errors
from bn_inception import input_pipeline
from bn_inception import metrics
from bn_inception import models
from bn_inception import run_dir
from bn_inception.run_dir import PAPER_BATCH


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  ema_params: Any  # Polyak/EMA weights, None when config.ema_decay is None
  ema_batch_stats: Any  # the EMA of batch_stats: the BN statistics of the EMA weights (or None)
  rng: jax.Array  # dropout keys are fold_in(rng, step); colour distortions: augment.example_keys
  nonfinite_step: jax.Array  # first step with a non-finite loss, gradient or new state; -1: none


# ------------------------------------------------------------------------------------------------
# Optimisation.
# ------------------------------------------------------------------------------------------------
def hyperparameters(config: ml_collections.ConfigDict) -> dict[str, np.float32]:
  """The optimiser's values, passed to the jitted training step as arguments rather than compiled
  into it as constants: runs that differ only in them (BN-x5 and BN-x30, a resume at another
  rate) share one compiled program. `learning_rate` is per step (the config's per 32 images, scaled
  to the batch)."""
  return {'learning_rate': np.float32(config.learning_rate * config.batch_size / PAPER_BATCH),
          'lr_decay_factor': np.float32(config.lr_decay_factor),
          'weight_decay': np.float32(config.weight_decay),
          'momentum': np.float32(config.momentum)}


def learning_rate_schedule(config: ml_collections.ConfigDict, num_train_examples: int,
                           hyper: Optional[dict] = None) -> Callable[[jax.Array], jax.Array]:
  """The paper's per-32-image rate scaled to the batch, staircase-decayed every lr_decay_epochs.

  lr(step) = learning_rate * batch_size / 32 * lr_decay_factor ** floor(epoch / lr_decay_epochs)
  * min(1, (step + 1) / warmup_steps), with epoch = step * batch_size / num_train_examples. It
  depends on the step alone. The warm-up multiplies the decay rather than preceding it (as
  optax.join_schedules would, restarting the decay's count), so decays fall on the same epochs
  with or without warm-up. `hyper`: hyperparameters(config), or traced values of them.
  """
  hyper = hyperparameters(config) if hyper is None else hyper
  steps_per_epoch = num_train_examples / config.batch_size
  decay_steps = config.lr_decay_epochs * steps_per_epoch
  # optax.exponential_decay(staircase=True)'s arithmetic, which takes no traced decay rate.
  decay = lambda step: hyper['learning_rate'] * hyper['lr_decay_factor'] ** jnp.floor(
      step / decay_steps)
  warmup_steps = config.warmup_epochs * steps_per_epoch
  if warmup_steps <= 1:
    return decay
  # (step + 1) / warmup_steps: the first step already moves, the rate is whole from warmup_steps on.
  warmup = optax.linear_schedule(1 / warmup_steps, 1.0, transition_steps=warmup_steps - 1)
  return lambda step: warmup(step) * decay(step)


def optimizer(config: ml_collections.ConfigDict, schedule,
              hyper: Optional[dict] = None) -> optax.GradientTransformation:
  """SGD with momentum (heavy-ball, or Nesterov's with config.nesterov) and L2 on the kernels.

  The L2 term 0.5 * weight_decay * |kernel|^2 enters as its gradient, weight_decay * kernel, added
  to the gradient before the momentum: the arithmetic of adding the term to the loss, while the
  loss that is logged stays the cross-entropy. `hyper` as for learning_rate_schedule.
  """
  hyper = hyperparameters(config) if hyper is None else hyper
  return optax.chain(
      optax.add_decayed_weights(hyper['weight_decay'], mask=decayed),
      optax.sgd(schedule, momentum=hyper['momentum'], nesterov=config.nesterov))


def decayed(params):
  """True on conv and dense kernels: BN scales/offsets and biases are not decayed."""
  return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == 'kernel', params)


def ema_decay_at(ema_decay: float, step: jax.Array) -> jax.Array:
  """The EMA's decay at `step`, warmed up as TensorFlow's ExponentialMovingAverage(num_updates)
  does: min(ema_decay, (1 + step) / (10 + step)), i.e. 0.1 at step 0, 0.9 at 80, 0.99 at 890, 0.9999
  from 89,990 on. Early evaluations then see recent weights, not mostly the initial ones. Warm-up
  rather than optax.ema's debiasing of a zero-initialised average: the stored EMA is a usable set of
  weights and statistics at every step, and it can start from loaded ones (config.init_from).
  """
  return jnp.minimum(ema_decay, (1.0 + step) / (10.0 + step))


def all_finite(tree) -> jax.Array:
  """Whether every value in `tree` is finite, from one reduction over all its arrays concatenated. A
  reduction per array compiles much slower with the tests' XLA settings: the training step took
  14.8 s to compile with optax.tree.norm, over 200 s with a sum of per-array sums and 9.6 s with
  this (CPU, 2026-12-07)."""
  return jnp.isfinite(jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])).all()


# ------------------------------------------------------------------------------------------------
# Steps (jitted in train_and_evaluate).
# ------------------------------------------------------------------------------------------------
class InputConvention(NamedTuple):
  """config.input as a hashable (static) argument: see models.normalize_pixels."""
  color_order: str
  mean: tuple
  std: tuple


PIPELINE_CONVENTION = InputConvention('rgb', (127.5,) * 3, (127.5,) * 3)  # the pipeline's [-1, 1]


def input_convention(config: ml_collections.ConfigDict) -> Optional[InputConvention]:
  """The weights' input convention, or None where it is the pipeline's own [-1, 1]."""
  convention = InputConvention(config.input.color_order, tuple(config.input.mean),
                               tuple(config.input.std))
  return None if convention == PIPELINE_CONVENTION else convention


def to_model_input(images: jax.Array, convention: Optional[InputConvention]) -> jax.Array:
  """Pipeline images -> the convention the weights were trained with (on device): float images in
  [-1, 1], or uint8 pixels (the TFDS loaders' training crops)."""
  if images.dtype == jnp.uint8:
    images = images.astype(jnp.float32) / 127.5 - 1
  if convention is None:
    return images
  return models.normalize_pixels((images + 1) * 127.5, convention)


def train_step(state: TrainState, batch: dict, hyper: dict, *, model, config,
               num_train_examples: int,
               convention: Optional[InputConvention] = None,
               distortion_strength: float = 0.0) -> tuple[TrainState, dict]:
  """One SGD step on a global batch; `hyper`: hyperparameters(config), as arguments.
  `distortion_strength` > 0: the batch's images are uint8 pixels, colour-distorted here (augment),
  each example from the step's key and its index in the global batch."""
  schedule = learning_rate_schedule(config, num_train_examples, hyper)
  tx = optimizer(config, schedule, hyper)
  ema_decay = config.ema_decay
  images = batch['image']
  if distortion_strength > 0:  # else not even compiled
    keys = augment.example_keys(state.rng, state.step, images.shape[0])
    images = augment.distort_colour(images, keys, distortion_strength) * 2 - 1
  images = to_model_input(images, convention)
  dropout_rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits, updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, images, train=True,
        mutable=['batch_stats'], rngs={'dropout': dropout_rng})
    cross_entropy = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label']).mean()
    return cross_entropy, (logits, updates.get('batch_stats', {}))

  (cross_entropy, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  param_updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, param_updates)
  ema_params, ema_batch_stats = state.ema_params, state.ema_batch_stats
  if ema_decay is not None:
    ema_params, ema_batch_stats = optax.incremental_update(
        (params, batch_stats), (ema_params, ema_batch_stats),
        step_size=1 - ema_decay_at(ema_decay, state.step))

  # From the first non-finite step on the state stops changing (but for the step counter), so no
  # checkpoint can ever hold NaN/inf and the loop, which stops the run when it sees nonfinite_step,
  # holds the last finite state. The new parameters and BN statistics are checked too: an overflowed
  # variance normalises to finite outputs and a finite loss.
  healthy = state.nonfinite_step < 0
  finite = healthy & jnp.isfinite(cross_entropy) & all_finite((grads, params, batch_stats))
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_state = state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      batch_stats=keep(batch_stats, state.batch_stats),
      opt_state=keep(opt_state, state.opt_state),
      ema_params=keep(ema_params, state.ema_params),
      ema_batch_stats=keep(ema_batch_stats, state.ema_batch_stats),
      nonfinite_step=jnp.where(healthy & ~finite, state.step, state.nonfinite_step))
  return new_state, {
      'loss': cross_entropy,
      'top1': jnp.mean(metrics.topk_correct(logits, batch['label'], 1)),
      'learning_rate': schedule(state.step),
  }


def predict(model, variables, images: jax.Array,
            convention: Optional[InputConvention] = None,
            crop_weights: Optional[jax.Array] = None) -> jax.Array:
  """Class probabilities [B, classes] for images [B, crops, H, W, 3], averaged over the crops with
  `crop_weights` [crops] (data_spec.crop_weights; None: equal weights)."""
  b, c = images.shape[:2]
  images = to_model_input(images.reshape((b * c,) + images.shape[2:]), convention)
  probs = jax.nn.softmax(model.apply(variables, images, train=False)).reshape(b, c, -1)
  if crop_weights is None:
    crop_weights = jnp.full((c,), 1 / c)
  return jnp.sum(probs * crop_weights[:, None], axis=1)  # not a matmul: no reduced precision


def eval_step(variables, batch: dict, *, model,
              convention: Optional[InputConvention] = None,
              crop_weights: Optional[jax.Array] = None) -> dict:
  """Sums over the real (unmasked) examples of one batch: correct top-1/top-5, loss, count."""
  probs = predict(model, variables, batch['image'], convention, crop_weights)
  mask = batch['mask'].astype(jnp.float32)
  nll = -jnp.log(jnp.take_along_axis(probs, batch['label'][:, None], axis=1)[:, 0] + 1e-12)
  return {
      'top1': jnp.sum(metrics.topk_correct(probs, batch['label'], 1) * mask),
      'top5': jnp.sum(metrics.topk_correct(probs, batch['label'], 5) * mask),
      'loss': jnp.sum(nll * mask),
      'count': jnp.sum(mask),
  }


# ------------------------------------------------------------------------------------------------
# Devices and data.
# ------------------------------------------------------------------------------------------------
def make_mesh(devices: Optional[list] = None) -> jax.sharding.Mesh:
  """A one-axis mesh ('data') over `devices` (default: every device of every host)."""
  return jax.sharding.Mesh(np.array(devices or jax.devices()), ('data',))


def check_batch(batch_size: int, group_size: Optional[int], mesh: jax.sharding.Mesh) -> None:
  """Fails early, with the numbers, on batches that cannot be split over devices or BN groups."""
  devices, hosts = mesh.devices.size, jax.process_count()
  if batch_size % devices:
    raise errors.ConfigError(
        f'batch_size {batch_size} does not divide over {devices} devices ({hosts} host(s)). '
        f'Use a multiple of {devices}, e.g. --config.batch_size={devices * max(1, batch_size // devices)}.')
  if group_size is not None:
    if batch_size % group_size:
      raise errors.ConfigError(
          f'batch_size {batch_size} does not divide into batch-norm groups of {group_size} '
          f'(model.bn_group_size). Use a multiple of {group_size}, or another bn_group_size.')
    per_device = batch_size // devices
    if per_device % group_size:
      logging.warning(
          'Each of the %d devices holds %d examples, not a multiple of bn_group_size %d: BN groups '
          'span devices, which costs communication. Prefer a batch of a multiple of %d.',
          devices, per_device, group_size, devices * group_size)


# Every module output of the full-width network holds about 84 values per input value (counted with
# jax.eval_shape(capture_intermediates=True) at 64 x 64 and 224 x 224; proportional to model.width).
_ACTIVATIONS_PER_INPUT_VALUE = 84
_GIB = 2 ** 30


def _memory_bytes(device) -> Optional[int]:
  """What one device may hold (its allocator's limit), or the host's memory for a CPU device."""
  stats = device.memory_stats() if device.platform != 'cpu' else None
  if stats and stats.get('bytes_limit'):
    return stats['bytes_limit']
  try:
    return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  except (ValueError, OSError):
    return None


def check_memory(config: ml_collections.ConfigDict, examples: int, mesh: jax.sharding.Mesh,
                 *, training: bool, field: str = 'batch_size') -> None:
  """Refuses, before anything is allocated, a step of `examples` images (crops, for evaluation)
  that cannot fit by a rough estimate: the host's batch as float32 (twice: one prefetched), and on
  each device the network's activations for its share (kept for the backward pass and matched by
  their gradients when training)."""
  size, width = config.dataset.image_size, config.model.width
  values_per_image = size * size * 3
  activation_bytes = (jnp.dtype(config.model.dtype).itemsize * values_per_image
                      * max(1.0, _ACTIVATIONS_PER_INPUT_VALUE * width) * (2 if training else 1))
  device = mesh.devices.flat[0]
  needs = (
      (2 * 4 * values_per_image * examples // jax.process_count(),
       _memory_bytes(jax.local_devices(backend='cpu')[0]), 'this host'),
      (-(-examples // mesh.devices.size) * activation_bytes, _memory_bytes(device),
       f'each {device.device_kind} device'))
  for need, have, where in needs:
    if have is not None and need > have:
      fits = max(1, int(examples * have / need / 2))
      raise errors.ConfigError(
          f'{field} {examples:,} cannot fit: {"a training" if training else "an evaluation"} step '
          f'needs about {need / _GIB:,.1f} GiB on {where}, which has {have / _GIB:,.1f} GiB '
          f'(an estimate, from the image size {size}, model.width {width:g} and '
          f'model.dtype {config.model.dtype}). Use a smaller {field}, e.g. {fits:,} or fewer.')


_barriers = itertools.count()


def wait_for_all_processes(name: str, timeout_seconds: int = 3600) -> None:
  """Returns when every process has called it (at once on one process).

  Processes drift apart where they compile on their own, and on CPUs they must reach a new group's
  first collective within 30 s of each other (gloo's rendezvous, not configurable). This waits at
  the coordination service instead, which fails it when a process is declared dead.
  """
  ocp.multihost.get_barrier_sync_fn()(key=f'bn_inception_{name}_{next(_barriers)}',
                                      timeout_ms=timeout_seconds * 1000)


def global_batches(local_batches: Iterator[dict], mesh: jax.sharding.Mesh,
                   keys: tuple[str, ...], prefetch: int = 2) -> Iterator[dict]:
  """Assembles each host's slices into global arrays sharded over 'data', `prefetch` ahead."""
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))

  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
            for k in keys}

  queue = []
  for batch in local_batches:
    queue.append((to_global(batch), batch))
    if len(queue) > prefetch:
      yield queue.pop(0)
  yield from queue


# ------------------------------------------------------------------------------------------------
# Initialisation.
# ------------------------------------------------------------------------------------------------
def create_train_state(config, model, tx, image_size: int) -> TrainState:
  rng = jax.random.PRNGKey(config.seed)
  init_rng, dropout_rng = jax.random.split(rng)
  variables = model.init(init_rng, jnp.zeros((1, image_size, image_size, 3)), train=False)
  params, batch_stats = variables['params'], variables.get('batch_stats', {})
  ema = config.ema_decay is not None
  return TrainState(
      step=jnp.array(0, jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      ema_params=params if ema else None,
      ema_batch_stats=batch_stats if ema else None,
      rng=dropout_rng,
      nonfinite_step=jnp.array(-1, jnp.int32))


def load_pretrained(state: TrainState, init_from: str) -> TrainState:
  """Starts from another run's (or a converted) checkpoint: params and BN statistics whose paths and
  shapes match; the rest (e.g. a classifier for another number of classes) stays freshly initialised.
  An EMA, when kept, starts from the same weights and statistics."""
  _, restored = checkpoints.restore_latest(checkpoints.manager(init_from, read_only=True),
                                           only=('params', 'batch_stats'))
  if restored is None:
    raise errors.NotFoundError(f'config.init_from={init_from!r} holds no checkpoint.')
  loaded, fresh, mismatched = [], [], []

  def merge(collection):
    source = flax.traverse_util.flatten_dict(restored.get(collection) or {}, sep='/')
    target = flax.traverse_util.flatten_dict(getattr(state, collection), sep='/')
    out = {}
    for path, value in target.items():
      if path in source and np.shape(source[path]) == value.shape:
        out[path] = jnp.asarray(source[path], value.dtype)
        loaded.append(path)
      else:
        out[path] = value
        fresh.append(path)
        if path in source:
          mismatched.append(f'{path} {tuple(np.shape(source[path]))} -> {tuple(value.shape)}')
    return flax.traverse_util.unflatten_dict(out, sep='/')

  state = state.replace(params=merge('params'), batch_stats=merge('batch_stats'))
  if state.ema_params is not None:
    state = state.replace(ema_params=state.params, ema_batch_stats=state.batch_stats)
  total = len(loaded) + len(fresh)
  what = (f'{len(loaded)} of {total} arrays of this model match {init_from} by name and shape; '
          f'{len(fresh)} do not ({len(mismatched)} of them by shape), e.g. '
          f'{", ".join(mismatched[:3] or fresh[:3])}')
  # Fine-tuning for another number of classes leaves only the classifier fresh; a model of another
  # width would keep almost nothing and in effect train from scratch.
  if len(loaded) < total / 2:
    raise errors.InputFileError(f'config.init_from: {what}. Use a checkpoint of the same network '
                                '(the same model.* fields, e.g. width and channels; num_classes '
                                'may differ).')
  if fresh:
    logging.warning('Partial initialisation: %s. Those stay freshly initialised.', what)
  else:
    logging.info('Initialised all %d arrays from %s.', total, init_from)
  return state


class Program(NamedTuple):
  model: nn.Module
  init: Callable  # () -> a freshly initialised TrainState, replicated over the mesh
  abstract_state: TrainState  # its shapes, dtypes and shardings: restoring or lowering needs no init
  train_step: Callable  # (state, batch, hyperparameters) -> (state, metrics); the state is donated
  hyperparameters: dict  # the train_step's third argument
  eval_step: Callable  # (variables, batch) -> sums of correct top-1/top-5, loss, count


# The config fields the compiled programs read; the optimiser's values (hyperparameters) are their
# arguments. The programs are built from these fields alone (program_config), so that reading any
# other field fails while tracing, and runs that agree on them share the programs.
PROGRAM_FIELDS = ('model', 'seed', 'batch_size', 'ema_decay', 'nesterov', 'lr_decay_epochs',
                  'warmup_epochs', 'dataset.image_size', 'dataset.eval_crops')


def program_config(config: ml_collections.ConfigDict) -> ml_collections.FrozenConfigDict:
  """The PROGRAM_FIELDS of `config`, frozen (hashable)."""
  subset = {}
  for field in PROGRAM_FIELDS:
    *path, last = field.split('.')
    source, target = config, subset
    for name in path:
      source, target = source[name], target.setdefault(name, {})
    target[last] = source[last]
  return ml_collections.FrozenConfigDict(subset)


def setup(config: ml_collections.ConfigDict, num_train_examples: int,
          mesh: jax.sharding.Mesh) -> Program:
  """The network, its initialisation and the jitted steps, as training runs them (and
  bn_inception.benchmark times them): state replicated and donated, batches sharded over 'data'.
  Nothing is compiled yet: a resumed run never compiles the initialisation. A process keeps the
  programs of its last few setups: a later run with the same program_config, data and mesh (an
  extended or resumed run, another learning rate) reuses them, traced and compiled once."""
  hyper = hyperparameters(config)
  model, init, train_fn, eval_fn = _programs(
      program_config(config), tuple(hyper), num_train_examples, mesh, input_convention(config),
      input_pipeline.distortion_strength(config.dataset))
  return Program(model, init, jax.eval_shape(init), train_fn, hyper, eval_fn)


@functools.lru_cache(maxsize=8)
def _programs(config: ml_collections.FrozenConfigDict, hyperparameter_names: tuple[str, ...],
              num_train_examples: int, mesh: jax.sharding.Mesh,
              convention: Optional[InputConvention],
              distortion_strength: float) -> tuple[nn.Module, Callable, Callable, Callable]:
  model = models.from_config(config.model)
  # For the optimiser state's structure alone, which does not depend on the values.
  zeros = dict.fromkeys(hyperparameter_names, np.float32(0))
  tx = optimizer(config, learning_rate_schedule(config, num_train_examples, zeros), zeros)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  init = jax.jit(functools.partial(create_train_state, config, model, tx, config.dataset.image_size),
                 out_shardings=replicated)
  train_fn = jax.jit(
      functools.partial(train_step, model=model, config=config,
                        num_train_examples=num_train_examples, convention=convention,
                        distortion_strength=distortion_strength),
      in_shardings=(replicated, None, replicated), out_shardings=(replicated, replicated),
      donate_argnums=0)
  eval_fn = jax.jit(functools.partial(
      eval_step, model=model, convention=convention,
      crop_weights=data_spec.crop_weights(config.dataset.eval_crops)), out_shardings=replicated)
  return model, init, train_fn, eval_fn


# ------------------------------------------------------------------------------------------------
# Logging.
# ------------------------------------------------------------------------------------------------
def _import_tensorboardx():
  """tensorboardX without torch: where torch is installed, tensorboardX imports it only to annotate
  its arguments, which costs every training start 1-2 s and, on a GPU host, loads torch's CUDA
  libraries into the JAX process. An entry of None in sys.modules makes that import fail."""
  if 'torch' in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX
  sys.modules['torch'] = None
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules['torch']
  return tensorboardX


class MetricWriter:
  """Metrics as JSON lines (metrics.jsonl) and TensorBoard events in the workdir; host 0 only."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    if self.active:
      self.path = os.path.join(workdir, 'metrics.jsonl')
      self.tensorboard = _import_tensorboardx().SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step: int, metrics: dict[str, float]) -> None:
    if not self.active:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': step, **metrics}) + '\n')
    for name, value in metrics.items():
      self.tensorboard.add_scalar(name, value, step)
    self.tensorboard.flush()

  def close(self):
    if self.active:
      self.tensorboard.close()


class Preemption:
  """SIGTERM (a cluster pre-empting the job) and SIGINT (Ctrl-C) as a request to save a checkpoint
  at the end of the step and stop; `reached(step)` is asked once per step.

  On several processes all must stop at the same step, or each would wait in vain for the others
  to save: they agree through JAX's pre-emption sync point (Orbax's `reached_preemption`), to
  which `jax.distributed.initialize` connects SIGTERM; SIGINT is passed on to it as a SIGTERM of
  this process. A second Ctrl-C stops at once, without saving.
  """

  def __init__(self, mngr, step: int):
    """`step`: the step training starts from."""
    self.mngr = mngr
    self.several = jax.process_count() > 1
    self.signal = None  # the signal that asked to stop, None on the processes that got none
    # JAX puts the sync point after the newest step any process has asked about, counting from 0:
    # a notice that came while this run started up stops it at step 1, which a resumed run never
    # reaches. Asking about every step up to this one finds such a stop (all processes alike).
    self.stop_at_once = self.several and any(
        mngr.reached_preemption(s) for s in range(1, step + 1))
    catch = (signal.SIGINT,) if self.several else (signal.SIGINT, signal.SIGTERM)
    try:
      self._previous = {s: signal.signal(s, self._handle) for s in catch}
    except ValueError:  # not the main thread: leave signals alone
      self._previous = {}

  def _handle(self, signum, frame):
    del frame
    self.signal = signal.Signals(signum)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: KeyboardInterrupt
    logging.warning('%s received: saving a checkpoint at the end of this step and stopping%s.',
                    self.signal.name, ' (Ctrl-C again stops at once, without saving)'
                    if signum == signal.SIGINT else '')
    if self.several and signum == signal.SIGINT:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's pre-emption notifier

  def reached(self, step: int) -> bool:
    """Whether to save and stop after `step` (the same answer on every process)."""
    if self.several:
      return self.stop_at_once or self.mngr.reached_preemption(step)
    return self.signal is not None

  def stop(self, step: int) -> None:
    """Once the checkpoint at `step` is written: says so, or after Ctrl-C raises KeyboardInterrupt,
    so that the command exits non-zero and a program training several runs (the demo) stops too."""
    self.mngr.wait_until_finished()
    if self.signal == signal.SIGINT:
      raise KeyboardInterrupt
    logging.warning('Pre-empted: checkpoint saved at step %d in %s; rerun the same command to '
                    'resume from it.', step, self.mngr.directory)

  def interrupted(self) -> KeyboardInterrupt:
    """Ctrl-C's exception, saying which checkpoint the run will resume from."""
    self.mngr.wait_until_finished()  # a save in progress completes first
    step = self.mngr.latest_step()
    resume = (f'step {step} (the checkpoint in {self.mngr.directory})' if step is not None
              else 'step 0 (no checkpoint yet)')
    return KeyboardInterrupt(f'Interrupted: rerun the same command to resume from {resume}.')

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def eval_batch_size(config: ml_collections.ConfigDict, crops: str,
                    mesh: jax.sharding.Mesh) -> int:
  """Images per evaluation step (training's and bn_inception.evaluate's): about
  config.eval_batch_size crops (default batch_size), so that 144 crops fit where one does, and a
  multiple of the device count."""
  devices = mesh.devices.size
  images = (config.eval_batch_size or config.batch_size) // data_spec.num_crops(crops)
  return max(devices, images // devices * devices)


def evaluate(variables, eval_fn, config: ml_collections.ConfigDict,
             mesh: jax.sharding.Mesh) -> dict[str, float]:
  """Top-1/top-5 accuracy and loss over the whole eval split, every example exactly once, on
  config.dataset.eval_crops crops per image."""
  batch_size = eval_batch_size(config, config.dataset.eval_crops, mesh)
  batches = input_pipeline.eval_batches(
      config.dataset, local_batch_size=batch_size // jax.process_count())
  totals = None
  for batch, _ in global_batches(batches, mesh, ('image', 'label', 'mask')):
    sums = eval_fn(variables, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  n = float(totals['count'])
  return {'eval_top1': float(totals['top1']) / n, 'eval_top5': float(totals['top5']) / n,
          'eval_loss': float(totals['loss']) / n, 'eval_examples': n}


def eval_variables(state: TrainState) -> dict:
  """What training evaluates: the EMA weights with the EMA of the BN statistics when an EMA is
  kept, else the weights with their population (running-average) statistics."""
  if state.ema_params is not None:
    return {'params': state.ema_params, 'batch_stats': state.ema_batch_stats}
  return {'params': state.params, 'batch_stats': state.batch_stats}


# ------------------------------------------------------------------------------------------------
# The loop.
# ------------------------------------------------------------------------------------------------
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices: Optional[list] = None, *,
                       start_over_if_unreadable: bool = False) -> TrainState:
  """Trains config's model in workdir, resuming from its newest checkpoint; returns the final state.

  `devices` restricts the run to some devices (default: all of them). A workdir whose checkpoints
  all fail to read stops the run (checkpoints.resume) unless `start_over_if_unreadable`.
  """
  # --- Devices, data and model --------------------------------------------------------------
  config_checks.check(config)
  mesh = make_mesh(devices)
  check_batch(config.batch_size, config.model.bn_group_size, mesh)
  check_memory(config, config.batch_size, mesh, training=True)
  check_memory(config, eval_batch_size(config, config.dataset.eval_crops, mesh)
               * data_spec.num_crops(config.dataset.eval_crops), mesh, training=False,
               field='eval_batch_size')
  info = input_pipeline.get_info(config.dataset)
  config_checks.check_num_classes(config, info)
  if config.batch_size > info.num_train_examples:
    raise errors.ConfigError(
        f'batch_size {config.batch_size:,} is larger than the training split '
        f'({info.num_train_examples:,} examples of {config.dataset.name}): use at most '
        f'{info.num_train_examples:,}.')
  _, init, abstract_state, train_fn, hyper, eval_fn = setup(config, info.num_train_examples, mesh)

  # --- Initialise, or resume from the newest complete checkpoint -----------------------------
  # Every check comes before the first write: a refused run changes no file in the workdir. One
  # training at a time in a workdir: process 0 holds its lock until the end.
  lock = run_dir.WorkdirLock(workdir) if jax.process_index() == 0 else None
  try:
    step, state = checkpoints.resume(workdir, config, abstract_state,
                                     start_over_if_unreadable=start_over_if_unreadable)
    if state is not None:
      logging.info('Resumed from the checkpoint at step %d in %s.', step, workdir)
    else:
      state = init()
      if config.init_from:
        state = load_pretrained(state, config.init_from)
  except BaseException:
    if lock:
      lock.release()
    raise
  step = int(state.step)
  if step >= config.num_train_steps:  # config.json keeps describing the steps that ran
    logging.warning('The run is at step %d, num_train_steps is %d: nothing to train (a larger '
                    '--config.num_train_steps extends the run).', step, config.num_train_steps)
    if lock:
      lock.release()
    return state
  checkpoints.write_config(workdir, config, step)
  mngr = checkpoints.manager(workdir, keep=config.keep_checkpoints,
                             keep_every=config.keep_checkpoint_every_steps)

  local_batch = config.batch_size // jax.process_count()
  train_iter = global_batches(
      input_pipeline.train_batches(config.dataset, local_batch_size=local_batch,
                                   seed=config.seed, start_step=step),
      mesh, ('image', 'label'))
  writer = MetricWriter(workdir)
  preemption = Preemption(mngr, step)

  def stop_if_diverged():
    bad = int(state.nonfinite_step)
    if bad >= 0:
      mngr.wait_until_finished()
      last = mngr.latest_step()
      raise errors.TrainingDivergedError(
          'Training diverged: the loss, gradients, parameters or BN statistics were not finite '
          f'at step {bad} (paper step {bad * config.batch_size // PAPER_BATCH}). The last good '
          'checkpoint is '
          f'{"step %d in %s" % (last, mngr.directory) if last is not None else "none (none saved yet)"}. '
          'Lower the learning rate (or add warm-up) and restart from it.')

  # --- Train ---------------------------------------------------------------------------------
  logging.info('Training %s on %d device(s), %d host(s): steps %d..%d, batch %d (%s per device).',
               config.dataset.name, mesh.devices.size, jax.process_count(), step,
               config.num_train_steps, config.batch_size, config.batch_size // mesh.devices.size)
  pending, interval_start, interval_steps = [], None, 0
  try:
    while step < config.num_train_steps:
      batch, _ = next(train_iter)
      if interval_start is None:  # compile before timing, and say so
        logging.info('Compiling the training step...')
        t = time.perf_counter()
        train_fn = train_fn.lower(state, batch, hyper).compile()
        logging.info('Compiled in %.1f s.', time.perf_counter() - t)
        wait_for_all_processes('compiled')
        interval_start = time.perf_counter()

      state, step_metrics = train_fn(state, batch, hyper)
      step += 1
      interval_steps += 1
      pending.append(step_metrics)

      if step % config.log_every_steps == 0 or step == config.num_train_steps:
        stop_if_diverged()
        summary = {k: float(np.mean([m[k] for m in jax.device_get(pending)])) for k in pending[0]}
        elapsed = time.perf_counter() - interval_start
        summary['img_per_s'] = interval_steps * config.batch_size / elapsed
        summary['paper_step'] = step * config.batch_size // PAPER_BATCH
        eta = (config.num_train_steps - step) * elapsed / interval_steps
        logging.info('step %d (paper step %d): loss %.4f, top-1 %.3f, lr %.5g, %.0f img/s, ETA %s',
                     step, summary['paper_step'], summary['loss'], summary['top1'],
                     summary['learning_rate'], summary['img_per_s'], format_seconds(eta))
        writer.write(step, summary)
        pending, interval_start, interval_steps = [], time.perf_counter(), 0

      if step % config.eval_every_steps == 0 or step == config.num_train_steps:
        stop_if_diverged()
        results = evaluate(eval_variables(state), eval_fn, config, mesh)
        results['paper_step'] = step * config.batch_size // PAPER_BATCH
        logging.info('step %d eval: top-1 %.4f, top-5 %.4f, loss %.4f (%d examples)', step,
                     results['eval_top1'], results['eval_top5'], results['eval_loss'],
                     results['eval_examples'])
        writer.write(step, results)

      preempted = preemption.reached(step)
      if (step % config.checkpoint_every_steps == 0 or step == config.num_train_steps
          or preempted):
        stop_if_diverged()  # never write a diverged state
        checkpoints.save(mngr, step, state)
      if preempted and step < config.num_train_steps:
        preemption.stop(step)
        break

      if interval_steps == 0:  # evaluation and checkpointing time is not training time
        interval_start = time.perf_counter()
  except KeyboardInterrupt:  # Ctrl-C: once (after saving) or twice (at once)
    raise preemption.interrupted() from None
  finally:
    try:
      mngr.wait_until_finished()  # may raise: the last save failed (a full disk)
    finally:
      mngr.close()
      writer.close()
      preemption.restore()
      if lock:
        lock.release()
  return state


def format_seconds(seconds: float) -> str:
  """m:ss, or h:mm:ss from an hour on."""
  seconds = int(round(seconds))
  if seconds < 3600:
    return f'{seconds // 60}:{seconds % 60:02d}'
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'
