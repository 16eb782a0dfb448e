"""SinFusion generation: diverse videos, extrapolation, temporal upsampling.

Nikankin, Haim, Irani (2022, arXiv 2211.11743), section on video:
  - a video is rolled out frame by frame: the Predictor samples frame
    i + k given frame i (k > 0 forward in time, k < 0 backward), and the
    Projector corrects the accumulating artifacts of each predicted frame by
    noising it to a moderate level (time `projector_t`) and denoising it;
  - a new video starts from a frame the Projector samples from pure noise
    ('generated') or from an input frame ('input');
  - temporal upsampling x2 puts the Interpolator's frame between every two
    consecutive frames; x4 does it twice.

Every frame is one call of `vdm_jax.sampling.sample` (a compiled scan over
the diffusion steps); the loop over frames runs on the host. Videos are
returned and written in natural time order, also when generated backward.
"""

import os
from typing import Any, Mapping

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdm_jax import checkpoint
from vdm_jax import denoiser
from vdm_jax import diffusion
from vdm_jax import sampling
from vdm_jax import schedules
from vdm_jax import video_io
from vdm_jax.sinfusion import data

MODES = ('diverse', 'extrapolate', 'upsample_x2', 'upsample_x4')
DIRECTIONS = ('forward', 'backward')
STARTS = ('generated', 'input')


class FrameSampler:
  """Samples frames with the three SinFusion models.

  Attributes:
    denoise_fns: {name: denoise_fn(z [B, H, W, C], logsnr [B], cond)}, cond
      holding 'frames' [B, H, W, n * C] and 'k' int32 [B] where the model
      takes them. Pass `jax.tree_util.Partial`s to keep parameters traced.
    logsnr_fn: the diffusion schedule.
    target: 'x', 'eps' or 'v'.
    spec: the sampler of every frame (`sampler_spec(config.sample)`); the
      Projector's correction runs fewer steps of it.
  """

  def __init__(
      self,
      denoise_fns: Mapping[str, diffusion.DenoiseFn],
      logsnr_fn: schedules.LogSNRFn,
      target: str,
      spec: sampling.SamplerSpec,
  ):
    self.denoise_fns = dict(denoise_fns)
    self.logsnr_fn = logsnr_fn
    self.target = target
    self.spec = spec
    self._partial_schedules = {}

  def _sample(self, name, rng, shape, cond, *, logsnr_fn=None, spec=None,
              z_init=None):
    return sampling.sample(
        self.denoise_fns[name], rng, shape,
        logsnr_fn=logsnr_fn or self.logsnr_fn, target=self.target,
        spec=spec or self.spec, cond=cond, z_init=z_init,
    )

  def generate(self, rng: jax.Array, shape: tuple[int, ...]) -> jnp.ndarray:
    """New frames [B, H, W, C] from noise with the Projector."""
    return self._sample('projector', rng, shape, {})

  def predict(self, rng: jax.Array, frame: jnp.ndarray, k: int
              ) -> jnp.ndarray:
    """Frame i + k [B, H, W, C] given frame i [B, H, W, C]."""
    cond = {'frames': frame,
            'k': jnp.full((frame.shape[0],), k, jnp.int32)}
    return self._sample('predictor', rng, frame.shape, cond)

  def interpolate(self, rng: jax.Array, before: jnp.ndarray,
                  after: jnp.ndarray, m: int) -> jnp.ndarray:
    """The frame midway between `before` and `after` (each [B, H, W, C])."""
    cond = {'frames': jnp.concatenate([before, after], axis=-1),
            'k': jnp.full((before.shape[0],), m, jnp.int32)}
    return self._sample('interpolator', rng, before.shape, cond)

  def project(self, rng: jax.Array, frame: jnp.ndarray, t: float
              ) -> jnp.ndarray:
    """Noises `frame` [B, H, W, C] to time t and denoises it (Projector).

    Runs the last round(t * num_steps) steps of the sampler (at least one)
    on the schedule restricted to [0, t]; t = 0 returns the frame.
    """
    if t <= 0:
      return frame
    if t not in self._partial_schedules:  # One function per t: one compile.
      self._partial_schedules[t] = lambda s: self.logsnr_fn(s * t)
    rng_noise, rng_sample = jax.random.split(rng)
    logsnr = jnp.full((frame.shape[0],), self.logsnr_fn(jnp.float32(t)))
    z = diffusion.q_sample(frame, logsnr,
                           jax.random.normal(rng_noise, frame.shape))
    return self._sample(
        'projector', rng_sample, frame.shape, {},
        logsnr_fn=self._partial_schedules[t],
        spec=self.spec.replace(
            num_steps=max(1, round(t * self.spec.num_steps))),
        z_init=z,
    )


