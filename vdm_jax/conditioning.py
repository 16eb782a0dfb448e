"""What to condition on, and where: the sampling tasks (Ho et al. 2022, 3.1).

`config.sample.task` selects one of TASKS:
  'unconditional'  p(x).
  'class'          p(x | label), classifier-free guidance weight
                   sample.guidance_weight (VDM 2).
  'predict'        the first k = sample.num_cond_frames frames of the block are
                   given; the model generates the rest (BAIR 1 -> 15,
                   Kinetics 5 -> 11 in VDM 4.2).
  'extend'         block-autoregressive extension to sample.num_frames_out
                   frames (VDM 4.3.3): each new block is conditioned on the k
                   frames of the video it touches; sample.direction
                   'forward' appends blocks, 'backward' prepends them.
  'interpolate'    temporal upsampling by m = sample.interp_factor: the given
                   frames sit at every m-th position of the block.
  'keyframes'      the first and the last frame of the block are given.
  'upsample'       spatial super-resolution of a low-resolution video with
                   the high-resolution model (VDM 3.1, the bilinear-downsample
                   variant of reconstruction guidance).
Frame-conditioned tasks use replacement when sample.recon_weight = 0 and
reconstruction guidance otherwise. A known part is (x_a [B, T, H, W, C],
mask [B, T] bool, True = given). Long videos are a Python loop over blocks
around the one compiled sampler: every block has the same shapes, so it is
compiled once.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdm_jax import diffusion
from vdm_jax import sampling
from vdm_jax import schedules

TASKS = ('unconditional', 'class', 'predict', 'extend', 'interpolate',
         'keyframes', 'upsample')
DIRECTIONS = ('forward', 'backward')
VIDEO_TASKS = ('predict', 'extend', 'interpolate', 'keyframes', 'upsample')


def check_task(task: str) -> None:
  if task not in TASKS:
    raise ValueError(f'Unknown sample.task {task!r}; choose one of {TASKS}.')


def _check_video(shape, num_frames_min: int, image_shape, task: str):
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


def _check_k(k: int, num_frames: int) -> None:
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
  _check_k(num_cond_frames, num_frames)
  _check_video(video.shape, num_cond_frames, None, 'predict')
  k = num_cond_frames
  return known_frames(video[:, :k], np.arange(k), num_frames)


def keyframes_condition(
    video: jnp.ndarray, num_frames: int
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The first and last frames of `video` become frames 0 and T-1."""
  if num_frames < 2:
    raise ValueError('Task keyframes needs a model with at least 2 frames.')
  _check_video(video.shape, 2, None, 'keyframes')
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


def build(
    task: str,
    video: jnp.ndarray | None,
    *,
    num_frames: int,
    num_cond_frames: int = 1,
    interp_factor: int = 2,
    direction: str = 'forward',
) -> tuple[jnp.ndarray | None, jnp.ndarray | None]:
  """(x_a, mask) of the first block of a task (None, None: nothing known).

  Args:
    task: one of TASKS.
    video: [B, T_in, H, W, C] input in [-1, 1] (None where not needed).
    num_frames: the model's T.
    num_cond_frames: k for 'predict' and 'extend'.
    interp_factor: m for 'interpolate'.
    direction: 'forward' or 'backward' for 'extend'.

  Returns:
    x_a [B, T, H, W, C] and mask bool [B, T], or (None, None) for tasks that
    condition on no frames ('unconditional', 'class', 'upsample').
  """
  check_task(task)
  if task == 'predict':
    return predict_condition(video, num_frames, num_cond_frames)
  if task == 'extend':
    return extension_condition(video, num_frames, num_cond_frames, direction)
  if task == 'keyframes':
    return keyframes_condition(video, num_frames)
  if task == 'interpolate':
    idx, pos, _ = interpolation_plan(video.shape[1], num_frames,
                                     interp_factor)[0]
    return known_frames(video[:, idx], pos, num_frames)
  return None, None


