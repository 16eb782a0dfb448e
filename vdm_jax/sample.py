"""Sampling and evaluation programs: EMA parameters -> videos, FVD.

`sample_and_save(config, workdir)` (--mode=sample) restores the EMA
parameters of the last checkpoint, runs `config.sample.task` (any task of
conditioning.py) with `config.sample.sampler` and writes, into
`workdir/samples/step_<N>/<task>/`, one mp4 and one gif per video, a PNG
grid and `samples.npz` (raw uint8 results 'videos' and, for video tasks,
'inputs' and 'known'). Video tasks show the input or ground truth left of
the result, given frames framed in green.

`sample_and_evaluate(config, workdir)` (--mode=eval) samples
`config.eval.num_videos` videos the same way, scores them against clips of
the config's dataset with FVD under the preset `config.eval.protocol`, and
writes `workdir/eval/fvd_<protocol>_<task>_step_<N>.json`.

Sampling is sharded over the batch: parameters are replicated on the mesh,
inputs and the denoiser's activations split over all its devices. Each
batch of `sample.batch_size` videos is padded up to a multiple of the device
count (padded videos are dropped), so every batch has one shape and the
sampler compiles once. Never imports the optimizer.
"""

import dataclasses
import datetime
import functools
import json
import os
import subprocess
import time
from typing import Any, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdm_jax import checkpoint
from vdm_jax import conditioning
from vdm_jax import diffusion
from vdm_jax import sample_inputs
from vdm_jax import sampling
from vdm_jax import schedules
from vdm_jax import sharding
from vdm_jax import video_io
from vdm_jax.models import unet3d

# Frame colours of the side-by-side display: given frames, generated ones.
KNOWN_COLOUR, OTHER_COLOUR = (0, 200, 0), (96, 96, 96)


def create_model(config: ml_collections.ConfigDict) -> unet3d.UNet3D:
  return unet3d.UNet3D(**config.model)


def abstract_params(config: ml_collections.ConfigDict, model) -> Any:
  """Parameter shapes without computing anything (for restoring)."""
  d = config.data
  z = jax.ShapeDtypeStruct(
      (1, d.num_frames, d.image_size, d.image_size, d.channels), jnp.float32
  )
  label = (
      jax.ShapeDtypeStruct((1,), jnp.int32)
      if config.model.num_classes else None
  )

  def init(rng, z, label):
    return model.init(
        {'params': rng}, jnp.zeros(z.shape), jnp.zeros((1,)),
        label=None if label is None else jnp.zeros(label.shape, jnp.int32),
    )['params']

  return jax.eval_shape(functools.partial(init, z=z, label=label),
                        jax.random.key(0))


def restore_ema_params(
    config: ml_collections.ConfigDict, workdir: str, mesh=None
) -> tuple[unet3d.UNet3D, Any, int]:
  """Returns (model, EMA params replicated on the mesh, checkpoint step)."""
  unet3d.validate_model_config(
      config.data.image_size, config.data.num_frames, **config.model
  )
  checkpoint.check_compatible(config, workdir)
  mesh = mesh or sharding.make_mesh(config.mesh)
  model = create_model(config)
  abstract = abstract_params(config, model)
  repl = sharding.replicated(mesh)
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=repl),
      abstract,
  )
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  try:
    params, step = ckpt.restore_ema_params(abstract)
  finally:
    ckpt.close()
  return model, params, step


@dataclasses.dataclass(frozen=True)
class _Apply:
  """(params, z, logsnr, cond) -> prediction; hashable, so jit caches it.

  With a mesh, z is constrained to the batch sharding, so the denoiser runs
  split over the batch whatever the sampler's inputs are.
  """

  model: unet3d.UNet3D
  mesh: Optional[jax.sharding.Mesh] = None

  def __call__(self, params, z, logsnr, cond):
    if self.mesh is not None and z.shape[0] % self.mesh.size == 0:
      z = jax.lax.with_sharding_constraint(
          z, sharding.batch_sharding(self.mesh))
    return self.model.apply({'params': params}, z, logsnr, train=False,
                            **cond)


