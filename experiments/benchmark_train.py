"""Times the jitted train step and reports its FLOP rate and peak memory.

  python experiments/benchmark_train.py --config=configs/quickstart.py \
      [--config.training.batch_size=2 ...] [--steps=10] [--warmup=2]
  python experiments/benchmark_train.py --config=configs/ucf101_64.py \
      --per_device_batch=2 --num_devices=1 --compile_only \
      --config.model.remat=block --config.model.dtype=bfloat16 \
      --config.mesh.data=1 --config.mesh.fsdp=1

Any config field can be overridden, in particular the mesh
(--config.mesh.data, --config.mesh.fsdp, --config.mesh.param_sharding),
rematerialisation (--config.model.remat=none|block|full), the activation
dtype (--config.model.dtype=float32|bfloat16) and gradient accumulation
(--config.training.grad_accum_steps). --per_device_batch sets the global
batch to that many examples per device of the mesh; --num_devices takes the
mesh from the first N devices. --compile_only builds the state and batch as
abstract sharded shapes (nothing is allocated, so models larger than the
host's memory can be measured) and skips the timing. --residuals=also|only
adds (or reports only) the bytes that the UNet's backward pass keeps from its
forward pass, per example: traced, not compiled, so it shows what the remat
policy asks for on any backend, in seconds.

The last line printed is one JSON object: compile_s, the compiled step's
memory analysis per device (argument, output, alias, temp and peak bytes,
and peak and temp bytes per example on a device; see `memory_report`),
flops_per_step (XLA cost analysis), matmul_conv_flops_per_step (dots and
convolutions only, 2 per multiply-add, as PyTorch's flop counter counts; see
perf.matmul_flops), and unless --compile_only: step_time_s
(median after warm-up), videos_per_s, achieved_flops_per_s,
matmul_flops_per_s (a large float32 matmul timed in the same process on the
same device) and mfu (their ratio).
"""

import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vdm_jax import denoiser  # pylint: disable=g-import-not-at-top
from vdm_jax import perf  # pylint: disable=g-import-not-at-top
from vdm_jax import sharding  # pylint: disable=g-import-not-at-top
from vdm_jax import train  # pylint: disable=g-import-not-at-top
from vdm_jax import training  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compiling.')
_MATMUL_N = flags.DEFINE_integer('matmul_n', 2048, 'Size of the matmul.')
_PER_DEVICE_BATCH = flags.DEFINE_integer(
    'per_device_batch', None,
    'Examples per device; overrides training.batch_size.')
_NUM_DEVICES = flags.DEFINE_integer(
    'num_devices', None, 'Use the first N devices (default: all).')
_COMPILE_ONLY = flags.DEFINE_bool(
    'compile_only', False,
    'Compile from abstract shapes and report memory and FLOPs; no steps.')
_RESIDUALS = flags.DEFINE_enum(
    'residuals', 'no', ['no', 'also', 'only'],
    'Report the bytes the UNet\'s backward pass keeps per example: not,'
    ' also, or only (traced in seconds; no compilation, no steps).')


def _median_time(fn, repeats):
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def matmul_flops_per_s(n: int) -> float:
  """FLOP/s of an n x n x n float32 matmul on the default device."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  mm = jax.jit(jnp.matmul)
  jax.block_until_ready(mm(a, b))
  return 2 * n**3 / _median_time(lambda: mm(a, b), 5)


def batch_shapes(config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Global shapes and dtypes of a training batch."""
  d = config.data
  b = config.training.batch_size
  t = d.num_frames + d.image_frames
  return {
      'video': ((b, t, d.image_size, d.image_size, d.channels), np.uint8),
      'label': ((b,), np.int32),
      'frame_mask': ((b, t), np.bool_),
  }


def abstract_inputs(config, model, tx, mesh):
  """(state, batch) as sharded ShapeDtypeStructs, with the state shardings."""
  abstract, shardings = train.abstract_state(config, model, tx, mesh)
  state = jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, shardings)
  batch_sharding = sharding.batch_sharding(mesh)
  batch = {
      k: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding)
      for k, (shape, dtype) in batch_shapes(config).items()
  }
  return state, batch, shardings


def memory_report(mem, per_device_batch: int) -> dict | None:
  """Bytes per device from `Compiled.memory_analysis()`.

  `peak` is argument + output - alias + temp: the inputs, the outputs that
  do not reuse a donated input, and XLA's temporary buffer (its buffer
  assignment already packs temporaries by liveness). `xla_peak` is XLA's own
  peak_memory_in_bytes, which the CPU backend leaves at about the argument
  size; it is kept for accelerators.
  """
  if mem is None:
    return None
  get = lambda name: int(getattr(mem, name, 0) or 0)
  argument, output = get('argument_size_in_bytes'), get('output_size_in_bytes')
  alias, temp = get('alias_size_in_bytes'), get('temp_size_in_bytes')
  peak = argument + output - alias + temp
  return {
      'argument': argument,
      'output': output,
      'alias': alias,
      'temp': temp,
      'generated_code': get('generated_code_size_in_bytes'),
      'peak': peak,
      'xla_peak': get('peak_memory_in_bytes'),
      'peak_per_example': peak / per_device_batch,
      'temp_per_example': temp / per_device_batch,
  }