def rollout(
    sampler: FrameSampler,
    rng: jax.Array,
    first: jnp.ndarray,
    num_new: int,
    k: int,
    projector_t: float,
) -> jnp.ndarray:
  """Autoregressive frames after `first` in generation order.

  Args:
    sampler: the models.
    rng: PRNG key; frame j uses fold_in(rng, j).
    first: [B, H, W, C] the frame to start from.
    num_new: frames to generate.
    k: the Predictor's offset per step (negative: backward in time).
    projector_t: noise level of the Projector correction (0: none).

  Returns:
    [B, num_new, H, W, C]: frame j is `first` advanced by (j + 1) * k.
  """
  frames, current = [], first
  for j in range(num_new):
    r_pred, r_proj = jax.random.split(jax.random.fold_in(rng, j))
    current = sampler.project(r_proj, sampler.predict(r_pred, current, k),
                              projector_t)
    frames.append(current)
  return jnp.stack(frames, axis=1)


def _signed(direction: str, offset: int) -> int:
  return offset if direction == 'forward' else -offset


def diverse(sampler, rng, video, *, num_videos, num_frames, start,
            start_frame, direction, offset, projector_t) -> jnp.ndarray:
  """New videos [N, num_frames, H, W, C] of the input's scene.

  The first generated frame (the last one in time when going backward) is
  a Projector sample from noise (start='generated') or input frame
  `start_frame` (start='input').
  """
  r_start, r_roll = jax.random.split(rng)
  shape = (num_videos, *video.shape[1:])
  if start == 'generated':
    first = sampler.generate(r_start, shape)
  else:
    first = jnp.broadcast_to(video[start_frame], shape)
  new = rollout(sampler, r_roll, first, num_frames - 1,
                _signed(direction, offset), projector_t)
  out = jnp.concatenate([first[:, None], new], axis=1)
  return out if direction == 'forward' else out[:, ::-1]


def extrapolate(sampler, rng, video, *, num_videos, num_new, direction,
                offset, projector_t) -> jnp.ndarray:
  """The input continued by num_new frames: [N, T + num_new, H, W, C].

  Forward: the input, then frames after its last one. Backward: frames
  before its first one (generated with k < 0), then the input.
  """
  n = num_videos
  edge = video[-1] if direction == 'forward' else video[0]
  first = jnp.broadcast_to(edge, (n, *video.shape[1:]))
  new = rollout(sampler, rng, first, num_new, _signed(direction, offset),
                projector_t)
  given = jnp.broadcast_to(video, (n, *video.shape))
  if direction == 'forward':
    return jnp.concatenate([given, new], axis=1)
  return jnp.concatenate([new[:, ::-1], given], axis=1)


def interpolate_in_chunks(sampler, rng, before, after, m, max_batch
                          ) -> jnp.ndarray:
  """sampler.interpolate over [N, H, W, C] pairs, max_batch at a time.

  The memory of one model call grows with its batch (~0.13 GiB per 144x256
  frame with the defaults, docs/sinfusion.md 'Memory'); upsampling x4 of
  32 frames would otherwise denoise 61 frames at once. The last chunk is
  padded to max_batch (one compile) and cut back.

  Args:
    sampler: the models.
    rng: PRNG key; chunk j uses fold_in(rng, j).
    before, after: [N, H, W, C] frames on either side.
    m: the Interpolator's half-gap.
    max_batch: frames per call (sample.max_batch).

  Returns:
    [N, H, W, C] the middle frames.
  """
  n = before.shape[0]
  size = min(n, max_batch)
  out = []
  for j, lo in enumerate(range(0, n, size)):
    pad = max(0, lo + size - n)
    b, a = (jnp.concatenate([x[lo:], jnp.repeat(x[-1:], pad, axis=0)])
            if pad else x[lo:lo + size] for x in (before, after))
    out.append(sampler.interpolate(jax.random.fold_in(rng, j), b, a,
                                   m)[:size - pad])
  return jnp.concatenate(out, axis=0)


