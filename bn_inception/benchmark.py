"""Throughput, MFU, compile time and memory of the training step, against the PyTorch port.

`run(config, mode=...)` returns one flat dict (the command line, scripts/benchmark.py, prints it as a
JSON line):

  * 'train': train.py's own training step (`train.train_step`, `create_train_state`, SGD on
    `learning_rate_schedule`), jitted as `train.train_and_evaluate` jits it: a mesh over all devices,
    the batch sharded, the state replicated and donated. The batch is synthetic and lives on the
    device, so nothing but the step is timed.
  * 'eval': `train.eval_step` (one centre crop) on the training state's population statistics.
  * 'input': the host input pipeline alone (`input_pipeline.train_batches`), in img/s per CPU core;
    for TFDS data sets both loaders (tf.data, Grain) at 1 and 2 cores (`input_benchmark`).
  * 'feed': the training step fed by the input pipeline from config's data set, against the same
    step on one batch already on the device (`input_benchmark.run_feed`).
  * 'decode': the TensorFlow-free JPEG decoders on one core (`decode_benchmark`), on the JPEGs of
    config.dataset.manual_dir's training archive; `steps` images.

`peer='torch'` also times the same network in PyTorch: the `pretrainedmodels` port (the Caffe-trained
BN-Inception's network), channels-last, bf16 autocast, `torch.compile` on CUDA, SGD with momentum.
Our side should then be the port's architecture (`like_port`, see `benchmark_config`).

Outside modes 'input' and 'feed' no data set is read and TensorFlow is not imported
(tests/test_benchmark.py).
"""

import datetime
import functools
import glob
import os
import platform
import re
import time
from typing import Any, Optional

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import ml_collections
import numpy as np

from bn_inception import config_checks
from bn_inception import convert
from bn_inception import decode_benchmark
from bn_inception import errors
from bn_inception import input_benchmark
from bn_inception import input_pipeline
from bn_inception import train

MODES = ('train', 'eval', 'input', 'decode', 'feed')
PEERS = ('torch',)

# Dense (no sparsity) peak FLOP/s of one device, by a substring of its lower-cased device_kind (first
# match wins), from the vendors' datasheets, which print the tensor-core figures "with sparsity",
# i.e. twice these: NVIDIA H100 (SXM: bf16 1,979 / tf32 989 TFLOPS; PCIe: 1,513 / 756; NVL: 1,671 /
# 835), H200 (SXM as H100 SXM; NVL as H100 NVL), A100 (bf16 312 and tf32 156 dense). 'float32' is the
# TF32 tensor-core peak, on the assumption that XLA runs float32 convolutions in TF32 at JAX's default
# precision (unverified: no GPU yet). Unknown devices (CPUs included) have no peak, and no MFU.
PEAK_FLOPS = (
    ('h100 pcie', {'bfloat16': 756e12, 'float32': 378e12}),
    ('h100 nvl', {'bfloat16': 835.5e12, 'float32': 417.5e12}),
    ('h200 nvl', {'bfloat16': 835.5e12, 'float32': 417.5e12}),
    ('h100', {'bfloat16': 989.4e12, 'float32': 494.7e12}),
    ('h200', {'bfloat16': 989.4e12, 'float32': 494.7e12}),
    ('a100', {'bfloat16': 312e12, 'float32': 156e12}),
)


# ------------------------------------------------------------------------------------------------
# FLOPs and MFU.
# ------------------------------------------------------------------------------------------------
def peak_flops(device_kind: str, dtype: str) -> Optional[float]:
  """The device's dense peak FLOP/s for compute in `dtype`; None when unknown."""
  dtype = 'bfloat16' if dtype == 'float16' else dtype  # same tensor-core rate
  for name, peaks in PEAK_FLOPS:
    if name in device_kind.lower():
      return peaks.get(dtype)
  return None


def mfu(flops_per_step: Optional[float], step_seconds: float,
        peak: Optional[float]) -> Optional[float]:
  """Model FLOPs utilisation: achieved FLOP/s over the peak; None without a FLOP count or peak."""
  if not flops_per_step or not peak:
    return None
  return flops_per_step / step_seconds / peak


