"""Cost of the sampler scan and of a reconstruction-guided step.

  python experiments/benchmark_sampling.py [--num_steps=32] [--batch=8]
      [--config=configs/quickstart.py] [--repeats=3]

With the UNet3D of the config (random init) as denoiser, times
  call:   one jitted denoiser call on [B, T, H, W, C];
  scan:   the full N-step ancestral sampler (one lax.scan);
  guided: the same sampler with reconstruction guidance (first 2 frames
          known, w_r = 2), i.e. a forward and a backward pass per step,
and prints as its last line a JSON object with
  sampler_overhead  = scan / (N * call)   (goal <= 1.05)
  guided_step_ratio = guided / scan       (goal <= 3.0, VDM 3.1 estimate).
Each time is the median of --repeats runs after a compiling run.
"""

import argparse
import functools
import importlib.util
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
from vdm_jax import denoiser
from vdm_jax import sampling
from vdm_jax import schedules


def _median_time(fn, repeats: int) -> float:
  jax.block_until_ready(fn())  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _load_config(path: str):
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main() -> None:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default=os.path.join(root, 'configs',
                                                       'quickstart.py'))
  parser.add_argument('--num_steps', type=int, default=32)
  parser.add_argument('--batch', type=int, default=None)
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()

  config = _load_config(args.config)
  d = config.data
  batch = args.batch or config.sample.batch_size
  shape = (batch, d.num_frames, d.image_size, d.image_size, d.channels)
  model = denoiser.create_model(config)
  z = jax.random.normal(jax.random.key(0), shape)
  logsnr = jnp.zeros((batch,))
  params = jax.jit(functools.partial(denoiser.init_params, config, model))(
      jax.random.key(1))
  denoise_fn = denoiser.make_denoise_fn(model, params)
  # The bound denoiser is a pytree: its parameters are traced arguments.
  call = jax.jit(lambda fn, z, logsnr: fn(z, logsnr, {}))
  logsnr_fn = schedules.get_logsnr_fn(config.diffusion, d.image_size)
  spec = sampling.SamplerSpec.from_config(config.sample).replace(
      sampler='ancestral', num_steps=args.num_steps)
  kw = dict(logsnr_fn=logsnr_fn, target=config.diffusion.target, spec=spec)
  x_a = jax.random.uniform(jax.random.key(2), shape, minval=-1, maxval=1)
  mask = jnp.arange(d.num_frames)[None, :] < 2
  guidance = sampling.make_guidance(
      x_a=x_a, mask=jnp.broadcast_to(mask, (batch, d.num_frames)),
      recon_weight=2.0)
  rng = jax.random.key(3)

  t_call = _median_time(lambda: call(denoise_fn, z, logsnr),
                        5 * args.repeats)
  t_scan = _median_time(lambda: sampling.sample(denoise_fn, rng, shape, **kw),
                        args.repeats)
  t_guided = _median_time(
      lambda: sampling.sample(denoise_fn, rng, shape, guidance=guidance, **kw),
      args.repeats)
  result = dict(
      sampler_overhead=round(t_scan / (args.num_steps * t_call), 4),
      guided_step_ratio=round(t_guided / t_scan, 4),
      call_s=t_call, scan_s=t_scan, guided_scan_s=t_guided,
      num_steps=args.num_steps, shape=shape,
      config=os.path.relpath(args.config, root),
      device=str(jax.devices()[0].device_kind), jax=jax.__version__)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
