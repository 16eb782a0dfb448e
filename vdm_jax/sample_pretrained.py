"""Sampling program of a pretrained model: --mode=sample with
config.pretrained.path (configs/stable_diffusion.py).

Text-to-image with Stable Diffusion: prompts -> images, written to
workdir/samples/pretrained/text_to_image/ as one PNG per image, grid.png and
samples.npz ('videos': uint8 [N, 1, H, W, 3] one-frame videos as every
sampling program writes, 'prompts', 'latents': the final latents
[N, h, w, 4]). Everything a user can get wrong (the folder, the prompts, the
size, the initial latents file) is checked before a weight is read, and the
memory the run needs is logged up front.
"""

import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import PIL.Image

from vdm_jax import fileio
from vdm_jax import sample as sample_lib
from vdm_jax import sharding
from vdm_jax import video_io
from vdm_jax.pretrained import formats
from vdm_jax.pretrained import stable_diffusion
from vdm_jax.text import encoders

TASKS = ('text_to_image',)
SAMPLERS = ('auto', 'ddim', 'euler', 'ancestral')


def _prompts(config: ml_collections.ConfigDict) -> list[str]:
  s = config.sample
  if s.prompts_file:
    prompts = encoders.read_prompts(s.prompts_file)
    return [prompts[i % len(prompts)] for i in range(s.num_videos)]
  return [s.prompt] * int(s.num_videos)


def _bytes(path: str) -> int:
  return sum(int(np.prod(shape)) * 4 for shape, _ in
             formats.tensor_shapes(path).values())


def check(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Checks the run before anything is read or compiled.

  Returns:
    {'classes': the folder's component classes, 'sampler': the sampler,
     'init_latents': the array or None}.
  """
  s, p = config.sample, config.pretrained
  if not p.path:
    raise ValueError('config.pretrained.path is empty: set it to a local '
                     'Stable Diffusion folder (diffusers layout), e.g. '
                     '--config.pretrained.path=/models/stable-diffusion-v1-5.')
  if s.task not in TASKS:
    raise ValueError(f'sample.task={s.task!r} is not available for a '
                     f'pretrained Stable Diffusion folder; choose one of '
                     f'{TASKS}.')
  classes = stable_diffusion.check_folder(p.path)
  if s.sampler not in SAMPLERS:
    raise ValueError(f'sample.sampler={s.sampler!r} is not available for a '
                     f'pretrained model; choose one of {SAMPLERS}.')
  if s.num_videos < 1 or s.batch_size < 1:
    raise ValueError('sample.num_videos and sample.batch_size must be >= 1.')
  sampler = (stable_diffusion.default_sampler(classes['scheduler'])
             if s.sampler == 'auto' else s.sampler)
  init = None
  if s.init_latents:
    if not os.path.isfile(s.init_latents):
      raise FileNotFoundError(f'sample.init_latents {s.init_latents!r} does '
                              'not exist.')
    init = np.load(s.init_latents)
    if init.ndim not in (4, 5) or init.shape[0] != s.num_videos:
      raise ValueError(
          f'sample.init_latents has shape {init.shape}: it needs '
          f'sample.num_videos={s.num_videos} latents, [N, 4, h, w] '
          '(diffusers) or [N, h, w, 4].')
  return {'classes': classes, 'sampler': sampler, 'init_latents': init}


def log_memory(config: ml_collections.ConfigDict) -> None:
  """Logs the parameter memory of the folder's networks (float32, as read)
  and what to lower if it is too much."""
  p = config.pretrained
  sizes = {name: _bytes(os.path.join(p.path, name))
           for name in ('unet', 'vae', 'text_encoder')}
  total = sum(sizes.values())
  logging.info(
      'Parameters (float32): %s = %.2f GiB per device, replicated; sampling '
      'activations add about one UNet forward at 2 x sample.batch_size '
      '(guidance doubles the batch). Lower sample.batch_size, '
      'pretrained.vae_chunk or the image size if this does not fit.',
      ', '.join(f'{k} {v / 2**30:.2f} GiB' for k, v in sizes.items()),
      total / 2**30)


def sample_and_save(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Text-to-image with config.pretrained.path; writes the images.

  Returns:
    The paths written (process 0): {'png': [...], 'grid', 'npz', 'dir'}.
  """
  s, p = config.sample, config.pretrained
  checked = check(config)
  prompts = _prompts(config)
  log_memory(config)
  mesh = sharding.make_mesh(config.mesh)
  start = time.time()
  sd = stable_diffusion.load(p.path, dtype=p.dtype, chunk=p.vae_chunk,
                             mesh=mesh, variant=p.variant or None,
                             param_sharding=config.mesh.param_sharding)
  logging.info('Loaded %s in %.1f s (sampler %s, %d steps, guidance scale '
               '%.2f).', p.path, time.time() - start, checked['sampler'],
               s.num_steps, s.guidance_scale)
  rng = jax.random.fold_in(jax.random.key(config.seed), 3)
  images, latents = [], []
  for first in range(0, len(prompts), s.batch_size):
    batch = prompts[first:first + s.batch_size]
    init = checked['init_latents']
    t0 = time.time()
    img, lat = stable_diffusion.text_to_image(
        sd, batch, jax.random.fold_in(rng, first),
        negative_prompt=s.negative_prompt, sampler=checked['sampler'],
        num_steps=int(s.num_steps), guidance_scale=float(s.guidance_scale),
        height=int(s.height) or None, width=int(s.width) or None,
        eta=float(s.eta),
        init_latents=None if init is None else init[first:first + len(batch)],
        mesh=mesh)
    images.append(img)
    latents.append(lat)
    logging.info('Images %d-%d of %d in %.1f s.', first + 1,
                 first + len(batch), len(prompts), time.time() - t0)
  videos = video_io.to_uint8(np.concatenate(images)[:, None] * 2 - 1)
  out_dir = os.path.join(workdir, 'samples', 'pretrained', s.task)
  paths = {}
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    paths['png'] = []
    for i, video in enumerate(videos):
      path = os.path.join(out_dir,
                          sample_lib.file_stem(i, prompts[i]) + '.png')
      with fileio.atomic_path(path) as tmp:
        PIL.Image.fromarray(video[0]).save(tmp)
      paths['png'].append(path)
    paths['grid'] = os.path.join(out_dir, 'grid.png')
    video_io.write_png_grid(paths['grid'], videos, captions=prompts)
    paths['npz'] = os.path.join(out_dir, 'samples.npz')
    video_io.save_npz(paths['npz'], videos,
                      prompts=np.asarray(prompts, dtype=str),
                      latents=np.concatenate(latents))
    paths['dir'] = out_dir
    logging.info('Wrote %d images to %s', len(videos), out_dir)
  return paths
