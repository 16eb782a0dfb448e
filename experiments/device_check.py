"""One prepared accelerator check: throughput, memory, kernels, sampler, I3D.

  PYTHONPATH=. python experiments/device_check.py [--out=device_check.jsonl]
      [--tiny] [--smoke] [--items=env,train_128_bf16,...] [--budget_scale=1]

Prints ONE JSON LINE PER MEASUREMENT and appends it to --out. Every item
runs in its own subprocess with its own time budget (BUDGETS, seconds), so
an out-of-memory crash, an exception or a hang of one item becomes one
error line ({"item", "ok": false, "error"}) and the next item still runs;
a process of its own also gives each item a clean peak of
`memory_stats()['peak_bytes_in_use']`. On one GPU or TPU host the whole
check stays under 8 minutes; on CPU (--tiny, the default there) every size
shrinks and it takes under 3 minutes.

Items:
  env            device kind, count, memory limit, peak table (perf.py).
  matmul         timed 4096^3 matmuls in bf16 and f32: TFLOP/s and the
                 fraction of the data-sheet peak.
  train_<base>_<dtype>  the VDM train step (configs/ucf101_64.py's UNet at
                 base 128 / 256, 16x64x64 videos, no image frames) in bf16
                 and f32 at the largest per-device batch that fits: a guess
                 from the backward pass's residual bytes, then downward by
                 halves, skipping batches whose compiled memory_analysis
                 exceeds the device limit and catching OOM; step time,
                 TFLOP/s per device, MFU, peak memory.
  remat          every model.remat policy (unet3d.REMAT) at base 128, bf16,
                 per-device batch 2: compiled peak bytes and step time (one
                 process: its memory_stats peak is cumulative).
  attention      experiments/benchmark_attention.py --json: fused vs XLA
                 attention time and parity at 16x16, 32x32, 64x64 (lines
                 passed through).
  sampler        ancestral sampler steps/s, without and with reconstruction
                 guidance (first 2 frames known; a backward pass per step).
  i3d            I3D feature extraction (FVD) videos/s, 16x64x64 -> 224.

--smoke runs env and matmul at minimal sizes (the test's selection);
--fail_item=NAME makes that item raise, to see the error line.
"""

import argparse
import functools
import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_ITEMS = tuple(f'train_{b}_{d}' for b in (128, 256)
                    for d in ('bf16', 'f32'))
ITEMS = ('env', 'matmul', *TRAIN_ITEMS, 'remat', 'attention', 'sampler',
         'i3d')
SMOKE = ('env', 'matmul')
# Hard limits in seconds per item (a subprocess past it is killed): on an
# accelerator they sum to 440 s (< 8 min with the platform probe); with
# --tiny (CPU) to 178 s; on a loaded CPU an item may hit its budget (an
# error line; --budget_scale=2 gives them room).
BUDGETS = {'env': 10, 'matmul': 15, 'train_128_bf16': 60,
           'train_128_f32': 50, 'train_256_bf16': 70, 'train_256_f32': 55,
           'remat': 70, 'attention': 45, 'sampler': 35, 'i3d': 30}
TINY_BUDGETS = {'env': 5, 'matmul': 5, 'train_128_bf16': 24,
                'train_128_f32': 22, 'train_256_bf16': 20,
                'train_256_f32': 20, 'remat': 38, 'attention': 16,
                'sampler': 16, 'i3d': 12}
DTYPES = {'bf16': 'bfloat16', 'f32': 'float32'}


# ----------------------------------------------------------------------------
# The parent: one subprocess per item, lines passed through.


def _emit(record: dict, out_path: str) -> None:
  line = json.dumps(record, default=str)
  print(line, flush=True)
  with open(out_path, 'a') as f:
    f.write(line + '\n')


def _run_item(name: str, args, budget: float) -> None:
  """Runs `--worker=name` with a hard timeout; every line it prints passes."""
  cmd = [sys.executable, os.path.abspath(__file__), f'--worker={name}']
  cmd += ['--tiny'] if args.tiny else []
  cmd += ['--smoke'] if args.smoke else []
  cmd += [f'--fail_item={args.fail_item}'] if args.fail_item else []
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep
             + os.environ.get('PYTHONPATH', ''))
  if args.tiny:  # CPU compiles of the UNet: ~40 s optimised, ~5 s not.
    env.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')
  start = time.time()
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=env, cwd=ROOT,
                          start_new_session=True)
  lines, errs = queue.Queue(), []
  readers = [threading.Thread(target=lambda: [lines.put(l) for l in
                                               proc.stdout], daemon=True),
             threading.Thread(target=lambda: errs.extend(proc.stderr),
                              daemon=True)]
  for r in readers:
    r.start()
  printed = 0
  timed_out = False
  while True:
    try:
      line = lines.get(timeout=0.2)
    except queue.Empty:
      if proc.poll() is not None and not readers[0].is_alive():
        break
      if time.time() - start > budget:
        timed_out = True
        os.killpg(proc.pid, 9)
        proc.wait()
        break
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # Library output on stdout is not ours.
    _emit(record, args.out)
    printed += 1
  for r in readers:
    r.join(timeout=5)
  while not lines.empty():
    try:
      _emit(json.loads(lines.get()), args.out)
      printed += 1
    except json.JSONDecodeError:
      pass
  rc = proc.wait()
  if timed_out or rc != 0:
    tail = ''.join(errs)[-1500:]
    _emit({'item': name, 'ok': False,
           'error': (f'time budget {budget:.0f} s exceeded (killed)'
                     if timed_out else f'worker exited with {rc}'),
           'stderr_tail': tail, 'elapsed_s': round(time.time() - start, 1),
           'lines_before': printed}, args.out)


