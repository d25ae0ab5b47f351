"""Imports the Caffe-trained BN-Inception from its PyTorch port (Cadene's `pretrainedmodels`).

Google never released BN-Inception weights; the widely used ones were trained in Caffe by Yuanjun
Xiong and ported to PyTorch as `pretrainedmodels.bninception` (73.52% top-1 / 91.56% top-5 on the
ImageNet validation centre crops, as the port reports). Their network is our Figure 5 with the knobs
of `CAFFE_MODEL`, fed the port's input convention `CAFFE_INPUT`:

  python -m bn_inception.convert --torch_checkpoint=bn_inception-52deb4733.pth --workdir=runs/caffe

writes `runs/caffe/checkpoints` (an Orbax checkpoint at step 0: params and batch_stats) and
`runs/caffe/config.json` (configs/default.py's ImageNet config with those knobs), which evaluation
reads and configs/finetune_caffe.py starts from. torch is needed only to read the `.pth` file
(`pip install -e '.[torch]'`); besides this module, only the benchmark's PyTorch peer
(bn_inception.benchmark) imports it.

Run from the repository root: the written config is built from `configs/default.py`.
"""

import importlib.util
import os
from typing import Any, Mapping

from absl import flags
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from bn_inception import checkpoints
from bn_inception import cli
from bn_inception import errors
from bn_inception import models
from configs import default

# The port's network in our knobs (paper.md section 6): a plain 7x7 stem; Figure 5's columns (608
# channels out of 4c/4d, 1056 out of 4e); strided convolutions padded k // 2 on every side as Caffe
# does, where 'SAME' would pad (2, 3) around the 7x7/2; a bias on every convolution, before its BN;
# BN epsilon 1e-5 (torch's default); no LRN, no dropout. Its ceil-mode max pools equal our 'SAME'
# ones on the even sizes a 224 x 224 input gives (112, 56, 28, 14: one -inf pad at the end), and its
# 3x3/1 average pools count the padding as ours do.
CAFFE_MODEL = dict(
    separable_stem=False, channels='paper', symmetric_padding=True, conv_bias=True, lrn=False,
    dropout_rate=0.0, bn_epsilon=1e-5)
# The port's `pretrained_settings`: BGR pixels in [0, 255] minus the Caffe means, std 1.
CAFFE_INPUT = dict(color_order='bgr', mean=(104.0, 117.0, 128.0), std=(1.0, 1.0, 1.0))
CAFFE_IMAGE_SIZE = 224  # its global pool is a fixed 7 x 7 window: 224 x 224 inputs only

# Our layer names whose port names differ; the others (inception_3a + _1x1, ...) join with '_'.
_PORT_NAMES = {'conv1': 'conv1_7x7_s2', 'conv2_reduce': 'conv2_3x3_reduce', 'conv2': 'conv2_3x3',
               'logits': 'last_linear'}
# (our submodule, our variable) -> (suffix of the port's layer name, its tensor, axes to ours).
_TENSORS = {
    ('conv', 'kernel'): ('', 'weight', (2, 3, 1, 0)),  # OIHW -> HWIO
    ('conv', 'bias'): ('', 'bias', None),
    ('bn', 'scale'): ('_bn', 'weight', None),
    ('bn', 'bias'): ('_bn', 'bias', None),
    ('bn', 'mean'): ('_bn', 'running_mean', None),
    ('bn', 'var'): ('_bn', 'running_var', None),  # both the population variance used as is
    ('logits', 'kernel'): ('', 'weight', (1, 0)),  # [out, in] -> [in, out]
    ('logits', 'bias'): ('', 'bias', None),
}
# torch's BN step counter: no role at inference, and none in our BN.
_IGNORED_SUFFIX = '_bn.num_batches_tracked'
_MAX_LISTED = 20  # keys listed per kind of error


