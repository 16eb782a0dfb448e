"""Times the UNet3D forward+backward pass against a large matmul.

  python experiments/benchmark_model.py [--steps=5] [--override=key=value]

Jits grad(mean(unet(z)**2)) w.r.t. the parameters for the reference shape
(base 64, mults 1,2,4, 2 res blocks, attention at 8 and 16 pixels, batch 2 of
8x32x32x3), reads its FLOP count from XLA's cost analysis, and compares the
achieved FLOP/s with a float32 2048^3 matmul timed in the same process.
Prints one JSON line: step_time_s, flops, achieved_flops_per_s,
matmul_flops_per_s, mfu (see `benchmark` for how a shared CPU is handled).
"""

import argparse
import ast
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vdm_jax.models import unet3d  # pylint: disable=g-import-not-at-top

MODEL = dict(base_channels=64, channel_mults=(1, 2, 4), num_res_blocks=2,
             attn_resolutions=(8, 16))
SHAPE = (2, 8, 32, 32, 3)  # B, T, H, W, C


def _time(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def _random_params(model, z, logsnr, seed=0):
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), z, logsnr))['params']
  rng = np.random.default_rng(seed)

  def fill(leaf):
    fan_in = np.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 1
    x = rng.standard_normal(leaf.shape).astype(np.float32)
    return jnp.asarray(x / np.sqrt(fan_in))

  return jax.tree.map(fill, shapes)


def benchmark(model_kwargs: dict, shape=SHAPE, steps: int = 5,
              matmul_size: int = 2048) -> dict:
  """Times the jitted forward+backward pass and a matmul, interleaved.

  The CPU may be shared, so each round times the matmul (best of 2) right
  before one model step; mfu is the median over rounds of the ratio of the
  two FLOP rates, which cancels slow drifts in the load. The best step and
  best matmul are reported too (closest to an idle machine).

  Args:
    model_kwargs: UNet3D fields.
    shape: [B, T, H, W, C] of the input.
    steps: timed rounds (after one warm-up).
    matmul_size: n of the float32 n x n x n matmul.

  Returns:
    A dict of the measurements.
  """
  model = unet3d.UNet3D(**model_kwargs)
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  logsnr = jnp.asarray(rng.uniform(-20, 20, shape[:1]), jnp.float32)
  params = _random_params(model, z, logsnr)

  def loss(p):
    return jnp.mean(jnp.square(model.apply({'params': p}, z, logsnr)))

  start = time.perf_counter()
  compiled = jax.jit(jax.grad(loss)).lower(params).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost['flops'])

  a = jnp.asarray(rng.standard_normal((matmul_size,) * 2), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul_flops = 2 * matmul_size**3
  _time(matmul, a, a)
  _time(compiled, params)
  step_times, matmul_times = [], []
  for _ in range(steps):
    matmul_times.append(min(_time(matmul, a, a) for _ in range(2)))
    step_times.append(_time(compiled, params))
  step_times, matmul_times = np.array(step_times), np.array(matmul_times)
  ratios = (flops / step_times) / (matmul_flops / matmul_times)
  step = float(np.median(step_times))
  return dict(
      step_time_s=step,
      flops=flops,
      achieved_flops_per_s=flops / step,
      matmul_flops_per_s=float(matmul_flops / np.median(matmul_times)),
      mfu=float(np.median(ratios)),
      best_step_time_s=float(step_times.min()),
      mfu_best=float((flops / step_times.min())
                     / (matmul_flops / matmul_times.min())),
      compile_s=compile_s,
      params=unet3d.count_params(params),
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--override', action='append', default=[],
                      help='model field=python literal, e.g. dtype=bfloat16')
  args = parser.parse_args()
  model_kwargs = dict(MODEL)
  for item in args.override:
    key, value = item.split('=', 1)
    try:
      model_kwargs[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      model_kwargs[key] = value
  result = benchmark(model_kwargs, steps=args.steps)
  result['model'] = model_kwargs
  result['shape'] = SHAPE
  result['backend'] = jax.default_backend()
  print(json.dumps(result))


if __name__ == '__main__':
  main()
