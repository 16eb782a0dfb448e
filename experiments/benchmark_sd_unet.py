"""SD-1.5's UNet forward: vdm_jax (Flax) against diffusers' PyTorch, one CPU.

  .venv/bin/python experiments/benchmark_sd_unet.py [--runs=3] [--size=64]

Stable Diffusion 1.5's UNet2DConditionModel config (859,520,964 parameters)
with random weights, float32, batch 1, 64x64 latents (512x512 images), 77
tokens of 768 channels, on this machine's CPU cores with the same thread
count for both. In turn, so that only one model is in memory at a time
(~3.5 GB each):

  1. diffusers (PyTorch): a warm-up forward (counted by
     torch.utils.flop_counter, which has no rule for the CPU kernel of
     scaled_dot_product_attention, `_scaled_dot_product_flash_attention_for_
     cpu`: its count leaves attention's two matmuls out), then --runs timed
     forwards; the weights are saved to a temporary diffusers folder.
  2. vdm_jax: the forward compiled from abstract shapes (no weights: the
     compile time, XLA's memory analysis, matmul/conv FLOPs counted on the
     jaxpr by perf.matmul_flops as torch counts them), then the folder
     loaded by vdm_jax.pretrained.unet2d.load and --runs timed forwards of
     that executable; the prediction compared with PyTorch's (the same
     weights and inputs: a full-size parity check).

Prints the hardware, each side's median seconds, our time over theirs, and
last one JSON line with everything.
"""

import gc
import json
import os
import platform
import statistics
import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax import perf
from vdm_jax.pretrained import convert
from vdm_jax.pretrained import unet2d

_RUNS = flags.DEFINE_integer('runs', 3, 'Timed forwards per framework.')
_SIZE = flags.DEFINE_integer('size', 64, 'Latent height and width.')
_BATCH = flags.DEFINE_integer('batch', 1, 'Batch size.')
_TOKENS = flags.DEFINE_integer('tokens', 77, 'Context length.')
_THREADS = flags.DEFINE_integer('threads', 0,
                                'torch threads (0: os.cpu_count()).')
_COMPILE_ONLY = flags.DEFINE_bool(
    'compile_only', False,
    'Only compile vdm_jax\'s forward from abstract shapes (no weights, no '
    'torch): compile time, memory analysis, FLOPs.')
_TINY = flags.DEFINE_bool('tiny', False,
                          'A tiny config instead of SD-1.5 (checks the '
                          'script in seconds).')

SD15 = unet2d.SD15_CONFIG
TINY = dict(SD15, block_out_channels=[32, 64, 64, 64], norm_num_groups=8,
            attention_head_dim=4)


def _config() -> dict:
  return TINY if _TINY.value else SD15


def _cpu_name() -> str:
  try:
    with open('/proc/cpuinfo', encoding='utf-8') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def _timed(fn, runs: int) -> list[float]:
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def _torch_side(folder: str, inputs: tuple[np.ndarray, ...], threads: int,
                runs: int) -> dict:
  """diffusers' forward: times, FLOPs, prediction; saves the weights."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from torch.utils import flop_counter  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  model = diffusers.UNet2DConditionModel.from_config(_config()).eval()
  x, t, ctx = inputs
  args = (torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))),
          torch.from_numpy(t), torch.from_numpy(ctx))
  with torch.no_grad():
    counter = flop_counter.FlopCounterMode(display=False)
    with counter:
      model(*args)
    out = model(*args).sample.numpy().transpose(0, 2, 3, 1)

    def step():
      model(*args)
    times = _timed(step, runs)
  model.save_pretrained(folder)
  del model
  gc.collect()
  return dict(times=times, flops=float(counter.get_total_flops()),
              out=out, version=torch.__version__,
              diffusers=diffusers.__version__)


def _compile(inputs: tuple[np.ndarray, ...]) -> dict:
  """vdm_jax's forward compiled from abstract shapes (no weights)."""
  module = unet2d.build(_config())
  abstract = unet2d.abstract_params(module)

  def forward(params, x, t, ctx):
    return module.apply({'params': params}, x, t, ctx)

  specs = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in inputs)
  flops = perf.matmul_flops(jax.make_jaxpr(forward)(abstract, *specs))
  start = time.perf_counter()
  compiled = jax.jit(forward).lower(abstract, *specs).compile()
  compile_s = time.perf_counter() - start
  mem = compiled.memory_analysis()
  memory = {k: getattr(mem, f'{k}_size_in_bytes', None) for k in
            ('argument', 'output', 'temp', 'generated_code')}
  return dict(compiled=compiled, flops=flops, compile_s=compile_s,
              memory=memory, xla_flops=perf.compiled_flops(compiled),
              params=convert.count(abstract))


