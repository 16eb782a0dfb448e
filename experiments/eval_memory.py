"""Peak memory of --mode=eval against the number of clips (issue 11).

  .venv/bin/python experiments/eval_memory.py --nums=256,1024

Each count runs `evaluate.sample_and_evaluate` in a fresh process and
reports its peak resident set size (`resource.getrusage(...).ru_maxrss`)
and wall time. The I3D feature extraction, the data pipeline (the built-in
synthetic dataset, 16x64x64 clips) and the sampler loop are the real ones;
only the checkpoint is replaced by an analytic denoiser (eps_hat = 0.3 z,
`sample.num_steps=2`), so the "generated" clips cost almost nothing and the
run measures the eval program, not a model. Protocol `stylegan_v_2048` with
eval.num_videos = eval.num_real = N, sample.batch_size 8, eval.batch_size
16, one CPU device. With streaming, peak RSS must not grow with N beyond
the features (N x 400 float32 per set, 1.6 MB per 1,000 clips).

I3D costs ~2.7 s per video on 2 CPU cores, so 2,048 + 2,048 clips take
about 3 hours. `--features=stand_in` swaps I3D for a cheap jitted map of
the same signature (uint8 [B, 16, 64, 64, 3] -> 'logits_mean' [B, 400] and
'pool' [B, 1024]: 4x4 average pooling, then a fixed random projection), so
large counts run in minutes; everything around the network (the sampler,
the real-data pipeline, the streaming, the feature accumulation, the
statistics) is unchanged, and that is what the memory claim is about:

  .venv/bin/python experiments/eval_memory.py --nums=256,2048 \
      --features=stand_in
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fake_apply(scale, z, logsnr, cond):
  del logsnr, cond
  return scale * z


def _stand_in_feature_fn(resize, mesh):
  """I3D's signature at a fraction of its cost (see the module doc)."""
  del resize
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  def fn(variables, videos):
    del variables
    b, t, h, w, c = videos.shape
    x = videos.astype(jnp.float32) / 127.5 - 1
    x = x.reshape(b, t, 4, h // 4, 4, w // 4, c).mean((3, 5)).reshape(b, -1)
    keys = jax.random.split(jax.random.key(0))
    proj = lambda k, d: jax.random.normal(k, (x.shape[1], d)) / x.shape[1]**.5
    return {'logits_mean': x @ proj(keys[0], 400),
            'pool': jnp.tanh(x @ proj(keys[1], 1024))}

  return jax.jit(fn, in_shardings=(NamedSharding(mesh, P()),
                                   NamedSharding(mesh, P('data'))),
                 out_shardings=NamedSharding(mesh, P()))


def child(num: int, features: str = 'i3d') -> dict:
  """One eval of `num` generated + `num` real clips; returns the numbers."""
  sys.path.insert(0, ROOT)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from configs import default  # pylint: disable=g-import-not-at-top
  from vdm_jax import evaluate  # pylint: disable=g-import-not-at-top
  from vdm_jax import sample  # pylint: disable=g-import-not-at-top
  from vdm_jax.evaluation import fvd  # pylint: disable=g-import-not-at-top

  if features == 'stand_in':
    fvd._feature_fn = _stand_in_feature_fn  # pylint: disable=protected-access
    fvd._variables = lambda mesh: {}  # pylint: disable=protected-access

  sample.restore_ema_params = lambda config, workdir, mesh: (None, None, 0)
  evaluate.denoiser.make_denoise_fn = (
      lambda model, params, mesh: jax.tree_util.Partial(
          _fake_apply, jnp.float32(0.3)))
  config = default.get_config()
  config.data.num_frames, config.data.image_size = 16, 64
  config.sample.num_steps, config.sample.batch_size = 2, 8
  config.eval.protocol = 'stylegan_v_2048'
  config.eval.num_videos = config.eval.num_real = num
  config.eval.batch_size = 16
  start = time.time()
  with tempfile.TemporaryDirectory() as workdir:
    result = evaluate.sample_and_evaluate(config, workdir)
  return dict(
      clips=num, fvd=round(result['fvd'], 3),
      peak_rss_mib=round(
          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
      wall_s=round(time.time() - start, 1),
      devices=result['devices'], features=features)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--nums', default='256,1024',
                      help='comma-separated clip counts, one process each')
  parser.add_argument('--features', default='i3d',
                      choices=('i3d', 'stand_in'),
                      help="'i3d' (real) or 'stand_in' (cheap, same shapes)")
  parser.add_argument('--child', type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args.child, args.features)), flush=True)
    return
  rows = []
  for num in map(int, args.nums.split(',')):
    out = subprocess.run(
        [sys.executable, __file__, f'--child={num}',
         f'--features={args.features}'], check=True,
        capture_output=True, text=True).stdout
    rows.append(json.loads(out.strip().splitlines()[-1]))
    print(json.dumps(rows[-1]), flush=True)
  print(f'features: {args.features}')
  print('| clips (generated = real) | peak RSS (MiB) | wall time (s) | FVD |')
  print('|---|---|---|---|')
  for r in rows:
    print(f"| {r['clips']:,} | {r['peak_rss_mib']:,} | {r['wall_s']:,} |"
          f" {r['fvd']} |")


if __name__ == '__main__':
  main()
