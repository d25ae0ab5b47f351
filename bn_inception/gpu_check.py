"""The GPU check: every measurement that needs a GPU (speed against the PyTorch port, profiles,
precision, the opt-in changes and XLA flags), prepared to run in one call.

  python3 scripts/gpu_check.py --out=$OUT               # on the GPU machine, from the repo's root
  python scripts/gpu_check.py --out=/tmp/smoke --smoke  # the same steps at a tiny size, on a CPU

`plan()` lists the steps in order of value: training at batch 256 against the PyTorch port and a
profile of that step, batches 128 and 512, the config's own network, evaluation, the
bfloat16-vs-float32 training check, the opt-in changes to the step and the XLA flags (each against
the plain run of the same call), and the PyTorch port at batches 128 and 512. `run()` runs each step
in a process of its own (a crash, an out-of-memory or a time-out loses that step alone) under the
step's time limit and the call's budget, and appends one JSON line per step to OUT/results.jsonl as
soon as the step ends, so that a call cut short still returns everything done so far. Every line
names the step, its command, its status and wall time, and the machine (GPU, driver, package
versions); the step's own JSON line is its 'result'.
Steps that the budget leaves out are listed at the end with the command that runs them.

Files in OUT (the device tool returns at most 8): results.jsonl, gpu_check.log (the end of every
step's stderr), nvidia-smi.txt, profile_b256.tar.gz (the profiled step's trace and optimised HLO).

This module imports neither JAX nor torch: the driver must leave the GPU's memory to its steps.
"""

import dataclasses
import glob
import importlib.metadata
import importlib.util
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from typing import Any, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What the GPU machine's image lacks (the device README's KINDS.md) and the steps import, carried as
# wheels in .whl/ (scripts/gpu_wheels.txt, `make gpu-wheels`).
CARRIED_MODULES = ('ml_collections', 'tensorboardX', 'pretrainedmodels', 'grain', 'simplejpeg',
                   'tensorflow_datasets', 'array_record')
PACKAGES = ('jax', 'jaxlib', 'jax-cuda13-plugin', 'jax-cuda13-pjrt', 'jax-cuda12-plugin', 'flax',
            'optax', 'orbax-checkpoint', 'ml-collections', 'numpy', 'torch', 'triton',
            'pretrainedmodels', 'tensorboardX', 'scikit-learn', 'grain', 'simplejpeg',
            'tensorflow-datasets', 'array-record')
MIN_STEP_S = 20  # a step is not started with less of the budget left than this
LOG_CHARS = 200_000  # of each step's stderr, kept in OUT/gpu_check.log

# The XLA flags of docs/benchmarks.md, most promising first; each runs against `flags_plain`.
XLA_FLAGS = (
    ('command_buffer_off', '--xla_gpu_enable_command_buffer='),
    ('triton_gemm_off', '--xla_gpu_enable_triton_gemm=false'),
    ('autotune_level_0', '--xla_gpu_autotune_level=0'),
    ('strict_conv_picker_off', '--xla_gpu_strict_conv_algorithm_picker=false'),
    ('latency_hiding_scheduler', '--xla_gpu_enable_latency_hiding_scheduler=true'),
    ('highest_priority_async_stream', '--xla_gpu_enable_highest_priority_async_stream=true'),
)


@dataclasses.dataclass(frozen=True)
class Step:
  name: str
  argv: tuple[str, ...]  # the command after the Python interpreter, run from the repository root
  limit_s: float  # the step's own time limit (the call's budget may cut it shorter)
  archive: Optional[str] = None  # a directory the step writes, returned as OUT/<name>.tar.gz
  needs: Optional[str] = None  # a path prepared beforehand; without it the step is skipped


# The photograph set the feed step trains from, as array_record (`prepare_photos`, on a host with
# TensorFlow: the GPU machine has none); a device call carries it ('.photos', about 25 MB).
PHOTOS = os.path.join(REPO, '.photos')
PHOTOS_TRAIN, PHOTOS_VAL = 500, 10


