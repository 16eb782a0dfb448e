"""--mode=plan: the real steps compiled for TPU / GPU targets on this CPU.

The TPU and GPU compilers come from requirements-plan.txt (in the test
requirements). Compiles are shared between tests (`_row` caches them):
each TPU or GPU compile of the tiny train step takes 10-50 s here.
"""

import contextlib
import functools
import importlib
import importlib.util
import os

import jax
import numpy as np
import pytest

from configs import tiny
from vdm_jax import denoiser
from vdm_jax import perf
from vdm_jax import plan
from vdm_jax import sharding
from vdm_jax import train
from vdm_jax import training
from vdm_jax.models import attention


def _config(**fields):
  config = tiny.get_config()
  return plan.with_settings(config, **fields) if fields else config


@functools.cache
def _devices(name):
  return plan.target_devices(plan.parse_target(name))


@functools.cache
def _row(name, program='train', **fields):
  """One plan row of the tiny config (fields: 'group.field' overrides)."""
  fields = {k.replace('__', '.'): v for k, v in fields.items()}
  return plan.measure(_config(**fields), plan.parse_target(name),
                      _devices(name), program, progress=lambda m: None)


def test_every_test_process_runs_on_the_cpu():
  # With the CUDA plugin and libtpu installed, JAX would try a GPU and a
  # TPU first (conftest.py sets JAX_PLATFORMS; subprocesses inherit it).
  assert os.environ.get('JAX_PLATFORMS') == 'cpu'
  assert jax.default_backend() == 'cpu'
  assert importlib.util.find_spec('libtpu') is not None
  assert importlib.util.find_spec('jax_plugins.xla_cuda12') is not None


@pytest.mark.parametrize('name, kind', [
    ('tpu:v5e:2x2', 'TPU v5 lite'),
    ('gpu:h100:4', 'NVIDIA H100 80GB HBM3'),
])
def test_tiny_train_step_compiles_for_the_target(name, kind):
  row = _row(name)
  config = _config()
  assert row['device_kind'] == kind and row['devices'] == 4
  assert row['mesh'] == 'data=4 fsdp=1' and row['batch'] == 8
  model = denoiser.create_model(config)
  assert row['params'] == denoiser.count_params(
      denoiser.abstract_params(config, model))
  mem = row['memory']
  assert row['fits'] and 0 < mem['total'] < row['capacity'] / 100
  # The donated state comes back in place: its output aliases its input.
  assert mem['alias'] > 0.9 * mem['output']
  assert mem['temp'] > 0 and mem['argument'] > 0
  assert row['flops_per_device'] > 0 and row['step_time_lower_bound_s'] > 0
  assert 0 < row['mfu_bound'] <= 1
  if name.startswith('tpu'):
    assert row['capacity'] == 16 * 2**30  # The v5e data sheet.
    assert row['bytes_source'] == 'xla cost analysis'
  else:  # 75% (JAX's preallocation) of what the H100 SXM reports.
    assert row['capacity'] == int(0.75 * 84942979072)
    assert row['bytes_source'] == 'arguments+outputs'


def test_temp_bytes_halve_when_the_data_axis_doubles():
  # Global batch 8: two examples per GPU on 4, one on 8. (On a TPU the tiny
  # model's temp is mostly tile padding: v5e:2x2 -> 2x4 measured 23.0 ->
  # 24.7 MB.)
  four, eight = _row('gpu:h100:4'), _row('gpu:h100:8')
  assert eight['mesh'] == 'data=8 fsdp=1' and eight['batch'] == 8
  ratio = eight['memory']['temp'] / four['memory']['temp']
  assert 0.4 < ratio < 0.6, (four['memory'], eight['memory'])
  # The replicated state does not change.
  assert eight['memory']['alias'] == four['memory']['alias']


def test_fsdp_divides_the_state_bytes_by_the_fsdp_axis():
  replicated = _row('gpu:h100:4')
  fsdp = _row('gpu:h100:4', mesh__data=1, mesh__fsdp=4,
              mesh__param_sharding='fsdp')
  assert fsdp['mesh'] == 'data=1 fsdp=4'
  # The aliased bytes are the donated state (params, EMA, Adam moments).
  ratio = fsdp['memory']['alias'] / replicated['memory']['alias']
  assert 0.24 < ratio < 0.27, (replicated['memory'], fsdp['memory'])
  assert fsdp['memory']['argument'] < 0.3 * replicated['memory']['argument']


def test_an_impossible_batch_is_reported_as_not_fitting():
  # 32,768 examples per H100: several times its memory. (XLA's GPU compiler
  # does not enforce it: the plan compares; a TPU overflow is below.)
  row = _row('gpu:h100:4', training__batch_size=131072)
  assert not row['fits']
  assert row['memory']['total'] > row['capacity'] > 50 * 2**30
  table = plan.table([row])
  assert '| NO |' in table and '| yes |' not in table


