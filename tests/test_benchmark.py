"""The benchmark (bn_inception/benchmark.py, scripts/benchmark.py) at a tiny size on CPU: the JSON
line's fields, the FLOP counts behind MFU, and no TensorFlow. Timings are not asserted."""

import json
import os
import re
import subprocess
import sys

import jax
import pytest

from bn_inception import benchmark
from bn_inception import models
from configs import bn_x30
from conftest import xla_flags
import optional_deps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(batch_size=8, image_size=32, width=0.125)
FIELDS = ('device', 'jax_version', 'batch_size', 'image_size', 'dtype', 'img_per_s', 'step_ms',
          'compile_s', 'mfu', 'peak_memory_bytes')


def tiny_config(**overrides):
  config = benchmark.benchmark_config(bn_x30.get_config(), **{**TINY, **overrides})
  config.model.bn_group_size = None  # batch 8 over conftest's 8 devices: one example each
  return config


def test_peer_with_several_host_flags_is_refused():
  # The peer is one process: several-host flags with it would time each process alone.
  command = subprocess.run(
      [sys.executable, 'scripts/benchmark.py', '--peer=torch', '--num_processes=2'], cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True, timeout=120)
  assert command.returncode == 1 and command.stderr.startswith(
      'Error: --peer compares one process'), command.stderr


def test_command_prints_a_json_line_without_tensorflow(tmp_path):
  # The command line as users run it, in a fresh process: the line has the fields, a profile of one
  # step says where its time went, and neither TensorFlow nor anything else imported it.
  script = ('import runpy, sys\n'
            'try:\n'
            '  runpy.run_path("scripts/benchmark.py", run_name="__main__")\n'
            'except SystemExit as e:\n'
            '  assert not e.code, e.code\n'
            'print("tensorflow imported:", "tensorflow" in sys.modules)\n')
  argv = ['--config=configs/bn_x30.py', '--batch_size=8', '--image_size=32', '--width=0.125',
          '--steps=1', '--warmup_steps=0', '--config.model.bn_group_size=8',
          f'--profile={tmp_path}']
  env = dict(os.environ, XLA_FLAGS=xla_flags(devices=1))
  command = subprocess.run([sys.executable, '-c', script, *argv], cwd=REPO,
                           env=env, capture_output=True, text=True, timeout=300)
  assert command.returncode == 0, command.stderr[-3000:]
  lines = command.stdout.strip().splitlines()
  assert lines[-1] == 'tensorflow imported: False'
  result = json.loads(lines[-2])
  for field in FIELDS:
    assert field in result, field
  assert result['mode'] == 'train' and result['config'] == 'configs/bn_x30.py'
  assert (result['batch_size'], result['image_size'], result['dtype']) == (8, 32, 'float32')
  assert result['img_per_s'] > 0 and result['compile_s'] > 0
  assert result['mfu'] is None and result['peak_memory_bytes'] is None  # CPU: no peak, no stats
  # XLA's count of the step agrees with ours (it adds BN and the optimiser, drops the padding).
  model_flops = result['model_flops_per_image'] * result['batch_size']
  assert 0.7 < result['flops_per_step'] / model_flops < 1.3
  assert result['profile_ms_by_category'].get('convolution', 0) > 0


def test_eval_mode():
  result = benchmark.run(tiny_config(), mode='eval', steps=1, warmup_steps=0)
  for field in FIELDS:
    assert field in result, field
  assert result['mode'] == 'eval' and result['num_devices'] == jax.device_count()
  assert result['img_per_s'] > 0
  # One forward pass: a third of training's FLOPs per image.
  model = models.from_config(tiny_config().model)
  assert result['model_flops_per_image'] == 2 * benchmark.count_macs(model, 32)


def test_input_mode():
  config = bn_x30.get_config('digits')
  config.batch_size = 8
  result = benchmark.run(config, mode='input', steps=2, warmup_steps=1)
  assert result['dataset'] == 'digits' and result['img_per_s'] > 0
  assert result['img_per_s_per_core'] == pytest.approx(result['img_per_s'] / result['cpu_cores'])


def test_torch_peer():
  optional_deps.load()
  config = tiny_config(width=1.0, like_port=True, batch_size=2)
  assert benchmark.same_as_port(config.model)
  result = benchmark.run_torch(config, steps=1, warmup_steps=0)
  assert result['torch_img_per_s'] > 0 and result['torch_compile'] is False  # CPU: eager
  with pytest.raises(ValueError, match='width 1 only'):
    benchmark.run(tiny_config(), peer='torch')


def test_bfloat16_convolutions_with_float32_statistics():
  # Every convolution of the lowered training step computes in bfloat16; BN statistics in float32.
  config = tiny_config(dtype='bfloat16')
  model = models.from_config(config.model)
  variables = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jax.numpy.zeros((8, 32, 32, 3)), train=False))
  text = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])).lower(
      variables, jax.ShapeDtypeStruct((8, 32, 32, 3), jax.numpy.float32)).as_text()
  convolutions = re.findall(r'stablehlo.convolution.*', text)
  assert convolutions and all('bf16' in c and 'f32' not in c for c in convolutions)
  assert re.search(r'stablehlo.reduce.*f32', text)


