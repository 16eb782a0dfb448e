"""Keyframe in-betweening: Generative Inbetweening against its alternatives.

  PYTHONPATH=. .venv/bin/python experiments/inbetween_compare.py \
      --i2v=runs/i2v --backward=runs/i2v_backward --uncond=runs/uncond_ref \
      --num=32 --out=docs/inbetween

On held-out synthetic clips (a dataset seed no model was trained on), the
first and last frames are given and the T - 2 frames between are made by:
  (a) gi         Generative Inbetweening (Wang et al. 2024): the
                 image-to-video model fused with its backward-motion tune
                 (w = 0.5, noise re-injection, image guidance 1 -> 3);
  (b) vdm_recon  VDM's reconstruction-guided keyframes (Ho et al. 2022, 3.1)
                 on an unconditional model of the same size, trained for the
                 same steps (configs/quickstart.py);
  (c) forward    the image-to-video model alone (ignores the last keyframe);
  (d) gi_untuned the fused sampler with the backward model untuned (only the
                 rotated attention);
  (e) crossfade  a linear cross-fade of the two keyframes.
It prints and writes (out.json) per method the in-between frames' MSE
against the truth, the object's trajectory error (pixel distance of the
bright object's centroid), FVD against the real clips (I3D needs 9 or more
frames: clips are repeated 2x in time, the same for every method and the
real clips) and seconds per video; side-by-side videos (truth, a..e) go to
out.gif / out.png.
"""

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vdm_jax import checkpoint  # pylint: disable=g-import-not-at-top
from vdm_jax import denoiser  # pylint: disable=g-import-not-at-top
from vdm_jax import fileio  # pylint: disable=g-import-not-at-top
from vdm_jax import sample  # pylint: disable=g-import-not-at-top
from vdm_jax import sample_inputs  # pylint: disable=g-import-not-at-top
from vdm_jax import sharding  # pylint: disable=g-import-not-at-top
from vdm_jax import tasks  # pylint: disable=g-import-not-at-top
from vdm_jax import video_io  # pylint: disable=g-import-not-at-top
from vdm_jax.adapt import inbetween  # pylint: disable=g-import-not-at-top
from vdm_jax.evaluation import fvd  # pylint: disable=g-import-not-at-top

METHODS = ('gi', 'vdm_recon', 'forward', 'gi_untuned', 'crossfade')