def _probe_platform() -> str:
  code = 'import jax; print(jax.devices()[0].platform)'
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True,
                        text=True, check=False, env=dict(
                            os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false'))
  lines = proc.stdout.split()
  return lines[-1] if lines else 'unknown'


# ----------------------------------------------------------------------------
# The worker: one item, in this process.


def _device():
  import jax  # pylint: disable=g-import-not-at-top
  return jax.devices()[0]


def _memory(device) -> dict:
  stats = device.memory_stats() or {}
  return {'bytes_limit': stats.get('bytes_limit'),
          'peak_bytes_in_use': stats.get('peak_bytes_in_use')}


def _median_time(fn, repeats: int) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return sorted(times)[len(times) // 2]


def item_env(args):
  import jax  # pylint: disable=g-import-not-at-top
  from vdm_jax import perf  # pylint: disable=g-import-not-at-top
  d = _device()
  yield {'device_count': jax.device_count(), 'platform': d.platform,
         'jax': jax.__version__, 'tiny': args.tiny,
         'peak_tflops_bf16': _tera(perf.table_peak_flops(d.device_kind)),
         'peak_tflops_f32': _tera(perf.table_peak_flops(d.device_kind,
                                                        'float32')),
         **_memory(d)}


def _tera(x):
  return None if x is None else x / 1e12


def item_matmul(args):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vdm_jax import perf  # pylint: disable=g-import-not-at-top
  n = 256 if args.smoke else 1024 if args.tiny else 4096
  d = _device()
  for dtype in ('bfloat16', 'float32'):
    a = jax.device_put(jnp.ones((n, n), dtype), d)
    mm = jax.jit(jnp.matmul)
    jax.block_until_ready(mm(a, a))
    t = _median_time(lambda: mm(a, a), 3 if args.tiny else 10)
    rate = 2 * n**3 / t
    peak = perf.peak_flops(d, dtype)
    yield {'dtype': dtype, 'n': n, 'time_s': t, 'tflops': rate / 1e12,
           'fraction_of_peak': None if not peak else rate / peak}


def _train_config(args, base: int, dtype: str, remat: str = 'none'):
  from configs import tiny, ucf101_64  # pylint: disable=g-import-not-at-top
  if args.tiny:
    config = tiny.get_config()
    config.model.base_channels = {128: 8, 256: 32}[base]
  else:
    config = ucf101_64.get_config()
    config.model.base_channels = base
    config.data.num_frames, config.data.image_size = 16, 64
  config.data.image_frames = 0
  config.model.dtype = dtype
  config.model.remat = remat
  config.mesh.data, config.mesh.fsdp = 1, 1
  return config


def _is_oom(e: Exception) -> bool:
  text = str(e)
  return 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower()


def _train_once(config, per_device_batch: int, steps: int) -> dict:
  """Compiles and times the train step on one device; raises on OOM."""
  import jax  # pylint: disable=g-import-not-at-top
  import benchmark_train as bt  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from vdm_jax import perf
  from vdm_jax import sharding
  from vdm_jax import train
  from vdm_jax import training
  # pylint: enable=g-import-not-at-top
  device = _device()
  mesh = sharding.make_mesh(config.mesh, [device])
  config.training.batch_size = per_device_batch
  model = denoiser_model(config)
  tx, lr_fn = training.create_optimizer(config)
  abstract, batch_abstract, shardings = bt.abstract_inputs(
      config, model, tx, mesh)
  step_fn = train.make_train_step(config, model, tx, lr_fn, mesh, shardings)
  rng = jax.random.key(1)
  start = time.perf_counter()
  compiled = step_fn.lower(abstract, batch_abstract, rng).compile()
  compile_s = time.perf_counter() - start
  mem = bt.memory_report(compiled.memory_analysis(), per_device_batch)
  limit = _memory(device)['bytes_limit']
  out = {'per_device_batch': per_device_batch, 'compile_s': compile_s,
         'compiled_peak_bytes': mem and mem['peak'],
         'temp_bytes': mem and mem['temp']}
  if limit and mem and mem['peak'] > limit:
    raise MemoryError(f'compiled peak {mem["peak"]} > limit {limit}')
  state, _ = train.create_train_state(config, model, tx,
                                      jax.random.key(0), mesh)
  batch = bt.random_batch(config, mesh)
  for _ in range(2):
    state, metrics = compiled(state, batch, rng)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch, rng)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t0)
  step_s = sorted(times)[len(times) // 2]
  flops = perf.compiled_flops(compiled)
  peak = perf.peak_flops(device, config.model.dtype)
  out.update(step_time_s=step_s, videos_per_s=per_device_batch / step_s,
             gflops_per_step=flops and flops / 1e9,
             tflops_per_device=flops and flops / step_s / 1e12,
             mfu=(flops / step_s / peak) if flops and peak else None,
             **_memory(device))
  return out


def denoiser_model(config):
  from vdm_jax import denoiser  # pylint: disable=g-import-not-at-top
  return denoiser.create_model(config)


def _batch_guess(config, limit: int | None, max_batch: int) -> int:
  """A power of 2 <= max_batch from the backward pass's residual bytes."""
  import benchmark_train as bt  # pylint: disable=g-import-not-at-top
  if not limit:
    return 1
  model = denoiser_model(config)
  one, two = (bt.saved_residual_bytes(config, model, b) for b in (1, 2))
  per_example = max(two - one, 1)
  # `one` holds the parameters: params, EMA, two Adam moments, gradients.
  fixed = 6 * one
  b = max_batch
  while b > 1 and fixed + 1.5 * b * per_example > 0.9 * limit:
    b //= 2
  return b


def _train_item(args, name):
  _, base, dt = name.split('_')
  config = _train_config(args, int(base), DTYPES[dt])
  limit = _memory(_device())['bytes_limit']
  max_batch = 2 if args.tiny else 64
  b = _batch_guess(config, limit, max_batch)
  guess, failed, up = b, [], False
  while b >= 1:
    try:
      result = _train_once(config, b, 2 if args.tiny else 5)
    except Exception as e:  # pylint: disable=broad-except
      if not (isinstance(e, MemoryError) or _is_oom(e)):
        raise
      failed.append(b)
      if up:
        return  # 2b did not fit: b (already printed) is the largest.
      b //= 2
      continue
    yield {'base_channels': config.model.base_channels, 'dtype': DTYPES[dt],
           'frames_hw': [config.data.num_frames, config.data.image_size],
           'batch_guess': guess, 'oom_batches': failed,
           'search': ('a residual-bytes guess, then halves down (one try'
                      ' of 2x up)') if limit
                     else 'none (no memory_stats on this backend)',
           **result}
    if not limit or failed or 2 * b > max_batch:
      return
    b, up = 2 * b, True
  raise MemoryError(f'no per-device batch fits (tried {failed})')


def item_remat(args):
  from vdm_jax.models import unet3d  # pylint: disable=g-import-not-at-top
  for policy in unet3d.REMAT:
    config = _train_config(args, 128, 'bfloat16', policy)
    if args.tiny:  # One level: five CPU compiles within the budget.
      config.model.channel_mults, config.model.attn_resolutions = (1,), ()
    try:
      yield {'remat': policy, 'base_channels': config.model.base_channels,
             **_train_once(config, 1 if args.tiny else 2,
                           2 if args.tiny else 5)}
    except Exception as e:  # pylint: disable=broad-except
      yield {'remat': policy, 'ok': False, 'error': _error(e)}


def item_attention(args):
  script = os.path.join(ROOT, 'experiments', 'benchmark_attention.py')
  if not os.path.exists(script):
    raise FileNotFoundError(f'{script} is not there (yet)')
  cmd = [sys.executable, script, '--json'] + (['--tiny'] if args.tiny else [])
  proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                        env=dict(os.environ, PYTHONPATH=ROOT), check=False)
  for line in proc.stdout.splitlines():
    try:
      yield {'benchmark_attention': json.loads(line)}
    except json.JSONDecodeError:
      pass
  if proc.returncode:
    raise RuntimeError(f'benchmark_attention.py exited with'
                       f' {proc.returncode}: {proc.stderr[-800:]}')