def make_denoise_fn(model: unet3d.UNet3D, params: Any,
                    mesh: Optional[jax.sharding.Mesh] = None):
  """(z, logsnr, cond) -> prediction with the parameters bound.

  A `jax.tree_util.Partial`, so the parameters stay traced arguments of
  the sampler (not constants) and new batches reuse its compilation.
  """
  return jax.tree_util.Partial(_Apply(model, mesh), params)


def class_labels(config: ml_collections.ConfigDict, n: int) -> np.ndarray:
  """Labels for class-conditional sampling: fixed, or cycling through all."""
  k = config.model.num_classes
  if config.sample.label >= 0:
    if config.sample.label >= k:
      raise ValueError(
          f'sample.label={config.sample.label} but the model has {k} classes.'
      )
    return np.full((n,), config.sample.label, np.int32)
  return (np.arange(n) % max(k, 1)).astype(np.int32)


def generate(
    config: ml_collections.ConfigDict,
    model: unet3d.UNet3D,
    params: Any,
    rng: jax.Array,
    *,
    num_videos: int,
    num_steps: int | None = None,
) -> np.ndarray:
  """Unconditional or class-conditional samples as uint8 [N, T, H, W, C]."""
  d = config.data
  shape = (num_videos, d.num_frames, d.image_size, d.image_size, d.channels)
  cond = {}
  guidance_weight = 0.0
  if config.model.num_classes > 0:
    cond['label'] = jnp.asarray(class_labels(config, num_videos))
    guidance_weight = config.sample.guidance_weight
  x = sampling.sample(
      make_denoise_fn(model, params), rng, shape,
      logsnr_fn=schedules.get_logsnr_fn(config.diffusion, d.image_size),
      target=config.diffusion.target,
      sampler=config.sample.sampler,
      num_steps=num_steps or config.sample.num_steps,
      gamma=config.sample.gamma,
      eta=config.sample.eta,
      delta=config.sample.delta,
      cond=cond,
      guidance_weight=guidance_weight,
      null_label=config.model.num_classes,
      noise_fn=diffusion.noise_fn_from_config(config.diffusion,
                                              d.num_frames),
  )
  return np.asarray(video_io.to_uint8(np.asarray(x)))


def task_config(config: ml_collections.ConfigDict
                ) -> ml_collections.ConfigDict:
  """config with sample.num_frames_out = 0 resolved to 2 T."""
  config = ml_collections.ConfigDict(config.to_dict())
  if not config.sample.num_frames_out:
    config.sample.num_frames_out = 2 * config.data.num_frames
  return config


def validate(config: ml_collections.ConfigDict,
             inputs: sample_inputs.TaskInputs) -> None:
  """Raises ValueError for impossible requests, before any compilation."""
  sampling.check_sampler(config.sample.sampler)
  diffusion.check_target(config.diffusion.target)
  video = inputs.video
  conditioning.validate(config, None if video is None else video.shape)
  if config.model.num_classes:
    class_labels(config, 1)
  if config.sample.num_videos < 1 or config.sample.batch_size < 1:
    raise ValueError('sample.num_videos and sample.batch_size must be >= 1.')


def _labels(config, inputs, n):
  """int32 [n] labels of a class-conditional model (None: the null label).

  'unconditional' uses the null label; 'class' sample.label (or cycles);
  video tasks the dataset clips' labels when there are, else as 'class'.
  """
  if not config.model.num_classes or config.sample.task == 'unconditional':
    return None
  if (config.sample.task != 'class' and inputs.labels is not None
      and config.sample.label < 0):
    return inputs.labels.astype(np.int32)
  return class_labels(config, n)


def _to_global(x: np.ndarray, mesh) -> jax.Array:
  """The same host array on every process -> a batch-sharded global array."""
  return jax.make_array_from_callback(
      x.shape, sharding.batch_sharding(mesh), lambda idx: x[idx])


