"""The GPU check (scripts/gpu_check.py, bn_inception/gpu_check.py) without a GPU: the driver's
records, time limits and budget with small real processes, one real step end to end at a tiny size
on CPU, the XLA flags it will pass, and the precision check's verdict. Timings are not asserted.

`BN_GPU_CHECK_SMOKE=1` also runs every step of the smoke plan (about 10 minutes on 2 cores): the
check to run before device time is spent.
"""

import os
import subprocess
import sys
import textwrap
import time

import pytest

from bn_inception import convert
from bn_inception import gpu_check
from bn_inception import precision_check
from configs import bn_x5
from conftest import xla_flags
import optional_deps

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, XLA_FLAGS=xla_flags(devices=1), PYTHONPATH=REPO)  # and conftest.py's

# What docs/benchmarks.md's tables read from each kind of step's result.
MACHINE_FIELDS = ('device', 'jax_version', 'jaxlib_version', 'flax_version', 'xla_flags', 'date')
TIMING_FIELDS = ('img_per_s', 'step_ms', 'compile_s', 'mfu', 'peak_memory_bytes', 'batch_size',
                 'dtype', 'architecture')
PEER_FIELDS = ('torch_img_per_s', 'torch_compile_s', 'torch_peak_memory_bytes', 'torch_version',
               'speedup_vs_torch', 'peer_same_architecture')
FEED_FIELDS = ('img_per_s', 'step_ms', 'compile_s', 'batch_size', 'dtype', 'loader',
               'device_only_img_per_s', 'fed_vs_device_only', 'host_cores', 'distortion_strength')
PRECISION_FIELDS = ('passed', 'finite', 'loss_falls', 'agrees', 'tolerance', 'difference', 'levels',
                    'runs')


def expected_fields(step: str) -> tuple[str, ...]:
  if step == 'precision':
    return MACHINE_FIELDS + PRECISION_FIELDS
  if step.startswith('feed'):
    return MACHINE_FIELDS + FEED_FIELDS
  fields = MACHINE_FIELDS + TIMING_FIELDS
  if step.endswith('_torch'):
    fields += PEER_FIELDS
  if step.startswith('profile'):
    fields += ('profile_ms_by_category', 'profile_top_ops_ms')
  return fields


def check_results(out_dir, steps):
  records = gpu_check.read_results(os.path.join(out_dir, 'results.jsonl'))
  assert records[0]['step'] == 'environment' and records[0]['versions']['jax']
  assert [r['step'] for r in records[1:]] == steps
  for record in records[1:]:
    assert record['status'] == 'ok', (record['step'], record.get('error'))
    assert record['command'].startswith('python3 ') and record['machine']['versions']
    missing = [f for f in expected_fields(record['step']) if f not in record['result']]
    assert not missing, (record['step'], missing)
  return records


def smoke(tmp_path, only=None, extra=()):
  # The driver needs the PyTorch port importable (or its wheels): a skip without the test extra.
  optional_deps.load(convert.load_port_module)
  out = tmp_path / 'out'
  command = [sys.executable, 'scripts/gpu_check.py', '--smoke', f'--out={out}',
             f'--scratch={tmp_path / "scratch"}', '--budget_s=100000']
  command += [f'--only={",".join(only)}'] if only else []
  command += list(extra)
  run = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=3600)
  assert run.returncode == 0, run.stderr[-3000:]
  return str(out), run.stdout


def test_feed_step_trains_from_prepared_photographs(tmp_path):
  # The photographs prepared as array_record where TensorFlow is (here), then the step as the GPU
  # machine runs it: the Grain loader feeding the training step, against the step alone. A real
  # step through the driver: a process of its own, the benchmark's line as its result, the machine
  # and the command beside it, the table at the end.
  pytest.importorskip('skimage')  # the photographs ship with scikit-image
  photos = tmp_path / 'photos'
  gpu_check.prepare_photos(str(photos), num_train=12, num_val=2)
  assert not (photos / 'manual').exists()  # only the array_record copy travels
  assert list(photos.glob('data/imagenet2012/*/imagenet2012-train.array_record-*'))
  out, stdout = smoke(tmp_path, only=['feed_grain_b256'], extra=[f'--photos={photos}'])
  record = check_results(out, ['feed_grain_b256'])[1]
  assert '--mode=feed' in record['command'] and record['new_cache_entries'] > 0
  result = record['result']
  assert result['mode'] == 'feed' and result['loader'] == 'grain' and result['batch_size'] == 4
  assert result['distortion_strength'] == 0.5  # bn_x30's, applied in the step
  assert result['img_per_s'] > 0 and result['device_only_img_per_s'] > 0
  assert '| feed_grain_b256 | ok |' in stdout


