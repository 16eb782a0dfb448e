"""Throughput accounting: FLOPs, peaks, TFLOP/s and MFU in the train loop,
the profiler window, one compile per run."""

import collections
import glob
import os

import jax
import jax.numpy as jnp
from jax import monitoring
import ml_collections
import numpy as np
import pytest

from vdm_jax import checkpoint
from vdm_jax import perf
from vdm_jax import sharding
from vdm_jax import training

M, N, K = 64, 64, 512  # The matmul of the fake train step.
_COMPILES = collections.Counter()


def _count_compiles(event, duration, **kw):
  del duration
  if event == '/jax/core/compile/backend_compile_duration':
    _COMPILES[kw.get('fun_name')] += 1


monitoring.register_event_duration_secs_listener(_count_compiles)


def _mesh():
  return sharding.make_mesh(ml_collections.ConfigDict(
      {'data': -1, 'fsdp': 1, 'param_sharding': 'replicated'}))


def test_matmul_flops_are_2mnk_split_over_the_devices():
  mesh = _mesh()
  n = mesh.devices.size
  assert n == 8
  a = jax.device_put(jnp.ones((M, K)), sharding.batch_sharding(mesh))
  b = jax.device_put(jnp.ones((K, N)), sharding.replicated(mesh))
  compiled = jax.jit(jnp.matmul).lower(a, b).compile()
  assert perf.compiled_flops(compiled) == 2 * M * N * K / n


@pytest.mark.parametrize('kind,dtype,tflops', [
    ('NVIDIA A100-SXM4-80GB', 'bfloat16', 312),
    ('NVIDIA A100-PCIE-40GB', 'float32', 156),
    ('NVIDIA H100 80GB HBM3', 'bfloat16', 989.5),
    ('NVIDIA H100 PCIe', 'bfloat16', 756.5),
    ('NVIDIA H200', 'float32', 494.5),
    ('NVIDIA H200 NVL', 'bfloat16', 835.5),
    ('TPU v4', 'bfloat16', 275),
    ('TPU v5 lite', 'bfloat16', 197),
    ('TPU v5', 'float32', 459),
    ('TPU v5p', 'bfloat16', 459),
    ('TPU v6 lite', 'bfloat16', 918),
])
def test_peak_table(kind, dtype, tflops):
  assert perf.table_peak_flops(kind, dtype) == tflops * 1e12


@pytest.mark.parametrize('kind', ['TPU v3', 'TPU v5 something',
                                  'NVIDIA GeForce RTX 4090', 'cpu', ''])
def test_unknown_device_has_no_peak_and_no_mfu(kind):
  assert perf.table_peak_flops(kind) is None
  throughput = perf.Throughput(1e9, None, 'float32', kind)
  assert throughput.metrics(2.0) == {'tflops_per_device': 2e-3}
  assert 'MFU unknown' in throughput.describe()


def test_matmul_dtype_sees_bf16_inside_a_remat():
  f32 = jnp.ones((4, 4))
  body = jax.checkpoint(lambda x: (x.astype(jnp.bfloat16) @ x.astype(
      jnp.bfloat16)).sum())
  assert perf.matmul_dtype(jax.make_jaxpr(body)(f32)) == 'bfloat16'
  assert perf.matmul_dtype(jax.make_jaxpr(lambda x: x @ x)(f32)) == 'float32'


class _Writer:
  """Records write_scalars; the rest of the writer interface is a no-op."""

  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars[step] = dict(scalars)

  def flush(self):
    pass


def _matmul_run(workdir, **settings):
  """training.run of a sharded matmul 'train step' on the 8 devices."""
  mesh = _mesh()
  repl = sharding.replicated(mesh)
  state = training.TrainState(
      step=jnp.zeros((), jnp.int32), params={'w': jnp.ones((K, N))},
      ema_params={'w': jnp.ones((K, N))}, opt_state={'m': jnp.zeros(2)})
  state = jax.device_put(state, repl)
  x = jax.device_put(jnp.ones((M, K)), sharding.batch_sharding(mesh))

  def step(state, x, scale):
    y = x @ state.params['w']
    metrics = {'loss': jnp.mean(y) * scale, 'grad_norm': jnp.float32(0)}
    return state.replace(step=state.step + 1), metrics

  fn = jax.jit(step, out_shardings=(repl, repl), donate_argnums=0)
  writer = _Writer()
  _COMPILES.clear()
  training.run(
      state, training.Step(fn, lambda s, b: (s, b, jnp.float32(1))),
      lambda start: iter([x] * 10),
      ckpt=checkpoint.Checkpointer(workdir), writer=writer,
      settings=training.LoopSettings(
          num_train_steps=3, log_every_steps=1, checkpoint_every_steps=100,
          **settings))
  return writer.scalars