def item_sampler(args):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from vdm_jax import denoiser
  from vdm_jax import sampling
  from vdm_jax import schedules
  # pylint: enable=g-import-not-at-top
  config = _train_config(args, 128, 'bfloat16')
  d = config.data
  batch, steps = (1, 4) if args.tiny else (4, 32)
  shape = (batch, d.num_frames, d.image_size, d.image_size, d.channels)
  model = denoiser.create_model(config)
  params = jax.jit(functools.partial(denoiser.init_params, config, model))(
      jax.random.key(1))
  denoise_fn = denoiser.make_denoise_fn(model, params)
  spec = sampling.SamplerSpec.from_config(config.sample).replace(
      sampler='ancestral', num_steps=steps)
  kw = dict(logsnr_fn=schedules.get_logsnr_fn(config.diffusion,
                                              d.image_size),
            target=config.diffusion.target, spec=spec)
  x_a = jax.random.uniform(jax.random.key(2), shape, minval=-1, maxval=1)
  mask = jnp.broadcast_to(jnp.arange(d.num_frames)[None] < 2,
                          (batch, d.num_frames))
  rng = jax.random.key(3)
  for guided in (False, True):
    extra = ({'guidance': sampling.make_guidance(x_a=x_a, mask=mask,
                                                 recon_weight=2.0)}
             if guided else {})
    fn = functools.partial(sampling.sample, denoise_fn, rng, shape, **kw,
                           **extra)
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    t = _median_time(fn, 2)
    yield {'reconstruction_guidance': guided, 'batch': batch,
           'num_steps': steps, 'shape': list(shape),
           'first_call_s': first, 'scan_s': t, 'steps_per_s': steps / t,
           'base_channels': config.model.base_channels}


