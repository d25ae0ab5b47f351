"""The processes of one run agree or stop together, for real on 127.0.0.1: started with another
config or workdir, every process refuses naming the field; a Python error in one process stops
every process within --failure_timeout, each naming the failed process.

Every wait has a timeout and every process started is killed at the end (test_multihost's
`start` fixture)."""

import sys
import time

from bn_inception import launch
from test_multihost import environment, start, train_command  # noqa: F401  (start: a fixture)

FAILURE_TIMEOUT = 20  # --failure_timeout here (default 60 s)
SLACK = 30  # seconds a loaded 2-core machine may add to it

# Process 1 raises as training begins, while process 0 goes on into compiling and its first
# collective: a test-only fault, injected by wrapping the entry point rather than in its code.
FAILING_MAIN = (
    'import jax; from bn_inception import cli, main, train\n'
    'train_and_evaluate = train.train_and_evaluate\n'
    'def failing(*args, **kwargs):\n'
    '  if jax.process_index() == 1:\n'
    '    raise RuntimeError("injected fault")\n'
    '  return train_and_evaluate(*args, **kwargs)\n'
    'train.train_and_evaluate = failing\n'
    'cli.run(main.main)\n')


def two_processes(start, commands):  # noqa: F811
  address = f'127.0.0.1:{launch.free_port()}'
  return start([command + [f'--coordinator_address={address}', '--num_processes=2',
                           f'--process_id={i}', f'--failure_timeout={FAILURE_TIMEOUT}']
                for i, command in enumerate(commands)], environment())


def test_another_seed_is_refused_by_every_process(start, tmp_path):  # noqa: F811
  workdir = tmp_path / 'run'
  processes = two_processes(start, [train_command(workdir),
                                    train_command(workdir, seed=7)])
  assert processes.wait(300) == [1, 1], processes.output()
  for i in range(2):
    out = processes.output(i)
    assert 'Process 1 was started with config.seed=7 (process 0: 0)' in out, out
    assert 'Traceback' not in out, out
  assert not workdir.exists()


def test_another_workdir_is_refused_by_every_process(start, tmp_path):  # noqa: F811
  processes = two_processes(start, [train_command(tmp_path / 'run'),
                                    train_command(tmp_path / 'other')])
  assert processes.wait(300) == [1, 1], processes.output()
  for i in range(2):
    out = processes.output(i)
    assert (f"Process 1 was started with workdir='{tmp_path}/other' (process 0: "
            f"'{tmp_path}/run')") in out, out
  assert not (tmp_path / 'run').exists() and not (tmp_path / 'other').exists()


def test_an_error_in_one_process_stops_every_process_within_the_failure_timeout(
    start, tmp_path):  # noqa: F811
  workdir = tmp_path / 'run'
  command = [sys.executable, '-c', FAILING_MAIN] + train_command(workdir)[3:]
  processes = two_processes(start, [command, command])
  processes.wait_for(lambda: 'injected fault' in processes.output(1), 300, 'the fault')
  failed = time.time()
  assert processes.wait(FAILURE_TIMEOUT + SLACK) == [1, 1], processes.output()
  assert time.time() - failed < FAILURE_TIMEOUT + SLACK
  assert 'RuntimeError: injected fault' in processes.output(1), processes.output(1)
  assert 'Error: process 1 failed; stopping the other processes' in processes.output(1)
  assert ('Error: process 1 of the run failed (RuntimeError: injected fault); stopping process 0 '
          'too.') in processes.output(0), processes.output(0)
