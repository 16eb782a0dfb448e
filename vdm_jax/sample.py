"""Sampling program: EMA parameters from a workdir -> videos on disk.

`sample_and_save(config, workdir)` restores the EMA parameters of the last
checkpoint, runs `config.sample.task` with `config.sample.sampler`, and
writes mp4, gif, a PNG frame grid and the raw videos (npz) into
`workdir/samples/step_<N>/`. Never imports the optimizer.
"""

import functools
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdm_jax import checkpoint
from vdm_jax import sampling
from vdm_jax import schedules
from vdm_jax import sharding
from vdm_jax import video_io
from vdm_jax.models import unet3d


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


def make_denoise_fn(model: unet3d.UNet3D, params: Any):
  """(z, logsnr, cond) -> prediction with the model's parameters bound."""

  def denoise_fn(z, logsnr, cond):
    return model.apply({'params': params}, z, logsnr, train=False, **cond)

  return denoise_fn


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
  )
  return np.asarray(video_io.to_uint8(np.asarray(x)))


def write_videos(videos: np.ndarray, out_dir: str, fps: int) -> dict:
  """Writes each video as mp4 and gif, a PNG grid of all, and an npz."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {'mp4': [], 'gif': []}
  for i, v in enumerate(videos):
    paths['mp4'].append(os.path.join(out_dir, f'sample_{i:03d}.mp4'))
    video_io.write_mp4(paths['mp4'][-1], v, fps=fps)
    paths['gif'].append(os.path.join(out_dir, f'sample_{i:03d}.gif'))
    video_io.write_gif(paths['gif'][-1], v, fps=fps)
  paths['grid'] = os.path.join(out_dir, 'grid.png')
  video_io.write_png_grid(paths['grid'], videos)
  paths['npz'] = os.path.join(out_dir, 'samples.npz')
  video_io.save_npz(paths['npz'], videos)
  return paths


def sample_and_save(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Samples `config.sample.num_videos` videos and writes them to disk.

  Returns:
    The paths written: {'mp4': [...], 'gif': [...], 'grid': ..., 'npz': ...}.
  """
  model, params, step = restore_ema_params(config, workdir)
  rng = jax.random.fold_in(jax.random.key(config.seed), 3)
  s = config.sample
  chunks = []
  for i in range(0, s.num_videos, s.batch_size):
    n = min(s.batch_size, s.num_videos - i)
    logging.info('Sampling videos %d-%d of %d (%s, %d steps).', i, i + n,
                 s.num_videos, s.sampler, s.num_steps)
    chunks.append(generate(config, model, params, jax.random.fold_in(rng, i),
                           num_videos=n))
  videos = np.concatenate(chunks)
  out_dir = os.path.join(workdir, 'samples', f'step_{step}')
  paths = {}
  if jax.process_index() == 0:
    paths = write_videos(videos, out_dir, config.sample.fps)
    logging.info('Wrote %d samples to %s', len(videos), out_dir)
  return paths
