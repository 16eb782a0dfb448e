"""Times the UNet3D forward+backward pass against a large matmul.

  python experiments/benchmark_model.py [--steps=5] [--override=key=value]

Jits grad(mean(unet(z)**2)) w.r.t. the parameters for the reference shape
(base 64, mults 1,2,4, 2 res blocks, attention at 8 and 16 pixels, batch 2 of
8x32x32x3), reads its FLOP count from XLA's cost analysis, and compares the
achieved FLOP/s with a float32 2048^3 matmul timed in the same process.
Prints one JSON line: step_time_s, flops, achieved_flops_per_s,
matmul_flops_per_s, mfu.
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


def _time(fn, *args, steps: int) -> float:
  """Median wall time of fn(*args) over `steps` runs, after a warm-up run."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _random_params(model, z, logsnr, seed=0):
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), z, logsnr))['params']
  rng = np.random.default_rng(seed)

  def fill(leaf):
    fan_in = np.prod(leaf.shape[:-1]) if len(leaf.shape) > 1 else 1
    x = rng.standard_normal(leaf.shape).astype(np.float32)
    return jnp.asarray(x / np.sqrt(fan_in))

  return jax.tree.map(fill, shapes)


def matmul_flops_per_s(n: int = 2048, steps: int = 5) -> float:
  """FLOP/s of a float32 n^3 matmul."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)),
                  jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  return 2 * n**3 / _time(f, a, a, steps=steps)


def benchmark(model_kwargs: dict, shape=SHAPE, steps: int = 5) -> dict:
  """Step time, FLOPs and FLOP/s of the jitted forward+backward pass."""
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
  step = _time(compiled, params, steps=steps)
  return dict(step_time_s=step, flops=flops, achieved_flops_per_s=flops / step,
              compile_s=compile_s, params=unet3d.count_params(params))


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
  result['matmul_flops_per_s'] = matmul_flops_per_s(steps=args.steps)
  result['mfu'] = result['achieved_flops_per_s'] / result['matmul_flops_per_s']
  result['model'] = {k: v for k, v in model_kwargs.items()}
  result['shape'] = SHAPE
  result['backend'] = jax.default_backend()
  print(json.dumps(result))


if __name__ == '__main__':
  main()