def test_a_tpu_overflow_is_read_from_the_compiler_error(monkeypatch):
  # An overflowing TPU compile fails with RESOURCE_EXHAUSTED, but not fast
  # here: the tiny step at batch 16,384 on v5e:2x2 compiled for 43 minutes
  # on this (shared) host without finishing. The message is replayed.
  # The message as the TPU compiler of libtpu 0.0.42.1 worded it (issue 43).
  message = ('RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory'
             ' required for HLO temporaries (36.46G) exceeds available HBM'
             ' (15.75G)')
  monkeypatch.setattr(plan, 'compile_program', lambda fn, args, target=None,
                      kernels=None:
                      (fn.trace(*args), message))
  target = plan.parse_target('tpu:v5e:2x2')
  row = plan.measure(_config(), target, _devices('tpu:v5e:2x2'),
                     progress=lambda m: None)
  assert not row['fits'] and 'RESOURCE_EXHAUSTED' in row['error']
  assert row['required'] == int(36.46 * 2**30)
  assert row['available'] == int(15.75 * 2**30)
  assert 'memory' not in row and row['flops_per_device'] > 0
  assert '(overflow)' in plan.table([row]) and '| NO |' in plan.table([row])
  assert plan.overflow_bytes('INTERNAL: something else') is None


def test_plan_on_the_cpu_mesh_equals_the_run_there():
  """Planned for this host's 8 CPU devices, then built and run for real."""
  config = _config()
  row = _row('cpu')
  devices = jax.devices()
  assert row['devices'] == len(devices) == 8
  mesh = sharding.make_mesh(config.mesh, devices)
  model = denoiser.create_model(config)
  tx, lr_fn = training.create_optimizer(config)
  state, shardings = train.create_train_state(config, model, tx,
                                              jax.random.key(0), mesh)
  step = train.make_train_step(config, model, tx, lr_fn, mesh, shardings)
  batch = sharding.host_to_global(
      train.create_pipeline(config).batch_for_step(0), mesh)
  rng = jax.random.key(1)
  # The plan's abstract inputs are what the real run passes.
  _, args = plan.train_step_program(config, mesh)
  real = (state, batch, rng)
  assert jax.tree.structure(args) == jax.tree.structure(real)
  for a, r in zip(jax.tree.leaves(args[:2]), jax.tree.leaves(real[:2])):
    assert (a.shape, a.dtype) == (r.shape, r.dtype)
    assert a.sharding.is_equivalent_to(r.sharding, len(r.shape))
  # The same program, so the same memory.
  traced = step.trace(*real)
  compiled = traced.lower().compile()
  assert row['memory'] == plan.compiled_memory(compiled)
  assert row['flops_per_device'] == perf.matmul_flops(traced.jaxpr) / 8
  new_state, metrics = compiled(*real)
  assert np.isfinite(float(metrics['loss'])) and int(new_state.step) == 1
  assert jax.tree.map(lambda x: x.sharding, new_state.params) == (
      shardings.params)


def test_flops_of_a_scanned_step_are_unrolled():
  # grad_accum_steps=2 runs the batch as 2 microbatches in a lax.scan: the
  # same work as one pass over the batch, which XLA counts once.
  # Global batch 16: microbatches of 8 over the 8 CPU devices.
  one = _row('cpu', training__batch_size=16)
  two = _row('cpu', training__batch_size=16, training__grad_accum_steps=2)
  assert two['flops_per_device'] == pytest.approx(one['flops_per_device'],
                                                  rel=1e-6)
  # What XLA's cost analysis gives (the scan body once) is about half.
  assert two['xla_flops'] < 0.7 * one['xla_flops']
  assert two['xla_flops'] < 0.7 * two['flops_per_device']


def test_sample_step_compiles_with_replicated_ema_params():
  row = _row('tpu:v5e:2x2', 'sample')
  assert row['fits'] and row['batch'] == 4  # sample.batch_size 2 -> 4 chips.
  train_row = _row('tpu:v5e:2x2')
  assert row['flops_per_device'] < train_row['flops_per_device'] / 2


@pytest.mark.parametrize('program', ['train', 'sample'])
def test_tpu_programs_run_the_pallas_kernel_per_device(program):
  """With attention at 32x32 (1,024 tokens) 'auto' takes the Pallas kernel
  on TPU, as on a slice; the train step and the sampler's denoiser enter
  attention.kernels_on, so the kernel is traced inside a shard_map (XLA
  cannot partition it). Traced only: the compile is the next test's."""
  config = _config(**{'data.image_size': 32, 'model.attn_resolutions': (32,)})
  target = plan.parse_target('tpu:v5e:2x2')
  mesh = sharding.make_mesh(config.mesh, _devices('tpu:v5e:2x2'))
  fn, args = (plan.train_step_program if program == 'train'
              else plan.sample_step_program)(config, mesh)
  with attention.compile_for(plan.attention_platform(target)):
    text = str(fn.trace(*args).jaxpr)
  assert 'pallas_call' in text and 'shard_map' in text
  # A GPU target traces on this host's choice (cuDNN cannot be traced here).
  assert plan.attention_platform(plan.parse_target('gpu:h100:4')) is None