def test_run_logs_tflops_and_mfu_compiles_once_and_profiles(tmp_path):
  scalars = _matmul_run(str(tmp_path), profile_steps=(2, 3))
  # The step compiles once (its FLOPs come from that executable); the
  # rest is the CPU peak's matmul and a constant.
  assert _COMPILES['jit(step)'] == 1, _COMPILES
  assert set(_COMPILES) <= {'jit(step)', 'jit(matmul)',
                            'jit(broadcast_in_dim)'}, _COMPILES
  want = 2 * M * N * K / 8  # Per device; + the mean (M N / 8) and step + 1.
  for step in (1, 2, 3):
    s = scalars[step]
    flops = s['tflops_per_device'] * 1e12 / s['steps_per_sec']
    np.testing.assert_allclose(flops, want, rtol=3e-3)
    np.testing.assert_allclose(
        s['mfu'], s['tflops_per_device'] * 1e12 / perf.cpu_matmul_flops(),
        rtol=1e-6)
  traces = glob.glob(os.path.join(str(tmp_path), 'profile', 'plugins',
                                  'profile', '*', '*.xplane.pb'))
  assert traces, os.listdir(str(tmp_path))


def test_plain_callable_trains_without_throughput(tmp_path):
  state = training.TrainState(
      step=jnp.zeros((), jnp.int32), params={'w': jnp.ones(2)},
      ema_params={'w': jnp.ones(2)}, opt_state={'m': jnp.zeros(2)})
  writer = _Writer()
  training.run(
      state, lambda s, b: (s.replace(step=s.step + 1),
                           {'loss': b, 'grad_norm': b}),
      lambda start: iter([jnp.float32(1)] * 3),
      ckpt=checkpoint.Checkpointer(str(tmp_path)), writer=writer,
      settings=training.LoopSettings(2, 1, 100))
  assert set(writer.scalars[2]) == {'loss', 'grad_norm', 'steps_per_sec'}
  # A Step around a plain function (tests wrap jitted steps so) too.
  throughput = perf.step_throughput(
      training.Step(lambda s, b: (s, {}), lambda s, b: (s, b)), state, 1.0)
  assert throughput.flops is None and throughput.metrics(1.0) == {}


@pytest.mark.parametrize('steps', [(3, 3), (0, 2), (2, 6), (1.0, 2), (1,)])
def test_bad_profile_window_is_refused(steps):
  with pytest.raises(ValueError, match='profile_steps'):
    training.LoopSettings(4, 1, 1, profile_steps=steps)
  training.LoopSettings(4, 1, 1, profile_steps=(1, 5))  # The whole run.


def test_profile_steps_from_the_config():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  settings = training.LoopSettings.from_config(config.training)
  assert settings.profile_steps is None
  config.training.profile_steps = (2, 3)
  settings = training.LoopSettings.from_config(config.training)
  assert settings.profile_steps == (2, 3)
  config.training.profile_steps = (2, 99)
  with pytest.raises(ValueError, match='profile_steps'):
    training.LoopSettings.from_config(config.training)


def test_loop_bodies_are_counted_once_here():
  # The reason LoopSettings.grad_accum_steps scales the FLOPs.
  assert perf.loops_counted_once()