def count_macs(model: nn.Module, image_size: int) -> int:
  """Multiply-adds of one image's forward pass through every convolution and dense layer.

  Counted from the shapes the layers see when the model is traced (no computation), as paper.md's
  appendix counts them: output positions x output channels x kernel area x input channels per group.
  Pooling, BN and nonlinearities are not counted.
  """
  macs = 0

  def count(next_fun, args, kwargs, context):
    nonlocal macs
    out = next_fun(*args, **kwargs)
    layer = context.module
    if context.method_name == '__call__' and isinstance(layer, (nn.Conv, nn.Dense)):
      inputs = args[0].shape[-1]
      if isinstance(layer, nn.Conv):
        inputs = inputs // layer.feature_group_count * int(np.prod(layer.kernel_size))
      macs += int(np.prod(out.shape)) * inputs
    return out

  with nn.intercept_methods(count):
    jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, image_size, image_size, 3)), train=False))
  return macs


def model_flops_per_image(model: nn.Module, image_size: int, mode: str) -> float:
  """2 FLOPs per multiply-add; training is forward + backward (gradients of inputs and weights),
  3x the forward, the usual convention for MFU."""
  return (3 if mode == 'train' else 1) * 2 * count_macs(model, image_size)


def compiled_flops(compiled) -> Optional[float]:
  """XLA's FLOP count of one execution of a compiled step, on one device; None if not reported."""
  costs = compiled.cost_analysis()
  if isinstance(costs, (list, tuple)):  # one dict per module in some JAX versions
    costs = costs[0] if costs else None
  flops = (costs or {}).get('flops')
  return float(flops) if flops and flops > 0 else None