def upsample(sampler, rng, video, *, factor, offset, max_batch=8
             ) -> jnp.ndarray:
  """Temporal upsampling [1, (T - 1) * factor + 1, H, W, C], factor 2^n.

  The Interpolator runs on at most `max_batch` frame pairs at a time.
  """
  for level in range(int(np.log2(factor))):
    mid = interpolate_in_chunks(sampler, jax.random.fold_in(rng, level),
                                video[:-1], video[1:], offset, max_batch)
    pairs = jnp.stack([video[:-1], mid], axis=1).reshape(-1, *video.shape[1:])
    video = jnp.concatenate([pairs, video[-1:]], axis=0)
  return video[None]


def validate_sample_config(config: ml_collections.ConfigDict) -> None:
  """Fails before compiling on impossible sampling settings."""
  s, k = config.sample, config.model.max_offset
  sampling.check_sampler(s.sampler)
  unknown = set(s.modes) - set(MODES)
  if unknown:
    raise ValueError(f'Unknown sample.modes {sorted(unknown)}; choose from'
                     f' {MODES}.')
  if s.direction not in DIRECTIONS:
    raise ValueError(f'sample.direction={s.direction!r}; one of'
                     f' {DIRECTIONS}.')
  if s.start not in STARTS:
    raise ValueError(f'sample.start={s.start!r}; one of {STARTS}.')
  for field in ('predict_offset', 'interp_offset'):
    if not 1 <= s[field] <= k:
      raise ValueError(f'sample.{field}={s[field]} must lie in [1,'
                       f' model.max_offset={k}].')
  if not 0.0 <= s.projector_t <= 1.0:
    raise ValueError(f'sample.projector_t={s.projector_t} must lie in'
                     ' [0, 1].')
  if min(s.num_frames_out, s.num_videos, s.num_steps, s.max_batch) < 1:
    raise ValueError('sample.num_frames_out, num_videos, num_steps and'
                     ' max_batch must be >= 1.')


def sampler_spec(sample_config: ml_collections.ConfigDict
                 ) -> sampling.SamplerSpec:
  """The SamplerSpec of configs/single_video.py's config.sample.

  SinFusion's config has no guidance fields (its models take no labels and
  no guidance), so they keep SamplerSpec's defaults.
  """
  s = sample_config
  return sampling.SamplerSpec(
      sampler=s.sampler, num_steps=int(s.num_steps), gamma=float(s.gamma),
      eta=float(s.eta), delta=float(s.delta))


def restore_sampler(config: ml_collections.ConfigDict, workdir: str,
                    frame_size: int) -> tuple[FrameSampler, int]:
  """EMA parameters of the last checkpoint -> (FrameSampler, step)."""
  checkpoint.check_compatible(
      config, workdir, fields=checkpoint.SINFUSION_COMPATIBILITY_FIELDS)
  models = denoiser.create_nextnets(
      config.model, {n: data.NUM_COND_FRAMES[n] for n in data.MODEL_NAMES})
  abstract = jax.eval_shape(
      lambda rng: denoiser.init_nextnet_params(models, rng),
      jax.random.key(0))
  params, step = checkpoint.restore_ema_params(workdir, abstract)
  fns = {name: denoiser.make_denoise_fn(model, params[name])
         for name, model in models.items()}
  logsnr_fn = schedules.get_logsnr_fn(config.diffusion, frame_size)
  return FrameSampler(fns, logsnr_fn, config.diffusion.target,
                      sampler_spec(config.sample)), step


