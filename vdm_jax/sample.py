"""Sampling program: EMA parameters -> videos (--mode=sample).

`sample_and_save(config, workdir)` restores the EMA parameters of the last
checkpoint, runs `config.sample.task` (any task of tasks.py) with
`config.sample.sampler` and writes, into `workdir/samples/step_<N>/<task>/`,
one mp4 and one gif per video, a PNG grid and `samples.npz` (raw uint8
results 'videos' and, for video tasks, 'inputs' and 'known'). Video tasks
show the input or ground truth left of the result, given frames framed in
green. evaluate.py (--mode=eval) samples through the same functions.

Sampling is sharded over the batch: parameters are replicated on the mesh,
inputs and the denoiser's activations split over all its devices. Each
batch of `sample.batch_size` videos is padded up to a multiple of the device
count (padded videos are dropped), so every batch has one shape and the
sampler compiles once. Never imports the optimizer.
"""

import dataclasses
import os
import re
import time
from typing import Any, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from vdm_jax import checkpoint
from vdm_jax import denoiser
from vdm_jax import diffusion
from vdm_jax import sample_inputs
from vdm_jax import sharding
from vdm_jax import tasks
from vdm_jax import video_io
from vdm_jax.adapt import inbetween
from vdm_jax.adapt import tuned
from vdm_jax.text import encoders

# Tasks whose inputs a latent model cannot take (docs/pretrained.md).
LATENT_UNSUPPORTED = ('upsample',)
# Frame colours of the side-by-side display: given frames, generated ones.
KNOWN_COLOUR, OTHER_COLOUR = (0, 200, 0), (96, 96, 96)


def restore_ema_params(
    config: ml_collections.ConfigDict, workdir: str, mesh=None
) -> tuple[Any, Any, int]:
  """Returns (model, EMA params replicated on the mesh, checkpoint step).

  A --mode=tune workdir holds only the tuned parameters: the frozen rest
  comes from its base workdir (adapt/tuned.py). A --mode=tune_backward
  workdir gives its forward (image-to-video) model here; `restore_sampler`
  gives both.
  """
  denoiser.validate(config)
  checkpoint.check_compatible(config, workdir)
  encoder = denoiser.text_encoder(config)
  if encoder is not None:
    checkpoint.check_text_dim(workdir, encoder.dim,
                              f'text.encoder={encoder.name!r}')
  mesh = mesh or sharding.make_mesh(config.mesh)
  if tuned.is_tuned_workdir(workdir):
    return tuned.restore(config, workdir, mesh)
  if inbetween.is_backward_workdir(workdir):
    record = inbetween.read_record(workdir)
    inbetween.check_base(config, record['base_workdir'])
    return inbetween.forward_params(config, record['base_workdir'],
                                    record['base_step'], mesh)
  model = denoiser.create_model(config)
  params, step = checkpoint.restore_ema_params(
      workdir, denoiser.abstract_params(config, model),
      sharding=sharding.replicated(mesh))
  return model, params, step


def restore_sampler(config: ml_collections.ConfigDict, workdir: str,
                    mesh: jax.sharding.Mesh) -> tuple[Any, Any, int]:
  """(denoise_fn, pair_fn, step) of a workdir's EMA model(s).

  pair_fn (the forward and backward models of task 'inbetween',
  adapt/inbetween.make_pair_fn) is None unless workdir holds a backward
  model (--mode=tune_backward).
  """
  if config.sample.task == 'inbetween' and not (
      inbetween.is_backward_workdir(workdir)):
    raise ValueError(
        f"sample.task='inbetween' needs a backward-motion model, but"
        f' {workdir} holds none: run --mode=tune_backward'
        f' --config.tune.base_workdir={workdir} --workdir=<new dir>, then'
        ' sample that workdir.')
  if inbetween.is_backward_workdir(workdir):
    denoiser.validate(config)
    checkpoint.check_compatible(config, workdir)
    model, fwd, bwd, step = inbetween.restore(config, workdir, mesh)
    return (denoiser.make_denoise_fn(model, fwd, mesh),
            inbetween.make_pair_fn(model, fwd, bwd, mesh), step)
  model, params, step = restore_ema_params(config, workdir, mesh)
  return denoiser.make_denoise_fn(model, params, mesh), None, step