def saved_residual_bytes(config, model, batch_size: int) -> int:
  """Bytes of what the UNet's VJP keeps from its forward pass (abstract).

  Traced only (jax.eval_shape of jax.vjp), so it is exact for what JAX asks
  to keep under config.model.remat and independent of the backend; XLA may
  still fuse or schedule buffers differently. The closure also holds the
  parameters and other batch-independent arrays, so differences between
  batch sizes give the per-example part.
  """
  d = config.data
  t = d.num_frames + d.image_frames
  z = jax.ShapeDtypeStruct(
      (batch_size, t, d.image_size, d.image_size, d.channels), jnp.float32)
  logsnr = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
  label = (jax.ShapeDtypeStruct((batch_size,), jnp.int32)
           if config.model.num_classes else None)
  params = denoiser.abstract_params(config, model)

  def vjp_fn(params, z, logsnr, label):
    apply = lambda p: model.apply(
        {'params': p}, z, logsnr, label=label, train=True,
        rngs={'dropout': jax.random.key(0)})
    return jax.vjp(apply, params)[1]

  residuals = jax.eval_shape(vjp_fn, params, z, logsnr, label)
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(residuals))


def random_batch(config, mesh):
  d = config.data
  b = config.training.batch_size // jax.process_count()
  t = d.num_frames + d.image_frames
  rng = np.random.default_rng(0)
  batch = {
      'video': rng.integers(
          0, 256, (b, t, d.image_size, d.image_size, d.channels), np.uint8),
      'label': rng.integers(0, max(config.model.num_classes, 1), (b,),
                            dtype=np.int32),
      'frame_mask': np.arange(t)[None].repeat(b, 0) < d.num_frames,
  }
  return sharding.host_to_global(batch, mesh)


def main(argv):
  del argv
  config = _CONFIG.value
  devices = jax.devices()[:_NUM_DEVICES.value] if _NUM_DEVICES.value else None
  mesh = sharding.make_mesh(config.mesh, devices)
  if _PER_DEVICE_BATCH.value:
    config.training.batch_size = _PER_DEVICE_BATCH.value * mesh.devices.size
  sharding.check_batch_size(config.training.batch_size, mesh)
  per_device_batch = config.training.batch_size // mesh.devices.size
  model = denoiser.create_model(config)
  tx, lr_fn = training.create_optimizer(config)
  residuals = None
  if _RESIDUALS.value != 'no':
    one, two = (saved_residual_bytes(config, model, b) for b in (1, 2))
    residuals = {'batch_1': one, 'per_example': two - one}
    if _RESIDUALS.value == 'only':
      print(json.dumps({'config': config_summary(config, mesh),
                        'saved_residual_bytes': residuals}))
      return
  rng = jax.random.key(1)
  if _COMPILE_ONLY.value:
    state, batch, shardings = abstract_inputs(config, model, tx, mesh)
  else:
    state, shardings = train.create_train_state(
        config, model, tx, jax.random.key(0), mesh)
    batch = random_batch(config, mesh)
  step_fn = train.make_train_step(config, model, tx, lr_fn, mesh, shardings)
  t0 = time.perf_counter()
  traced = step_fn.trace(state, batch, rng)
  compiled = traced.lower().compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', float('nan'))) * mesh.devices.size
  # Counted as PyTorch's flop counter counts (experiments/lucidrains_step.py):
  # matmuls and convolutions only, over the global batch.
  matmul_conv_flops = perf.matmul_flops(traced.jaxpr)
  result = {
      'config': config_summary(config, mesh),
      'device': str(mesh.devices.flat[0].device_kind),
      'num_devices': mesh.devices.size,
      'params': int(sum(x.size for x in jax.tree.leaves(state.params))),
      'compile_s': round(compile_s, 2),
      'flops_per_step': flops,
      'matmul_conv_flops_per_step': matmul_conv_flops,
      'memory_bytes_per_device': memory_report(
          compiled.memory_analysis(), per_device_batch),
  }
  if residuals is not None:
    result['saved_residual_bytes'] = residuals
  if not _COMPILE_ONLY.value:
    result.update(time_steps(compiled, state, batch, rng, flops, mesh))
    result['videos_per_s'] = config.training.batch_size / result['step_time_s']
    result['matmul_conv_flops_per_s'] = (
        matmul_conv_flops / result['step_time_s'])
  print(json.dumps(result))


def config_summary(config, mesh) -> dict:
  return {
      'batch_size': config.training.batch_size,
      'per_device_batch': config.training.batch_size // mesh.devices.size,
      'num_frames': config.data.num_frames,
      'image_frames': config.data.image_frames,
      'image_size': config.data.image_size,
      'base_channels': config.model.base_channels,
      'channel_mults': list(config.model.channel_mults),
      'attn_resolutions': list(config.model.attn_resolutions),
      'dtype': config.model.dtype,
      'remat': config.model.remat,
      'grad_accum_steps': config.training.grad_accum_steps,
      'mesh': dict(mesh.shape),
      'param_sharding': config.mesh.param_sharding,
  }


def time_steps(compiled, state, batch, rng, flops, mesh) -> dict:
  """Median step time after warm-up, and the FLOP rate against a matmul."""
  for _ in range(_WARMUP.value):
    state, metrics = compiled(state, batch, rng)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(_STEPS.value):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  step_time = statistics.median(times)
  mm = matmul_flops_per_s(_MATMUL_N.value) * mesh.devices.size
  achieved = flops / step_time
  return {
      'step_time_s': step_time,
      'achieved_flops_per_s': achieved,
      'matmul_flops_per_s': mm,
      'mfu': achieved / mm,
  }


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