def test_feed_step_without_photographs_is_skipped_with_what_to_do(tmp_path):
  optional_deps.load(convert.load_port_module)  # the driver's, as in smoke()
  step = [s for s in gpu_check.plan(smoke=True, photos=str(tmp_path / 'none'))
          if s.name == 'feed_grain_b256']
  out = str(tmp_path / 'out')
  gpu_check.run(step, out, budget_s=600, scratch=str(tmp_path / 'scratch'))
  record = gpu_check.read_results(os.path.join(out, 'results.jsonl'))[-1]
  assert record['status'] == 'skipped' and '--prepare_photos' in record['reason']


@pytest.mark.skipif(not os.environ.get('BN_GPU_CHECK_SMOKE'),
                    reason='every step of the smoke plan: set BN_GPU_CHECK_SMOKE=1 (~10 min)')
def test_every_step_of_the_smoke_plan(tmp_path):
  photos = tmp_path / 'photos'
  gpu_check.prepare_photos(str(photos), num_train=12, num_val=2)
  out, _ = smoke(tmp_path, extra=[f'--photos={photos}'])
  records = check_results(out, [s.name for s in gpu_check.plan(smoke=True)])
  by_step = {r['step']: r for r in records}
  # Programs another step compiled come from the call's compilation cache.
  assert by_step['profile_b256']['new_cache_entries'] == 0
  assert os.path.exists(os.path.join(out, 'profile_b256.tar.gz'))


def test_smoke_plan_is_the_device_plan_shrunk():
  device, small = gpu_check.plan(), gpu_check.plan(smoke=True)
  names = [s.name for s in device]
  assert len(set(names)) == len(names) and names[0] == 'train_b256_torch'
  assert '--peer=torch' in device[0].argv and '--batch_size=256' in device[0].argv
  first_flag = 'flag_' + gpu_check.XLA_FLAGS[0][0]
  assert [s.name for s in small] == [n for n in names
                                     if not n.startswith('flag_') or n == first_flag]


def test_xla_flags_are_known_to_this_jaxlib():
  # XLA aborts on a flag name it does not know: one typo would fail every flag step on the device.
  flags = ' '.join(flag for _, flag in gpu_check.XLA_FLAGS)
  run = subprocess.run([sys.executable, '-c', 'import jax; jax.numpy.zeros(2).block_until_ready()'],
                       env=dict(ENV, XLA_FLAGS=flags), capture_output=True, text=True, timeout=120)
  assert run.returncode == 0, run.stderr[-2000:]


def python_step(name, code, limit_s=60):
  return gpu_check.Step(name, ('-c', textwrap.dedent(code)), limit_s)