# ------------------------------------------------------------------------------------------------
# Configuration.
# ------------------------------------------------------------------------------------------------
def benchmark_config(config: ml_collections.ConfigDict, *, batch_size: Optional[int] = None,
                     image_size: Optional[int] = None, dtype: Optional[str] = None,
                     width: Optional[float] = None,
                     like_port: bool = False) -> ml_collections.ConfigDict:
  """A copy of `config` with the benchmark's overrides.

  `like_port` gives the network the port's architecture (`convert.CAFFE_MODEL`: plain 7x7 stem,
  Figure 5's columns, a bias on every convolution, Caffe's symmetric padding, no LRN or dropout), so
  that a comparison with the PyTorch peer is like for like. BN groups stay the config's: they are how
  we train, and cost the same arithmetic as the port's whole-batch statistics.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  if batch_size is not None:
    config.batch_size = batch_size
  if image_size is not None:
    config.dataset.image_size = image_size
  if dtype is not None:
    config.model.dtype = dtype
  if width is not None:
    config.model.width = width
  if like_port:
    config.model.update(convert.CAFFE_MODEL)
  return config


def same_as_port(model_config) -> bool:
  return model_config.width == 1 and all(
      model_config[k] == v for k, v in convert.CAFFE_MODEL.items())


# ------------------------------------------------------------------------------------------------
# The benchmark.
# ------------------------------------------------------------------------------------------------
def run(config: ml_collections.ConfigDict, *, mode: str = 'train', steps: int = 20,
        warmup_steps: int = 3, peer: Optional[str] = None, torch_compile: Optional[bool] = None,
        profile_dir: Optional[str] = None) -> dict[str, Any]:
  """Times `steps` steps of `mode` after compilation and `warmup_steps`; returns the numbers."""
  config_checks.check(config)
  if mode not in MODES:
    raise ValueError(f'Unknown mode {mode!r}; valid: {list(MODES)}.')
  if peer not in (None,) + PEERS:
    raise ValueError(f'Unknown peer {peer!r}; valid: {list(PEERS)}.')
  if peer and mode != 'train':
    raise ValueError('The PyTorch peer times training steps only: use mode="train".')
  if mode == 'decode':
    if not config.dataset.manual_dir:
      raise errors.ConfigError('--mode=decode reads ImageNet-layout archives: give '
                               '--config.dataset.manual_dir (scripts/make_photo_imagenet.py).')
    return {**describe(config, mode, steps, warmup_steps),
            **decode_benchmark.run_decode(config.dataset.manual_dir, num_images=steps,
                                          image_size=config.dataset.image_size)}
  if mode == 'feed':
    return {**describe(config, mode, steps, warmup_steps),
            **input_benchmark.run_feed(config, steps=steps, warmup_steps=warmup_steps)}
  if mode == 'input':
    if input_pipeline.DATASETS.get(config.dataset.name, input_pipeline.TFDS) is input_pipeline.TFDS:
      measured = input_benchmark.compare_loaders(config, steps=steps, warmup_steps=warmup_steps,
                                                 rounds=3)  # the best of 3: a busy neighbour
    else:  # one loader only
      measured = input_benchmark.run_input(config, steps=steps, warmup_steps=warmup_steps)
    return {**describe(config, mode, steps, warmup_steps), **measured}

  peer_result = {}
  if peer == 'torch':
    if config.model.width != 1:
      raise ValueError(f'The PyTorch port has width 1 only, not model.width={config.model.width}.')
    if not same_as_port(config.model):
      logging.warning('The peer runs the port\'s architecture but ours differs from it (%s): the '
                      'ratio compares different networks. Use like_port.', convert.CAFFE_MODEL)
    # First, before JAX starts: JAX's allocator keeps the GPU memory it takes, torch's gives it back.
    peer_result = run_torch(config, steps=steps, warmup_steps=warmup_steps,
                            torch_compile=torch_compile)
    peer_result['peer_same_architecture'] = same_as_port(config.model)

  result = describe(config, mode, steps, warmup_steps)  # JAX starts here
  result.update(run_jax(config, mode=mode, steps=steps, warmup_steps=warmup_steps,
                        profile_dir=profile_dir))
  if peer_result:
    result.update(peer_result)
    result['speedup_vs_torch'] = result['img_per_s'] / peer_result['torch_img_per_s']
  return result


def describe(config, mode: str, steps: int, warmup_steps: int) -> dict[str, Any]:
  """What was measured, where and with which software."""
  device = jax.devices()[0]
  kind = device.device_kind
  if device.platform == 'cpu':
    kind = f'cpu: {cpu_model()}'
  return {
      'mode': mode,
      'device': kind,
      'num_devices': jax.device_count(),
      'cpu_cores': len(os.sched_getaffinity(0)),
      'jax_version': jax.__version__,
      'jaxlib_version': jaxlib.__version__,
      'flax_version': flax.__version__,
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'date': datetime.date.today().isoformat(),
      'batch_size': config.batch_size,
      'image_size': config.dataset.image_size,
      'dtype': config.model.dtype,
      'width': config.model.width,
      'steps': steps,
      'warmup_steps': warmup_steps,
  }


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def run_jax(config, *, mode: str, steps: int, warmup_steps: int,
            profile_dir: Optional[str]) -> dict[str, Any]:
  # --- Model, state and steps as train.train_and_evaluate builds them ------------------------
  mesh = train.make_mesh()
  train.check_batch(config.batch_size, config.model.bn_group_size, mesh)
  train.check_memory(config, config.batch_size, mesh, training=mode == 'train')
  program = train.setup(config, input_pipeline.SYNTHETIC_INFO.num_train_examples, mesh)
  state = program.init()
  if mode == 'train':
    jitted, carry, args = program.train_step, state, (program.hyperparameters,)
  else:
    jitted, carry, args = program.eval_step, train.eval_variables(state), ()
  batch = synthetic_batch(config, mesh, crops=mode == 'eval')

  # --- Compile once, warm up, time -----------------------------------------------------------
  start = time.perf_counter()
  compiled = jitted.lower(carry, batch, *args).compile()
  compile_s = time.perf_counter() - start
  train.wait_for_all_processes('compiled')
  if mode == 'train':
    step_fn = lambda state, batch: compiled(state, batch, *args)
  else:  # the same variables every step
    step_fn = lambda variables, batch: (variables, compiled(variables, batch))
  carry = time_steps(step_fn, carry, batch, warmup_steps)[0]
  carry, seconds = time_steps(step_fn, carry, batch, steps)
  step_s = seconds / steps

  profile = {}
  if profile_dir:
    with jax.profiler.trace(profile_dir):
      carry = time_steps(step_fn, carry, batch, 1)[0]
    hlo_text = compiled.as_text()
    with open(os.path.join(profile_dir, 'step.hlo.txt'), 'w') as f:  # fusions, layouts, kernels
      f.write(hlo_text)
    profile = {'profile_dir': profile_dir, **profile_breakdown(profile_dir, hlo_text)}

  # --- FLOPs, MFU and memory -----------------------------------------------------------------
  device = jax.devices()[0]
  peak = peak_flops(device.device_kind, config.model.dtype)
  devices = mesh.devices.size
  flops = compiled_flops(compiled)
  per_image = model_flops_per_image(program.model, config.dataset.image_size, mode)
  memory = device.memory_stats() or {}
  return {
      'img_per_s': config.batch_size / step_s,
      'step_ms': step_s * 1e3,
      'compile_s': compile_s,
      'flops_per_step': flops * devices if flops else None,  # XLA's count, all devices
      'model_flops_per_image': per_image,  # count_macs: 2 x (3 x for training) multiply-adds
      'peak_flops': peak * devices if peak else None,
      'mfu': mfu(flops, step_s, peak),  # XLA's count of the compiled step
      'mfu_model': mfu(per_image * config.batch_size / devices, step_s, peak),
      'peak_memory_bytes': memory.get('peak_bytes_in_use'),
      'temp_memory_bytes': compiled_temp_bytes(compiled),
      'architecture': {k: config.model[k] for k in (
          'separable_stem', 'channels', 'conv_bias', 'symmetric_padding', 'lrn', 'dropout_rate',
          'bn_group_size')},
      **profile,
  }


def synthetic_batch(config, mesh, crops: bool) -> dict[str, jax.Array]:
  """Random images and labels, made on the devices and sharded over 'data' as
  `train.global_batches` shards real ones: uint8 pixels for training (the TFDS loaders' training
  crops, which the step distorts), float32 in [-1, 1] for evaluation ([B, 1, H, W, 3])."""
  b, s = config.batch_size, config.dataset.image_size
  shape = (b, 1, s, s, 3) if crops else (b, s, s, 3)
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))

  @functools.partial(jax.jit, out_shardings=sharding)
  def make(key):
    image_key, label_key = jax.random.split(key)
    image = (jax.random.uniform(image_key, shape, jnp.float32, -1, 1) if crops else
             jax.random.randint(image_key, shape, 0, 256).astype(jnp.uint8))
    batch = {'image': image,
             'label': jax.random.randint(label_key, (b,), 0, config.model.num_classes)}
    if crops:
      batch['mask'] = jnp.ones((b,), bool)
    return batch

  return make(jax.random.key(config.seed))


def time_steps(step_fn, carry, batch, steps: int):
  """Runs `steps` steps back to back, each dispatched without waiting on the host, and waits for
  all of them at the end. Returns the final carry and the seconds taken."""
  start = time.perf_counter()
  outputs = []
  for _ in range(steps):
    carry, out = step_fn(carry, batch)
    outputs.append(out)  # eval's steps do not depend on one another: wait for each of them
  jax.block_until_ready((carry, outputs))
  return carry, time.perf_counter() - start


def compiled_temp_bytes(compiled) -> Optional[int]:
  """XLA's scratch memory for one step (activations kept for the backward pass, mostly)."""
  try:
    return int(compiled.memory_analysis().temp_size_in_bytes)
  except (AttributeError, NotImplementedError):
    return None


