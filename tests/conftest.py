"""Test-wide JAX setup: 8 simulated CPU devices for the sharding tests, fast compilation, one
compilation cache.

Set in the environment at import time, before JAX initialises its backends, so that every process
a test starts (training and evaluation commands, several hosts) inherits the same setup: the same
programs for the same configs, compiled once for the whole suite.
"""

import os
import subprocess
import sys

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# XLA's CPU compiler is faster on these small networks with its older fusion emitters (~1.5x, on
# jaxlib 0.10) and with one code-generation thread (~1.1x: the tests run one process per core).
FAST_COMPILE_FLAGS = ('--xla_cpu_use_fusion_emitters=false',
                      '--xla_cpu_parallel_codegen_split_count=1')


def fast_compile_flags() -> str:
  """Those of FAST_COMPILE_FLAGS this jaxlib knows (XLA aborts on an unknown flag, and jaxlib 0.11.1
  dropped the first), asked of a subprocess once and kept in the environment for the test
  processes pytest-xdist starts."""
  known = os.environ.get('BN_INCEPTION_TEST_COMPILE_FLAGS')
  if known is None:
    accepts = lambda flag: subprocess.run(
        [sys.executable, '-c', 'import jax; jax.devices()'], capture_output=True, timeout=300,
        env={**os.environ, 'XLA_FLAGS': flag, 'JAX_PLATFORMS': 'cpu'}).returncode == 0
    known = os.environ['BN_INCEPTION_TEST_COMPILE_FLAGS'] = ' '.join(
        flag for flag in FAST_COMPILE_FLAGS if accepts(flag))
  return known


def xla_flags(devices: int = 8) -> str:
  """XLA_FLAGS for a test's process (and those it starts) with this many simulated CPU devices."""
  return f'--xla_force_host_platform_device_count={devices} {fast_compile_flags()}'.strip()


# Once: pytest-xdist's workers inherit the controller's environment, and XLA flags given twice
# would key every program differently from the same program in a test's subprocess (JAX's cache
# key hashes the flags), which then never finds it in the cache.
if xla_flags() not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags()}".strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The tests run small networks for a few steps: compile time dominates, not run time.
os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS'] = '1'
# Many tests compile the same small training step, in this process or in those they start.
os.environ['JAX_COMPILATION_CACHE_DIR'] = os.path.join(REPO, '.pytest_cache', 'jax')
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'

import jax  # noqa: E402
import jaxlib.version  # noqa: E402

# In case a plugin imported JAX before the environment above was set.
jax.config.update('jax_disable_most_optimizations', True)
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)

# jaxlib 0.12.1 on CPUs: when one process of a run loads a program from the persistent compilation
# cache and another compiles it, both hang at their first collective (seen: two processes never end
# step 1; jaxlib 0.11.2 and 0.12.0 run the same launch). Process 1 never finds its programs there
# anyway (JAX keys them by each process's CPU topology), so there a launch of several processes
# does without the cache: add SEVERAL_PROCESSES_ENV to its environment.
SEVERAL_PROCESSES_ENV = ({'JAX_ENABLE_COMPILATION_CACHE': 'false'}
                         if jaxlib.version.__version_info__ >= (0, 12, 1) else {})


def kill_tree(pid: int) -> None:
  """Kills a process and every process it started: the launcher (bn_inception.launch) starts each
  in a session of its own, which its process group does not reach."""
  try:
    process = psutil.Process(pid)
    tree = [*process.children(recursive=True), process]
  except psutil.NoSuchProcess:
    return
  for p in tree:
    try:
      p.kill()
    except psutil.NoSuchProcess:
      pass


# The files that take longest, longest first (their durations on 2 cores, 2026-12-07: 270, 200, 175,
# 90, 75, 70, 70, 50 s; the others take 30 s or less), each to the next free test process (make test
# passes --no-loadscope-reorder, so that pytest-xdist keeps this order rather than putting the files
# with the most tests first): the long ones do not start last and finish alone. test_faults trains
# TINY's programs before test_evaluate, which then reads them from the compilation cache.
LONGEST_FIRST = ('test_train.py', 'test_multihost.py', 'test_demo.py', 'test_faults.py',
                 'test_evaluate.py', 'test_benchmark.py', 'test_gpu_check.py', 'test_models.py')


def pytest_collection_modifyitems(items):
  rank = lambda item: (LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST
                       else len(LONGEST_FIRST))
  items.sort(key=rank)  # stable: the order within a file, and of the other files, stays