def running(pid: int) -> bool:
  """Whether the process exists and is not a zombie (killed, not yet reaped by its new parent)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


def test_records_statuses_time_limits_and_budget(tmp_path, capsys, monkeypatch):
  monkeypatch.setattr(gpu_check, 'CARRIED_MODULES', ())  # these steps import nothing carried
  pid_file = tmp_path / 'grandchild.pid'
  steps = [
      python_step('ok', 'import json; print("log"); print(json.dumps({"img_per_s": 12.5}))'),
      python_step('crashes', 'import sys; sys.exit("out of memory, say")'),
      python_step('no_result', 'print("no JSON here")'),
      # Killed at its limit with the process it started (torch.compile's workers, say).
      python_step('hangs', f'''
          import subprocess, time
          child = subprocess.Popen(["sleep", "300"])
          open("{pid_file}", "w").write(str(child.pid))
          time.sleep(300)''', limit_s=5),
  ]
  out = str(tmp_path / 'out')
  gpu_check.run(steps, out, budget_s=600, scratch=str(tmp_path / 'scratch'))
  records = gpu_check.read_results(os.path.join(out, 'results.jsonl'))
  by_step = {r['step']: r for r in records}
  assert [r['step'] for r in records] == ['environment', 'ok', 'crashes', 'no_result', 'hangs']
  assert by_step['ok']['status'] == 'ok' and by_step['ok']['result'] == {'img_per_s': 12.5}
  assert by_step['crashes']['status'] == 'failed' and 'out of memory' in by_step['crashes']['error']
  assert by_step['no_result']['status'] == 'failed'
  assert by_step['hangs']['status'] == 'timeout' and by_step['hangs']['wall_s'] < 30
  grandchild, deadline = int(pid_file.read_text()), time.monotonic() + 10
  while running(grandchild) and time.monotonic() < deadline:  # SIGKILL is delivered asynchronously
    time.sleep(0.05)
  assert not running(grandchild)  # the process it started is gone too
  assert 'out of memory' in open(os.path.join(out, 'gpu_check.log')).read()
  stdout = capsys.readouterr().out
  assert '| ok | ok | 12 |' in stdout
  assert '--only=crashes,no_result,hangs' in stdout  # the command that runs what is left

  # An exhausted budget starts nothing, and says so.
  gpu_check.run(steps[:1], out, budget_s=0, scratch=str(tmp_path / 'scratch'))
  last = gpu_check.read_results(os.path.join(out, 'results.jsonl'))[-1]
  assert last['step'] == 'ok' and last['status'] == 'skipped'


def test_missing_packages_without_wheels_say_what_to_do(tmp_path, monkeypatch):
  monkeypatch.setattr(gpu_check, 'CARRIED_MODULES', ('ml_collections', 'no_such_module_here'))
  with pytest.raises(FileNotFoundError, match='make gpu-wheels'):
    gpu_check.install_wheels(str(tmp_path), str(tmp_path / 'site'))
  monkeypatch.setattr(gpu_check, 'CARRIED_MODULES', ('ml_collections',))
  assert gpu_check.install_wheels(str(tmp_path), str(tmp_path / 'site')) == []  # importable here


def runs(f32_levels, bf16_levels, **curves):
  """Runs whose curves fall from 2.3 to the given levels (the mean of their second half)."""
  levels = {('float32', s): v for s, v in enumerate(f32_levels)}
  levels.update({('bfloat16', s): v for s, v in enumerate(bf16_levels)})
  out = {}
  for (dtype, seed), value in levels.items():
    name = precision_check.run_name(dtype, seed)
    curve = curves.get(name, [2.3, 1.5, value, value])
    out[name] = {'loss': curve, 'finite': all(x == x for x in curve)}
  return out


def test_precision_run_reads_its_loss_curve_and_evaluation(tmp_path):
  # One real run of the precision check, shrunk (its verdict needs six: test_precision_verdict).
  config = bn_x5.get_config('digits')
  config.model.width, config.model.bn_group_size, config.batch_size = 0.125, 2, 16
  config.dataset.image_size, config.num_train_steps, config.log_every_steps = 32, 3, 1
  config.eval_every_steps = config.checkpoint_every_steps = 3
  run = precision_check.train_once(config, str(tmp_path / 'run'))
  assert run['finite'] and run['error'] is None
  assert len(run['loss']) == 3 and all(0 < x < 10 for x in run['loss'])
  # The final evaluation is read (its value after 3 steps of BN over pairs means nothing: the
  # population statistics are still mostly their initial values, and the logits can overflow).
  assert 0 <= run['eval_top1'] <= 1 and run['eval_loss'] is not None


def test_precision_verdict():
  f32 = [0.40, 0.50, 0.45]  # standard deviation 0.05, as for bf16 below
  # Two-sample t-test at 1%, 3 + 3 runs: t(0.995, 4 degrees of freedom) = 4.604 (a t table), so
  # the tolerance is 4.604 * 0.05 * sqrt(2 / 3) = 0.188.
  verdict = precision_check.compare(runs(f32, [0.52, 0.57, 0.62]))
  assert verdict['tolerance'] == pytest.approx(0.188, abs=0.001)
  assert verdict['difference'] == pytest.approx(0.12) and verdict['passed']
  # bfloat16 further from float32 than the seeds allow, in either direction: a numerical problem.
  for shift in (0.2, -0.2):
    drifted = precision_check.compare(runs(f32, [x + shift for x in f32]))
    assert not drifted['passed'] and not drifted['agrees'], shift
  # A loss that does not fall, or a NaN, fails whatever the levels.
  flat = precision_check.compare(runs(f32, f32, bfloat16_seed1=[0.5, 0.5, 0.5, 0.5]))
  assert not flat['passed'] and not flat['loss_falls']
  nan = precision_check.compare(runs(f32, f32, bfloat16_seed2=[2.3, 1.5, 0.4, float('nan')]))
  assert not nan['passed'] and not nan['finite'] and not nan['agrees']
