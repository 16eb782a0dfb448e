"""XLA:CPU convolution options for the UNet's 3x3 convolutions, side by side.

  PYTHONPATH=. python experiments/benchmark_conv.py [--repeats=5]
  PYTHONPATH=. python experiments/benchmark_conv.py --flags   # XLA_FLAGS sets
  PYTHONPATH=. python experiments/benchmark_conv.py --depthwise
  PYTHONPATH=. python experiments/benchmark_conv.py --in-loop

In-process (default): the forward + backward time of `layers.conv3x3` (a
lax convolution with the project's custom input gradient) against the same
convolution computed as im2col (nine shifted copies of the input
concatenated on channels, one matmul; its transpose for the gradients), at
the convolution shapes of configs/quickstart.py and of issue 15's
benchmark shape (base 64, 8x32x32 frames, batch 2), with a 2048 f32 matmul's
rate as the reference. --flags: the same timing in subprocesses, one per
XLA_FLAGS variant (oneDNN, XNNPACK and YNNPACK library fusions this jaxlib
knows), since XLA_FLAGS is read once per process. --depthwise: SinFusion's
k x k depthwise convolution (`layers.depthwise_conv`, 'conv' = one grouped
lax convolution against 'shifted' = k * k fused shifted multiply-adds),
forward and forward + backward, at SinFusion's crop of carphone (2 x 137 x
167 x 64) and of 144x256 frames. --in-loop: the kernel gradient of a
3x3 convolution summed over two microbatches in a `lax.scan` (gradient
accumulation), lax's against `layers.conv3x3(kernel_grad='taps')`, and
lax's with the scan unrolled. Prints one JSON line per measurement.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

FLAG_SETS = {
    'default': '',
    'onednn': '--xla_cpu_use_onednn=true',
    'onednn_conv': ('--xla_cpu_experimental_onednn_fusion_type='
                    'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'),
    'xnn_conv': ('--xla_cpu_experimental_xnn_fusion_type='
                 'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'),
    'ynn_conv': ('--xla_cpu_experimental_ynn_fusion_type='
                 'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION'),
    'ynn_dot_conv': ('--xla_cpu_experimental_ynn_fusion_type='
                     'LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION,'
                     'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'),
    'fast_runtime': '--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME',
}

# (name, N frames, H=W, Cin, Cout): the UNet's convolutions.
SHAPES = (
    ('quickstart_16px_32ch', 64, 16, 32, 32),
    ('quickstart_8px_64ch', 64, 8, 64, 64),
    ('bench_32px_64ch', 16, 32, 64, 64),
    ('bench_16px_128ch', 16, 16, 128, 128),
)


def run_in_process(repeats: int, label: str) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vdm_jax.models import layers  # pylint: disable=g-import-not-at-top

  def im2col(x, kernel):
    n, h, w, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(3)
                            for j in range(3)], axis=-1)
    return jnp.dot(cols, kernel.reshape(9 * c, -1))

  def timed(fn, *args):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - t0)
    return statistics.median(times)

  a = jnp.ones((2048, 2048), jnp.float32)
  mm = timed(jax.jit(lambda a: a @ a), a)
  print(json.dumps({'flags': label, 'item': 'matmul_2048',
                    'gflops': 2 * 2048**3 / mm / 1e9}), flush=True)
  for name, n, hw, cin, cout in SHAPES:
    x = jax.random.normal(jax.random.key(0), (n, hw, hw, cin))
    k = jax.random.normal(jax.random.key(1), (3, 3, cin, cout)) * 0.1
    flops = 2 * n * hw * hw * 9 * cin * cout * 3  # forward + two grads
    for impl, conv in (('lax', layers.conv3x3), ('im2col', im2col)):
      step = jax.jit(jax.grad(lambda x, k, conv=conv: jnp.sum(
          conv(x, k)**2), argnums=(0, 1)))
      t = timed(step, x, k)
      print(json.dumps({'flags': label, 'item': name, 'impl': impl,
                        'fwd_bwd_ms': round(t * 1e3, 2),
                        'gflops': round(flops / t / 1e9, 1),
                        'of_matmul': round(flops / t / (2 * 2048**3 / mm),
                                           3)}), flush=True)


# (name, N, H, W, C, k): SinFusion's depthwise convolutions.
DEPTHWISE_SHAPES = (
    ('sinfusion_137x167_7x7', 2, 137, 167, 64, 7),
    ('sinfusion_137x243_7x7', 2, 137, 243, 64, 7),
    ('sinfusion_137x167_3x3', 2, 137, 167, 64, 3),
)


def run_depthwise(repeats: int) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vdm_jax.models import layers  # pylint: disable=g-import-not-at-top

  def timed(fn, *args):
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times.append(time.perf_counter() - t0)
    return statistics.median(times)

  for name, n, h, w, c, k in DEPTHWISE_SHAPES:
    x = jax.random.normal(jax.random.key(0), (n, h, w, c))
    kernel = jax.random.normal(jax.random.key(1), (k, k, 1, c)) * 0.1
    row = {'item': name}
    for impl in ('conv', 'shifted'):
      fwd = jax.jit(lambda x, kk, impl=impl: layers.depthwise_conv(
          x, kk, impl))
      grad = jax.jit(jax.grad(lambda x, kk, impl=impl: jnp.sum(
          layers.depthwise_conv(x, kk, impl)**2), argnums=(0, 1)))
      row[f'{impl}_fwd_ms'] = round(timed(fwd, x, kernel) * 1e3, 1)
      row[f'{impl}_fwd_bwd_ms'] = round(timed(grad, x, kernel) * 1e3, 1)
    row['fwd_speedup'] = round(row['conv_fwd_ms'] / row['shifted_fwd_ms'], 2)
    row['fwd_bwd_speedup'] = round(
        row['conv_fwd_bwd_ms'] / row['shifted_fwd_bwd_ms'], 2)
    print(json.dumps(row), flush=True)


def run_in_loop(repeats: int) -> None:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vdm_jax.models import layers  # pylint: disable=g-import-not-at-top

  for hw in (32, 64):
    x = jnp.ones((2, 2, hw, hw, 64))
    kernel = jnp.ones((3, 3, 64, 128)) * 0.01
    row = {'item': f'kernel_grad_in_scan_2x{hw}x{hw}_64to128'}
    for name, grad_impl, unroll in (('lax', 'lax', 1), ('taps', 'taps', 1),
                                    ('lax_unrolled', 'lax', 2)):
      def total(x, k, grad_impl=grad_impl, unroll=unroll):
        def body(c, xx):
          g = jax.grad(lambda k: jnp.sum(jnp.sin(
              layers.conv3x3(xx, k, 1, grad_impl))))(k)
          return c + g, None
        return jax.lax.scan(body, jnp.zeros_like(k), x, unroll=unroll)[0]
      fn = jax.jit(total)
      jax.block_until_ready(fn(x, kernel))
      times = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x, kernel))
        times.append(time.perf_counter() - t0)
      row[f'{name}_ms'] = round(statistics.median(times) * 1e3, 1)
    print(json.dumps(row), flush=True)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--flags', action='store_true')
  parser.add_argument('--label', default='default')
  parser.add_argument('--depthwise', action='store_true')
  parser.add_argument('--in-loop', action='store_true')
  args = parser.parse_args()
  if args.in_loop:
    run_in_loop(args.repeats)
    return
  if args.depthwise:
    run_depthwise(args.repeats)
    return
  if not args.flags:
    run_in_process(args.repeats, args.label)
    return
  for label, value in FLAG_SETS.items():
    env = dict(os.environ, XLA_FLAGS=value)
    proc = subprocess.run(
        [sys.executable, __file__, f'--repeats={args.repeats}',
         f'--label={label}'], env=env, capture_output=True, text=True,
        check=False)
    if proc.returncode:
      print(json.dumps({'flags': label, 'error':
                        proc.stderr.strip().splitlines()[-1:]}), flush=True)
    else:
      sys.stdout.write(proc.stdout)
      sys.stdout.flush()


if __name__ == '__main__':
  main()
