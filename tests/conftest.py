"""Test-wide JAX setup: 8 simulated CPU devices for the sharding tests, fast compilation, one
compilation cache.

Set in the environment at import time, before JAX initialises its backends, so that every process
a test starts (training and evaluation commands, several hosts) inherits the same setup: the same
programs for the same configs, compiled once for the whole suite.
"""

import os
from importlib import metadata

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def xla_flags(devices: int = 8) -> str:
  """XLA_FLAGS for a test's process (and those it starts) with this many simulated CPU devices."""
  flags = f'--xla_force_host_platform_device_count={devices}'
  # XLA's CPU backend before jaxlib 0.12 (whose fusion emitters are the only ones) compiles these
  # networks ~1.5x faster with its older emitters, and compiling is most of the suite's time.
  if tuple(int(v) for v in metadata.version('jaxlib').split('.')[:2]) < (0, 12):
    flags += ' --xla_cpu_use_fusion_emitters=false'
  return flags


os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {xla_flags()}".strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# The tests run small networks for a few steps: compile time dominates, not run time.
os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS'] = '1'
# Many tests compile the same small training step, in this process or in those they start.
os.environ['JAX_COMPILATION_CACHE_DIR'] = os.path.join(REPO, '.pytest_cache', 'jax')
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'

import jax  # noqa: E402

# In case a plugin imported JAX before the environment above was set.
jax.config.update('jax_disable_most_optimizations', True)
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
