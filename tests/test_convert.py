"""Weight import from the PyTorch port of the Caffe-trained BN-Inception, checked against the port.

The port's own module (pretrainedmodels/models/bninception.py, loaded by file path: the package's
__init__ imports torchvision) gets random weights and random, non-trivial BN statistics; the
converted network must give its logits, from the same RGB pixels through each side's preprocessing.
"""

import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from bn_inception import checkpoints
from bn_inception import convert
from bn_inception import errors
from bn_inception import evaluate
from bn_inception import models
from configs import finetune_caffe
import optional_deps

RTOL = 1e-4  # of the largest logit
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def port_preprocess(rgb, settings):
  """Cadene's TransformImage after the crop: pixels at input_range, BGR, then (x - mean) / std."""
  torch = optional_deps.load()
  x = torch.from_numpy(rgb).permute(0, 3, 1, 2).float()  # NCHW, RGB, [0, 255]
  assert settings['input_space'] == 'BGR' and settings['input_range'] == [0, 255]
  x = x[:, [2, 1, 0]]
  mean = torch.tensor(settings['mean'], dtype=torch.float32).view(1, 3, 1, 1)
  std = torch.tensor(settings['std'], dtype=torch.float32).view(1, 3, 1, 1)
  return (x - mean) / std


@pytest.fixture(scope='module')
def port():
  """The port with random weights and statistics, RGB test images and the port's logits."""
  torch = optional_deps.load()
  module = optional_deps.load(convert.load_port_module)
  settings = module.pretrained_settings['bninception']['imagenet']
  torch.manual_seed(0)
  net = module.BNInception(num_classes=1000)
  rng = np.random.default_rng(0)
  rgb = rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
  x = port_preprocess(rgb, settings)
  bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for bn in bns:
      bn.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, bn.num_features)))
      bn.bias.copy_(torch.from_numpy(rng.normal(0, 0.2, bn.num_features)))
      bn.momentum = None  # running statistics: cumulative averages, here of one batch
    # Statistics of these very images (one pass in training mode), then perturbed, so that every
    # BN is far from the identity while activations stay of order one.
    net.train()(x)
    for bn in bns:
      c = bn.num_features
      bn.running_mean.add_(torch.from_numpy(rng.normal(0, 0.1, c)) * bn.running_var.sqrt())
      bn.running_var.mul_(torch.from_numpy(rng.uniform(0.5, 1.5, c)))
    logits = net.eval()(x).numpy()
  return net, settings, rgb, logits


def assert_logits_close(actual, expected):
  actual = np.asarray(actual)
  assert actual.shape == expected.shape
  error = np.abs(actual - expected).max()
  assert error <= RTOL * np.abs(expected).max(), f'max |difference| {error}'


def forward(model, variables, config_input, rgb):
  images = models.normalize_pixels(rgb.astype(np.float32), config_input)
  return jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)


def test_converted_logits_equal_the_ports(port):
  net, settings, rgb, port_logits = port
  # Not degenerate: the logits vary across classes and depend on the image.
  scale = np.abs(port_logits).max()
  assert port_logits.std(axis=1).min() > 0.1 * scale
  assert np.abs(port_logits[0] - port_logits[1]).max() > 0.1 * scale
  # torch's state dict as is: tensors, with num_batches_tracked.
  model, variables = convert.from_torch_state_dict(net.state_dict())
  config_input = ml_collections.ConfigDict(convert.CAFFE_INPUT)
  assert settings['mean'] == list(config_input.mean) and settings['std'] == list(config_input.std)
  assert_logits_close(forward(model, variables, config_input, rgb), port_logits)


def test_command_writes_a_checkpoint_with_the_same_logits(port, tmp_path):
  net, _, rgb, port_logits = port
  pth = str(tmp_path / 'bn_inception.pth')
  optional_deps.load().save(net.state_dict(), pth)
  workdir = str(tmp_path / 'caffe')
  command = subprocess.run([sys.executable, '-m', 'bn_inception.convert',
                            f'--torch_checkpoint={pth}', f'--workdir={workdir}'],
                           cwd=REPO, capture_output=True, text=True)
  assert command.returncode == 0, command.stderr[-3000:]

  # What an evaluation reads, from the workdir alone: config.json and the newest checkpoint.
  config = checkpoints.read_config(workdir)
  step, variables, _ = evaluate.restore_variables(workdir)
  assert step == 0
  model = models.from_config(config.model)
  assert_logits_close(forward(model, variables, config.input, rgb), port_logits)

  with pytest.raises(errors.ConfigError, match="already holds checkpoints"):
    convert.convert(pth, workdir)


@pytest.fixture(scope='module')
def numpy_state_dict(port):
  return {k: v.numpy() for k, v in port[0].state_dict().items()}


@pytest.mark.parametrize('corrupt, listed', [
    (lambda sd: sd.pop('inception_3a_double_3x3_reduce_bn.running_var'),
     'missing keys: inception_3a_double_3x3_reduce_bn.running_var'),
    (lambda sd: sd.update({'aux_logits.weight': np.zeros((10, 1024))}),
     'unknown keys: aux_logits.weight'),
    (lambda sd: sd.update({'conv1_7x7_s2.weight': np.zeros((64, 3, 3, 3))}),
     'wrong shape: conv1_7x7_s2.weight (64, 3, 3, 3) (expected (64, 3, 7, 7))'),
])
def test_bad_state_dicts_are_refused_with_their_keys(numpy_state_dict, corrupt, listed):
  state_dict = dict(numpy_state_dict)
  corrupt(state_dict)
  with pytest.raises(ValueError) as error:
    convert.from_torch_state_dict(state_dict)
  assert listed in str(error.value)


def test_a_fine_tuned_port_keeps_its_classes(numpy_state_dict):
  state_dict = dict(numpy_state_dict)
  state_dict['last_linear.weight'] = np.zeros((10, 1024), np.float32)
  state_dict['last_linear.bias'] = np.zeros((10,), np.float32)
  model, variables = convert.from_torch_state_dict(state_dict)
  assert model.num_classes == 10 and variables['params']['logits']['kernel'].shape == (1024, 10)


def test_configs_build_the_converted_network():
  for config in convert.caffe_config(), finetune_caffe.get_config():
    assert models.from_config(config.model) == convert.caffe_model()
    assert dict(config.input) == convert.CAFFE_INPUT
  assert finetune_caffe.get_config().init_from


def test_normalize_pixels():
  rgb = np.array([[[[0, 128, 255]]]], np.uint8)
  default = ml_collections.ConfigDict(dict(color_order='rgb', mean=(127.5,) * 3, std=(127.5,) * 3))
  np.testing.assert_allclose(models.normalize_pixels(rgb, default), [[[[-1, 0.5 / 127.5, 1]]]])
  caffe = ml_collections.ConfigDict(convert.CAFFE_INPUT)
  np.testing.assert_allclose(models.normalize_pixels(rgb, caffe),
                             [[[[255 - 104, 128 - 117, 0 - 128]]]])
  with pytest.raises(ValueError, match="valid: \\['rgb', 'bgr'\\]"):
    models.normalize_pixels(rgb, ml_collections.ConfigDict(dict(color_order='hsv', mean=0, std=1)))
