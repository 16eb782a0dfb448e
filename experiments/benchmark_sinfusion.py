"""SinFusion train step: time and memory against the frame resolution.

  python experiments/benchmark_sinfusion.py \
      --sizes=144x176,272x640,720x1280 --accum=1,2,4,8 --steps=3

For every frame size (a synthetic 32-frame clip of that size, or
--videos=a.mp4,b.mp4 for real clips) and every training.grad_accum_steps,
a fresh Python process builds configs/single_video.py's default config
(overrides: --set=field=value,...), resizes the clip to data.max_size as
training does, compiles the train step on abstract inputs and reads XLA's
memory analysis (sinfusion/memory.py: temp = activations; state = params,
EMA and Adam), then, if the estimate fits in the free memory
(memory.check, the check training runs), times --steps steps after one
warm-up step. Each process reports its own peak RSS (ru_maxrss), so the
rows do not share allocations. Prints one markdown table and, last, one
JSON line with every row.
"""

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

_SIZES = flags.DEFINE_list('sizes', ['144x176', '272x640', '720x1280'],
                           'Synthetic clip sizes HxW (before max_size).')
_VIDEOS = flags.DEFINE_list('videos', [], 'Real clips instead of --sizes.')
_ACCUM = flags.DEFINE_list('accum', ['1', '2', '4', '8'],
                           'training.grad_accum_steps values.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps (after 1 warm-up).')
_SET = flags.DEFINE_list('set', [], 'Config overrides field=value.')
_CHILD = flags.DEFINE_string('child', None, 'Internal: one row as JSON.')

GIB = 2**30


def _synthetic_clip(path: str, height: int, width: int, frames: int = 32):
  """A smooth moving pattern (writes an .npz the loader reads)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from vdm_jax import video_io  # pylint: disable=g-import-not-at-top
  y, x = np.mgrid[0:height, 0:width].astype(np.float32)
  t = np.arange(frames, dtype=np.float32)[:, None, None]
  chans = [np.sin((x + 3 * t) / 17 + c) * np.cos(y / 11 - c) for c in range(3)]
  video = ((np.stack(chans, -1) + 1) * 127.5).astype(np.uint8)
  video_io.save_npz(path, video[None])


def _row(spec: dict) -> dict:
  """Compiles, checks and times one (clip, grad_accum_steps) case."""
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from configs import single_video  # pylint: disable=g-import-not-at-top
  from vdm_jax import training  # pylint: disable=g-import-not-at-top
  from vdm_jax.sinfusion import data  # pylint: disable=g-import-not-at-top
  from vdm_jax.sinfusion import memory  # pylint: disable=g-import-not-at-top
  from vdm_jax.sinfusion import train as sf_train  # pylint: disable=g-import-not-at-top

  config = single_video.get_config()
  config.data.path = spec['path']
  config.training.grad_accum_steps = spec['accum']
  for item in spec['set']:
    key, value = item.split('=', 1)
    group, field = key.split('.')
    config[group][field] = type(config[group][field])(value)
  video = data.load_video(config)
  hw = data.crop_size(config, video.shape[1:3])
  models = sf_train.create_models(config)
  tx, lr_fn = training.create_optimizer(config)
  step_fn = sf_train.make_train_step(config, models, tx, lr_fn, hw)
  rng = jax.random.key(1)
  abstract = jax.eval_shape(functools.partial(sf_train.init_state, models, tx),
                            jax.random.key(0))
  start = time.perf_counter()
  compiled = step_fn.lower(
      abstract, jax.ShapeDtypeStruct(video.shape, jnp.float32), rng).compile()
  row = {'frames': 'x'.join(map(str, video.shape[:3])),
         'crop': f'{hw[0]}x{hw[1]}', 'accum': spec['accum'],
         'micro': config.training.batch_size // spec['accum'],
         'compile_s': time.perf_counter() - start}
  estimate = memory.estimate_step(compiled, abstract, video.shape)
  row.update(temp_gib=estimate.temp / GIB, estimate_gib=estimate.total / GIB)
  try:
    memory.check(estimate, memory.available_memory(config), config,
                 video.shape[1:3], hw)
  except memory.InsufficientMemoryError as e:
    row['refused'] = str(e).split('.')[0]
  else:
    state = jax.jit(functools.partial(sf_train.init_state, models, tx))(
        jax.random.key(0))
    video = jnp.asarray(video)
    state, metrics = step_fn(state, video, rng)  # Warm-up (cache hit).
    jax.block_until_ready(metrics)
    times = []
    for _ in range(spec['steps']):
      start = time.perf_counter()
      state, metrics = step_fn(state, video, rng)
      jax.block_until_ready(metrics)
      times.append(time.perf_counter() - start)
    row['step_s'] = sorted(times)[len(times) // 2]
    row['loss'] = float(metrics['loss'])
  row['peak_rss_gib'] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                         * 1024 / GIB)
  return row


def _commit() -> str:
  try:
    out = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    dirty = subprocess.run(['git', 'status', '--porcelain'], cwd=ROOT,
                           capture_output=True, text=True).stdout
    return out.strip() + ('+dirty' if dirty.strip() else '')
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def main(argv):
  del argv
  if _CHILD.value:
    print(json.dumps(_row(json.loads(_CHILD.value))))
    return
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    clips = list(_VIDEOS.value)
    for size in ([] if clips else _SIZES.value):
      h, w = map(int, size.split('x'))
      path = os.path.join(tmp, f'synthetic_{h}x{w}.npz')
      _synthetic_clip(path, h, w)
      clips.append(path)
    for path in clips:
      for accum in map(int, _ACCUM.value):
        spec = {'path': path, 'accum': accum, 'steps': _STEPS.value,
                'set': _SET.value}
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__),
             f'--child={json.dumps(spec)}'],
            cwd=ROOT, capture_output=True, text=True)
        if out.returncode:
          row = {'clip': os.path.basename(path), 'accum': accum,
                 'error': out.stderr.strip().splitlines()[-1:]}
        else:
          row = {'clip': os.path.basename(path),
                 **json.loads(out.stdout.strip().splitlines()[-1])}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
  print(f'{platform.processor() or platform.machine()}, {os.cpu_count()}'
        f' CPUs; commit {_commit()}; {" ".join(sys.argv)}')
  print('| clip | frames (T x H x W) | crop | grad_accum_steps (microbatch)'
        ' | XLA temp GiB | estimate GiB | peak RSS GiB | step s |')
  print('|---|---|---|---|---|---|---|---|')
  for r in rows:
    if 'error' in r:
      print(f'| {r["clip"]} | | | {r["accum"]} | error: {r["error"]} | | | |')
      continue
    step = f'{r["step_s"]:.2f}' if 'step_s' in r else 'refused (check)'
    print(f'| {r["clip"]} | {r["frames"]} | {r["crop"]} | {r["accum"]}'
          f' ({r["micro"]}) | {r["temp_gib"]:.2f} | {r["estimate_gib"]:.2f}'
          f' | {r["peak_rss_gib"]:.2f} | {step} |')
  print(json.dumps(rows))


if __name__ == '__main__':
  app.run(main)
