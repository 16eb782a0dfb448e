"""Test setup: 8 fake CPU devices, so the sharded code paths run in tests.

Set before JAX is imported by any test module.
"""

import os
import sys
import tempfile

os.environ.setdefault(
    'XLA_FLAGS', '--xla_force_host_platform_device_count=8'
)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# One persistent compilation cache per test session, shared with the
# subprocesses the tests start: identical programs (a run and its resumed
# twin) compile once.
os.environ.setdefault(
    'JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='vdm_jax_xla_'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')
# Tests check numerics and behaviour, not speed: XLA's optimisation passes
# cost ~40 s per tiny-UNet compile on 2 cores, against ~5 s without them.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # `configs` is importable as a package.