def test_the_pallas_kernel_compiles_per_chip_for_tpu():
  """The kernel in a shard_map compiles with libtpu, each chip holding its
  quarter of the batch; outside kernels_on 'auto' falls back to XLA's
  einsum instead of failing ("Mosaic kernels cannot be automatically
  partitioned")."""
  target = plan.parse_target('tpu:v5e:2x2')
  mesh = sharding.make_mesh(_config().mesh, _devices('tpu:v5e:2x2'))
  split = sharding.batch_sharding(mesh)
  q = jax.ShapeDtypeStruct((8, 1024, 4, 64), jax.numpy.bfloat16,
                           sharding=split)

  def grad_fn(placed):
    def loss(q, k, v):
      with (attention.kernels_on(mesh, sharding.BATCH_AXES) if placed
            else contextlib.nullcontext()):
        out = attention.dot_product_attention(q, k, v)
      return out.astype(np.float32).sum()
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))

  for placed in (True, False):
    _, compiled = plan.compile_program(grad_fn(placed), (q, q, q), target)
    hlo = compiled.as_text()
    assert ('tpu_custom_call' in hlo) == placed, placed
    assert compiled.memory_analysis().argument_size_in_bytes == (
        3 * 8 * 1024 * 4 * 64 * 2 // 4)


@pytest.mark.parametrize('name, topology, devices, hosts', [
    ('tpu:v4-32', '2x2x4', 16, 4),      # Cloud names count TensorCores.
    ('tpu:v4:2x2x4', '2x2x4', 16, 4),   # One device per chip (megacore).
    ('tpu:v5p-128', '4x4x4', 64, 16),
    ('tpu:v5litepod-16', '4x4', 16, 4),
    ('tpu:v6e:2x2', '2x2', 4, 1),
    ('gpu:a100_80:2x8', '1x2x8', 16, 2),
    ('gpu:h200:8', '1x1x8', 8, 1),
])
def test_target_names(name, topology, devices, hosts):
  target = plan.parse_target(name)
  assert target.topology == topology
  found = plan.target_devices(target)
  assert len(found) == devices
  assert len({d.process_index for d in found}) == hosts


def test_multislice_target():
  target = plan.parse_target('tpu:v5e:2x2:slices=2')
  devices = plan.target_devices(target)
  assert target.num_slices == 2 and len(devices) == 8
  assert len({d.slice_index for d in devices}) == 2


@pytest.mark.parametrize('name, message', [
    ('tpu:v9:2x2', 'known: tpu:'),
    ('h100:8', 'known: tpu:'),
    ('gpu:h100:eight', 'known: tpu:'),
    ('tpu:v5p:4x4', '3 dimensions'),
    ('tpu:v4-24', 'not a slice size'),
])
def test_unknown_targets_list_the_known_ones(name, message):
  with pytest.raises(ValueError, match=message):
    plan.parse_target(name)


def _no_compile(*args, **kwargs):
  raise AssertionError('compiled before checking the input')


def _plan(monkeypatch, targets, **fields):
  monkeypatch.setattr(plan, 'measure', _no_compile)
  config = _config(**fields)
  config.plan.targets = targets
  return plan.plan(config, emit=lambda line: None)


def test_a_mesh_that_does_not_divide_the_devices_fails_first(monkeypatch):
  with pytest.raises(ValueError, match=r'tpu:v5e:2x2 \(4 devices\).*'
                     'mesh.data=8'):
    _plan(monkeypatch, 'gpu:h100:8,tpu:v5e:2x2', **{'mesh.data': 8})


def test_a_batch_that_does_not_divide_fails_first(monkeypatch):
  with pytest.raises(ValueError, match='batch_size=6.*multiple of 4'):
    _plan(monkeypatch, 'tpu:v5e:2x2', **{'training.batch_size': 6})
  # 2 hosts x 8 GPUs take multiples of 16.
  with pytest.raises(ValueError, match='batch_size=8 .*multiple of 16'):
    _plan(monkeypatch, 'gpu:h100:2x8')


def test_missing_compilers_name_the_requirements_file(monkeypatch):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: (
      None if name == 'libtpu' else find_spec(name)))
  with pytest.raises(RuntimeError, match='requirements-plan.txt'):
    _plan(monkeypatch, 'gpu:h100:4,tpu:v5e:2x2')
  with pytest.raises(ValueError, match='No targets'):
    _plan(monkeypatch, '')


def test_chip_memory_table():
  assert perf.table_memory('TPU v5 lite') == (16 * 2**30, 819e9)
  assert perf.table_memory('TPU v4')[0] == 32 * 2**30
  assert perf.table_memory('TPU v5')[0] == 95 * 2**30
  assert perf.table_memory('NVIDIA H100 80GB HBM3') == (80e9, 3350e9)
  assert perf.table_memory('NVIDIA A100-SXM4-80GB')[1] == 2039e9
  assert perf.table_memory('NVIDIA A100-SXM4-40GB')[1] == 1555e9
  assert perf.table_memory('NVIDIA H200 141GB HBM3e') == (141e9, 4800e9)
  assert perf.table_memory('cpu') == (None, None)
