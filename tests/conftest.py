"""Test-wide JAX setup: 8 simulated CPU devices for the sharding tests, fast compilation.

XLA_FLAGS must be set before JAX initialises its backends, so it is set at import time here.
"""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

# The tests run small networks for a few steps: compile time dominates, not run time.
jax.config.update('jax_disable_most_optimizations', True)

# Many tests compile the same small training step: keep compiled programs across tests and runs.
jax.config.update('jax_compilation_cache_dir',
                  os.path.join(os.path.dirname(__file__), '..', '.pytest_cache', 'jax'))
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
