"""Several processes for real, on 127.0.0.1: two processes train as one run, a lost one stops the
other within the heartbeat timeout, the launcher ends the others when one fails; on one process,
Ctrl-C and SIGTERM save and the run resumes where Ctrl-C said. (On two processes, evaluation, every
example once, and SIGTERM, which stops both at one step from which the run resumes bitwise, are
tested on the Grain loader's launches in test_grain_pipeline.py.)

The suite's most expensive tests: every launch starts processes that each compile (JAX reads the
persistent compilation cache on every process, but on CPUs only process 0 finds its programs
there). They run a tiny BN-x30 on digits with the tests' compilation cache, and share launches:
one run serves the one-run checks and the lost-process checks. Every wait has a timeout, every
process started is killed at the end, and a failing check shows the processes' output.
"""

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from bn_inception import checkpoints
from bn_inception import launch
from bn_inception import train
from conftest import SEVERAL_PROCESSES_ENV
from conftest import kill_tree
from conftest import xla_flags
from test_train import tiny_config, tiny_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEARTBEAT_TIMEOUT = 10  # --heartbeat_timeout for the killed-process test (default 100 s)
SLACK = 30  # seconds a loaded 2-core machine may add to it

# BN-x30 at the digits scale, shrunk as tests/test_train.py shrinks it; never evaluated, every step
# logged, checkpoints kept.
OVERRIDES = {'model.width': 0.125, 'batch_size': 16, 'model.bn_group_size': 2,
             'dataset.image_size': 32, 'log_every_steps': 1, 'eval_every_steps': 100000,
             'num_train_steps': 100000, 'keep_checkpoints': 100}


def digits_config(**overrides):
  return tiny_config(OVERRIDES, **overrides)


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


@pytest.fixture(scope='module')
def killed_run(start, tmp_path_factory):
  """Two processes started by hand (no launcher) train with a checkpoint every step; once step 3
  is saved, process 1 stops dead (SIGSTOP: its connections stay open, as when a host loses power,
  so only the heartbeat can tell) and is then killed (SIGKILL). Returns (workdir, processes,
  seconds process 0 outlived process 1).

  A process killed on the same machine closes its connections, and the other then fails at once
  in a collective with it (on CPUs gloo aborts): the heartbeat bound is the one to test."""
  workdir = tmp_path_factory.mktemp('killed') / 'run'
  address = f'127.0.0.1:{launch.free_port()}'
  processes = start([
      train_command(workdir, checkpoint_every_steps=1) + [
          f'--coordinator_address={address}', '--num_processes=2', f'--process_id={i}',
          f'--heartbeat_timeout={HEARTBEAT_TIMEOUT}'] for i in range(2)], environment())
  processes.wait_for(lambda: (workdir / 'checkpoints' / '3').is_dir(), 600, 'checkpoint 3')
  os.killpg(processes.procs[1].pid, signal.SIGSTOP)
  stopped = time.time()
  processes.wait(HEARTBEAT_TIMEOUT + SLACK, processes.procs[:1])
  seconds = time.time() - stopped
  os.killpg(processes.procs[1].pid, signal.SIGKILL)
  return workdir, processes, seconds


def test_two_processes_train_as_one_run(killed_run):
  """Each process says which it is and sees 8 devices; they log the same steps with the same
  losses (one global batch); metrics are written once (by process 0); checkpoints hold the steps."""
  workdir, processes, _ = killed_run
  for i in range(2):
    out = processes.output(i)
    assert f'Process {i} of 2: 4 local devices, 8 in all (cpu)' in out, out
    assert 'on 8 device(s), 2 host(s)' in out, out
  losses = [re.findall(r'\] step (\d+) \(paper step \d+\): loss (\S+),', processes.output(i))
            for i in range(2)]
  assert losses[1] == losses[0][:len(losses[1])] and len(losses[1]) >= 3, processes.output()
  metrics = [line for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  steps = [int(re.search(r'"step": (\d+)', line).group(1)) for line in metrics]
  assert steps == list(range(1, len(steps) + 1)) and len(steps) >= 3  # each step once
  assert {1, 2, 3} <= set(checkpoints.manager(str(workdir), read_only=True).all_steps())


def test_a_lost_process_stops_the_other_within_the_heartbeat_timeout(killed_run, caplog):
  """Process 1 lost: process 0 exits non-zero within --heartbeat_timeout (and a margin for a
  loaded machine), JAX's coordination service naming task 1. The newest complete checkpoint
  resumes, here on one process of 8 devices (digits batches do not depend on the process count)."""
  workdir, processes, seconds = killed_run
  assert processes.procs[0].returncode != 0, processes.output(0)
  assert seconds < HEARTBEAT_TIMEOUT + SLACK
  assert re.search(r'Task 1 heartbeat timeout|stopped sending heartbeats\):\s*1\b',
                   processes.output(0)), processes.output(0)
  newest = checkpoints.manager(str(workdir), read_only=True).latest_step()
  caplog.set_level(logging.INFO, logger='absl')  # parsed flags set absl's own level
  state = train.train_and_evaluate(digits_config(num_train_steps=newest + 1), str(workdir))
  assert int(state.step) == newest + 1
  assert f'Resumed from the checkpoint at step {newest}' in caplog.text


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


def test_one_process_ctrl_c_and_sigterm_save_and_resume_where_said(start, tmp_path):
  """One process (its own signal handlers; several processes stop through JAX's pre-emption
  notifier, tested in test_grain_pipeline.py). Ctrl-C (SIGINT): a checkpoint at the interrupted step, exit status 130
  and, last, one line naming the checkpoint the run will resume from; no traceback. The same
  command resumes from that step; SIGTERM then saves the step it is at and exits 0."""
  workdir = tmp_path / 'run'
  interrupted = start([train_command(workdir)], environment(devices_per_process=8, processes=1))
  interrupted.wait_for(lambda: 2 in logged_steps(interrupted.output()), 300, 'step 2')
  interrupted.procs[0].send_signal(signal.SIGINT)
  assert interrupted.wait(120) == [130], interrupted.output()
  out = interrupted.output()
  steps = checkpoints.manager(str(workdir), read_only=True).all_steps()
  assert len(steps) == 1 and steps[0] >= 2, out
  assert out.strip().splitlines()[-1] == (
      f'Interrupted: rerun the same command to resume from step {steps[0]} (the checkpoint in '
      f'{workdir}/checkpoints).'), out
  assert 'Traceback' not in out, out

  resumed = start([train_command(workdir)], environment(devices_per_process=8, processes=1))
  resumed.wait_for(lambda: steps[0] + 2 in logged_steps(resumed.output()), 300,
                   f'step {steps[0] + 2}')
  resumed.procs[0].send_signal(signal.SIGTERM)
  assert resumed.wait(120) == [0], resumed.output()
  out = resumed.output()
  assert f'Resumed from the checkpoint at step {steps[0]}' in out, out
  assert logged_steps(out)[0] == steps[0] + 1, out
  saved = re.findall(r'Pre-empted: checkpoint saved at step (\d+)', out)
  assert len(saved) == 1 and int(saved[0]) >= steps[0] + 2, out
  assert sorted(checkpoints.manager(str(workdir), read_only=True).all_steps()) == [
      steps[0], int(saved[0])]
  assert 'Traceback' not in out, out
