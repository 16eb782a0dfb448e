"""Test setup: 8 fake CPU devices, so the sharded code paths run in tests.

Set before JAX is imported by any test module.
"""

import os
import sys

os.environ.setdefault(
    'XLA_FLAGS', '--xla_force_host_platform_device_count=8'
)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # `configs` is importable as a package.