def load_port_module():
  """The port's network module, `pretrainedmodels/models/bninception.py`, loaded by file path: the
  package's __init__ imports torchvision, which the network does not need (we install pretrainedmodels
  with --no-deps). Importing it imports torch."""
  spec = importlib.util.find_spec('pretrainedmodels')
  if spec is None:
    raise ModuleNotFoundError(
        'pretrainedmodels is not installed: pip install --no-deps pretrainedmodels==0.7.4')
  path = os.path.join(spec.submodule_search_locations[0], 'models', 'bninception.py')
  module_spec = importlib.util.spec_from_file_location('port_bninception', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def caffe_model(num_classes: int = 1000) -> models.BNInception:
  return models.BNInception(num_classes=num_classes, **CAFFE_MODEL)


def caffe_config(num_classes: int = 1000) -> ml_collections.ConfigDict:
  """configs/default.py at ImageNet scale, with the port's network and input convention."""
  config = default.get_config('imagenet')
  config.model.update(CAFFE_MODEL, num_classes=num_classes)
  config.input.update(CAFFE_INPUT)
  config.dataset.image_size = CAFFE_IMAGE_SIZE
  return config


def port_key(path: tuple[str, ...]) -> tuple[str, Any]:
  """The port's state-dict key for one of our variables (path without the collection), and the
  transposition from the port's layout to ours (None: same layout)."""
  if path[0] == 'logits':
    layer, submodule = path[:1], 'logits'
  else:
    layer, submodule = path[:-2], path[-2]
  suffix, tensor, axes = _TENSORS[submodule, path[-1]]
  name = '_'.join(_PORT_NAMES.get(n, n) for n in layer)
  return f'{name}{suffix}.{tensor}', axes


def from_torch_state_dict(state_dict: Mapping[str, Any]):
  """The port's state dict (torch tensors or numpy arrays) -> (model, {'params', 'batch_stats'}).

  The model takes what the port takes, in NHWC: 224 x 224 BGR pixels in [0, 255] minus the Caffe
  means (`models.normalize_pixels` with `CAFFE_INPUT`). The number of classes is read from
  `last_linear`, so fine-tuned ports load too. Unknown, missing or mis-shaped keys raise a
  ValueError that lists them.
  """
  arrays = {key: _to_numpy(value) for key, value in state_dict.items()}
  classifier = arrays.get('last_linear.weight')
  num_classes = classifier.shape[0] if classifier is not None and classifier.ndim == 2 else 1000
  model = caffe_model(num_classes)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, CAFFE_IMAGE_SIZE, CAFFE_IMAGE_SIZE, 3)), train=False))

  wanted = {}  # port key -> (our path with the collection, axes, our shape)
  for path, leaf in flax.traverse_util.flatten_dict(shapes).items():
    key, axes = port_key(path[1:])
    wanted[key] = (path, axes, leaf.shape)
  unknown = sorted(k for k in arrays if k not in wanted and not _ignored(k, wanted))
  missing = sorted(k for k in wanted if k not in arrays)
  misshaped = []
  for key in sorted(set(wanted) & set(arrays)):
    _, axes, shape = wanted[key]
    port_shape = shape if axes is None else tuple(shape[i] for i in np.argsort(axes))
    if arrays[key].shape != port_shape:
      misshaped.append(f'{key} {arrays[key].shape} (expected {port_shape})')
  if unknown or missing or misshaped:
    raise errors.InputFileError(
        'This state dict is not the BN-Inception of pretrainedmodels (bninception.py):'
        + _listing('unknown keys', unknown) + _listing('missing keys', missing)
        + _listing('keys with the wrong shape', misshaped))

  flat = {}
  for key, (path, axes, _) in wanted.items():
    value = arrays[key] if axes is None else arrays[key].transpose(axes)
    flat[path] = jnp.asarray(value, jnp.float32)
  return model, flax.traverse_util.unflatten_dict(flat)


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, 'detach'):  # a torch tensor, without importing torch
    value = value.detach().cpu().numpy()
  return np.asarray(value)


def _ignored(key: str, wanted) -> bool:
  return (key.endswith(_IGNORED_SUFFIX)
          and key[:-len(_IGNORED_SUFFIX)] + '_bn.running_mean' in wanted)


def _listing(kind: str, keys: list[str]) -> str:
  if not keys:
    return ''
  more = f', ... ({len(keys) - _MAX_LISTED} more)' if len(keys) > _MAX_LISTED else ''
  return f'\n  {len(keys)} {kind}: ' + ', '.join(keys[:_MAX_LISTED]) + more


def load_torch_checkpoint(path: str) -> dict[str, Any]:
  """Reads a `.pth` state dict without running any code from it (weights_only)."""
  import torch  # the optional extra: pip install -e '.[torch]'
  if not os.path.isfile(path):
    raise errors.NotFoundError(f'{path}: no such file.')
  try:
    state_dict = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  # torch raises many kinds on other files
    raise errors.InputFileError(
        f'{path} is not a PyTorch checkpoint that torch.load(weights_only=True) reads '
        f'({errors.describe(e)}). '
        "Expected the port's state dict, e.g. bn_inception-52deb4733.pth "
        '(README: Start from the Caffe-trained weights).') from e
  if not isinstance(state_dict, Mapping):
    raise errors.InputFileError(f'{path} holds a {type(state_dict).__name__}, not a state dict.')
  return dict(state_dict)


def save(workdir: str, config: ml_collections.ConfigDict, variables) -> None:
  """Writes `variables` as the step-0 checkpoint of `workdir` and its `config.json`, as training
  writes them (bn_inception.checkpoints)."""
  mngr = checkpoints.manager(workdir)
  try:
    if mngr.all_steps():
      raise errors.ConfigError(f'{workdir} already holds checkpoints {mngr.all_steps()}; '
                               'convert into a new workdir.')
    checkpoints.save(mngr, 0, {'step': np.asarray(0, np.int32), 'params': variables['params'],
                               'batch_stats': variables['batch_stats']})
    mngr.wait_until_finished()
  finally:
    mngr.close()
  checkpoints.write_config(workdir, config, 0)


def convert(torch_checkpoint: str, workdir: str) -> ml_collections.ConfigDict:
  """The port's `.pth` -> an Orbax checkpoint and config.json in `workdir`; returns the config."""
  state_dict = load_torch_checkpoint(torch_checkpoint)
  try:
    model, variables = from_torch_state_dict(state_dict)
  except errors.InputFileError as e:
    raise errors.InputFileError(f'{torch_checkpoint}: {e}') from e
  config = caffe_config(model.num_classes)
  save(workdir, config, variables)
  return config


def main(argv):
  del argv
  workdir = flags.FLAGS.workdir
  convert(flags.FLAGS.torch_checkpoint, workdir)
  print(f'Wrote {workdir}/checkpoints (step 0) and {workdir}/config.json.')


if __name__ == '__main__':
  # Defined here, not at import: other entry points define --workdir too.
  flags.DEFINE_string('torch_checkpoint', None,
                      "The port's state dict, e.g. bn_inception-52deb4733.pth.")
  flags.DEFINE_string('workdir', None, 'Where to write checkpoints/ and config.json.')
  flags.mark_flags_as_required(['torch_checkpoint', 'workdir'])
  cli.run(main)