# ------------------------------------------------------------------------------------------------
# Where the time goes.
# ------------------------------------------------------------------------------------------------
# What each instruction of the compiled step is, by its opcode and, for fusions and custom calls,
# what they compute: XLA's CPU and GPU backends wrap convolutions in fusions (YNNPACK, cuDNN) and
# custom calls (cuDNN, cuBLAS), which their names do not tell. First match wins.
_COLLECTIVES = re.compile(r'^(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)')
_CONVOLUTION_OPS = ('convolution', 'dot')
_CONVOLUTION_TARGETS = re.compile(r'conv|gemm|cublas|matmul', re.I)  # __cudnn$convForward, ...
_POOLING = re.compile(r'^(reduce-window|select-and-scatter)$')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) .*\{$')
_INSTRUCTION = re.compile(r'^\s+(?:ROOT )?%?([\w.\-]+) = .*?\b([a-z][a-z0-9\-]*)\(')
_CALLS = re.compile(r'(?:calls|to_apply|body|condition)=%?([\w.\-]+)')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
# Kernel names of a GPU trace without HLO names: cuDNN/cuBLAS/CUTLASS kernels, NCCL.
_KERNELS = (('collective', re.compile(r'nccl', re.I)),
            ('convolution', re.compile(r'conv(?!ert)|xmma|cudnn|fprop|dgrad|wgrad|gemm|cutlass',
                                       re.I)),
            ('fusion', re.compile(r'fusion|triton', re.I)))


def hlo_categories(hlo_text: str) -> dict[str, str]:
  """Instruction name -> 'collective', 'convolution' (matmuls too), 'pooling' (reduce-window and
  its gradient, select-and-scatter), 'fusion' (XLA's own: BN, ReLU, the optimiser...), 'copy' or
  'other', for every instruction of a compiled module's text (`compiled.as_text()`)."""
  contents: dict[str, list[str]] = {}  # computation -> what its instructions are or call
  instructions: dict[str, list[str]] = {}  # instruction -> its opcode, target and callees
  computation = None
  for line in hlo_text.splitlines():
    if match := _COMPUTATION.match(line):
      computation = match.group(1)
      contents[computation] = []
    elif computation and (match := _INSTRUCTION.match(line)):
      name, opcode = match.groups()
      what = ([opcode] + ['$' + t for t in _TARGET.findall(line)] +
              ['@' + c for c in _CALLS.findall(line)])
      instructions[name] = what
      contents[computation] += what

  def kinds(what, seen=()):  # opcodes and $targets, through called computations
    for item in what:
      if item.startswith('@'):
        if item[1:] not in seen:
          yield from kinds(contents.get(item[1:], []), seen + (item[1:],))
      else:
        yield item

  def category(what):
    found = list(kinds(what))
    if any(_COLLECTIVES.match(k) for k in found):
      return 'collective'
    if any(k in _CONVOLUTION_OPS or k.startswith('$') and _CONVOLUTION_TARGETS.search(k)
           for k in found):
      return 'convolution'
    if any(_POOLING.match(k) for k in found):
      return 'pooling'
    if what[0] == 'fusion':
      return 'fusion'
    if what[0] in ('copy', 'transpose', 'copy-start', 'copy-done'):
      return 'copy'
    return 'other'

  return {name: category(what) for name, what in instructions.items()}


def profile_breakdown(profile_dir: str, hlo_text: str, top: int = 10) -> dict[str, Any]:
  """Milliseconds per category of op (`hlo_categories`), and the costliest ops, in the newest trace
  in `profile_dir` of the module `hlo_text`.

  Reads the device planes (GPU/TPU: the XLA ops line when the trace has one, else the streams'
  kernels, named by their 'hlo_op' or, failing that, by kernel name) or, on CPU, the executor
  threads, whose times add up over threads. A first look; TensorBoard's profile plugin or Perfetto
  open the same trace in full.
  """
  paths = glob.glob(os.path.join(profile_dir, 'plugins', 'profile', '*', '*.xplane.pb'))
  if not paths:
    return {}
  categories = hlo_categories(hlo_text)
  data = jax.profiler.ProfileData.from_file(max(paths, key=os.path.getmtime))
  planes = [p for p in data.planes if p.name.startswith('/device:')]
  if planes:
    lines = [line for p in planes for line in p.lines]
    lines = ([line for line in lines if line.name == 'XLA Ops'] or
             [line for line in lines if line.name.startswith('Stream')] or lines)
  else:
    lines = [line for p in data.planes if p.name == '/host:CPU' for line in p.lines]
  by_op: dict[str, list] = {}  # name -> [category, ms]
  for line in lines:
    for event in line.events:
      name = str(dict(event.stats).get('hlo_op') or event.name)
      category = categories.get(name)
      if category is None:
        if not planes:
          continue  # host-side work around the ops: dispatch, waits, Python
        category = next((c for c, pattern in _KERNELS if pattern.search(name)), 'other')
      by_op.setdefault(name, [category, 0.0])[1] += event.duration_ns / 1e6
  by_category: dict[str, float] = {}
  for category, ms in by_op.values():
    by_category[category] = by_category.get(category, 0.0) + ms
  costliest = sorted(by_op.items(), key=lambda item: -item[1][1])[:top]
  return {'profile_ms_by_category': by_category,
          'profile_top_ops_ms': [[name, category, ms] for name, (category, ms) in costliest]}


# ------------------------------------------------------------------------------------------------
# The PyTorch peer.
# ------------------------------------------------------------------------------------------------
def run_torch(config, *, steps: int, warmup_steps: int,
              torch_compile: Optional[bool] = None) -> dict[str, Any]:
  """The port's BN-Inception trained on synthetic data: channels-last, bf16 autocast when
  config.model.dtype is bfloat16, `torch.compile` (default: on CUDA only), fused SGD with momentum."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
  cuda = device.type == 'cuda'
  torch_compile = cuda if torch_compile is None else torch_compile
  if cuda:
    torch.backends.cudnn.benchmark = True  # the fastest convolution algorithms, as XLA autotunes
    torch.set_float32_matmul_precision('high')  # TF32 matmuls, like its (and XLA's) convolutions
  b, s = config.batch_size, config.dataset.image_size
  torch.manual_seed(config.seed)
  net = convert.load_port_module().BNInception(num_classes=config.model.num_classes)
  if s != 224:  # its global pool is a fixed 7 x 7 window, for 224 x 224 inputs only
    net.global_pool = torch.nn.AdaptiveAvgPool2d(1)
  net = net.to(device, memory_format=torch.channels_last).train()
  optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=config.momentum,
                              nesterov=config.nesterov, weight_decay=config.weight_decay,
                              fused=cuda or None)
  forward = torch.compile(net) if torch_compile else net
  images = (torch.rand(b, 3, s, s, device=device) * 2 - 1).contiguous(
      memory_format=torch.channels_last)
  labels = torch.randint(0, config.model.num_classes, (b,), device=device)
  autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                            enabled=config.model.dtype == 'bfloat16')
  synchronize = torch.cuda.synchronize if cuda else (lambda: None)

  def step():
    with autocast:
      loss = F.cross_entropy(forward(images), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss

  def timed(n):
    start = time.perf_counter()
    for _ in range(n):
      step()
    synchronize()
    return time.perf_counter() - start

  if cuda:
    torch.cuda.reset_peak_memory_stats()
  first_s = timed(1)  # with torch.compile: compiles the forward and backward graphs
  timed(warmup_steps)
  step_s = timed(steps) / steps
  result = {
      'torch_version': torch.__version__,
      'torch_device': torch.cuda.get_device_name() if cuda else f'cpu: {cpu_model()}',
      'torch_compile': torch_compile,
      'torch_img_per_s': b / step_s,
      'torch_step_ms': step_s * 1e3,
      'torch_compile_s': first_s if torch_compile else None,
      'torch_peak_memory_bytes': torch.cuda.max_memory_allocated() if cuda else None,
  }
  del net, forward, optimizer, images, labels
  if cuda:
    torch.cuda.empty_cache()  # the memory goes back to the driver, for JAX
  return result


