"""Several processes for real, on 127.0.0.1, with the entry points as users start them.

One run of two processes (the launcher, two devices each) on the tiny ImageNet archives'
array_record copy, through the Grain loader, in processes where importing TensorFlow fails: they
train as one run; when one is lost the other stops within the heartbeat timeout; evaluation on two processes sees
every image once; SIGTERM stops both at one step, from which the run resumes bit for bit; on one
process the run resumes from its newest complete checkpoint, and Ctrl-C and SIGTERM save and resume
where they said. And the launcher ends the others when one process fails.

The suite's most expensive tests: every launch starts processes that each compile (JAX reads the
persistent compilation cache on every process, but on CPUs only process 0 finds its programs
there). So one two-process run serves every check it can, and the network is at its smallest.
Every wait has a timeout, every process started is killed at the end, and a failing check shows
the processes' output.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from bn_inception import checkpoints
from bn_inception import evaluate
from bn_inception import predictions
from conftest import SEVERAL_PROCESSES_ENV
from conftest import kill_tree
from conftest import xla_flags
from imagenet_fixture import grain_imagenet  # noqa: F401  (a pytest fixture)
from test_train import tiny_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT_TIMEOUT = 10  # --heartbeat_timeout for the lost-process test (default 100 s)
SLACK = 30  # seconds a loaded 2-core machine may add to it

# BN-x30 at the digits scale, shrunk as tests/test_train.py shrinks it, for test_multihost_agree.py.
OVERRIDES = {'model.width': 0.125, 'batch_size': 16, 'model.bn_group_size': 2,
             'dataset.image_size': 32, 'log_every_steps': 1, 'eval_every_steps': 100000,
             'num_train_steps': 100000, 'keep_checkpoints': 100}


def train_command(workdir, **overrides):
  return [sys.executable, '-m', 'bn_inception.main', f'--workdir={workdir}',
          *tiny_flags(OVERRIDES, **overrides)]


def environment(devices_per_process=4, processes=2):
  return dict(os.environ, XLA_FLAGS=xla_flags(devices_per_process),
              PYTHONPATH=REPO, PYTHONUNBUFFERED='1',
              **(SEVERAL_PROCESSES_ENV if processes > 1 else {}))


class Processes:
  """Commands started together, their output gathered line by line."""

  def __init__(self, commands, env):
    self.procs, self.lines = [], []
    for command in commands:
      proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, errors='replace',
                              start_new_session=True)
      lines = []
      threading.Thread(target=lambda p=proc, l=lines: l.extend(p.stdout), daemon=True).start()
      self.procs.append(proc)
      self.lines.append(lines)

  def output(self, i=None) -> str:
    if i is None:
      return '\n'.join(f'--- command {j} ---\n{self.output(j)}' for j in range(len(self.procs)))
    return ''.join(self.lines[i])

  def wait_for(self, condition, timeout, what):
    deadline = time.time() + timeout
    while not condition():
      assert all(p.poll() is None for p in self.procs), f'exited before {what}:\n{self.output()}'
      assert time.time() < deadline, f'no {what} within {timeout} s:\n{self.output()}'
      time.sleep(0.2)

  def wait(self, timeout, procs=None) -> list[int]:
    deadline = time.time() + timeout
    for p in procs or self.procs:
      try:
        p.wait(timeout=max(deadline - time.time(), 0.1))
      except subprocess.TimeoutExpired:
        pytest.fail(f'still running after {timeout} s:\n{self.output()}')
    time.sleep(0.5)  # the last lines
    return [p.returncode for p in procs or self.procs]

  def kill(self):
    for p in self.procs:
      if p.poll() is None:
        kill_tree(p.pid)
        p.wait()


@pytest.fixture(scope='module')
def start():
  """start(commands, env) -> Processes; every process is killed when the module's tests end."""
  started = []
  yield lambda commands, env: started.append(Processes(commands, env)) or started[-1]
  for processes in started:
    processes.kill()


def logged_steps(output: str) -> list[int]:
  return [int(s) for s in re.findall(r'train.py:\d+\] step (\d+) \(paper step', output)]


