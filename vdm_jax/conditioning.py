"""Known parts of a block: which frames are given, and where (VDM 3.1).

The frame-placement helpers of the sampling tasks (tasks.py): a known part
is (x_a [B, T, H, W, C], mask [B, T] bool, True = given). `known_frames`
places given frames at block positions; `predict_condition`,
`keyframes_condition`, `extension_condition`, `interpolation_plan` and
`overlapping_blocks` say which frames condition a block of each task, and
`extend` loops the block-autoregressive extension (VDM 4.3.3) around a
block sampler.
"""

import jax.numpy as jnp
import numpy as np


def check_video(shape, num_frames_min: int, image_shape, task: str):
  """Checks a video shape [B, T_in, H, W, C] with T_in >= num_frames_min."""
  if shape is None:
    raise ValueError(f'Task {task!r} needs an input video.')
  if len(shape) != 5:
    raise ValueError(f'Input video must be [B, T, H, W, C]; got {shape}.')
  if shape[1] < num_frames_min:
    raise ValueError(
        f'Task {task!r} needs at least {num_frames_min} input frames; got'
        f' {shape[1]}.'
    )
  if image_shape is not None and tuple(shape[2:]) != tuple(image_shape):
    raise ValueError(
        f'Input frames are {tuple(shape[2:])} but the model makes'
        f' {tuple(image_shape)}.'
    )


def check_k(k: int, num_frames: int) -> None:
  if not 1 <= k < num_frames:
    raise ValueError(
        f'sample.num_cond_frames={k} must be in [1, num_frames) ='
        f' [1, {num_frames}): the block must keep frames to generate.'
    )