def _config(workdir: str, **sample_overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(checkpoint.load_config(workdir))
  for k, v in sample_overrides.items():
    config.sample[k] = v
  return config


def centroids(videos: np.ndarray, threshold: int = 90) -> np.ndarray:
  """[N, T, 2] (row, col) centroid of the bright object (nan: none)."""
  bright = videos.max(axis=-1) > threshold  # The background is dark.
  n, t, h, w = bright.shape
  rows, cols = np.mgrid[:h, :w]
  count = bright.sum(axis=(2, 3))
  with np.errstate(invalid='ignore', divide='ignore'):
    r = (bright * rows).sum(axis=(2, 3)) / count
    c = (bright * cols).sum(axis=(2, 3)) / count
  return np.stack([r, c], -1)


def metrics(videos: np.ndarray, truth: np.ndarray) -> dict:
  mid = slice(1, -1)
  err = (videos[:, mid].astype(np.float64) - truth[:, mid]) / 255.0
  mse_frame = np.mean(np.square(err), axis=(0, 2, 3, 4))
  cg, ct = centroids(videos[:, mid]), centroids(truth[:, mid])
  dist = np.linalg.norm(cg - ct, axis=-1)
  found = np.isfinite(dist)
  return {'mse': float(np.mean(mse_frame)),
          'mse_per_frame': [round(float(m), 5) for m in mse_frame],
          'trajectory_px': float(np.mean(dist[found])) if found.any()
                           else None,
          'object_found': float(found.mean())}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--i2v', required=True)
  p.add_argument('--backward', required=True)
  p.add_argument('--uncond', required=True)
  p.add_argument('--num', type=int, default=32)
  p.add_argument('--steps', type=int, default=16)
  p.add_argument('--recon_weight', type=float, default=5.0)
  p.add_argument('--data_seed', type=int, default=12345)
  p.add_argument('--image_guidance_max', type=float, default=3.0,
                 help='image-to-video guidance scale on the last frame'
                 ' (1: no guidance).')
  p.add_argument('--out', default='docs/inbetween')
  args = p.parse_args()

  common = dict(sampler='ddim', eta=0.0, num_steps=args.steps)
  common_i2v = dict(common, image_guidance_max=args.image_guidance_max)
  cfg_i2v = _config(args.i2v, task='inbetween', **common_i2v)
  cfg_uncond = _config(args.uncond, task='keyframes',
                       recon_weight=args.recon_weight, **common)
  held = ml_collections.ConfigDict(cfg_i2v.to_dict())
  held.seed = args.data_seed  # Another synthetic dataset: held out.
  t = held.data.num_frames
  truth, _ = sample_inputs.dataset_clips(held, args.num, t, seed=1)
  video = jnp.asarray(truth.astype(np.float32) / 127.5 - 1.0)
  mesh = sharding.make_mesh(cfg_i2v.mesh)
  rng = jax.random.key(0)

  model, fwd, bwd, _ = inbetween.restore(cfg_i2v, args.backward, mesh)
  fwd_fn = denoiser.make_denoise_fn(model, fwd, mesh)
  runs = {
      'gi': (tasks.from_config(cfg_i2v.sample), cfg_i2v, fwd_fn,
             inbetween.make_pair_fn(model, fwd, bwd, mesh)),
      'gi_untuned': (tasks.from_config(cfg_i2v.sample), cfg_i2v, fwd_fn,
                     inbetween.make_pair_fn(model, fwd, fwd, mesh)),
      'forward': (tasks.from_config(_config(
          args.i2v, task='image_to_video', **common_i2v).sample), cfg_i2v,
                  fwd_fn, None),
  }
  u_model, u_params, _ = sample.restore_ema_params(cfg_uncond, args.uncond,
                                                   mesh)
  runs['vdm_recon'] = (tasks.from_config(cfg_uncond.sample), cfg_uncond,
                       denoiser.make_denoise_fn(u_model, u_params, mesh),
                       None)
  results, outputs = {}, {}
  for name in METHODS:
    start = time.time()
    if name == 'crossfade':
      a = np.linspace(0.0, 1.0, t)[None, :, None, None, None]
      x = (1 - a) * video[:, :1] + a * video[:, -1:]
    else:
      task, config, fn, pair = runs[name]
      setup = tasks.Setup.from_config(config)
      x = tasks.run(task, fn, rng, setup, video=video, pair_fn=pair)
      x = jax.block_until_ready(x)
      if name == 'forward':  # Its last frame is not the keyframe: shown
        x = x.at[:, -1].set(video[:, -1])  # as given, not scored.
    seconds = (time.time() - start) / args.num
    outputs[name] = video_io.to_uint8(np.asarray(x))
    results[name] = {**metrics(outputs[name], truth),
                     'seconds_per_video': round(seconds, 3)}
    print(name, json.dumps(results[name]), flush=True)

  # FVD: I3D needs >= 9 frames; every set is repeated 2x in time alike.
  rep = lambda v: np.repeat(v, 2, axis=1)
  real = fvd.extract_features(rep(truth), progress=False)['logits_mean']
  for name in METHODS:
    gen = fvd.extract_features(rep(outputs[name]), progress=False)['logits_mean']
    results[name]['fvd'] = round(fvd.compute_fvd(gen, real)['fvd'], 1)
    print(name, 'fvd', results[name]['fvd'], flush=True)

  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  fileio.write_json(args.out + '.json', {
      'command': ' '.join(sys.argv), 'num_clips': args.num,
      'steps': args.steps, 'recon_weight': args.recon_weight,
      'devices': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
      'results': results})
  # GIF: clips one after another, truth and each method side by side.
  k = min(8, args.num)
  side = np.concatenate([truth[:k]] + [outputs[m][:k] for m in METHODS],
                        axis=3)  # [k, T, H, W * 6, C]
  video_io.write_gif(args.out + '.gif', np.concatenate(list(side)), fps=4)
  # PNG: per clip a row of the truth, then one of each method; frames
  # left to right.
  k = min(4, args.num)
  names = ('truth',) + METHODS
  rows = np.stack([v[:k] for v in [truth] + [outputs[m] for m in METHODS]],
                  axis=1).reshape((-1,) + truth.shape[1:])
  video_io.write_png_grid(args.out + '.png', rows,
                          captions=[n for _ in range(k) for n in names])


if __name__ == '__main__':
  main()
