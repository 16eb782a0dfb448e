"""Patch metrics of single-video generation, and the eval program.

Nearest-neighbour patch metrics (after SinFusion's NNFDIV, Nikankin, Haim,
Irani 2022, arXiv 2211.11743, section 7.2). Patches are p x p x C, values in
[0, 1]; the distance of two patches is their RMS difference. For every
patch q of a generated frame (stride `query_stride`), NN(q) is the closest
patch among all patches of all input frames (stride `ref_stride`), and

  nn_patch_dist     = mean over generated frames and their patches of
                      d(q, NN(q));
  nn_patch_dist_ref = the same for each input frame against the patches of
                      the *other* input frames (leave one frame out): how
                      far a real frame of the video is from the rest;
  nnfdiv_like       = nn_patch_dist / nn_patch_dist_ref.

nnfdiv_like is 0 for copies of input frames, about 1 for frames as novel
as a real frame of the video is relative to the others, and above 1 for
patches the video does not contain (new content or artifacts), so read it
with the fidelity numbers. `nnf_compression` is closer to the published
NNFDIV (the compression ratio of the nearest-neighbour field): the field of
(frame, dy, dx) displacements of NN(q) relative to q, as int16, compressed
with zlib level 9, divided by its raw size. Copies and translations give
constant fields that compress well (small values); shuffled or new content
gives complex fields (larger values). `sample_diversity` is the per-pixel
standard deviation across generated videos divided by the per-pixel
standard deviation across the input's frames (SinGAN-style).
"""

import os
import zlib
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdm_jax import fileio
from vdm_jax.sinfusion import generate

# Query patches per distance block (bounds memory to block x references).
_BLOCK = 1024


def extract_patches(frames: np.ndarray, patch: int, stride: int
                    ) -> tuple[np.ndarray, tuple[int, int]]:
  """uint8/float [N, H, W, C] -> ([N, h, w, p * p * C] in [0, 1], (h, w))."""
  frames = np.asarray(frames)
  x = frames.astype(np.float32)
  if frames.dtype == np.uint8:
    x = x / 255.0
  n, height, width, c = x.shape
  if patch > min(height, width):
    raise ValueError(f'eval.patch_size={patch} exceeds the {height}x{width}'
                     ' frames.')
  win = np.lib.stride_tricks.sliding_window_view(x, (patch, patch), (1, 2))
  win = win[:, ::stride, ::stride]  # [N, h, w, C, p, p]
  hw = win.shape[1:3]
  win = np.moveaxis(win, 3, -1).reshape(n, *hw, patch * patch * c)
  return win, hw


@jax.jit
def _nearest(queries: jnp.ndarray, refs: jnp.ndarray, ref_sq: jnp.ndarray):
  """[Q, D], [R, D], [R] -> (min squared distance [Q], argmin [Q])."""
  d2 = (jnp.sum(queries**2, -1, keepdims=True) + ref_sq[None]
        - 2.0 * queries @ refs.T)
  return jnp.maximum(jnp.min(d2, -1), 0.0), jnp.argmin(d2, -1)


