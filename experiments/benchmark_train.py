"""Times the jitted train step and reports its FLOP rate against a matmul.

  python experiments/benchmark_train.py --config=configs/quickstart.py \
      [--config.training.batch_size=2 ...] [--steps=10] [--warmup=2]

The last line printed is one JSON object: step_time_s (median after
warm-up), videos_per_s, flops_per_step (XLA cost analysis of the compiled
step), achieved_flops_per_s, matmul_flops_per_s (a large float32 matmul timed
in the same process on the same device), mfu (their ratio), and the compiled
step's memory analysis (bytes) per device.
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
from vdm_jax import sharding  # pylint: disable=g-import-not-at-top
from vdm_jax import train  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
_STEPS = flags.DEFINE_integer('steps', 10, 'Timed steps.')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'Untimed steps after compiling.')
_MATMUL_N = flags.DEFINE_integer('matmul_n', 2048, 'Size of the matmul.')


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
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.training.batch_size, mesh)
  model = train.create_model(config)
  tx, lr_fn = train.create_optimizer(config)
  state, shardings = train.create_train_state(
      config, model, tx, jax.random.key(0), mesh)
  step_fn = train.make_train_step(config, model, tx, lr_fn, mesh, shardings)
  batch = random_batch(config, mesh)
  rng = jax.random.key(1)
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, batch, rng).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', float('nan'))) * mesh.devices.size
  mem = compiled.memory_analysis()
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
  result = {
      'config': {
          'batch_size': config.training.batch_size,
          'num_frames': config.data.num_frames,
          'image_size': config.data.image_size,
          'base_channels': config.model.base_channels,
          'channel_mults': list(config.model.channel_mults),
          'dtype': config.model.dtype,
          'remat': config.model.remat,
      },
      'device': str(jax.devices()[0].device_kind),
      'num_devices': mesh.devices.size,
      'params': int(sum(x.size for x in jax.tree.leaves(state.params))),
      'compile_s': round(compile_s, 2),
      'step_time_s': step_time,
      'videos_per_s': config.training.batch_size / step_time,
      'flops_per_step': flops,
      'achieved_flops_per_s': achieved,
      'matmul_flops_per_s': mm,
      'mfu': achieved / mm,
      'memory_bytes_per_device': {
          'argument': getattr(mem, 'argument_size_in_bytes', None),
          'output': getattr(mem, 'output_size_in_bytes', None),
          'temp': getattr(mem, 'temp_size_in_bytes', None),
          'generated_code': getattr(mem, 'generated_code_size_in_bytes', None),
      } if mem is not None else None,
  }
  print(json.dumps(result))


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
