r"""Run a command as every process of one multi-process JAX run, on this machine.

  python -m bn_inception.launch --num_processes=2 -- \
      python -m bn_inception.main --config=configs/bn_x30.py:digits --workdir=runs/two_processes

For trying a multi-host run on one machine, and for the tests. Process I runs the command with
--coordinator_address=127.0.0.1:PORT (a free port), --num_processes=N and --process_id=I appended
(the flags of bn_inception.main, .evaluate and scripts/benchmark.py). Every line of its output is
printed prefixed with "[I] ". SIGINT (Ctrl-C) and SIGTERM are passed on to every process (which
then save a checkpoint and stop). When a process fails otherwise, the others are killed at once (a
run that lost a process can neither compute nor save; the newest complete checkpoint stays as it
was). The launcher exits with the status of the first process that failed, 0 when all succeed.

On CPUs, XLA_FLAGS=--xla_force_host_platform_device_count=K gives each process K devices. Clusters
have their own launchers (srun, mpirun, gcloud ... --worker=all): README.md, "Several hosts".
"""

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional, Sequence, TextIO

from absl import app
from absl import flags


def free_port() -> int:
  """A TCP port that is free on 127.0.0.1 now (the coordinator binds it moments later)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def exit_status(returncode: int) -> int:
  """A shell's exit status for a Popen returncode (-N: killed by signal N -> 128 + N)."""
  return 128 - returncode if returncode < 0 else returncode


def describe(returncode: int) -> str:
  if returncode < 0:
    return f'was killed by {signal.Signals(-returncode).name}'
  return f'exited with status {returncode}'


def launch(command: Sequence[str], num_processes: int, output: TextIO = sys.stdout,
           poll_seconds: float = 0.1) -> int:
  """Runs `command` as processes 0 ... num_processes - 1 of one run; returns the exit status."""
  address = f'127.0.0.1:{free_port()}'
  lock = threading.Lock()

  def say(line):
    with lock:
      output.write(line)
      output.flush()

  def relay(i, stream):
    for line in stream:
      say(f'[{i}] {line}')

  processes, relays = [], []
  passed_on = []  # signals passed on: the processes then stop by themselves, however they exit

  def pass_on(signum, frame):
    del frame
    passed_on.append(signum)
    for p in processes:
      if p.poll() is None:
        os.killpg(p.pid, signum)

  previous = {s: signal.signal(s, pass_on) for s in (signal.SIGINT, signal.SIGTERM)}
  try:
    for i in range(num_processes):
      # Each in its own session: a terminal's Ctrl-C reaches the launcher once, which passes it on.
      p = subprocess.Popen(
          [*command, f'--coordinator_address={address}', f'--num_processes={num_processes}',
           f'--process_id={i}'],
          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors='replace',
          start_new_session=True, env=dict(os.environ, PYTHONUNBUFFERED='1'))
      processes.append(p)
      say(f'[launch] process {i} of {num_processes}: pid {p.pid}, coordinator {address}\n')
      relays.append(threading.Thread(target=relay, args=(i, p.stdout), daemon=True))
      relays[-1].start()
    failed: Optional[int] = None
    while any(p.poll() is None for p in processes):
      if failed is None and not passed_on:
        failed = next((i for i, p in enumerate(processes) if p.poll()), None)
        if failed is not None:
          say(f'[launch] process {failed} {describe(processes[failed].returncode)}: ending the '
              'others.\n')
          _kill(processes)
      time.sleep(poll_seconds)
  finally:
    _kill(processes)
    for s, handler in previous.items():
      signal.signal(s, handler)
  for r in relays:
    r.join(timeout=10)
  codes = [p.returncode for p in processes]
  if failed is None:
    failed = next((i for i, code in enumerate(codes) if code), None)
  if failed is None:
    say(f'[launch] all {num_processes} processes exited with status 0.\n')
    return 0
  say(f'[launch] process {failed} {describe(codes[failed])}; statuses: '
      f'{", ".join(str(exit_status(c)) for c in codes)}.\n')
  return exit_status(codes[failed])


def _kill(processes: Sequence[subprocess.Popen]) -> None:
  for p in processes:
    if p.poll() is None:
      try:
        os.killpg(p.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
  for p in processes:
    p.wait()


def main(argv):
  if len(argv) < 2:
    raise app.UsageError('Give the command after --, e.g. python -m bn_inception.launch '
                         '--num_processes=2 -- python -m bn_inception.main --config=... '
                         '--workdir=...')
  sys.exit(launch(argv[1:], flags.FLAGS.num_processes))


if __name__ == '__main__':
  flags.DEFINE_integer('num_processes', 2, 'Processes to start.', lower_bound=1)
  app.run(main)