def sample_videos(
    config: ml_collections.ConfigDict,
    denoise_fn: diffusion.DenoiseFn,
    rng: jax.Array,
    mesh: jax.sharding.Mesh,
    *,
    num_videos: int,
    inputs: sample_inputs.TaskInputs,
    labels: Optional[np.ndarray] = None,
) -> np.ndarray:
  """Runs config.sample.task in padded, sharded batches.

  Args:
    config: the full config (task_config'd).
    denoise_fn: from `make_denoise_fn`.
    rng: PRNG key; batch i uses fold_in(rng, i).
    mesh: the device mesh.
    num_videos: N.
    inputs: uint8 inputs with N videos (or no video).
    labels: int32 [N] or None.

  Returns:
    uint8 [N, T_out, H, W, C] on every process.
  """
  s = config.sample
  n_dev = mesh.size
  batch = -(-min(s.batch_size, num_videos) // n_dev) * n_dev
  num_batches = -(-num_videos // batch)
  chunks, start_time = [], time.time()
  for i in range(num_batches):
    idx = np.minimum(np.arange(i * batch, (i + 1) * batch), num_videos - 1)
    kwargs = {}
    if inputs.video is not None:
      video = inputs.video[idx].astype(np.float32) / 127.5 - 1.0
      kwargs['video'] = _to_global(video, mesh)
    if labels is not None:
      kwargs['labels'] = _to_global(labels[idx], mesh)
    x = conditioning.run_task(config, denoise_fn, jax.random.fold_in(rng, i),
                              num_videos=batch, **kwargs)
    x = multihost_utils.process_allgather(x, tiled=True)
    n = min(batch, num_videos - i * batch)
    chunks.append(video_io.to_uint8(np.asarray(x)[:n]))
    elapsed = time.time() - start_time
    logging.info(
        'Sampled %d/%d videos (%s, %s, %d steps): %.1f s, ETA %.0f s.',
        min((i + 1) * batch, num_videos), num_videos, s.task, s.sampler,
        s.num_steps, elapsed, elapsed / (i + 1) * (num_batches - i - 1))
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


def write_videos(videos: np.ndarray, out_dir: str, fps: int, *,
                 display: Optional[np.ndarray] = None, **arrays) -> dict:
  """Writes each video as mp4 and gif, a PNG grid of all, and an npz.

  Args:
    videos: uint8 [N, T, H, W, C] results, saved as 'videos' in the npz.
    out_dir: output directory.
    fps: frames per second.
    display: uint8 [N, T, H', W', C] what the mp4/gif/PNG show (default:
      the videos).
    **arrays: further arrays for the npz ('inputs', 'known', ...).

  Returns:
    {'mp4': [...], 'gif': [...], 'grid': path, 'npz': path}.
  """
  display = videos if display is None else display
  os.makedirs(out_dir, exist_ok=True)
  paths = {'mp4': [], 'gif': []}
  for i, v in enumerate(display):
    paths['mp4'].append(os.path.join(out_dir, f'sample_{i:03d}.mp4'))
    video_io.write_mp4(paths['mp4'][-1], v, fps=fps)
    paths['gif'].append(os.path.join(out_dir, f'sample_{i:03d}.gif'))
    video_io.write_gif(paths['gif'][-1], v, fps=fps)
  paths['grid'] = os.path.join(out_dir, 'grid.png')
  video_io.write_png_grid(paths['grid'], display)
  paths['npz'] = os.path.join(out_dir, 'samples.npz')
  video_io.save_npz(paths['npz'], videos, **arrays)
  return paths


def _prepare(config, num_videos, *, seed, split=''):
  """Checked config, inputs and labels of a run; nothing compiled yet."""
  config = task_config(config)
  inputs = sample_inputs.load(config, num_videos, seed=seed, split=split)
  validate(config, inputs)
  return config, inputs, _labels(config, inputs, num_videos)


def sample_and_save(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs config.sample.task for sample.num_videos videos; writes them.

  Returns:
    The paths written (process 0; {} elsewhere): {'mp4': [...], 'gif':
    [...], 'grid': ..., 'npz': ..., 'dir': ...}.
  """
  s = config.sample
  config, inputs, labels = _prepare(config, s.num_videos, seed=config.seed)
  mesh = sharding.make_mesh(config.mesh)
  model, params, step = restore_ema_params(config, workdir, mesh)
  rng = jax.random.fold_in(jax.random.key(config.seed), 3)
  videos = sample_videos(config, make_denoise_fn(model, params, mesh), rng,
                         mesh, num_videos=s.num_videos, inputs=inputs,
                         labels=labels)
  out_dir = os.path.join(workdir, 'samples', f'step_{step}', s.task)
  arrays, display = {}, None
  if labels is not None:
    arrays['labels'] = labels
  if inputs.video is not None:
    known = sample_inputs.known_positions(config, inputs.video.shape[1],
                                          videos.shape[1])
    reference = inputs.reference
    if reference is None:
      reference = _on_timeline(config, inputs.video, known, videos.shape)
    display = side_by_side(reference, videos, known)
    arrays.update(inputs=inputs.video, known=known)
  paths = {}
  if jax.process_index() == 0:
    paths = write_videos(videos, out_dir, s.fps, display=display, **arrays)
    paths['dir'] = out_dir
    logging.info('Wrote %d samples to %s', len(videos), out_dir)
  return paths


def _on_timeline(config, video, known, shape):
  """File inputs [N, T_in, h, w, C] placed at their output frames."""
  n, t_in = video.shape[:2]
  if config.sample.task == 'upsample':
    return video
  out = np.zeros((n, shape[1]) + video.shape[2:], np.uint8)
  if config.sample.task == 'keyframes':
    out[:, [0, -1]] = video[:, [0, -1]]
  elif config.sample.task == 'predict':
    out[:, :min(t_in, shape[1])] = video[:, :shape[1]]
  else:
    out[:, known] = video
  return out


def _git_commit() -> Optional[str]:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(
        ['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True,
        text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(
        ['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root,
        capture_output=True, text=True, timeout=10, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ('-dirty' if dirty.strip() else '')


def sample_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        config_path: Optional[str] = None) -> dict:
  """Samples with config.sample and scores FVD under config.eval.protocol.

  Real clips come from config.data (split eval.split); video tasks are
  conditioned on them (generated video i on real clip i mod num_real), so
  samples and ground truth share their given frames (VDM's Kinetics
  protocol).

  Args:
    config: the full config.
    workdir: the run's directory.
    config_path: the config file, recorded in the result.

  Returns:
    The result written to workdir/eval/fvd_<protocol>_<task>_step_<N>.json.
  """
  from vdm_jax.evaluation import evaluate  # pylint: disable=g-import-not-at-top

  config = task_config(config)
  plan = evaluate.plan(config)
  inputs = sample_inputs.load(
      config, plan.num_real, seed=config.eval.seed, split=plan.split,
      random_start=plan.protocol.clip_start == 'random')
  validate(config, inputs)
  real = evaluate.real_clips(config, plan, inputs)
  idx = np.arange(plan.num_generated) % plan.num_real
  inputs = sample_inputs.TaskInputs(
      None if inputs.video is None else inputs.video[idx],
      None if inputs.labels is None else inputs.labels[idx])
  labels = _labels(config, inputs, plan.num_generated)
  mesh = sharding.make_mesh(config.mesh)
  model, params, step = restore_ema_params(config, workdir, mesh)
  start = time.time()
  rng = jax.random.fold_in(jax.random.key(config.seed), 5)
  videos = sample_videos(config, make_denoise_fn(model, params, mesh), rng,
                         mesh, num_videos=plan.num_generated, inputs=inputs,
                         labels=labels)
  sample_s = time.time() - start
  result = evaluate.score(config, plan, videos, real)
  result.update(
      checkpoint_step=int(step), workdir=workdir, config_path=config_path,
      git_commit=_git_commit(), sampling_seconds=round(sample_s, 1),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      devices=f'{jax.device_count()} x {jax.devices()[0].device_kind}')
  path = os.path.join(
      workdir, 'eval',
      f'fvd_{plan.protocol.name}_{config.sample.task}_step_{step}.json')
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w') as f:
      json.dump(result, f, indent=2)
    if config.eval.save_samples:
      video_io.save_npz(path[:-len('.json')] + '.npz', videos)
    logging.info('FVD %.2f (%s, %d videos) written to %s', result['fvd'],
                 plan.protocol.name, len(videos), path)
  result['path'] = path
  return result