def prepare_photos(photos: str = PHOTOS, num_train: int = PHOTOS_TRAIN,
                   num_val: int = PHOTOS_VAL) -> None:
  """Writes the photograph set (scripts/make_photo_imagenet.py) and prepares it as array_record in
  photos/data with TFDS's imagenet2012 builder (TensorFlow needed), keeping only that."""
  manual = os.path.join(photos, 'manual')
  subprocess.run([sys.executable, 'scripts/make_photo_imagenet.py', manual,
                  f'--num_train={num_train}', f'--num_val={num_val}'], cwd=REPO, check=True)
  code = ('import sys; from bn_inception import input_pipeline; from configs import default; '
          'c = default.get_config().dataset; '
          'c.update(loader="grain", data_dir=sys.argv[1], manual_dir=sys.argv[2]); '
          'print(input_pipeline.get_info(c))')
  subprocess.run([sys.executable, '-c', code, os.path.join(photos, 'data'), manual], cwd=REPO,
                 check=True, env=dict(os.environ, PYTHONPATH=REPO))
  shutil.rmtree(manual)


# ------------------------------------------------------------------------------------------------
# The steps.
# ------------------------------------------------------------------------------------------------
def plan(smoke: bool = False, scratch: str = '/tmp/gpu_check', photos: str = PHOTOS) -> list[Step]:
  """The steps in order of value. `smoke`: the same commands at a tiny size for a CPU (one batch
  size for all, so that the compiled programs repeat; the first XLA flag only). `photos`: the
  prepared photograph set (`prepare_photos`)."""

  def benchmark(name, limit_s, *args, batch=256, peer=False, port=True, archive=None, steps=50):
    size = (('--batch_size=4', '--image_size=32', '--steps=2', '--warmup_steps=1',
             '--config.model.bn_group_size=4') if smoke else
            (f'--batch_size={batch}', f'--steps={steps}', '--warmup_steps=5'))
    argv = ('scripts/benchmark.py', '--config=configs/bn_x30.py', '--dtype=bfloat16', *size,
            *(('--peer=torch',) if peer else ()), f'--like_port={str(port).lower()}', *args)
    return Step(name, argv, SMOKE_LIMIT_S if smoke else limit_s, archive)

  profile = os.path.join(scratch, 'profile')
  return [
      # Training, the port's architecture, against the port itself at the same batch.
      benchmark('train_b256_torch', 300, batch=256, peer=True),
      # Where that step's time goes (the same program: read from the call's compilation cache).
      benchmark('profile_b256', 60, '--steps=5', f'--profile={profile}', archive=profile),
      # Other batch sizes (the port at these sizes comes last: its compilation is the cost).
      benchmark('train_b128', 120, batch=128),
      benchmark('train_b512', 120, batch=512),
      # The config's own network: the paper's separable stem, 'SAME' padding, no conv biases.
      benchmark('network_b256', 120, port=False),
      # That step fed from photographs by the Grain loader on this host's cores (JPEG decoding,
      # crops, flips; the colour distortions in the step), against it on one batch on the device.
      dataclasses.replace(
          benchmark('feed_grain_b256', 240, '--mode=feed', '--config.dataset.loader=grain',
                    f'--config.dataset.data_dir={os.path.join(photos, "data")}',
                    *(('--width=0.125',) if smoke else ()),  # no peer: compiles in seconds
                    port=False, steps=30), needs=photos),
      # Evaluation, one centre crop (the training step's forward convolutions, autotuned already).
      *(benchmark(f'eval_b{b}', 90, '--mode=eval', batch=b) for b in (256, 128, 512)),
      # bfloat16 training is sound: the loss its runs reach against float32's.
      Step('precision', ('-m', 'bn_inception.precision_check',
                         f'--workdir={os.path.join(scratch, "precision")}',
                         *(PRECISION_SMOKE if smoke else PRECISION_GPU)),
           SMOKE_LIMIT_S if smoke else 300),
      # The plain step again (also the noise: train_b256_torch timed the same program), then the
      # opt-in changes to it (docs/benchmarks.md predicts each) and the XLA flags, each against it
      # (the stem's against network_b256).
      benchmark('flags_plain', 60),
      *(benchmark(name, 120, *args, port=port) for name, port, args in VARIANTS),
      *(benchmark(f'flag_{name}', 120, f'--xla_flags={flag}')
        for name, flag in XLA_FLAGS[:1 if smoke else None]),
      # The port at the other batch sizes (our side is read from the compilation cache).
      benchmark('train_b128_torch', 240, batch=128, peer=True),
      benchmark('train_b512_torch', 240, batch=512, peer=True),
  ]