def test_matmul_flops_count_dots_and_convolutions_like_torch():
  """2 per multiply-add: a conv, a dot, their backward, a scan of dots."""
  x = jnp.ones((2, 8, 8, 4))          # NHWC
  k = jnp.ones((3, 3, 4, 6))          # HWIO
  w = jnp.ones((6, 5))

  def f(x, k, w):
    y = jax.lax.conv_general_dilated(
        x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.sum(jnp.tanh(y.mean((1, 2)) @ w))

  conv = 2 * (2 * 8 * 8 * 6) * (3 * 3 * 4)
  dot = 2 * 2 * 6 * 5
  assert perf.matmul_flops(jax.make_jaxpr(f)(x, k, w)) == conv + dot
  # The gradient in k and w: each product once more per operand
  # differentiated through it (the input gradient of the conv is not
  # needed: x is not differentiated, but y's is, through the dot).
  grad = jax.make_jaxpr(jax.grad(f, argnums=(1, 2)))(x, k, w)
  assert perf.matmul_flops(grad) == 2 * conv + 3 * dot
  # A scan body counts once per iteration; a jit inside counts too.
  body = jax.jit(lambda c, _: (c @ jnp.ones((5, 5)), None))
  scan = jax.make_jaxpr(
      lambda c: jax.lax.scan(body, c, None, length=7)[0])(jnp.ones((3, 5)))
  assert perf.matmul_flops(scan) == 7 * 2 * 3 * 5 * 5
  # XLA's cost analysis agrees on one unpadded convolution (with padding it
  # leaves out the products with the padding's zeros; torch and this count
  # them, as the output shape times the kernel size).
  valid = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  ours = perf.matmul_flops(jax.make_jaxpr(valid)(x, k))
  assert ours == 2 * (2 * 6 * 6 * 6) * (3 * 3 * 4)
  xla = perf.compiled_flops(jax.jit(valid).lower(x, k).compile())
  assert xla is not None  # The CPU backend has a cost analysis.
  np.testing.assert_allclose(xla, ours, rtol=0.01)


def test_compiled_operations_are_classified_by_what_they_compute():
  """perf.parse_hlo / hlo_kind, which experiments/profile_step.py sums by."""
  def f(x, k, w):
    y = jax.lax.conv_general_dilated(
        x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.sum(y ** 2, axis=(1, 2)) @ w

  args = (jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 6)), jnp.ones((6, 5)))
  # With XLA's optimisations (tests/conftest.py turns most off), as a real
  # step is compiled: some operations arrive fused.
  was = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  try:
    text = jax.jit(f).lower(*args).compile().as_text()
  finally:
    jax.config.update('jax_disable_most_optimizations', was)
  comps, instructions = perf.parse_hlo(text)
  entry = next(line for line in text.splitlines()
               if line.startswith('ENTRY'))
  assert entry.split()[1].lstrip('%') in comps
  kinds = {perf.hlo_kind(name, comps, instructions)
           for name in instructions}
  assert 'fusion' not in kinds, kinds  # Every fusion is looked into.
  # The convolution, the dot and the sum each land in their own kind,
  # whether XLA left them alone or fused them.
  assert {'convolution', 'fusion:convolution'} & kinds, kinds
  assert {'dot', 'fusion:dot'} & kinds, kinds
  assert {'reduce', 'fusion:reduce'} & kinds, kinds
  # sum(y ** 2) arrives as one fusion (a multiply into a reduce), read as a
  # reduction, not as elementwise work.
  assert 'fusion:reduce' in kinds, kinds
  assert perf.hlo_kind('no such op', comps, instructions) is None
  # The convolution's FLOPs from the HLO: 2 per multiply-add, padding
  # included (as perf.matmul_flops counts on the jaxpr).
  convs = [n for n in instructions if perf.hlo_kind(n, comps, instructions)
           in ('convolution', 'fusion:convolution')]
  assert len(convs) == 1, convs
  assert perf.hlo_conv_flops(convs[0], comps, instructions) == (
      2 * (2 * 8 * 8 * 6) * (3 * 3 * 4))


def test_pallas_attention_counts_every_block_of_its_grid():
  """The flash kernel's jaxpr is one block of a (batch, heads, q blocks, kv
  blocks) grid: counted per block, its forward has the einsum's 4 B H Tq Tk
  D FLOPs (traced for TPU; nothing compiles)."""
  from vdm_jax.models import attention  # pylint: disable=g-import-not-at-top
  q = jax.ShapeDtypeStruct((2, 512, 4, 64), jnp.float32)
  counts = {}
  for impl in ('xla', 'pallas'):
    fn = jax.jit(lambda q, k, v, impl=impl: attention.dot_product_attention(
        q, k, v, implementation=impl))
    with attention.compile_for('tpu'):
      counts[impl] = perf.matmul_flops(fn.trace(q, q, q).jaxpr)
  assert counts['xla'] == 4 * 2 * 4 * 512 * 512 * 64
  assert counts['pallas'] == counts['xla']


def test_a_shard_map_body_counts_once_per_shard():
  """A shard_map body has one device's shapes; split over 'data' (4) and
  copied over 'fsdp' (2), the matmul counts 4 times: the global 2 m n k."""
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((4, 2), ('data', 'fsdp'))
  fn = jax.jit(lambda a, b: jax.shard_map(
      lambda x, y: x @ y, mesh=mesh, in_specs=(P('data'), P()),
      out_specs=P('data'))(a, b))
  traced = fn.trace(
      jax.ShapeDtypeStruct((64, 32), jnp.float32,
                           sharding=NamedSharding(mesh, P('data'))),
      jax.ShapeDtypeStruct((32, 16), jnp.float32,
                           sharding=NamedSharding(mesh, P())))
  assert perf.matmul_flops(traced.jaxpr) == 2 * 64 * 32 * 16
  # (all shards, one device): plan.py adds one device's share exactly.
  assert perf.shard_map_flops(traced.jaxpr) == (2 * 64 * 32 * 16,
                                                2 * 16 * 32 * 16)