def run_mode(mode, sampler, rng, video, s) -> tuple[str, jnp.ndarray]:
  """(tag, videos [N, F, H, W, C] in [-1, 1]) of one sample mode."""
  common = dict(direction=s.direction, offset=s.predict_offset,
                projector_t=s.projector_t)
  if mode == 'diverse':
    return f'diverse_{s.direction}', diverse(
        sampler, rng, video, num_videos=s.num_videos,
        num_frames=s.num_frames_out, start=s.start,
        start_frame=s.start_frame, **common)
  if mode == 'extrapolate':
    return f'extrapolate_{s.direction}', extrapolate(
        sampler, rng, video, num_videos=s.num_videos,
        num_new=s.num_frames_out, **common)
  factor = int(mode.rsplit('x', 1)[1])
  return mode, upsample(sampler, rng, video, factor=factor,
                        offset=s.interp_offset, max_batch=s.max_batch)


# Columns of the PNG overview (evenly spaced frames); the mp4s hold all.
PNG_MAX_FRAMES = 16


def write_outputs(tag: str, videos: np.ndarray, out_dir: str,
                  config: ml_collections.ConfigDict) -> list[str]:
  """mp4 + gif per video, a PNG grid, and <input>_sinfusion_<tag>.mp4."""
  fps = config.sample.fps
  paths = []
  for i, v in enumerate(videos):
    base = os.path.join(out_dir, f'{tag}_{i}')
    video_io.write_mp4(base + '.mp4', v, fps=fps)
    video_io.write_gif(base + '.gif', v, fps=fps)
    paths += [base + '.mp4', base + '.gif']
  video_io.write_png_grid(os.path.join(out_dir, f'{tag}.png'), videos,
                          max_frames=PNG_MAX_FRAMES)
  path = config.data.path
  if config.sample.write_next_to_input and data.input_dir_writable(path):
    beside = f'{os.path.splitext(path)[0]}_sinfusion_{tag}.mp4'
    video_io.write_mp4(beside, videos[0], fps=fps)
    paths.append(beside)
  return paths


def sample_and_save(config: ml_collections.ConfigDict,
                    workdir: str) -> dict[str, np.ndarray]:
  """Runs every mode of `config.sample.modes`; writes workdir/samples/.

  Returns:
    {tag: uint8 [N, F, H, W, 3]}, tags like 'diverse_forward',
    'extrapolate_backward', 'upsample_x2'.
  """
  validate_sample_config(config)
  video = jnp.asarray(data.load_video(config))
  sampler, step = restore_sampler(config, workdir, max(video.shape[1:3]))
  rng = jax.random.fold_in(jax.random.key(config.seed), 2)
  out_dir = os.path.join(workdir, 'samples')
  os.makedirs(out_dir, exist_ok=True)
  results = {}
  for i, mode in enumerate(config.sample.modes):
    logging.info('SinFusion %s (checkpoint step %d).', mode, step)
    tag, videos = run_mode(mode, sampler, jax.random.fold_in(rng, i), video,
                           config.sample)
    results[tag] = video_io.to_uint8(videos)
    if jax.process_index() == 0:
      paths = write_outputs(tag, results[tag], out_dir, config)
      logging.info('Wrote %s', ', '.join(paths))
  return results


def sample_diverse(config: ml_collections.ConfigDict, workdir: str,
                   num_videos: int, num_frames: int,
                   rng: jax.Array) -> tuple[Any, np.ndarray, int]:
  """(input video uint8 [T, H, W, 3], diverse uint8 [N, F, ...], step)."""
  validate_sample_config(config)
  video = jnp.asarray(data.load_video(config))
  sampler, step = restore_sampler(config, workdir, max(video.shape[1:3]))
  s = config.sample
  videos = diverse(sampler, rng, video, num_videos=num_videos,
                   num_frames=num_frames, start=s.start,
                   start_frame=s.start_frame, direction=s.direction,
                   offset=s.predict_offset, projector_t=s.projector_t)
  return video_io.to_uint8(video), video_io.to_uint8(videos), step