def extension_condition(
    video: jnp.ndarray, num_frames: int, k: int, direction: str
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Next block's known part: the k frames of `video` nearest to it.

  forward: video[:, -k:] at block positions 0..k-1; backward: video[:, :k]
  at positions T-k..T-1.
  """
  _check_k(k, num_frames)
  _check_video(video.shape, k, None, 'extend')
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


def validate(config: ml_collections.ConfigDict, video_shape=None) -> None:
  """Raises ValueError for impossible requests before any sampling.

  Args:
    config: the full config.
    video_shape: shape of the input video (None if there is none).
  """
  s, d = config.sample, config.data
  task, t = s.task, d.num_frames
  check_task(task)
  image = (d.image_size, d.image_size, d.channels)
  k = s.get('num_cond_frames', 1)
  if task == 'class' and not config.model.num_classes:
    raise ValueError("Task 'class' needs a model with num_classes > 0.")
  if task in ('predict', 'extend'):
    _check_k(k, t)
  if task == 'keyframes' and t < 2:
    raise ValueError('Task keyframes needs a model with at least 2 frames.')
  if task == 'interpolate':
    interpolation_plan(max(video_shape[1], 2) if video_shape else 2, t,
                       s.get('interp_factor', 2))
  if s.get('fixed_base_noise', False):
    if task != 'extend':
      raise ValueError("sample.fixed_base_noise applies to task 'extend'.")
    if config.diffusion.get('noise', 'iid') != 'decomposed':
      raise ValueError(
          "sample.fixed_base_noise needs diffusion.noise='decomposed' (the"
          ' base noise it holds fixed).'
      )
  if task == 'extend':
    direction = s.get('direction', 'forward')
    if direction not in DIRECTIONS:
      raise ValueError(
          f'Unknown sample.direction {direction!r}; choose one of'
          f' {DIRECTIONS}.'
      )
    out = s.get('num_frames_out', 2 * t)
    have = video_shape[1] if video_shape else t
    if out <= have:
      raise ValueError(
          f'sample.num_frames_out={out} must exceed the {have} frames there'
          ' are already.'
      )
  if task == 'upsample':
    if not s.recon_weight:
      raise ValueError("Task 'upsample' needs sample.recon_weight > 0.")
    if video_shape is None:
      raise ValueError("Task 'upsample' needs a low-resolution input video.")
    _, tin, h, w, c = video_shape
    if tin % t or d.image_size % h or d.image_size % w or c != d.channels:
      raise ValueError(
          f'Cannot upsample {tuple(video_shape[1:])} with a {t}x'
          f'{d.image_size}x{d.image_size}x{d.channels} model: frames must be'
          ' a multiple of T, sizes must divide the image size.'
      )
  elif task in VIDEO_TASKS:
    if video_shape is None:
      if task != 'extend':
        raise ValueError(f'Task {task!r} needs an input video.')
    else:
      need = {'predict': k, 'extend': k, 'keyframes': 2, 'interpolate': 2}
      _check_video(video_shape, need[task], image, task)


def run_task(
    config: ml_collections.ConfigDict,
    denoise_fn: diffusion.DenoiseFn,
    rng: jax.Array,
    *,
    video: jnp.ndarray | None = None,
    num_videos: int | None = None,
    labels: jnp.ndarray | None = None,
    logsnr_fn: schedules.LogSNRFn | None = None,
    **sample_kwargs: Any,
) -> jnp.ndarray:
  """Runs config.sample.task end to end.

  Args:
    config: the full config (sample, diffusion, data, model).
    denoise_fn: (z, logsnr, cond) -> prediction (ideally a
      `jax.tree_util.Partial(apply, params)`, see `sampling.sample`).
    rng: PRNG key; block i samples with fold_in(rng, i).
    video: [B, T_in, H, W, C] input in [-1, 1] for the video tasks
      ('upsample': the low-resolution video [B, T_in, h, w, C]); optional for
      'extend' (None: the first block is sampled without frames).
    num_videos: B when there is no input video.
    labels: int32 [B] class labels (class-conditional models; with
      sample.guidance_weight > 0 classifier-free guidance is applied on
      every task).
    logsnr_fn: schedule; default from config.diffusion.
    **sample_kwargs: overrides of `sampling.sample` keywords (num_steps,
      noise_fn, clip_x, ...).

  Returns:
    x: [B, T_out, H, W, C] float32, T_out = T except 'extend'
    (num_frames_out) and 'interpolate' ((T_in - 1) * interp_factor + 1).
  """
  s, d = config.sample, config.data
  task, t = s.task, d.num_frames
  if video is not None:
    video = jnp.asarray(video, jnp.float32)
  validate(config, None if video is None else video.shape)
  b = video.shape[0] if video is not None else num_videos
  if b is None:
    raise ValueError(f'Task {task!r} without an input video needs num_videos.')
  shape = (b, t, d.image_size, d.image_size, d.channels)
  cond = {}
  num_classes = int(config.model.get('num_classes', 0) or 0)
  if num_classes and labels is not None:
    cond['label'] = jnp.asarray(labels, jnp.int32)
  elif task == 'class':
    raise ValueError("Task 'class' needs labels.")
  cfg = {}
  if 'label' in cond and s.get('guidance_weight', 0.0):
    cfg = dict(cfg_weight=s.guidance_weight, null_label=num_classes)
  logsnr_fn = logsnr_fn or schedules.get_logsnr_fn(config.diffusion,
                                                   d.image_size)
  remat = s.get('remat_guidance', False)
  fixed_base = s.get('fixed_base_noise', False)
  if fixed_base and 'noise_fn' in sample_kwargs:
    raise ValueError('sample.fixed_base_noise builds its own noise_fn.')
  noise_fn = diffusion.noise_fn_from_config(config.diffusion, t)

  def sample_block(i, x_a=None, mask=None, x_lowres=None):
    guidance = sampling.make_guidance(
        x_a=x_a, mask=mask, x_lowres=x_lowres, recon_weight=s.recon_weight,
        remat=remat, **cfg)
    block_rng, kwargs = jax.random.fold_in(rng, i), sample_kwargs
    if fixed_base:
      # VideoFusion's long videos: every block samples with the same key, so
      # each draw (z_1, step i's noise) has the same base noise per video;
      # the block index salts the residuals, which are fresh per block.
      block_rng = jax.random.fold_in(rng, 0)
      kwargs = dict(sample_kwargs,
                    noise_fn=noise_fn.replace(residual_salt=jnp.int32(i)))
    return sampling.sample_from_config(
        denoise_fn, block_rng, shape, config, cond=cond,
        guidance=guidance, logsnr_fn=logsnr_fn, **kwargs)

  if task in ('unconditional', 'class'):
    return sample_block(0)
  if task in ('predict', 'keyframes'):
    return sample_block(0, *build(task, video, num_frames=t,
                                  num_cond_frames=s.get('num_cond_frames', 1)))
  if task == 'extend':
    k = s.get('num_cond_frames', 1)
    if video is None:
      video = sample_block(0)
    return extend(lambda i, x_a, m: sample_block(i + 1, x_a, m), video,
                  num_frames=t, num_cond_frames=k,
                  num_frames_out=s.get('num_frames_out', 2 * t),
                  direction=s.get('direction', 'forward'))
  if task == 'interpolate':
    m = s.get('interp_factor', 2)
    out = jnp.zeros((b, (video.shape[1] - 1) * m + 1) + shape[2:])
    for i, (idx, pos, first) in enumerate(interpolation_plan(video.shape[1],
                                                             t, m)):
      block = sample_block(i, *known_frames(video[:, idx], pos, t))
      n = pos[-1] + 1
      out = out.at[:, first:first + n].set(block[:, :n])
    return out
  # upsample: independent blocks of T frames.
  blocks = [sample_block(i, x_lowres=video[:, j:j + t])
            for i, j in enumerate(range(0, video.shape[1], t))]
  return jnp.concatenate(blocks, axis=1)