# ------------------------------------------------------------------------------------------------
# The two-process run on the Grain loader, without TensorFlow.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def no_tensorflow(tmp_path_factory):
  """A PYTHONPATH entry whose tensorflow module fails to import and leaves a trace in its
  `attempts` file (an attempt caught by the code would not show otherwise)."""
  blocker = tmp_path_factory.mktemp('no_tensorflow')
  (blocker / 'tensorflow.py').write_text(
      'import traceback\n'
      f'with open({os.fspath(blocker / "attempts")!r}, "a") as f:\n'
      '  traceback.print_stack(file=f)\n'
      'raise ImportError("TensorFlow is not installed")\n')
  return blocker


def grain_environment(no_tensorflow, devices_per_process, processes):
  return dict(environment(devices_per_process, processes),
              PYTHONPATH=os.pathsep.join([os.fspath(no_tensorflow), REPO]))


def assert_tensorflow_never_imported(no_tensorflow):
  attempts = no_tensorflow / 'attempts'
  assert not attempts.exists(), attempts.read_text()


def grain_command(data, workdir, *overrides):
  """BN-x30 at its smallest on the archives through the Grain loader: every step logged and
  checkpointed (all kept), an evaluation every 3 steps."""
  return [sys.executable, '-m', 'bn_inception.main', '--config=configs/bn_x30.py',
          f'--workdir={workdir}', f'--config.dataset.data_dir={data.config.data_dir}',
          '--config.dataset.loader=grain', '--config.dataset.image_size=32',
          '--config.model.width=0.125', '--config.batch_size=8', '--config.model.bn_group_size=2',
          '--config.num_train_steps=100000', '--config.eval_every_steps=3',
          '--config.log_every_steps=1', '--config.checkpoint_every_steps=1',
          '--config.keep_checkpoints=100', *overrides]


def on_two_processes(command):
  return [sys.executable, '-m', 'bn_inception.launch', '--num_processes=2', '--', *command]


@pytest.fixture(scope='module')
def run(start, grain_imagenet, no_tensorflow, tmp_path_factory):  # noqa: F811
  """The two-process run, launched: once checkpoint 3 is saved, process 1 stops dead (SIGSTOP: its
  connections stay open, as when a host loses power, so only the heartbeat can tell). Returns
  (workdir, the launcher's output, its exit status, seconds it outlived process 1).

  A process killed on the same machine closes its connections, and the other then fails at once
  in a collective with it (on CPUs gloo aborts): the heartbeat bound is the one to test."""
  workdir = tmp_path_factory.mktemp('two_processes') / 'run'
  launched = start([on_two_processes(grain_command(
      grain_imagenet, workdir, f'--heartbeat_timeout={HEARTBEAT_TIMEOUT}'))],
                   grain_environment(no_tensorflow, 2, 2))
  launched.wait_for(lambda: (workdir / 'checkpoints' / '3').is_dir(), 600, 'checkpoint 3')
  process_1 = re.search(r'\[launch\] process 1 of 2: pid (\d+)', launched.output()).group(1)
  os.killpg(int(process_1), signal.SIGSTOP)
  stopped = time.time()
  status, = launched.wait(HEARTBEAT_TIMEOUT + SLACK)
  return workdir, launched.output(0), status, time.time() - stopped


def test_two_processes_train_as_one_run_without_tensorflow(run, no_tensorflow):
  """Each process says which it is and sees 4 devices; they log the same steps with the same
  losses (one global batch); process 0 writes each step's metrics once, and the evaluation at step
  3 sees each of the 12 validation images once; the checkpoints hold the steps."""
  workdir, out, _, _ = run
  assert_tensorflow_never_imported(no_tensorflow)
  for i in range(2):
    assert f'[{i}] ' in out and f'Process {i} of 2: 2 local devices, 4 in all (cpu)' in out, out
  assert out.count('on 4 device(s), 2 host(s)') == 2, out
  losses = [re.findall(rf'\[{i}\] .*\] step (\d+) \(paper step \d+\): loss (\S+),', out)
            for i in range(2)]
  common = min(map(len, losses))
  assert common >= 3 and losses[0][:common] == losses[1][:common], out
  metrics = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  steps = [m['step'] for m in metrics if 'loss' in m]
  assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 3  # each step once
  evaluations = [(m['step'], m['eval_examples']) for m in metrics if 'eval_examples' in m]
  assert evaluations[:1] == [(3, 12)], evaluations
  assert {1, 2, 3} <= set(checkpoints.manager(str(workdir), read_only=True).all_steps())