def known_frames(
    frames: jnp.ndarray, positions: np.ndarray, num_frames: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Places given frames at block positions.

  Args:
    frames: [B, K, H, W, C] the given frames.
    positions: int [K] their positions in the block.
    num_frames: T, the block length.

  Returns:
    x_a: [B, T, H, W, C] (zeros where unknown); mask: bool [B, T].
  """
  b = frames.shape[0]
  x_a = jnp.zeros((b, num_frames) + frames.shape[2:], jnp.float32)
  x_a = x_a.at[:, positions].set(jnp.asarray(frames, jnp.float32))
  mask = np.zeros((b, num_frames), bool)
  mask[:, positions] = True
  return x_a, jnp.asarray(mask)


def predict_condition(
    video: jnp.ndarray, num_frames: int, num_cond_frames: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Video prediction: the first k frames of `video` start the block.

  Args:
    video: [B, T_in, H, W, C], T_in >= k.
    num_frames: T of the model.
    num_cond_frames: k, 1 <= k < T.

  Returns:
    (x_a [B, T, H, W, C], mask bool [B, T]).
  """
  check_k(num_cond_frames, num_frames)
  check_video(video.shape, num_cond_frames, None, 'predict')
  k = num_cond_frames
  return known_frames(video[:, :k], np.arange(k), num_frames)


def keyframes_condition(
    video: jnp.ndarray, num_frames: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The first and last frames of `video` become frames 0 and T-1."""
  if num_frames < 2:
    raise ValueError('Task keyframes needs a model with at least 2 frames.')
  check_video(video.shape, 2, None, 'keyframes')
  frames = jnp.stack([video[:, 0], video[:, -1]], axis=1)
  return known_frames(frames, np.array([0, num_frames - 1]), num_frames)


def interpolation_plan(
    num_in: int, num_frames: int, factor: int
) -> list[tuple[np.ndarray, np.ndarray, int]]:
  """Blocks for temporal upsampling of num_in frames by `factor`.

  The output has (num_in - 1) * factor + 1 frames; input frame j is output
  frame j * factor. A block holds K = (T - 1) // factor + 1 given frames at
  positions 0, factor, ...; consecutive blocks share one given frame.

  Returns:
    A list of (input indices [K'], block positions [K'], first output index);
    each block fills output frames [first, first + (K' - 1) * factor].
  """
  if factor < 2 or factor >= num_frames:
    raise ValueError(
        f'sample.interp_factor={factor} must be in [2, num_frames) = [2,'
        f' {num_frames}) so that two given frames fit in one block.'
    )
  if num_in < 2:
    raise ValueError('Task interpolate needs at least 2 input frames.')
  per_block = (num_frames - 1) // factor + 1
  plan, j0 = [], 0
  while j0 < num_in - 1:
    idx = np.arange(j0, min(j0 + per_block, num_in))
    plan.append((idx, (idx - j0) * factor, j0 * factor))
    j0 = idx[-1]
  return plan


def extension_condition(
    video: jnp.ndarray, num_frames: int, k: int, direction: str
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Next block's known part: the k frames of `video` nearest to it.

  forward: video[:, -k:] at block positions 0..k-1; backward: video[:, :k]
  at positions T-k..T-1.
  """
  check_k(k, num_frames)
  check_video(video.shape, k, None, 'extend')
  if direction == 'forward':
    return known_frames(video[:, -k:], np.arange(k), num_frames)
  return known_frames(video[:, :k], np.arange(num_frames - k, num_frames),
                      num_frames)


def extend(
    sample_block,
    video: jnp.ndarray,
    *,
    num_frames: int,
    num_cond_frames: int,
    num_frames_out: int,
    direction: str = 'forward',
) -> jnp.ndarray:
  """Block-autoregressive extension (VDM 4.3.3).

  Args:
    sample_block: (block index, x_a, mask) -> [B, T, H, W, C].
    video: [B, T_in, H, W, C], T_in >= k.
    num_frames: T.
    num_cond_frames: k, frames shared between the video and a new block.
    num_frames_out: length of the result (> T_in).
    direction: 'forward' (new frames after the video) or 'backward'
      (before it).

  Returns:
    [B, num_frames_out, H, W, C]: the input video and T - k new frames per
    block, cut to num_frames_out.
  """
  k = num_cond_frames
  i = 0
  while video.shape[1] < num_frames_out:
    x_a, mask = extension_condition(video, num_frames, k, direction)
    block = sample_block(i, x_a, mask)
    if direction == 'forward':
      video = jnp.concatenate([video, block[:, k:]], axis=1)
    else:
      video = jnp.concatenate([block[:, :num_frames - k], video], axis=1)
    i += 1
  if direction == 'forward':
    return video[:, :num_frames_out]
  return video[:, video.shape[1] - num_frames_out:]


def overlapping_blocks(num_frames_in: int, num_frames: int,
                       overlap: int) -> list[tuple[int, int]]:
  """Blocks of a long video sampled one after another over a shared overlap.

  Block 0 is frames [0, T); each next block starts T - overlap frames after
  the previous one, so that its first `overlap` frames are already sampled
  (the known part it is conditioned on, VDM 3.1); the last block ends at
  the last frame, sharing more frames when T - overlap does not divide the
  rest. overlap = 0 cuts the video into independent blocks (T must then
  divide the length).

  Args:
    num_frames_in: frames of the video, >= T.
    num_frames: T, the block length.
    overlap: frames each block shares with the frames before it, < T.

  Returns:
    [(start, known)]: block i covers [start, start + T) and its first
    `known` frames are given (0 for block 0).
  """
  t, k = num_frames, overlap
  if not 0 <= k < t:
    raise ValueError(f'The overlap {k} must be in [0, T={t}).')
  if num_frames_in < t or (k == 0 and num_frames_in % t):
    raise ValueError(
        f'{num_frames_in} frames cannot be cut into blocks of {t} frames'
        + (' (without overlap T must divide the length).' if k == 0 else '.'))
  blocks, end = [(0, 0)], t
  while end < num_frames_in:
    start = min(end - k, num_frames_in - t)
    blocks.append((start, end - start))
    end = start + t
  return blocks
