"""Test setup: 8 fake CPU devices, so the sharded code paths run in tests.

Set before JAX is imported by any test module.
"""

import os
import sys
import tempfile

import pytest

# The legacy elemental emitters compile the tiny test programs ~20% faster
# than XLA:CPU's fusion emitters (tests/test_remat.py + test_unet3d.py:
# 47.5 s -> 39.9 s, 2026-12-03); tests only.
os.environ.setdefault(
    'XLA_FLAGS', '--xla_force_host_platform_device_count=8'
    ' --xla_cpu_use_fusion_emitters=false'
)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# The CPU, whatever else is installed: with the plan compilers of
# requirements-plan.txt (libtpu, the CUDA plugin) JAX would otherwise try a
# TPU and a GPU first in every process, and the first test process to do so
# holds libtpu's lock file (/tmp/libtpu_lockfile). Subprocesses inherit it.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# One persistent compilation cache per test session, shared with the
# subprocesses the tests start: identical programs (a run and its resumed
# twin) compile once.
os.environ.setdefault(
    'JAX_COMPILATION_CACHE_DIR', tempfile.mkdtemp(prefix='vdm_jax_xla_'))
# Every program, however small: tests and files compile many identical tiny
# ones. Caching only those of 1 s or more (2026-12-04, whole suite in a clean
# clone, same VM, back to back): 528 s with 0, 650 s with 1, though on two
# files without repeats (test_noise, test_attention) 1 saved ~9% CPU.
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '-1')
# Tests check numerics and behaviour, not speed: XLA's optimisation passes
# cost ~40 s per tiny-UNet compile on 2 cores, against ~5 s without them.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # `configs` is importable as a package.

# The longest files first, so that xdist's loadfile (whole files to
# workers in collection order) ends with short files on both workers instead
# of one long file on one. Seconds per file in the suite's two workers
# (`python -m pytest -v --durations=0`, commit 77034ee, 2026-12-06); the
# files not listed take under 10 s each.
_LONGEST_FIRST = (
    # The pretrained-model files (2026-12-07): wall seconds measured alone
    # under a load average of 10-20 on 2 cores, divided by 3 as an estimate
    # of a quiet VM's; refresh with --durations on a quiet machine.
    'test_plan.py',            # ~240 (libtpu and GPU compiles)
    'test_inbetween_svd.py',   # ~110
    'test_plan_methods.py',    # ~110 alone (2026-12-08)
    'test_tune_a_video_sd.py',  # ~90
    'test_pretrained_svd.py',  # ~40
    'test_pretrained_unet.py',  # ~60
    'test_pretrained_pipeline.py',  # ~60
    'test_latent.py',          # ~60
    'test_sharding.py',        # 97
    'test_sinfusion.py',       # 81
    'test_train.py',           # 65
    'test_tune_a_video.py',    # 58
    'test_configs.py',         # 53
    'test_text.py',            # 50
    'test_sample.py',          # 47
    'test_golden.py',          # 38
    'test_tfds_sources.py',    # 34
    'test_inbetween.py',       # 26
    'test_unet3d.py',          # 23
    'test_grain_workers.py',   # 22
    'test_remat.py',           # 22
    'test_fvd.py',             # 17
    'test_video_files.py',     # 16
    'test_noise.py',           # 15
    'test_precision.py',       # 14
    'test_conditioning.py',    # 13
    'test_attention.py',       # 12
    'test_sampling.py',        # 11
)


def pytest_collection_modifyitems(session, config, items):
  del session, config
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