def nearest_patches(queries: np.ndarray, refs: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
  """NN of each query among refs: (RMS distance [Q], ref index [Q])."""
  refs = jnp.asarray(refs)
  ref_sq = jnp.sum(refs**2, -1)
  dists, idx = [], []
  for i in range(0, len(queries), _BLOCK):
    block = queries[i:i + _BLOCK]
    pad = _BLOCK - len(block)
    if pad:  # Fixed block shape: one compile.
      block = np.concatenate([block, np.zeros((pad, block.shape[1]),
                                              block.dtype)])
    d2, j = _nearest(jnp.asarray(block), refs, ref_sq)
    dists.append(np.asarray(d2)[:_BLOCK - pad])
    idx.append(np.asarray(j)[:_BLOCK - pad])
  dim = queries.shape[-1]
  return np.sqrt(np.concatenate(dists) / dim), np.concatenate(idx)


def nn_field(gen: np.ndarray, ref: np.ndarray, patch: int, query_stride: int,
             ref_stride: int) -> tuple[np.ndarray, np.ndarray]:
  """Per-patch NN distance [F, h, w] and NN field int16 [F, h, w, 3].

  Args:
    gen: [F, H, W, C] generated frames (uint8 or [0, 1] floats).
    ref: [T, H', W', C] input frames.
    patch, query_stride, ref_stride: patch side and strides.

  Returns:
    (distances, field) with field = (ref frame, dy, dx) of NN(q) minus
    (0, y, x) of q, in pixels.
  """
  q, (qh, qw) = extract_patches(gen, patch, query_stride)
  r, (rh, rw) = extract_patches(ref, patch, ref_stride)
  dist, idx = nearest_patches(q.reshape(-1, q.shape[-1]),
                              r.reshape(-1, r.shape[-1]))
  t, rem = np.divmod(idx, rh * rw)
  ry, rx = np.divmod(rem, rw)
  f = len(gen)
  qy = np.broadcast_to(np.arange(qh)[:, None] * query_stride, (qh, qw))
  qx = np.broadcast_to(np.arange(qw)[None] * query_stride, (qh, qw))
  field = np.stack([
      t.reshape(f, qh, qw),
      ry.reshape(f, qh, qw) * ref_stride - qy,
      rx.reshape(f, qh, qw) * ref_stride - qx,
  ], axis=-1).astype(np.int16)
  return dist.reshape(f, qh, qw), field


def leave_one_out_dist(video: np.ndarray, patch: int, query_stride: int,
                       ref_stride: int) -> float:
  """Mean NN patch distance of each input frame to the other frames."""
  per_frame = []
  for i in range(len(video)):
    others = np.concatenate([video[:i], video[i + 1:]])
    d, _ = nn_field(video[i:i + 1], others, patch, query_stride, ref_stride)
    per_frame.append(float(d.mean()))
  return float(np.mean(per_frame))


def compression_ratio(field: np.ndarray) -> float:
  raw = np.ascontiguousarray(field).tobytes()
  return len(zlib.compress(raw, 9)) / len(raw)


def patch_metrics(videos: np.ndarray, video: np.ndarray, *, patch: int,
                  query_stride: int = 1, ref_stride: int = 1
                  ) -> dict[str, float]:
  """Diversity / fidelity numbers of generated videos (module docstring).

  Args:
    videos: uint8 [N, F, H, W, C] generated videos.
    video: uint8 [T, H, W, C] the input video.
    patch, query_stride, ref_stride: patch side and strides.

  Returns:
    'nn_patch_dist', 'nn_patch_dist_ref', 'nnfdiv_like', 'nnf_compression',
    'sample_diversity' (floats).
  """
  dists, ratios = [], []
  for v in videos:
    d, field = nn_field(v, video, patch, query_stride, ref_stride)
    dists.append(float(d.mean()))
    ratios.append(compression_ratio(field))
  ref = leave_one_out_dist(video, patch, query_stride, ref_stride)
  gen_std = np.asarray(videos, np.float32).std(axis=0).mean()
  in_std = np.asarray(video, np.float32).std(axis=0).mean()
  return {
      'nn_patch_dist': float(np.mean(dists)),
      'nn_patch_dist_ref': ref,
      'nnfdiv_like': float(np.mean(dists) / max(ref, 1e-8)),
      'nnf_compression': float(np.mean(ratios)),
      'sample_diversity': float(gen_std / max(in_std, 1e-8)),
  }


def fvd_against_input(videos: np.ndarray, video: np.ndarray
                      ) -> dict[str, Any]:
  """FVD (I3D logits) of generated clips against all input windows.

  Args:
    videos: uint8 [N, F, H, W, 3] generated clips.
    video: uint8 [T, H, W, 3] the input; its T - F + 1 windows of F frames
      are the real clips.

  Returns:
    {'fvd', 'fvd_num_generated', 'fvd_num_real', ...} or {'fvd_skipped':
    reason}. Few clips make a noisy, biased score: compare runs only at
    equal counts.
  """
  try:
    from vdm_jax.evaluation import fvd  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return {'fvd_skipped': f'vdm_jax.evaluation.fvd not importable: {e}'}
  f = videos.shape[1]
  real = np.stack([video[i:i + f] for i in range(len(video) - f + 1)]
                  ) if len(video) >= f else np.zeros((0,))
  if f < 9 or len(real) < 2 or len(videos) < 2:
    return {'fvd_skipped': f'needs >= 9 frames and >= 2 clips per side; got'
                           f' {f} frames, {len(videos)} generated and'
                           f' {len(real)} real clips'}
  gen_f = fvd.extract_features(videos, progress=False)['logits_mean']
  real_f = fvd.extract_features(real, progress=False)['logits_mean']
  scores = fvd.compute_fvd(gen_f, real_f)
  return {'fvd': scores['fvd'], 'fvd_num_generated': len(videos),
          'fvd_num_real': len(real), 'fvd_num_frames': f,
          'fvd_feature': 'i3d logits_mean, reference resize'}


def sample_and_evaluate(config: ml_collections.ConfigDict,
                        workdir: str) -> dict[str, Any]:
  """Samples `eval.num_videos` diverse videos and scores them.

  Writes workdir/sinfusion_eval.json and returns the same dict.
  """
  e = config.eval
  rng = jax.random.fold_in(jax.random.key(config.seed), 3)
  video, videos, step = generate.sample_diverse(
      config, workdir, e.num_videos, e.num_frames, rng)
  results = {'step': step, 'num_videos': int(len(videos)),
             'num_frames': int(videos.shape[1]),
             'patch_size': e.patch_size, 'query_stride': e.query_stride,
             'ref_stride': e.ref_stride, 'start': config.sample.start,
             'direction': config.sample.direction}
  results.update(patch_metrics(videos, video, patch=e.patch_size,
                               query_stride=e.query_stride,
                               ref_stride=e.ref_stride))
  if e.fvd:
    results.update(fvd_against_input(videos, video))
  else:
    results['fvd_skipped'] = 'eval.fvd is False'
  path = os.path.join(workdir, 'sinfusion_eval.json')
  if jax.process_index() == 0:
    fileio.write_json(path, results, sort_keys=True)
  logging.info('SinFusion eval: %s', results)
  return results
