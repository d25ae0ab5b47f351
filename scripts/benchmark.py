r"""Benchmark the training step: one JSON line of img/s, MFU, compile time and memory.

  python scripts/benchmark.py --config=configs/bn_x30.py --batch_size=256 --dtype=bfloat16 \
      --steps=100 --peer=torch

Synthetic data on the device; the step is train.py's, jitted as training jits it. `--peer=torch` also
times the PyTorch port (pretrainedmodels) and sets `--like_port` (our network in the port's
architecture). `--mode=eval` times evaluation; `--mode=input` the input pipeline alone, on the
config's data set (e.g. `--config.dataset.data_dir=...`). Any config field: `--config.FIELD=VALUE`.
Run from the repository root. bn_inception/benchmark.py has the details; docs/benchmarks.md the results.
"""

import json
import os
import sys

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

# configs/ is imported by path from the repository root, as bn_inception.main does from its cwd.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bn_inception import benchmark  # noqa: E402  pylint: disable=g-import-not-at-top
from bn_inception import cli  # noqa: E402  pylint: disable=g-import-not-at-top
from bn_inception import errors  # noqa: E402  pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/bn_x30.py', 'Config file (configs/bn_x30.py is the ImageNet network).')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', None, 'Global batch; default: the config\'s.')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', None, 'Image side; default: the config\'s.')
_DTYPE = flags.DEFINE_enum('dtype', None, ['bfloat16', 'float32'],
                           'Compute dtype; default: the config\'s model.dtype.')
_WIDTH = flags.DEFINE_float('width', None, 'Channel multiplier (small CPU runs).')
_MODE = flags.DEFINE_enum('mode', 'train', benchmark.MODES, 'What to time.')
_STEPS = flags.DEFINE_integer('steps', 50, 'Timed steps.')
_WARMUP_STEPS = flags.DEFINE_integer('warmup_steps', 5, 'Untimed steps after compilation.')
_PEER = flags.DEFINE_enum('peer', None, benchmark.PEERS, 'Also time the PyTorch port.')
_LIKE_PORT = flags.DEFINE_bool(
    'like_port', None, 'Our network in the port\'s architecture (plain 7x7 stem, conv biases, '
    'Caffe padding). Default: on with --peer.')
_TORCH_COMPILE = flags.DEFINE_enum('torch_compile', 'auto', ['auto', 'true', 'false'],
                                   'torch.compile the peer; auto: on CUDA only.')
_PROFILE = flags.DEFINE_string('profile', None, 'Trace one more step into this directory and '
                               'report where its time goes.')
_XLA_FLAGS = flags.DEFINE_string('xla_flags', '', 'Added to XLA_FLAGS before JAX starts.')
cli.define_multihost_flags()
flags.adopt_module_key_flags(cli)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if _XLA_FLAGS.value:  # read when JAX first touches a device, which it has not yet
    os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {_XLA_FLAGS.value}".strip()
  if _PEER.value is None:  # the peer runs first, before JAX starts and keeps the memory it takes
    cli.start()
  elif any(flags.FLAGS[f].present for f in ('coordinator_address', 'num_processes', 'process_id',
                                              'multihost')):
    raise errors.ConfigError('--peer compares one process with PyTorch: leave out the '
                             'several-host flags, or --peer.')
  like_port = _PEER.value is not None if _LIKE_PORT.value is None else _LIKE_PORT.value
  config = benchmark.benchmark_config(
      _CONFIG.value, batch_size=_BATCH_SIZE.value, image_size=_IMAGE_SIZE.value,
      dtype=_DTYPE.value, width=_WIDTH.value, like_port=like_port)
  torch_compile = {'auto': None, 'true': True, 'false': False}[_TORCH_COMPILE.value]
  result = benchmark.run(config, mode=_MODE.value, steps=_STEPS.value,
                         warmup_steps=_WARMUP_STEPS.value, peer=_PEER.value,
                         torch_compile=torch_compile, profile_dir=_PROFILE.value)
  result = {'config': config_flags.get_config_filename(flags.FLAGS['config']),
            'like_port': like_port, **result}
  if jax.process_index() == 0:  # one line for the whole run
    print(json.dumps(result))


if __name__ == '__main__':
  cli.run(main)
