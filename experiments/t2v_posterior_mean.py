"""Does a text-to-video model's prediction from noise depend on the direction?

  PYTHONPATH=. python experiments/t2v_posterior_mean.py --workdir=runs/t2v
      [--config=configs/t2v_quickstart.py] [--logsnr=-8,-4,-2] [--n=64]

On the synthetic 'straight' data a clip moving right starts on the left and
ends on the right (synthetic.SyntheticVideos._straight), so even the mean
clip of one direction travels: the centroid of its foreground moves by
several pixels from the first frame to the last. A denoiser's x-prediction
at a very low log-SNR is that mean given the prompt (the posterior mean of
the clean video). This script prints, per direction, the centroid's travel
(dx, dy in pixels, first frame to last) of
  data: the mean of real clips whose detected direction is that one;
  model: the mean x-prediction from pure noise (z = sigma * eps) for the
    prompt 'a red circle moving {direction}', at each --logsnr.
A model that ties the direction word to motion travels as the data does.
"""

import argparse
import os
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
from vdm_jax import denoiser
from vdm_jax import sample
from vdm_jax import sample_inputs
from vdm_jax import sharding
from vdm_jax.data import detect
from vdm_jax.data import synthetic
import t2v_alignment  # Beside this script.


def travel(videos: np.ndarray) -> tuple[float, float]:
  """Mean (dx, dy) of the foreground centroid, frame 0 to the last.

  videos: float [N, T, H, W, C]; the foreground is what is brighter than
  its frame's mean.
  """
  lum = videos.mean(-1)
  w = np.maximum(lum - lum.mean((2, 3), keepdims=True), 0.0)
  pos = np.arange(videos.shape[2])
  cx = (w.sum(2) * pos).sum(-1) / w.sum((2, 3))
  cy = (w.sum(3) * pos).sum(-1) / w.sum((2, 3))
  return (float((cx[:, -1] - cx[:, 0]).mean()),
          float((cy[:, -1] - cy[:, 0]).mean()))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  t2v_alignment.model_arguments(parser)
  parser.add_argument('--logsnr', default='-8,-4,-2')
  parser.add_argument('--n', type=int, default=64)
  args = parser.parse_args()
  config = t2v_alignment.load_config(args.config)

  real, _ = sample_inputs.dataset_clips(config, 512, config.data.num_frames,
                                        seed=1)
  found = detect.detect(real, config.data.num_classes or t2v_alignment.NUM_KINDS)
  real = real.astype(np.float32) / 127.5 - 1.0
  model, params, step = sample.restore_ema_params(
      config, args.workdir, sharding.make_mesh(config.mesh))
  encoder = denoiser.text_encoder(config)
  rng = np.random.default_rng(0)
  t, size = config.data.num_frames, config.data.image_size
  print(f'checkpoint step {step}; centroid travel (dx, dy) in pixels')
  for d, name in enumerate(synthetic.DIRECTIONS):
    cells = [f'data {travel(real[found["direction"] == d])[0]:+.2f},'
             f' {travel(real[found["direction"] == d])[1]:+.2f}']
    emb = encoder.encode([f'a red circle moving {name}'])
    for lam in [float(x) for x in args.logsnr.split(',')]:
      alpha, sigma = np.sqrt(1 / (1 + np.exp(-lam))), np.sqrt(
          1 / (1 + np.exp(lam)))
      z = sigma * rng.standard_normal((args.n, t, size, size, 3))
      out = np.asarray(model.apply(
          {'params': params}, jnp.asarray(z, jnp.float32),
          jnp.full((args.n,), lam),
          text=jnp.repeat(emb.tokens, args.n, 0),
          text_mask=jnp.repeat(emb.mask, args.n, 0)))
      x = {'v': alpha * z - sigma * out, 'x': out,
           'eps': (z - sigma * out) / alpha}[config.diffusion.target]
      dx, dy = travel(x)
      cells.append(f'logsnr {lam:g}: {dx:+.2f}, {dy:+.2f}')
    print(f'{name:6s} ' + ' | '.join(cells))


if __name__ == '__main__':
  main()