# Variants of the step, each against a plain run of the same call (docs/benchmarks.md predicts
# each): the model's opt-in switches, largest predicted saving first, the plain stem and whole-batch
# BN. (step, like_port, flags); the stem's run on the config's network, against network_b256.
VARIANTS = (
    ('optin_bn_fused_grad', True, ('--config.model.bn_fused_grad=true',)),
    ('optin_bn_fused_one_pass', True, ('--config.model.bn_fused_grad=true',
                                       '--config.model.bn_one_pass=true')),
    ('optin_bn_one_pass', True, ('--config.model.bn_one_pass=true',)),
    ('optin_fold_stem', False, ('--config.model.fold_stem=true',)),
    ('network_plain_stem', False, ('--config.model.separable_stem=false',)),
    ('bn_whole_batch', True, ('--config.model.bn_group_size=None',)),
)
SMOKE_LIMIT_S = 900  # a step on a (shared, slow) CPU: the smoke run checks that it works, not speed

# The bfloat16 check: configs/bn_x5.py (BN-x30's network at a rate that is stable at batch 64) on
# digits at full width, upscaled to 64 x 64.
PRECISION_GPU = ('--config=configs/bn_x5.py:digits', '--config.model.width=1.0',
                 '--config.dataset.image_size=64', '--config.batch_size=64',
                 '--config.num_train_steps=300', '--config.log_every_steps=10')
PRECISION_SMOKE = ('--config=configs/bn_x5.py:digits', '--config.model.width=0.125',
                   '--config.dataset.image_size=32', '--config.batch_size=32',
                   '--config.num_train_steps=8', '--config.log_every_steps=2')


def select(steps: Sequence[Step], only: Optional[Sequence[str]]) -> list[Step]:
  """The steps named in `only` (all when None), in plan order; unknown names are an error."""
  if not only:
    return list(steps)
  names = [s.name for s in steps]
  unknown = sorted(set(only) - set(names))
  if unknown:
    raise ValueError(f'Unknown steps {unknown}; valid: {names}.')
  return [s for s in steps if s.name in only]


# ------------------------------------------------------------------------------------------------
# The machine.
# ------------------------------------------------------------------------------------------------
def install_wheels(wheel_dir: str, target: str) -> list[str]:
  """Installs the carried wheels into `target` when a module the steps need is missing; returns the
  wheels installed (none when everything is importable already, as on a development machine)."""
  missing = [m for m in CARRIED_MODULES if importlib.util.find_spec(m) is None]
  if not missing:
    return []
  wheels = sorted(glob.glob(os.path.join(wheel_dir, '*.whl')))
  if not wheels:
    raise FileNotFoundError(
        f'{missing} cannot be imported and {wheel_dir} holds no wheels: run `make gpu-wheels` '
        "here and name '.whl' in the device call's carry list.")
  subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-index', '--no-deps',
                  '--no-compile', '--no-cache-dir', '--upgrade', '--target', target, *wheels],
                 check=True)
  return [os.path.basename(w) for w in wheels]