def test_a_lost_process_stops_the_other_within_the_heartbeat_timeout(run):
  """Process 1 lost: process 0 exits non-zero within --heartbeat_timeout (and a margin for a
  loaded machine), JAX's coordination service naming task 1, and the launcher ends process 1."""
  _, out, status, seconds = run
  assert status != 0 and seconds < HEARTBEAT_TIMEOUT + SLACK, out
  assert re.search(r'Task 1 heartbeat timeout|stopped sending heartbeats\):\s*(\[0\] )?1\b', out), out
  assert re.search(r'\[launch\] process 0 (exited with status|was killed by) .*: ending the others',
                   out), out


def test_evaluation_on_two_processes_sees_every_image_once(
    run, grain_imagenet, no_tensorflow, start, tmp_path):  # noqa: F811
  """evaluate's command: the predictions file, written by process 0 alone (6 of the 12 images a
  process, in padded batches), holds every image once with its label and the probabilities of a
  one-process evaluation."""
  workdir = run[0]
  output = tmp_path / 'val.npz'
  launched = start([on_two_processes([sys.executable, '-m', 'bn_inception.evaluate',
                                      f'--workdir={workdir}', '--checkpoint=3',
                                      f'--output={output}'])],
                   grain_environment(no_tensorflow, 2, 2))
  assert launched.wait(400) == [0], launched.output()
  out = launched.output(0)
  assert_tensorflow_never_imported(no_tensorflow)
  assert re.search(r'\[0\] step 3 \(paper step \d+\), crops=center, .* 12 examples', out), out
  assert f'[0] Wrote {output}' in out and '[1] step' not in out and '[1] Wrote' not in out, out
  p = predictions.load(str(output)).sorted_by_id()
  validation = grain_imagenet.manifest['validation']
  assert p.ids.tolist() == sorted(validation)
  assert p.labels.tolist() == [grain_imagenet.label_index[validation[i]] for i in p.ids]
  one = evaluate.evaluate_checkpoint(checkpoints.read_config(str(workdir)), str(workdir), step=3,
                                     batch_size=8).sorted_by_id()
  np.testing.assert_allclose(p.probs, one.probs, atol=1e-6)


def test_sigterm_stops_both_processes_at_one_step_and_the_run_resumes_bitwise(
    run, grain_imagenet, no_tensorflow, start, tmp_path):  # noqa: F811
  """The run at step 1, resumed by the same command: SIGTERM during compilation stops both
  processes at the same step with one checkpoint, exit status 0. Each process's loader started at
  the step's position: that checkpoint is the run's own at that step, bit for bit."""
  workdir = run[0]
  resumed = tmp_path / 'resumed'
  shutil.copytree(workdir / 'checkpoints' / '1', resumed / 'checkpoints' / '1')
  shutil.copy(workdir / 'config.json', resumed / 'config.json')
  launched = start([on_two_processes(grain_command(grain_imagenet, resumed))],
                   grain_environment(no_tensorflow, 2, 2))
  launched.wait_for(lambda: launched.output().count('Compiling the training step') == 2, 400,
                    'both processes compiling')
  launched.procs[0].send_signal(signal.SIGTERM)  # the launcher passes it on to both
  assert launched.wait(400) == [0], launched.output()
  out = launched.output(0)
  assert_tensorflow_never_imported(no_tensorflow)
  saved = re.findall(r'\[(\d)\] .*Pre-empted: checkpoint saved at step (\d+)', out)
  assert sorted(i for i, _ in saved) == ['0', '1'] and saved[0][1] == saved[1][1], out
  step = int(saved[0][1])
  assert 1 < step <= 3, out  # the run holds steps 1 ... 3
  assert out.count('Resumed from the checkpoint at step 1') == 2, out
  assert logged_steps(out) == sorted(2 * list(range(2, step + 1))), out
  assert sorted(checkpoints.manager(str(resumed), read_only=True).all_steps()) == [1, step]
  np.testing.assert_equal(*(checkpoints.restore_latest(
      checkpoints.manager(os.fspath(w), read_only=True), step=step,
      only=('params', 'batch_stats', 'opt_state'))[1] for w in (workdir, resumed)))