def test_mfu_arithmetic():
  # The numbers: 12.2 GFLOP per training image at 224 (3 x 2 x 2.03 G multiply-adds) makes
  # one H100 SXM's bf16 peak worth ~81k img/s, and 12,000 img/s about 15% MFU.
  model = models.BNInception(separable_stem=False)
  per_image = benchmark.model_flops_per_image(model, 224, 'train')
  assert per_image == pytest.approx(12.2e9, rel=0.01)
  peak = benchmark.peak_flops('NVIDIA H100 80GB HBM3', 'bfloat16')
  assert peak == 989.4e12
  assert peak / per_image == pytest.approx(81_000, rel=0.01)
  assert benchmark.mfu(12_000 * per_image, 1.0, peak) == pytest.approx(0.148, abs=0.001)
  assert benchmark.mfu(256 * per_image, 0.0256, peak) == benchmark.mfu(10_000 * per_image, 1, peak)
  assert benchmark.peak_flops('NVIDIA H100 PCIe', 'float32') == 378e12
  assert benchmark.peak_flops('cpu', 'float32') is None
  assert benchmark.mfu(1e9, 1.0, None) is None and benchmark.mfu(None, 1.0, peak) is None


@pytest.mark.parametrize('separable_stem, channels, paper_gmacs', [
    (False, 'paper', 2.03), (True, 'paper', 1.95), (False, 'slim', 2.02), (True, 'slim', 1.93)])
def test_multiply_adds_match_paper_md(separable_stem, channels, paper_gmacs):
  # paper.md section 1.5 counts the multiply-adds at 224 x 224 by hand from Figure 5's shapes and
  # prints them rounded to 0.01 G: our count must round to the same, which tells the 608- and
  # 576-channel networks (0.01 G apart) and the two stems (0.08 G) apart.
  model = models.BNInception(separable_stem=separable_stem, channels=channels)
  assert benchmark.count_macs(model, 224) / 1e9 == pytest.approx(paper_gmacs, abs=0.005)


HLO = '''
%fused_conv (p0: f32[1,4,4,2], p1: f32[1,1,2,2]) -> f32[1,4,4,2] {
  %p0 = f32[1,4,4,2]{3,2,1,0} parameter(0)
  %p1 = f32[1,1,2,2]{3,2,1,0} parameter(1)
  ROOT %conv.1 = f32[1,4,4,2]{3,2,1,0} convolution(%p0, %p1), window={size=1x1}, dim_labels=b01f_01io->b01f
}

%fused_convert (p0: bf16[1,4,4,2]) -> f32[1,4,4,2] {
  %p0 = bf16[1,4,4,2]{3,2,1,0} parameter(0)
  ROOT %convert.1 = f32[1,4,4,2]{3,2,1,0} convert(%p0)
}

%fused_pool (p0: f32[1,4,4,2]) -> f32[1,2,2,2] {
  %p0 = f32[1,4,4,2]{3,2,1,0} parameter(0)
  %c = f32[] constant(-inf)
  ROOT %pool = f32[1,2,2,2]{3,2,1,0} reduce-window(%p0, %c), window={size=1x2x2x1 stride=1x2x2x1}, to_apply=%max
}

ENTRY %main (x: f32[1,4,4,2], w: f32[1,1,2,2]) -> f32[1,4,4,2] {
  %x = f32[1,4,4,2]{3,2,1,0} parameter(0)
  %w = f32[1,1,2,2]{3,2,1,0} parameter(1)
  %ynn_fusion = f32[1,4,4,2]{3,2,1,0} fusion(%x, %w), kind=kCustom, calls=%fused_conv
  %custom-call.2 = (f32[1,4,4,2]{3,2,1,0}, u8[0]{0}) custom-call(%x, %w), custom_call_target="__cudnn$convForward"
  %wrapped_reduce-window = f32[1,2,2,2]{3,2,1,0} fusion(%x), kind=kLoop, calls=%fused_pool
  %all-reduce.3 = f32[2]{0} all-reduce(%w), replica_groups={}, to_apply=%add
  %loop_convert_fusion = f32[1,4,4,2]{3,2,1,0} fusion(%x), kind=kLoop, calls=%fused_convert
  ROOT %copy.4 = f32[1,4,4,2]{3,2,1,0} copy(%x)
}
'''


def test_hlo_categories():
  # Convolutions hide in fusions and custom calls; the profile report needs to see through them.
  categories = benchmark.hlo_categories(HLO)
  assert {name: categories[name] for name in (
      'ynn_fusion', 'custom-call.2', 'wrapped_reduce-window', 'all-reduce.3',
      'loop_convert_fusion', 'copy.4', 'x')} == {
          'ynn_fusion': 'convolution', 'custom-call.2': 'convolution',
          'wrapped_reduce-window': 'pooling', 'all-reduce.3': 'collective',
          'loop_convert_fusion': 'fusion', 'copy.4': 'copy', 'x': 'other'}
