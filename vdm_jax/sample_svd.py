"""Sampling program of Stable Video Diffusion: --mode=sample with
configs/svd.py (config.pretrained.path an SVD folder).

'image_to_video': sample.input (an image file) -> videos, as diffusers'
StableVideoDiffusionPipeline makes them (pretrained/
stable_video_diffusion.py). 'inbetween': sample.keyframes ('a.png,b.png')
-> the frames between them with the backward-motion weights of a
--mode=tune_backward workdir (adapt/inbetween_svd.py). Written to
workdir/samples/svd/<task>/ (mp4, gif, grid.png, samples.npz with the final
latents). Bad input (the folder, the images, the frame count, the size, the
initial latents, the tuned weights) is reported before anything is loaded
or compiled, and the memory the run needs is logged up front.
"""

import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdm_jax import sample as sample_lib
from vdm_jax import sharding
from vdm_jax import video_io
from vdm_jax.adapt import inbetween_svd
from vdm_jax.pretrained import formats
from vdm_jax.pretrained import stable_video_diffusion as svdp

TASKS = ('image_to_video', 'inbetween')


def _images(paths: list[str]) -> list[np.ndarray]:
  return [video_io.read_image(p) for p in paths]


def check(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Checks the run before anything is read or compiled.

  Returns:
    {'images': uint8 [H, W, 3] per input image, 'frames': F, 'size': (H, W),
     'factor': the autoencoder's, 'init_latents', 'backward': (record,
     delta) or None}.
  """
  s, p, c = config.sample, config.pretrained, config.svd
  if not p.path:
    raise ValueError('config.pretrained.path is empty: set it to a local '
                     'Stable Video Diffusion folder (diffusers layout).')
  if s.task not in TASKS:
    raise ValueError(f'sample.task={s.task!r} is not available for SVD; '
                     f'choose one of {TASKS}.')
  svdp.check_folder(p.path)
  if c.xt_path:
    svdp.check_folder(c.xt_path)
  if s.task == 'image_to_video':
    if not s.input:
      raise ValueError('sample.input is empty: give the first frame as an '
                       'image file (.png/.jpg).')
    images = _images([s.input])
  else:
    paths = [x for x in s.keyframes.split(',') if x]
    if len(paths) != 2:
      raise ValueError("sample.keyframes must name two image files, "
                       f"'first.png,last.png'; got {s.keyframes!r}.")
    images = _images(paths)
    if images[0].shape != images[1].shape:
      raise ValueError(f'The keyframes differ in size: {paths[0]} is '
                       f'{images[0].shape[:2]}, {paths[1]} '
                       f'{images[1].shape[:2]}; give two of one size.')
  unet = formats.model_config(os.path.join(c.xt_path or p.path, 'unet'))
  vae = formats.model_config(os.path.join(p.path, 'vae'))
  trained = int(unet.get('num_frames', 25))
  frames = int(c.num_frames) or trained
  if frames != trained:
    logging.warning('%d frames: this UNet was trained on %d (img2vid 14, '
                    '-xt 25); other counts are untested by its authors.',
                    frames, trained)
  factor = 2 ** (len(vae.get('block_out_channels', [0] * 4)) - 1)
  multiple = factor * 2 ** (len(unet.get('block_out_channels', [0] * 4)) - 1)
  size = tuple(max(multiple, int(round(int(v) / multiple)) * multiple)
               for v in (c.height, c.width))
  if size != (int(c.height), int(c.width)):
    logging.warning('svd.height x svd.width %dx%d is not a multiple of %d: '
                    'using %dx%d.', c.height, c.width, multiple, *size)
  init = None
  if c.init_latents:
    if not os.path.isfile(c.init_latents):
      raise FileNotFoundError(f'svd.init_latents {c.init_latents!r} does not'
                              ' exist.')
    init = np.load(c.init_latents)
    if init.ndim != 5 or init.shape[0] != s.num_videos:
      raise ValueError(f'svd.init_latents has shape {init.shape}: it needs '
                       f'sample.num_videos={s.num_videos} latents [N, F, 4, '
                       'h, w] (diffusers) or [N, F, h, w, 4].')
  backward = None
  if s.task == 'inbetween':
    record, _, delta = inbetween_svd.restore(workdir)
    backward = (record, delta)
  return {'images': images, 'frames': frames, 'size': size,
          'factor': factor, 'init_latents': init, 'backward': backward}


def log_memory(config: ml_collections.ConfigDict, frames: int,
               size: tuple[int, int], factor: int) -> None:
  """Logs the parameter memory of the networks and the sampler's batch."""
  p, c = config.pretrained, config.svd
  nbytes = lambda path: sum(int(np.prod(shape)) * 4 for shape, _ in
                            formats.tensor_shapes(path).values())
  unets = 2 if config.sample.task == 'inbetween' else 1
  sizes = {'unet': unets * nbytes(os.path.join(c.xt_path or p.path, 'unet')),
           'vae': nbytes(os.path.join(p.path, 'vae')),
           'image_encoder': nbytes(os.path.join(p.path, 'image_encoder'))}
  logging.info(
      'Parameters (float32): %s = %.2f GiB per device; the sampler runs %d '
      'UNet(s) on %d x %d frames of %dx%d latents (guidance doubles the '
      'batch). docs/inbetween.md "SVD" has the compiled peak per device; '
      'lower svd.num_frames, the size or svd.decode_chunk_size, or use '
      'pretrained.dtype=bfloat16, if this does not fit.',
      ', '.join(f'{k} {v / 2**30:.2f} GiB' for k, v in sizes.items()),
      sum(sizes.values()) / 2**30, unets, 2 * config.sample.batch_size,
      frames, size[0] // factor, size[1] // factor)


def sample_and_save(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs sample.task with config.pretrained.path; writes the videos.

  Returns:
    The paths written (process 0), as sample.write_videos.
  """
  s, p, c = config.sample, config.pretrained, config.svd
  checked = check(config, workdir)
  log_memory(config, checked['frames'], checked['size'], checked['factor'])
  mesh = sharding.make_mesh(config.mesh)
  start = time.time()
  model = svdp.load(p.path, dtype=p.dtype, chunk=p.vae_chunk, mesh=mesh,
                    variant=p.variant or None)
  logging.info('Loaded %s in %.1f s.', p.path, time.time() - start)
  kw = dict(num_frames=checked['frames'], num_steps=int(s.num_steps),
            min_guidance_scale=float(s.image_guidance_min),
            max_guidance_scale=float(s.image_guidance_max), fps=int(s.fps),
            motion_bucket_id=int(c.motion_bucket_id),
            noise_aug_strength=float(s.image_noise),
            decode_chunk_size=int(c.decode_chunk_size) or None,
            height=checked['size'][0], width=checked['size'][1], mesh=mesh)
  images = [jnp.asarray(im, jnp.float32)[None] / 255.0
            for im in checked['images']]
  rng = jax.random.fold_in(jax.random.key(config.seed), 3)
  if s.task == 'inbetween':
    target = model.unet_params
    if c.xt_path:
      from vdm_jax.pretrained import svd  # pylint: disable=g-import-not-at-top
      _, target = svd.load(c.xt_path, dtype=p.dtype,
                           variant=p.variant or None)
    backward = inbetween_svd.add_delta(
        {k: jnp.asarray(v) for k, v in checked['backward'][1].items()},
        target)
    kw.update(weight=s.inbetween_weight, guidance=s.inbetween_guidance,
              reinject_fraction=float(s.inbetween_reinject_fraction),
              reinject_repeats=int(s.inbetween_reinject_repeats))
  videos, latents = [], []
  for i in range(int(s.num_videos)):
    init = checked['init_latents']
    init = None if init is None else init[i:i + 1]
    t0 = time.time()
    key = jax.random.fold_in(rng, i)
    if s.task == 'inbetween':
      frames, z = inbetween_svd.inbetween(
          model, images[0], images[1], key, forward_params=target,
          backward_params=backward, init_latents=init, **kw)
    else:
      frames, z = svdp.image_to_video(model, images[0], key,
                                      init_latents=init, **kw)
    videos.append(frames)
    latents.append(z)
    logging.info('Video %d of %d in %.1f s.', i + 1, s.num_videos,
                 time.time() - t0)
  out_dir = os.path.join(workdir, 'samples', 'svd', s.task)
  paths = {}
  if jax.process_index() == 0:
    paths = sample_lib.write_videos(
        video_io.to_uint8(np.concatenate(videos) * 2 - 1), out_dir,
        int(s.fps), latents=np.concatenate(latents))
    logging.info('Wrote %d videos to %s', len(videos), out_dir)
  return paths