def test_one_process_resumes_the_run_and_ctrl_c_and_sigterm_save_and_resume_where_said(
    run, grain_imagenet, no_tensorflow, start, tmp_path):  # noqa: F811
  """The run's workdir, resumed on one process of 4 devices (its own signal handlers) from its
  newest complete checkpoint, checkpoints now only when stopped. Ctrl-C (SIGINT): a checkpoint at
  the interrupted step, exit status 130 and, last, one line naming the checkpoint the run will
  resume from; no traceback. The same command resumes from that step; SIGTERM then saves the step
  it is at and exits 0."""
  workdir = tmp_path / 'run'
  shutil.copytree(run[0], workdir)
  before = sorted(checkpoints.manager(str(workdir), read_only=True).all_steps())
  newest = before[-1]
  command = grain_command(grain_imagenet, workdir, '--config.checkpoint_every_steps=100000')
  env = grain_environment(no_tensorflow, 4, 1)

  interrupted = start([command], env)
  interrupted.wait_for(lambda: newest + 2 in logged_steps(interrupted.output()), 300,
                       f'step {newest + 2}')
  interrupted.procs[0].send_signal(signal.SIGINT)
  assert interrupted.wait(120) == [130], interrupted.output()
  out = interrupted.output()
  assert f'Resumed from the checkpoint at step {newest}' in out, out
  steps = sorted(checkpoints.manager(str(workdir), read_only=True).all_steps())
  assert steps == before + [steps[-1]] and steps[-1] >= newest + 2, out
  assert out.strip().splitlines()[-1] == (
      f'Interrupted: rerun the same command to resume from step {steps[-1]} (the checkpoint in '
      f'{workdir}/checkpoints).'), out
  assert 'Traceback' not in out, out

  resumed = start([command], env)
  resumed.wait_for(lambda: steps[-1] + 2 in logged_steps(resumed.output()), 300,
                   f'step {steps[-1] + 2}')
  resumed.procs[0].send_signal(signal.SIGTERM)
  assert resumed.wait(120) == [0], resumed.output()
  out = resumed.output()
  assert f'Resumed from the checkpoint at step {steps[-1]}' in out, out
  assert logged_steps(out)[0] == steps[-1] + 1, out
  saved = re.findall(r'Pre-empted: checkpoint saved at step (\d+)', out)
  assert len(saved) == 1 and int(saved[0]) >= steps[-1] + 2, out
  assert sorted(checkpoints.manager(str(workdir), read_only=True).all_steps()) == [
      *steps, int(saved[0])]
  assert 'Traceback' not in out, out
  assert_tensorflow_never_imported(no_tensorflow)


def test_launcher_ends_the_others_when_one_process_fails(start):
  """The launcher passes each process its id, prefixes its lines, and when process 1 fails kills
  process 0 (which would sleep a minute) and exits with process 1's status."""
  code = ('import sys, time; i = sys.argv[-1].split("=")[1]; print("process", i, sys.argv[1:]); '
          'sys.stdout.flush(); sys.exit(3) if i == "1" else time.sleep(60)')
  processes = start([[sys.executable, '-m', 'bn_inception.launch', '--num_processes=2', '--',
                      sys.executable, '-c', code]], environment())
  assert processes.wait(30) == [3], processes.output()
  out = processes.output()
  assert re.search(r"\[1\] process 1 \['--coordinator_address=127\.0\.0\.1:\d+', "
                   r"'--num_processes=2', '--process_id=1'\]", out), out
  assert '[launch] process 1 exited with status 3: ending the others' in out, out
  assert 'statuses: 137, 3' in out, out  # process 0 killed (128 + SIGKILL)
