"""Seams of long-video super-resolution: independent blocks vs overlap.

  python experiments/upsample_seams.py --frames=24 --overlap=0,1,2,4

The truth is known here: videos are drawn from a stationary Gaussian
process (AR(1) in time, corr --rho_t between neighbouring frames; a
Gaussian kernel in space), and the denoiser is that prior's exact
posterior mean E[x | z_t] for one T-frame block (the best any trained
model of T frames could do). Each long video is downsampled by --factor
(the library's bilinear `sampling.downsample`) and upsampled back with
task 'upsample' (VDM 3.1: reconstruction guidance on the low-resolution
frames, and with sample.upsample_overlap = k > 0 also on the k frames
each block shares with the video already upsampled before it).

The seam figure: the mean absolute difference between consecutive frames
where the output passes from one block's frames to the next block's
(the boundary), against the same between consecutive frames within a
block. A stationary video has ratio 1; independent blocks meet with a
jump of independent high-frequency detail. The error against the true
high-resolution video is printed as well. Prints a markdown table and a
JSON line.
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import default  # pylint: disable=g-import-not-at-top,wrong-import-position
from vdm_jax import conditioning  # pylint: disable=g-import-not-at-top,wrong-import-position
from vdm_jax import sampling  # pylint: disable=g-import-not-at-top,wrong-import-position
from vdm_jax import tasks  # pylint: disable=g-import-not-at-top,wrong-import-position

_T = flags.DEFINE_integer('num_frames', 8, 'T, frames of a model block.')
_SIZE = flags.DEFINE_integer('size', 8, 'High-resolution frame size.')
_FACTOR = flags.DEFINE_integer('factor', 2, 'Downsampling factor.')
_FRAMES = flags.DEFINE_integer('frames', 24, 'Frames of each long video.')
_OVERLAP = flags.DEFINE_list('overlap', ['0', '1', '2', '4'],
                             'sample.upsample_overlap values.')
_VIDEOS = flags.DEFINE_integer('videos', 64, 'Videos per setting.')
_STEPS = flags.DEFINE_integer('steps', 128, 'Sampler steps.')
_WEIGHT = flags.DEFINE_float('recon_weight', 5.0, 'w_r of both terms.')
_RHO_T = flags.DEFINE_float('rho_t', 0.95, 'Frame-to-frame correlation.')
_LENGTH = flags.DEFINE_float('length', 1.5, 'Spatial kernel length (px).')


def _covariance(frames: int, size: int) -> np.ndarray:
  """Sigma = K_t (x) K_s, K_t[i, j] = rho^|i - j|, K_s a Gaussian kernel."""
  t = np.arange(frames)
  k_t = _RHO_T.value ** np.abs(t[:, None] - t[None])
  yy, xx = np.meshgrid(np.arange(size), np.arange(size), indexing='ij')
  p = np.stack([yy.ravel(), xx.ravel()], -1).astype(np.float64)
  d2 = np.sum(np.square(p[:, None] - p[None]), -1)
  k_s = 0.25 * np.exp(-d2 / (2 * _LENGTH.value ** 2)) + 1e-4 * np.eye(
      size * size)
  return np.kron(k_t, k_s)


def _posterior_mean(cov: np.ndarray, shape: tuple[int, ...]):
  """(z, logsnr, cond) -> E[x | z] for x ~ N(0, cov): the exact x-denoiser."""
  s, u = np.linalg.eigh(cov)
  s, u = jnp.asarray(s, jnp.float32), jnp.asarray(u, jnp.float32)

  def denoise(z, logsnr, cond):
    del cond
    a2 = jax.nn.sigmoid(logsnr)[:, None]
    s2 = jax.nn.sigmoid(-logsnr)[:, None]
    y = z.reshape(z.shape[0], -1) @ u
    x = (y * (jnp.sqrt(a2) * s / (a2 * s + s2))) @ u.T
    return x.reshape((z.shape[0],) + shape)

  return denoise


def _seam_ratio(video: np.ndarray, boundaries: np.ndarray) -> tuple:
  """(boundary diff, within diff): mean |x_{f+1} - x_f| at the frames f
  after which the next frame comes from another block, and elsewhere."""
  diff = np.abs(np.diff(video, axis=1)).mean(axis=(0, 2, 3, 4))  # [F - 1]
  at = np.zeros(diff.shape[0], bool)
  at[boundaries] = True
  return float(diff[at].mean()), float(diff[~at].mean())


def _boundaries(frames: int, t: int, overlap: int) -> np.ndarray:
  """The frames f whose successor f + 1 is the first new frame of a block."""
  blocks = conditioning.overlapping_blocks(frames, t, overlap)
  return np.array([start + known - 1 for start, known in blocks[1:]])


def main(argv):
  del argv
  t, size, f = _T.value, _SIZE.value, _FRAMES.value
  low = size // _FACTOR.value
  rng = np.random.default_rng(0)
  cov_long = _covariance(f, size)
  x_true = (rng.standard_normal((_VIDEOS.value, cov_long.shape[0]))
            @ np.linalg.cholesky(cov_long).T).reshape(
                _VIDEOS.value, f, size, size, 1).astype(np.float32)
  y = sampling.downsample(jnp.asarray(x_true), (low, low))
  denoise = _posterior_mean(_covariance(t, size), (t, size, size, 1))
  config = default.get_config()
  config.data.num_frames, config.data.image_size = t, size
  config.data.channels, config.model.num_classes = 1, 0
  config.diffusion.target = 'x'
  config.sample.update(task='upsample', sampler='ancestral',
                       num_steps=_STEPS.value, recon_weight=_WEIGHT.value,
                       clip_x=False, lowres_size=low)
  rows = []
  truth_b, truth_w = _seam_ratio(x_true, np.arange(t - 1, f - 1, t))
  for overlap in (int(k) for k in _OVERLAP.value):
    config.sample.upsample_overlap = overlap
    start = time.time()
    out = np.asarray(tasks.run(
        tasks.from_config(config.sample), denoise, jax.random.key(1),
        tasks.Setup.from_config(config), video=y))
    seconds = time.time() - start
    boundary, within = _seam_ratio(out, _boundaries(f, t, overlap))
    rows.append(dict(
        overlap=overlap,
        blocks=len(conditioning.overlapping_blocks(f, t, overlap)),
        boundary_diff=round(boundary, 4), within_diff=round(within, 4),
        seam_ratio=round(boundary / within, 3),
        rmse_to_truth=round(float(np.sqrt(np.mean(np.square(
            out - x_true)))), 4),
        lowres_rmse=round(float(np.sqrt(np.mean(np.square(
            np.asarray(sampling.downsample(jnp.asarray(out), (low, low)))
            - np.asarray(y))))), 4),
        seconds=round(seconds, 1)))
  print(f'{_VIDEOS.value} videos of {f}x{size}x{size} from {low}x{low},'
        f' T={t}, {_STEPS.value} ancestral steps, w_r={_WEIGHT.value};'
        f' truth: boundary {truth_b:.4f} / within {truth_w:.4f}'
        f' = {truth_b / truth_w:.3f}')
  print('| overlap k | blocks | boundary diff | within diff | seam ratio |'
        ' RMSE to truth | low-res RMSE | s |')
  print('|---|---|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['overlap']} | {r['blocks']} | {r['boundary_diff']} |"
          f" {r['within_diff']} | {r['seam_ratio']} | {r['rmse_to_truth']} |"
          f" {r['lowres_rmse']} | {r['seconds']} |")
  print(json.dumps(dict(rows=rows, truth_ratio=round(truth_b / truth_w, 3))))


if __name__ == '__main__':
  app.run(main)