def environment(site: Optional[str] = None) -> dict[str, Any]:
  """GPU, driver, CPU and package versions, without importing JAX or torch."""
  paths = ([site] if site else []) + sys.path
  versions = {}
  for name in PACKAGES:
    found = next(iter(importlib.metadata.distributions(name=name, path=paths)), None)
    if found is not None:
      versions[name] = found.version
  gpu = {}
  try:
    fields = ('name', 'driver_version', 'memory.total', 'clocks.max.sm', 'power.limit')
    line = subprocess.run(
        ['nvidia-smi', f'--query-gpu={",".join(fields)}', '--format=csv,noheader'],
        capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()[0]
    gpu = dict(zip(fields, (v.strip() for v in line.split(','))))
  except (OSError, subprocess.SubprocessError, IndexError):
    pass  # no NVIDIA GPU (a CPU smoke run)
  return {'gpu': gpu.get('name'), 'gpu_details': gpu, 'python': platform.python_version(),
          'cpu': platform.processor() or platform.machine(),
          'cpu_cores': len(os.sched_getaffinity(0)), 'versions': versions}


# ------------------------------------------------------------------------------------------------
# Running the steps.
# ------------------------------------------------------------------------------------------------
def run(steps: Sequence[Step], out_dir: str, *, budget_s: float, scratch: str,
        wheel_dir: str = os.path.join(REPO, '.whl'), stream=None) -> list[dict]:
  """Runs `steps` in order within `budget_s` seconds; one JSON line per step in
  out_dir/results.jsonl, progress and the summary on `stream` (stdout). Returns the records."""
  stream = stream or sys.stdout
  deadline = time.monotonic() + budget_s
  os.makedirs(out_dir, exist_ok=True)
  os.makedirs(scratch, exist_ok=True)
  results_path = os.path.join(out_dir, 'results.jsonl')
  log_path = os.path.join(out_dir, 'gpu_check.log')
  site = os.path.join(scratch, 'site')
  installed = install_wheels(wheel_dir, site)
  env = dict(os.environ, PYTHONUNBUFFERED='1', PYTHONPATH=os.pathsep.join(
      ([site] if installed else []) + [REPO] + os.environ.get('PYTHONPATH', '').split(os.pathsep)))
  # One persistent compilation cache for the call: steps that compile a program another step
  # compiled (the profile, flags_plain, the port's batches) read it, and XLA's convolution
  # autotuning results are shared between steps (JAX keeps them beside the cache).
  cache = os.path.join(scratch, 'jax_cache')
  env.update(JAX_COMPILATION_CACHE_DIR=cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')
  machine = environment(site if installed else None)
  machine['installed_wheels'] = installed
  save_nvidia_smi(os.path.join(out_dir, 'nvidia-smi.txt'))
  records = [{'step': 'environment', 'status': 'ok', **machine}]
  append_json(results_path, records[0])
  brief = {'gpu': machine['gpu'], 'driver': machine['gpu_details'].get('driver_version'),
           'versions': machine['versions']}

  for step in steps:
    remaining = deadline - time.monotonic()
    record = {'step': step.name, 'command': shlex.join(['python3', *step.argv]),
              'limit_s': step.limit_s, 'machine': brief}
    if remaining < MIN_STEP_S:
      record.update(status='skipped', reason=f'{remaining:.0f} s of the budget left')
    elif step.needs and not os.path.exists(step.needs):
      record.update(status='skipped', reason=(
          f'{step.needs} is missing: run python scripts/gpu_check.py --prepare_photos where '
          "TensorFlow is installed, and name '.photos' in the device call's carry list"))
    else:
      before = count_files(cache)
      record.update(run_step(step, min(step.limit_s, remaining), env, log_path))
      record['new_cache_entries'] = count_files(cache) - before  # 0: compiled programs were cached
      if step.archive and os.path.isdir(step.archive):
        with tarfile.open(os.path.join(out_dir, f'{step.name}.tar.gz'), 'w:gz') as t:
          t.add(step.archive, arcname=step.name)
    append_json(results_path, record)
    records.append(record)
    print(f'{step.name}: {record["status"]}'
          f'{" in %.0f s" % record["wall_s"] if "wall_s" in record else ""}', file=stream,
          flush=True)

  print(summary_table(records), file=stream)
  left = [r['step'] for r in records if r['status'] != 'ok' and r['step'] != 'environment']
  if left:
    print(f'\nNot done: {", ".join(left)}. Again: python3 scripts/gpu_check.py --out=$OUT '
          f'--only={",".join(left)}', file=stream)
  return records


def run_step(step: Step, timeout_s: float, env: dict, log_path: str) -> dict[str, Any]:
  """Runs one step in a new process group (killed whole at the time limit, torch.compile's workers
  too); its last stdout line, if JSON, is the result."""
  start = time.monotonic()
  process = subprocess.Popen([sys.executable, *step.argv], cwd=REPO, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             start_new_session=True)
  try:
    stdout, stderr = process.communicate(timeout=timeout_s)
    status = 'ok' if process.returncode == 0 else 'failed'
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signal.SIGKILL)
    stdout, stderr = process.communicate()
    status = 'timeout'
  wall_s = time.monotonic() - start
  with open(log_path, 'a') as log:  # the end of each step's log: what failed is there
    log.write(f'===== {step.name} ({status}, {wall_s:.0f} s): {shlex.join(step.argv)}\n'
              f'{stderr[-LOG_CHARS:]}\n')
  record = {'status': status, 'wall_s': round(wall_s, 1), 'returncode': process.returncode}
  lines = stdout.strip().splitlines()
  try:
    record['result'] = json.loads(lines[-1])
  except (IndexError, json.JSONDecodeError):
    if status == 'ok':
      record['status'] = 'failed'  # no result line
  if record['status'] != 'ok':
    record['error'] = stderr[-3000:]
  return record


def append_json(path: str, record: dict) -> None:
  with open(path, 'a') as f:
    f.write(json.dumps(record) + '\n')


def count_files(directory: str) -> int:
  return sum(len(files) for _, _, files in os.walk(directory))


def save_nvidia_smi(path: str) -> None:
  try:
    text = subprocess.run(['nvidia-smi'], capture_output=True, text=True, timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return
  with open(path, 'w') as f:
    f.write(text)


# ------------------------------------------------------------------------------------------------
# The summary.
# ------------------------------------------------------------------------------------------------
def _number(value, scale=1.0, digits=0) -> str:
  return '' if value is None else f'{value * scale:,.{digits}f}'


def summary_table(records: Sequence[dict]) -> str:
  """A markdown table of the records (docs/benchmarks.md's layout): one row per step."""
  rows = ['| step | status | img/s | step ms | MFU % | compile s | peak GB | torch img/s | '
          'torch compile s | ratio | other |',
          '|---|---|---|---|---|---|---|---|---|---|---|']
  for record in records:
    if record['step'] == 'environment':
      continue
    r = record.get('result') or {}
    other = ''
    if 'passed' in r:
      other = (f"passed={r['passed']}: bf16 - f32 loss {r['difference']:.3g}, tolerance "
               f"{r['tolerance']:.3g}, finite {r['finite']}, loss falls {r['loss_falls']}")
    elif 'profile_ms_by_category' in r:
      other = ', '.join(f'{k} {v:.1f} ms' for k, v in sorted(
          r['profile_ms_by_category'].items(), key=lambda kv: -kv[1]))
    elif r.get('xla_flags'):
      other = r['xla_flags']
    rows.append('| ' + ' | '.join([
        record['step'], record['status'], _number(r.get('img_per_s')),
        _number(r.get('step_ms'), digits=1), _number(r.get('mfu'), 100, 1),
        _number(r.get('compile_s'), digits=1), _number(r.get('peak_memory_bytes'), 1e-9, 1),
        _number(r.get('torch_img_per_s')), _number(r.get('torch_compile_s'), digits=1),
        _number(r.get('speedup_vs_torch'), digits=2), other]) + ' |')
  return '\n'.join(rows)


def read_results(path: str) -> list[dict]:
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
