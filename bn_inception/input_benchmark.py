"""The two TFDS loaders (tf.data and Grain) compared on the same data, in img/s per CPU core.

`compare_loaders(config, ...)` prepares the data set once per loader (tf.data reads tfrecord from
config.dataset.data_dir, Grain array_record from the sibling directory `grain_data_dir(...)`, both
from config.dataset.manual_dir) and then times `run_input` in one fresh process per
(cores, loader), interleaved: each child pins itself to its first `cores` CPUs before TensorFlow or
Grain start a thread, so their thread pools are bounded to those cores.

  python -m bn_inception.input_benchmark  # a child: reads its job as JSON on stdin

`run_feed(config, ...)` times the training step fed by the input pipeline (on this host's cores),
against the same step on one batch already on the device (what `benchmark --mode=train` times).
"""

import json
import os
import subprocess
import sys
import time
from typing import Any, Sequence

import ml_collections
import numpy as np

LOADERS = ('tf_data', 'grain')


def grain_data_dir(data_dir: str) -> str:
  """Where the comparison keeps the array_record copy next to the tfrecord one."""
  return data_dir.rstrip('/') + '-array_record'


def loader_config(config: ml_collections.ConfigDict, loader: str) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(config.to_dict())
  config.dataset.loader = loader
  if loader == 'grain' and config.dataset.data_dir:
    config.dataset.data_dir = grain_data_dir(config.dataset.data_dir)
  return config


def _measure(config, loader: str, cores: int, steps: int, warmup_steps: int) -> dict[str, Any]:
  job = {'config': loader_config(config, loader).to_json(), 'cores': cores, 'steps': steps,
         'warmup_steps': warmup_steps}
  child = subprocess.run([sys.executable, '-m', 'bn_inception.input_benchmark'],
                         input=json.dumps(job), capture_output=True, text=True, check=False)
  if child.returncode:
    raise RuntimeError(
        f'The {loader} measurement on {cores} core(s) failed:\n{child.stderr[-3000:]}')
  return json.loads(child.stdout.strip().splitlines()[-1])


def compare_loaders(config, *, steps: int, warmup_steps: int,
                    core_counts: Sequence[int] = (1, 2), rounds: int = 1) -> dict[str, Any]:
  """img/s and img/s per core of both loaders at each core count (the best of `rounds`
  interleaved rounds), with the ratio grain / tf_data."""
  from bn_inception import input_pipeline  # pylint: disable=g-import-not-at-top
  available = len(os.sched_getaffinity(0))
  if max(core_counts) > available:
    raise ValueError(f'{max(core_counts)} cores asked for, {available} available.')
  for loader in LOADERS:  # prepare once, here, not in a timed child
    input_pipeline.get_info(loader_config(config, loader).dataset)
  best = {}
  for _ in range(rounds):
    for cores in core_counts:
      for loader in LOADERS:
        result = _measure(config, loader, cores, steps, warmup_steps)
        key = f'{loader}_{cores}core'
        if result['img_per_s'] > best.get(key, {}).get('img_per_s', 0):
          best[key] = result
  out = {'dataset': config.dataset.name, 'rounds': rounds}
  for cores in core_counts:
    for loader in LOADERS:
      result = best[f'{loader}_{cores}core']
      out[f'{loader}_{cores}core_img_per_s'] = result['img_per_s']
      out[f'{loader}_{cores}core_img_per_s_per_core'] = result['img_per_s_per_core']
    out[f'grain_vs_tf_data_{cores}core'] = (best[f'grain_{cores}core']['img_per_s'] /
                                           best[f'tf_data_{cores}core']['img_per_s'])
  return out


def run_input(config, *, steps: int, warmup_steps: int) -> dict[str, Any]:
  """Host-side img/s of the training input pipeline (decode, crop, flip, batch), per CPU core
  this process may use (restrict them with taskset to measure scaling)."""
  # Here only: for TFDS data sets the pipeline imports TensorFlow.
  from bn_inception import input_pipeline  # pylint: disable=g-import-not-at-top
  cores = len(os.sched_getaffinity(0))
  start = time.perf_counter()
  batches = input_pipeline.train_batches(config.dataset, local_batch_size=config.batch_size,
                                         seed=config.seed)
  next(batches)
  startup_s = time.perf_counter() - start
  for _ in range(warmup_steps):
    next(batches)
  start = time.perf_counter()
  for _ in range(steps):
    batch = next(batches)
  np.asarray(batch['image'])
  step_s = (time.perf_counter() - start) / steps
  img_per_s = config.batch_size / step_s
  return {
      'dataset': config.dataset.name,
      'img_per_s': img_per_s,
      'img_per_s_per_core': img_per_s / cores,
      'step_ms': step_s * 1e3,
      'startup_s': startup_s,
      'compile_s': None,
      'mfu': None,
      'peak_memory_bytes': None,
  }


def run_feed(config, *, steps: int, warmup_steps: int) -> dict[str, Any]:
  """img/s of the training step fed by the input pipeline, and of the same compiled step on one
  fed batch again and again (no input: the device's own speed), on every device of the host."""
  # Here only: the benchmark's other modes build no input pipeline.
  # pylint: disable=g-import-not-at-top
  import jax
  from bn_inception import input_pipeline
  from bn_inception import train
  mesh = train.make_mesh()
  train.check_batch(config.batch_size, config.model.bn_group_size, mesh)
  info = input_pipeline.get_info(config.dataset)
  program = train.setup(config, info.num_train_examples, mesh)
  start = time.perf_counter()
  batches = train.global_batches(input_pipeline.train_batches(
      config.dataset, local_batch_size=config.batch_size // jax.process_count(),
      seed=config.seed), mesh, ('image', 'label'))
  first, _ = next(batches)
  startup_s = time.perf_counter() - start
  start = time.perf_counter()
  step = program.train_step.lower(program.abstract_state, first, program.hyperparameters).compile()
  compile_s = time.perf_counter() - start
  state = program.init()

  def timed(next_batch, count):
    nonlocal state
    start = time.perf_counter()
    for _ in range(count):
      state, _ = step(state, next_batch(), program.hyperparameters)
    jax.block_until_ready(state)
    return time.perf_counter() - start

  timed(lambda: next(batches)[0], warmup_steps)
  fed_s = timed(lambda: next(batches)[0], steps)
  device_s = timed(lambda: first, steps)
  return {
      'dataset': config.dataset.name,
      'loader': config.dataset.loader,
      'img_per_s': config.batch_size * steps / fed_s,
      'step_ms': fed_s / steps * 1e3,
      'device_only_img_per_s': config.batch_size * steps / device_s,
      'fed_vs_device_only': device_s / fed_s,
      'host_cores': len(os.sched_getaffinity(0)),
      'distortion_strength': input_pipeline.distortion_strength(config.dataset),
      'startup_s': startup_s,
      'compile_s': compile_s,
      'mfu': None,
      'peak_memory_bytes': (jax.devices()[0].memory_stats() or {}).get('peak_bytes_in_use'),
  }


def _child():
  job = json.loads(sys.stdin.read())
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:job['cores']])  # before any thread
  config = ml_collections.ConfigDict(json.loads(job['config']))
  print(json.dumps(run_input(config, steps=job['steps'], warmup_steps=job['warmup_steps'])))


if __name__ == '__main__':
  _child()