def _jax_side(folder: str, inputs: tuple[np.ndarray, ...],
              runs: int) -> dict:
  """vdm_jax's forward: compile from abstract shapes, load, time."""
  result = _compile(inputs)
  compiled = result.pop('compiled')
  start = time.perf_counter()
  _, params = unet2d.load(folder)
  jax.block_until_ready(params)
  load_s = time.perf_counter() - start
  args = tuple(jnp.asarray(a) for a in inputs)
  out = np.asarray(compiled(params, *args))

  def step():
    jax.block_until_ready(compiled(params, *args))
  times = _timed(step, runs)
  return dict(result, times=times, out=out, load_s=load_s)


def main(argv):
  del argv
  threads = _THREADS.value or os.cpu_count()
  rng = np.random.RandomState(0)
  s, b = _SIZE.value, _BATCH.value
  inputs = (rng.randn(b, s, s, 4).astype(np.float32),
            np.full((b,), 500.0, np.float32),
            rng.randn(b, _TOKENS.value, 768).astype(np.float32))
  print(f'CPU: {_cpu_name()}, {os.cpu_count()} cores; torch threads '
        f'{threads}; jax {jax.__version__} on {jax.devices()[0]}; '
        f'shape [{b}, {s}, {s}, 4], {_TOKENS.value} tokens, float32; load '
        f'average {os.getloadavg()[0]:.1f}', flush=True)
  if _COMPILE_ONLY.value:
    result = _compile(inputs)
    del result['compiled']
    print(json.dumps(result))
    return
  with tempfile.TemporaryDirectory(prefix='sd15_unet_') as folder:
    theirs = _torch_side(folder, inputs, threads, _RUNS.value)
    print(f'diffusers {theirs["diffusers"]} (torch {theirs["version"]}): '
          f'{[round(v, 2) for v in theirs["times"]]} s, '
          f'{theirs["flops"] / 1e9:.1f} GFLOP without attention\'s '
          'matmuls (torch does not count CPU SDPA)', flush=True)
    ours = _jax_side(folder, inputs, _RUNS.value)
  diff = float(np.abs(ours['out'] - theirs['out']).max())
  print(f'vdm_jax: {[round(v, 2) for v in ours["times"]]} s, '
        f'{ours["flops"] / 1e9:.1f} GFLOP (matmul_flops), compile '
        f'{ours["compile_s"]:.1f} s, load {ours["load_s"]:.1f} s, memory '
        f'{ours["memory"]}', flush=True)
  med_ours = statistics.median(ours['times'])
  med_theirs = statistics.median(theirs['times'])
  print(f'median: vdm_jax {med_ours:.2f} s, diffusers {med_theirs:.2f} s, '
        f'ours / theirs {med_ours / med_theirs:.2f}; max |diff| {diff:.2e} '
        f'(max |pred| {np.abs(theirs["out"]).max():.2f})', flush=True)
  print(json.dumps(dict(
      cpu=_cpu_name(), cores=os.cpu_count(), threads=threads,
      shape=[b, s, s, 4], tokens=_TOKENS.value, params=ours['params'],
      jax_s=ours['times'], torch_s=theirs['times'], jax_median_s=med_ours,
      torch_median_s=med_theirs, ratio=med_ours / med_theirs,
      jax_matmul_flops=ours['flops'],
      torch_flops_without_sdpa=theirs['flops'],
      xla_flops=ours['xla_flops'], compile_s=ours['compile_s'],
      load_s=ours['load_s'], memory=ours['memory'], max_abs_diff=diff,
      load_average_end=os.getloadavg()[0])))


if __name__ == '__main__':
  app.run(main)