@dataclasses.dataclass(frozen=True)
class Request:
  """A checked sampling request: nothing compiled or restored yet.

  Attributes:
    task: the task of config.sample.
    setup: model shape, sampler spec, schedule, target, noise.
    inputs: the task's uint8 inputs (N videos, or none).
    labels: int32 [N] labels of a class-conditional model, or None.
    batch_size: videos per sampling batch.
    prompts: the N prompts of a text model (None without text).
    text: their embeddings (text.encoders.TextEmbeddings).
  """

  task: tasks.Task
  setup: tasks.Setup
  inputs: sample_inputs.TaskInputs
  labels: Optional[np.ndarray]
  batch_size: int
  prompts: Optional[list[str]] = None
  text: Optional[encoders.TextEmbeddings] = None


def prompts_for(config: ml_collections.ConfigDict,
                inputs: sample_inputs.TaskInputs, num: int
                ) -> Optional[list[str]]:
  """The N prompts of a text model: the prompts file (cycled), the prompt,
  or each dataset clip's caption; the empty prompt (the null text) else.

  Raises:
    ValueError: a prompt for a model without text conditioning.
  """
  s = config.sample
  if not denoiser.has_text(config):
    if s.prompt or s.prompts_file:
      raise ValueError(
          'sample.prompt / sample.prompts_file were given, but this model has'
          " no text conditioning (text.encoder='none'): train a text model"
          ' (e.g. configs/t2v_quickstart.py) or drop the prompt.')
    return None
  if s.task == 'edit':  # The reconstruction first, then each edit.
    prompts = [''] + tuned.edit_prompts(config)
    if len(prompts) != num:
      raise ValueError(f"sample.task='edit' makes {len(prompts)} videos (the"
                       f' reconstruction and each edit prompt), not {num}.')
    return prompts
  if s.prompts_file:
    prompts = encoders.read_prompts(s.prompts_file)
    return [prompts[i % len(prompts)] for i in range(num)]
  if s.prompt:
    return [s.prompt] * num
  if inputs.captions is not None:
    return list(inputs.captions)
  logging.info('No sample.prompt: sampling with the empty prompt (the null'
               ' text), i.e. unconditionally.')
  return [''] * num


def prepare(config: ml_collections.ConfigDict, num_videos: int, *,
            seed: int, split: str = '', random_start: bool = True
            ) -> Request:
  """Builds and checks the task, its inputs and labels (raises early)."""
  diffusion.check_target(config.diffusion.target)
  if config.sample.num_videos < 1 or config.sample.batch_size < 1:
    raise ValueError('sample.num_videos and sample.batch_size must be >= 1.')
  task = tasks.from_config(config.sample)
  # A latent model (latent.path) samples latents; its inputs are frames,
  # fitted at the pixel size and encoded in sample_videos.
  setup = tasks.Setup.from_config(denoiser.model_space(config))
  if denoiser.has_latent(config) and task.name in LATENT_UNSUPPORTED:
    raise ValueError(f"sample.task={task.name!r} is not available for a "
                     'latent model (latent.path): its low-resolution input '
                     'lives in pixels, the model in latents.')
  inputs = sample_inputs.load(config, task, tasks.ModelShape.from_config(
      config), num_videos, seed=seed, split=split,
                              random_start=random_start)
  video = inputs.video
  shape = None if video is None else video.shape
  if shape is not None and denoiser.has_latent(config):
    f = config.data.image_size // setup.model.image_size
    shape = (*shape[:2], shape[2] // f, shape[3] // f,
             setup.model.channels)
  task.validate(setup.model, shape, setup.spec)
  tasks.check_noise(task, setup.noise)
  labels = task.labels(setup.model.num_classes, inputs.labels, num_videos)
  prompts = prompts_for(config, inputs, num_videos)
  text = None
  if prompts is not None:
    empty = sum(not p for p in prompts)
    if empty and empty < len(prompts):
      logging.info('%d of %d prompts are empty: those videos are sampled'
                   ' with the null text.', empty, len(prompts))
    text = denoiser.text_encoder(config).encode(prompts)
  return Request(task, setup, inputs, labels, config.sample.batch_size,
                 prompts, text)


