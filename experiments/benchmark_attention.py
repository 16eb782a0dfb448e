"""Spatial attention: every implementation this backend runs, side by side.

  PYTHONPATH=. python experiments/benchmark_attention.py --json   # GPU/TPU
  PYTHONPATH=. python experiments/benchmark_attention.py --tiny   # CPU, <30 s

Times the forward and the forward + backward (gradients w.r.t. q, k, v) of
`models.attention.dot_product_attention` for each implementation available
here ('xla' everywhere, 'cudnn' on an NVIDIA GPU, 'pallas' on TPU), plus
jax.nn.dot_product_attention(implementation='xla') as an outside reference,
at 16x16, 32x32 and 64x64 spatial tokens with configs/ucf101_64.py's head
width (64) and heads (channels // 64 at that resolution: 1024, 512 and 256
channels give 16, 8 and 4 heads), batch = frames x videos (16 x 1: VDM's
128 videos on 128 chips), and once with text cross-attention (32x32 queries,
16 masked tokens, config.text.max_length). --tiny shrinks all of it for CPU
(and times float32 only).
Prints one JSON line per (kind, size, dtype, implementation): the median
time over --repeats runs, the compile time, what 'auto' picks for that shape,
and the max abs difference of the output and of the gradients from 'xla';
an implementation that cannot run a row says why ("skipped"), one that fails
gives the exception ("error").
"""

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax.models import attention

# (kind, spatial side, heads, key tokens or None for self-attention)
FULL = (('self', 16, 16, None), ('self', 32, 8, None), ('self', 64, 4, None),
        ('cross', 32, 8, 16))
TINY = (('self', 8, 2, None), ('self', 16, 2, None), ('cross', 8, 2, 6))


def _inputs(kind, side, heads, keys, batch, head_dim, dtype, seed=0):
  rng = np.random.default_rng(seed)
  tq = side * side
  tk = tq if keys is None else keys
  q = rng.standard_normal((batch, tq, heads, head_dim)) * head_dim**-0.5
  k = rng.standard_normal((batch, tk, heads, head_dim))
  v = rng.standard_normal((batch, tk, heads, head_dim))
  mask = None
  if kind == 'cross':  # Texts of different lengths, padded at the end.
    lengths = rng.integers(1, tk + 1, batch)
    mask = jnp.asarray(np.arange(tk)[None] < lengths[:, None])[:, None, None]
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v)) + (mask,)


def _functions(name, mask):
  if name == 'jax_nn_xla':
    fn = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, mask=None if mask is None else jnp.broadcast_to(
            mask, (q.shape[0], 1, q.shape[1], k.shape[1])),
        scale=1.0, implementation='xla')
  else:
    fn = lambda q, k, v: attention.dot_product_attention(
        q, k, v, mask, implementation=name)

  def loss(q, k, v, cot):
    return jnp.vdot(fn(q, k, v).astype(jnp.float32), cot)

  grad = jax.grad(loss, argnums=(0, 1, 2))
  return jax.jit(fn), jax.jit(lambda q, k, v, cot: (fn(q, k, v),
                                                    grad(q, k, v, cot)))


def _time(fn, args, repeats):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  compile_s = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return out, compile_s, statistics.median(times)


def _max_diff(a, b):
  return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) -
                                   y.astype(jnp.float32))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def run(rows, batch, head_dim, dtypes, repeats):
  backend = jax.default_backend()
  names = ['xla', 'jax_nn_xla'] + [n for n in ('cudnn', 'pallas')
                                   if _runs_here(n)]
  for kind, side, heads, keys in rows:
    for dtype in dtypes:
      q, k, v, mask = _inputs(kind, side, heads, keys, batch, head_dim,
                              dtype)
      cot = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape),
                        jnp.float32)
      common = dict(kind=kind, tokens=f'{side}x{side}', tq=q.shape[1],
                    tk=k.shape[1], batch=batch, heads=heads,
                    head_dim=head_dim, dtype=jnp.dtype(dtype).name,
                    backend=backend, device=jax.devices()[0].device_kind,
                    auto=attention.resolve('auto', q.shape, k.shape, dtype,
                                           mask is not None))
      reference = None
      for name in names:
        row = dict(common, implementation=name)
        reason = None if name == 'jax_nn_xla' else attention.unsupported_reason(
            name, q.shape, k.shape, dtype, mask is not None)
        if reason:
          print(json.dumps(dict(row, skipped=reason)), flush=True)
          continue
        fwd, fwd_bwd = _functions(name, mask)
        try:
          out, compile_fwd, t_fwd = _time(fwd, (q, k, v), repeats)
          both, compile_both, t_both = _time(fwd_bwd, (q, k, v, cot),
                                             repeats)
        except Exception as e:  # pylint: disable=broad-except
          # One failing kernel (e.g. cuDNN refusing a shape) must not hide
          # the other rows.
          print(json.dumps(dict(row, error=f'{type(e).__name__}: {e}'[:800])),
                flush=True)
          continue
        if reference is None:
          reference = both  # 'xla' comes first.
        row.update(fwd_ms=round(1e3 * t_fwd, 3),
                   fwd_bwd_ms=round(1e3 * t_both, 3),
                   compile_s=round(compile_fwd + compile_both, 2),
                   max_abs_diff_out=_max_diff(both[0], reference[0]),
                   max_abs_diff_grads=_max_diff(both[1], reference[1]))
        print(json.dumps(row), flush=True)
        del out, both


def _runs_here(name):
  try:
    attention.check_implementation(name)
    return True
  except ValueError:
    return False


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tiny', action='store_true',
                      help='CPU sizes: 8x8 and 16x16 tokens, 2 heads of 16,'
                      ' float32 only unless --dtypes.')
  parser.add_argument('--json', action='store_true',
                      help='JSON lines only (the default output is the same'
                      ' lines; kept for experiments/device_check.sh).')
  parser.add_argument('--videos', type=int, default=1,
                      help='videos per batch (x 16 frames; --tiny: x 2).')
  parser.add_argument('--dtypes', default=None,
                      help='comma-separated; default bfloat16,float32'
                      ' (--tiny: float32).')
  parser.add_argument('--repeats', type=int, default=None)
  args = parser.parse_args(argv)
  default = 'float32' if args.tiny else 'bfloat16,float32'
  dtypes = tuple(jnp.dtype(d) for d in (args.dtypes or default).split(','))
  if args.tiny:
    run(TINY, 2 * args.videos, 16, dtypes, args.repeats or 5)
  else:
    run(FULL, 16 * args.videos, 64, dtypes, args.repeats or 10)


if __name__ == '__main__':
  sys.exit(main())
