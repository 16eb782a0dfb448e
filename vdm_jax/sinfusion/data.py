"""The single training video and the training examples cut from it.

SinFusion (Nikankin, Haim, Irani 2022, arXiv 2211.11743) trains on random
large crops (~95% of each side) of the frames of one video. Each of the
three models sees its own examples, all cropped at one location per example
so that the condition frames and the target stay aligned:

  predictor:    target frame i + k given frame i, k in +-{1..K}
  projector:    frame i alone (a denoiser of the video's frames)
  interpolator: frame i + m given frames i and i + 2m, m in {1..M}

with K = model.max_offset and M = min(K, (T - 1) // 2).
"""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from vdm_jax import video_io

MODEL_NAMES = ('predictor', 'projector', 'interpolator')
# Condition frames of each model (channel-concatenated to z).
NUM_COND_FRAMES = {'predictor': 1, 'projector': 0, 'interpolator': 2}


def load_video(config: ml_collections.ConfigDict) -> np.ndarray:
  """Reads, subsamples and resizes `config.data.path`.

  Args:
    config: the full config (data.path, max_frames, frame_stride, max_size).

  Returns:
    float32 [T, H, W, 3] in [-1, 1].

  Raises:
    ValueError / FileNotFoundError: no path, an unreadable file, or too few
      frames for the frame offsets; the message names the config field.
  """
  d = config.data
  if not d.path:
    raise ValueError(
        'SinFusion trains on one video: set --config.data.path=clip.mp4.'
    )
  if d.frame_stride < 1 or d.max_frames < 1:
    raise ValueError('data.frame_stride and data.max_frames must be >= 1.')
  try:
    video = video_io.read_video(
        d.path, max_frames=d.max_frames * d.frame_stride
    )
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f'The training video config.data.path={d.path!r} does not exist.'
    ) from e
  except ValueError as e:
    raise ValueError(
        f'Cannot use config.data.path={d.path!r} as the training video: {e}'
    ) from e
  video = video[:: d.frame_stride][: d.max_frames]
  check_num_frames(len(video), config.model.max_offset, d.path)
  video = resize_frames(video, d.max_size)
  return video.astype(np.float32) / 127.5 - 1.0


def check_num_frames(num_frames: int, max_offset: int, path: str) -> None:
  """The Predictor needs frame pairs k = max_offset apart; the Interpolator
  needs triplets."""
  need = max(max_offset + 1, 3)
  if num_frames < need:
    raise ValueError(
        f'The video {path} has {num_frames} usable frames; SinFusion with'
        f' model.max_offset={max_offset} needs at least {need} (max |k| + 1,'
        ' and 3 for the Interpolator). Use a longer clip, a smaller'
        ' data.frame_stride or a smaller model.max_offset.'
    )


def resize_frames(video: np.ndarray, max_size: int) -> np.ndarray:
  """uint8 [T, H, W, C] -> uint8 [T, h, w, C] with max(h, w) <= max_size.

  Keeps the aspect ratio; a Lanczos filter (antialiased) when shrinking.
  """
  t, h, w, _ = video.shape
  if not max_size or max(h, w) <= max_size:
    return video
  scale = max_size / max(h, w)
  size = (max(1, round(w * scale)), max(1, round(h * scale)))
  return np.stack([
      np.asarray(Image.fromarray(f).resize(size, Image.LANCZOS))
      for f in video
  ]).reshape(t, size[1], size[0], video.shape[-1])


def crop_size(
    config: ml_collections.ConfigDict, frame_hw: tuple[int, int]
) -> tuple[int, int]:
  """(h, w) of the training crops; raises if larger than the frame."""
  d = config.data
  height, width = frame_hw
  if d.crop_size is not None:
    h, w = (int(d.crop_size), int(d.crop_size)) if isinstance(
        d.crop_size, int) else (int(d.crop_size[0]), int(d.crop_size[1]))
    source = f'data.crop_size={d.crop_size}'
  else:
    if not 0.0 < d.crop_fraction <= 1.0:
      raise ValueError(
          f'data.crop_fraction={d.crop_fraction} must lie in (0, 1].'
      )
    h = max(1, round(height * d.crop_fraction))
    w = max(1, round(width * d.crop_fraction))
    source = f'data.crop_fraction={d.crop_fraction}'
  if h > height or w > width or h < 1 or w < 1:
    raise ValueError(
        f'Training crop {h}x{w} ({source}) does not fit the {height}x{width}'
        f' frames of {d.path} (after data.max_size={d.max_size}).'
    )
  return h, w


def max_interp_gap(num_frames: int, max_offset: int) -> int:
  """Largest half-gap m of the Interpolator's triplets (i, i + m, i + 2m)."""
  return max(1, min(max_offset, (num_frames - 1) // 2))


def _crop(frames: jnp.ndarray, y0: jnp.ndarray, x0: jnp.ndarray,
          hw: tuple[int, int]) -> jnp.ndarray:
  """[B, H, W, C] frames, [B] corners -> [B, h, w, C] crops."""
  def one(f, y, x):
    return jax.lax.dynamic_slice(f, (y, x, 0), (*hw, f.shape[-1]))

  return jax.vmap(one)(frames, y0, x0)


def make_examples(
    name: str,
    video: jnp.ndarray,
    rng: jax.Array,
    batch_size: int,
    hw: tuple[int, int],
    max_offset: int,
) -> dict[str, jnp.ndarray]:
  """Random training examples of one model (traceable under jit).

  Args:
    name: one of MODEL_NAMES.
    video: [T, H, W, C] float frames in [-1, 1].
    rng: PRNG key.
    batch_size: B.
    hw: crop (h, w).
    max_offset: K of the frame offsets.

  Returns:
    'x': [B, h, w, C] target frames; 'frames': [B, h, w, n * C] condition
    frames (absent for the projector); 'k': int32 [B] offsets (predictor:
    signed k; interpolator: half-gap m; absent for the projector).
  """
  num_frames, height, width, _ = video.shape
  r_a, r_s, r_i, r_y, r_x = jax.random.split(rng, 5)
  y0 = jax.random.randint(r_y, (batch_size,), 0, height - hw[0] + 1)
  x0 = jax.random.randint(r_x, (batch_size,), 0, width - hw[1] + 1)

  def crop(idx):
    return _crop(video[idx], y0, x0, hw)

  if name == 'projector':
    i = jax.random.randint(r_i, (batch_size,), 0, num_frames)
    return {'x': crop(i)}
  if name == 'predictor':
    a = jax.random.randint(r_a, (batch_size,), 1, max_offset + 1)
    sign = jnp.where(jax.random.bernoulli(r_s, 0.5, (batch_size,)), 1, -1)
    i = jax.random.randint(r_i, (batch_size,), 0, num_frames - a)
    src = jnp.where(sign > 0, i, i + a)
    return {'x': crop(src + sign * a), 'frames': crop(src), 'k': sign * a}
  if name == 'interpolator':
    m_max = max_interp_gap(num_frames, max_offset)
    m = jax.random.randint(r_a, (batch_size,), 1, m_max + 1)
    i = jax.random.randint(r_i, (batch_size,), 0, num_frames - 2 * m)
    frames = jnp.concatenate([crop(i), crop(i + 2 * m)], axis=-1)
    return {'x': crop(i + m), 'frames': frames, 'k': m}
  raise ValueError(f'Unknown SinFusion model {name!r}; one of {MODEL_NAMES}.')


def input_dir_writable(path: str) -> bool:
  directory = os.path.dirname(os.path.abspath(path))
  return os.path.isdir(directory) and os.access(directory, os.W_OK)