def sample_videos(
    request: Request,
    denoise_fn: diffusion.DenoiseFn,
    rng: jax.Array,
    mesh: jax.sharding.Mesh,
    num_videos: int,
    pair_fn: Any = None,
    codec: Any = None,
    codec_params: Any = None,
) -> np.ndarray:
  """Runs the request's task in padded, sharded batches.

  Args:
    request: from `prepare` (inputs and labels hold >= num_videos).
    denoise_fn: from `denoiser.make_denoise_fn`.
    rng: PRNG key; batch i uses fold_in(rng, i).
    mesh: the device mesh.
    num_videos: N.
    pair_fn: task 'inbetween': from `restore_sampler`.
    codec, codec_params: a latent model's codec (denoiser.load_codec):
      input frames are encoded, samples decoded; None: pixel space.

  Returns:
    uint8 [N, T_out, H, W, C] on every process.
  """
  n_dev = mesh.size
  batch = -(-min(request.batch_size, num_videos) // n_dev) * n_dev
  num_batches = -(-num_videos // batch)
  video, labels = request.inputs.video, request.labels
  spec = request.setup.spec
  chunks, start_time = [], time.time()
  for i in range(num_batches):
    idx = np.minimum(np.arange(i * batch, (i + 1) * batch), num_videos - 1)
    kwargs = {}
    if video is not None:
      kwargs['video'] = sharding.full_to_global(
          video[idx].astype(np.float32) / 127.5 - 1.0, mesh)
      if codec_params is not None:
        kwargs['video'] = codec.encode(codec_params, kwargs['video'])
    if labels is not None:
      kwargs['labels'] = sharding.full_to_global(labels[idx], mesh)
    if request.text is not None:
      kwargs['text'] = {
          'text': sharding.full_to_global(request.text.tokens[idx], mesh),
          'text_mask': sharding.full_to_global(request.text.mask[idx],
                                               mesh)}
    x = tasks.run(request.task, denoise_fn, jax.random.fold_in(rng, i),
                  request.setup, num_videos=batch, pair_fn=pair_fn, **kwargs)
    if codec_params is not None:
      x = codec.decode(codec_params, x)
    x = multihost_utils.process_allgather(x, tiled=True)
    n = min(batch, num_videos - i * batch)
    chunks.append(video_io.to_uint8(np.asarray(x)[:n]))
    elapsed = time.time() - start_time
    logging.info(
        'Sampled %d/%d videos (%s, %s, %d steps): %.1f s, ETA %.0f s.',
        min((i + 1) * batch, num_videos), num_videos, request.task.name,
        spec.sampler, spec.num_steps, elapsed,
        elapsed / (i + 1) * (num_batches - i - 1))
  return np.concatenate(chunks)


def _frame(videos: np.ndarray, known: np.ndarray, width: int) -> np.ndarray:
  """Pads [N, T, H, W, C] by `width` pixels, green where known [T]."""
  n, t, h, w, c = videos.shape
  out = np.empty((n, t, h + 2 * width, w + 2 * width, c), np.uint8)
  for j in range(t):
    colour = np.asarray(KNOWN_COLOUR if known[j] else OTHER_COLOUR, np.uint8)
    out[:, j] = colour[:c] if c == 3 else colour[1]
  out[:, :, width:width + h, width:width + w] = videos
  return out


def side_by_side(reference: np.ndarray, result: np.ndarray,
                 known: np.ndarray) -> np.ndarray:
  """Display videos: reference (input or ground truth) left of the result.

  Args:
    reference: uint8 [N, T, h, w, C] on the result's timeline; smaller
      frames (upsample inputs) are enlarged by pixel repetition.
    result: uint8 [N, T, H, W, C].
    known: bool [T], the given frames (framed in green in both panels).

  Returns:
    uint8 [N, T, H + 2p, 2 (W + 2p), C], p = max(1, H // 16).
  """
  factor = result.shape[2] // reference.shape[2]
  reference = reference.repeat(factor, axis=2).repeat(factor, axis=3)
  width = max(1, result.shape[2] // 16)
  return np.concatenate([_frame(reference, known, width),
                         _frame(result, known, width)], axis=3)


def file_stem(i: int, prompt: Optional[str] = None) -> str:
  """'sample_007', or 'sample_007_a_red_square_moving_left' (the prompt's
  letters and digits, at most 60 characters)."""
  stem = f'sample_{i:03d}'
  if prompt:
    words = re.sub(r'[^a-z0-9]+', '_', prompt.lower()).strip('_')[:60]
    stem += '_' + words.rstrip('_') if words else ''
  return stem


def write_videos(videos: np.ndarray, out_dir: str, fps: int, *,
                 display: Optional[np.ndarray] = None,
                 prompts: Optional[list[str]] = None, **arrays) -> dict:
  """Writes each video as mp4 and gif, a PNG grid of all, and an npz.

  Args:
    videos: uint8 [N, T, H, W, C] results, saved as 'videos' in the npz.
    out_dir: output directory.
    fps: frames per second.
    display: uint8 [N, T, H', W', C] what the mp4/gif/PNG show (default:
      the videos).
    prompts: the N prompts (text models): in the file names, under each
      row of the PNG grid, and in the npz ('prompts').
    **arrays: further arrays for the npz ('inputs', 'known', ...).

  Returns:
    {'mp4': [...], 'gif': [...], 'grid': path, 'npz': path}.
  """
  display = videos if display is None else display
  os.makedirs(out_dir, exist_ok=True)
  paths = {'mp4': [], 'gif': []}
  for i, v in enumerate(display):
    stem = file_stem(i, prompts[i] if prompts else None)
    paths['mp4'].append(os.path.join(out_dir, stem + '.mp4'))
    video_io.write_mp4(paths['mp4'][-1], v, fps=fps)
    paths['gif'].append(os.path.join(out_dir, stem + '.gif'))
    video_io.write_gif(paths['gif'][-1], v, fps=fps)
  paths['grid'] = os.path.join(out_dir, 'grid.png')
  video_io.write_png_grid(paths['grid'], display, captions=prompts)
  if prompts is not None:
    arrays['prompts'] = np.asarray(prompts, dtype=str)
  paths['npz'] = os.path.join(out_dir, 'samples.npz')
  video_io.save_npz(paths['npz'], videos, **arrays)
  return paths


def sample_and_save(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs config.sample.task for sample.num_videos videos; writes them.

  Returns:
    The paths written (process 0; {} elsewhere): {'mp4': [...], 'gif':
    [...], 'grid': ..., 'npz': ..., 'dir': ...}.
  """
  if config.sample.task == 'edit':
    config = tuned.edit_config(config, workdir)
  s = config.sample
  request = prepare(config, s.num_videos, seed=config.seed)
  mesh = sharding.make_mesh(config.mesh)
  denoise_fn, pair_fn, step = restore_sampler(config, workdir, mesh)
  codec, codec_params = denoiser.load_codec(config, mesh)
  rng = jax.random.fold_in(jax.random.key(config.seed), 3)
  videos = sample_videos(request, denoise_fn, rng, mesh, s.num_videos,
                         pair_fn, codec, codec_params)
  out_dir = os.path.join(workdir, 'samples', f'step_{step}', s.task)
  arrays, display = {}, None
  inputs, task = request.inputs, request.task
  if request.labels is not None:
    arrays['labels'] = request.labels
  if inputs.video is not None:
    known = task.known_positions(request.setup.model, inputs.video.shape[1],
                                 videos.shape[1])
    reference = inputs.reference
    if reference is None:
      reference = task.display_reference(inputs.video, known,
                                         videos.shape[1])
    display = side_by_side(reference, videos, known)
    arrays.update(inputs=inputs.video, known=known)
  paths = {}
  if jax.process_index() == 0:
    paths = write_videos(videos, out_dir, s.fps, display=display,
                         prompts=request.prompts, **arrays)
    paths['dir'] = out_dir
    logging.info('Wrote %d samples to %s', len(videos), out_dir)
  return paths