def item_i3d(args):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vdm_jax.evaluation import fvd  # pylint: disable=g-import-not-at-top
  mesh = fvd.default_mesh()
  batch, frames, size = (1, 9, 32) if args.tiny else (16, 16, 64)
  batch = max(batch, mesh.devices.size)
  videos = np.random.default_rng(0).integers(
      0, 256, (batch, frames, size, size, 3), np.uint8)
  proto = fvd.PROTOCOLS['stylegan_v_2048']
  fn = fvd._feature_fn(proto.resize, mesh)  # pylint: disable=protected-access
  variables = fvd._variables(mesh)  # pylint: disable=protected-access
  start = time.perf_counter()
  compiled = fn.lower(variables, videos).compile()
  compile_s = time.perf_counter() - start
  jax.block_until_ready(compiled(variables, videos))
  t = _median_time(lambda: compiled(variables, videos), 2 if args.tiny else 3)
  yield {'batch': batch, 'input_shape': [batch, frames, size, size, 3],
         'num_devices': mesh.devices.size, 'compile_s': compile_s,
         'step_time_s': t, 'videos_per_s': batch / t}


def _error(e: BaseException) -> str:
  return f'{type(e).__name__}: {str(e)[:600]}'


def _worker(args) -> int:
  name = args.worker
  start = time.time()
  base = {'item': name}
  try:
    base['device'] = _device().device_kind
    if args.fail_item == name:
      raise RuntimeError(f'injected failure of {name} (--fail_item)')
    sys.path.insert(0, os.path.join(ROOT, 'experiments'))
    records = (_train_item(args, name) if name in TRAIN_ITEMS
               else globals()[f'item_{name}'](args))
    for record in records:
      print(json.dumps({**base, 'ok': True, **record,
                        'elapsed_s': round(time.time() - start, 2)},
                       default=str), flush=True)
  except Exception as e:  # pylint: disable=broad-except
    print(json.dumps({**base, 'ok': False, 'error': _error(e),
                      'elapsed_s': round(time.time() - start, 2)}),
          flush=True)
    traceback.print_exc()
  return 0


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='device_check.jsonl',
                      help='JSON lines are appended here.')
  parser.add_argument('--tiny', action='store_true',
                      help='CPU sizes (automatic on CPU).')
  parser.add_argument('--smoke', action='store_true',
                      help=f'Only {SMOKE}, at minimal sizes (the test).')
  parser.add_argument('--items', default=None,
                      help=f'Comma-separated subset of {ITEMS}.')
  parser.add_argument('--fail_item', default=None,
                      help='Make this item raise (checks the error path).')
  parser.add_argument('--budget_scale', type=float, default=1.0,
                      help='Multiplies every item\'s time budget.')
  parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    return _worker(args)
  if not args.tiny:  # Asked in a subprocess: the workers need the device.
    args.tiny = _probe_platform() == 'cpu'
  items = (args.items.split(',') if args.items
           else SMOKE if args.smoke else ITEMS)
  unknown = set(items) - set(ITEMS)
  if unknown:
    parser.error(f'unknown items {sorted(unknown)}; choose from {ITEMS}')
  budgets = TINY_BUDGETS if args.tiny else BUDGETS
  start = time.time()
  for name in items:
    _run_item(name, args, budgets[name] * args.budget_scale)
  _emit({'item': 'summary', 'ok': True, 'items': list(items),
         'tiny': args.tiny, 'wall_s': round(time.time() - start, 1)},
        args.out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
