"""Tune-A-Video on Stable Diffusion: editing a tuned video (sample.task='edit').

As their inference does it (showlab/Tune-A-Video: train_tuneavideo.py's
validation, tuneavideo/util.py `ddim_inversion`,
pipelines/pipeline_tuneavideo.py): the source frames' latents (the
autoencoder's posterior mean x the scaling factor) are inverted by DDIM
with the empty prompt and no guidance on the scheduler's DDIM timesteps
(sample.num_steps, their 50), the model evaluated at each step's
destination timestep as their `next_step` does; from the inverted latents,
DDIM (eta 0) with the same timesteps regenerates the video with the empty
prompt (the reconstruction) and under each edit prompt with classifier-free
guidance in their (diffusers') convention eps_u + g (eps_c - eps_u),
g = sample.guidance_scale (their 12.5). Written to
workdir/samples/step_<N>/edit/: per edit prompt an mp4 and a gif of source
| reconstruction | edit side by side, grid.png (rows: source,
reconstruction, edits; frames left to right) and samples.npz (uint8 videos,
prompts, the source, inverted and regenerated latents).

  python -m vdm_jax.main --mode=sample --config=configs/tune_a_video_sd.py \\
      --workdir=runs/tav_sd --config.pretrained.path=/models/sd-v1-4 \\
      --config.sample.prompt="spider man is skiing on the beach"
"""

import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdm_jax import denoiser
from vdm_jax import sample as sample_lib
from vdm_jax import sampling
from vdm_jax import sharding
from vdm_jax import video_io
from vdm_jax.adapt import tuned_sd
from vdm_jax.pretrained import stable_diffusion
from vdm_jax.text import encoders


def check(config: ml_collections.ConfigDict, workdir: str
          ) -> tuple[list[str], np.ndarray, dict]:
  """(edit prompts, source frames uint8 [F, H, W, 3], record), checked
  before a weight is read; a prompt over CLIP's limit is warned about."""
  s = config.sample
  if s.task != 'edit':
    raise ValueError(f"sample.task={s.task!r}: a Tune-A-Video workdir is "
                     "sampled with sample.task='edit'.")
  record = tuned_sd.read_record(workdir)
  tuned_sd.check_base(config)
  prompts = (encoders.read_prompts(s.prompts_file) if s.prompts_file
             else [s.prompt] if s.prompt else [])
  if not prompts:
    raise ValueError("sample.task='edit' needs the edited caption: "
                     'sample.prompt (or a sample.prompts_file of several).')
  tuned_sd.check_prompts(config.pretrained.path, prompts)
  if s.input:
    frames = video_io.read_video(s.input)
    f = record['num_frames']
    if len(frames) < f:
      raise ValueError(f'sample.input={s.input} has {len(frames)} frames; '
                       f'the tune ran on {f}.')
    frames = tuned_sd.resize(frames[:f], record['height'], record['width'])
  else:
    frames = video_io.read_npz_videos(
        os.path.join(workdir, tuned_sd.SOURCE))[0]
  return prompts, frames, record


def invert_and_edit(sd: stable_diffusion.StableDiffusion, module: Any,
                    params: Any, frames: np.ndarray, prompts: list[str], *,
                    num_steps: int, guidance_scale: float, rng: jax.Array,
                    mesh: Any = None, batch_size: int = 0
                    ) -> dict[str, jax.Array]:
  """Inversion, reconstruction and edits (module docstring).

  Args:
    sd: the loaded SD (codec, text encoder, schedule).
    module, params: the inflated UNet and its tuned parameters.
    frames: uint8 [F, H, W, 3] the source.
    prompts: P edit prompts.
    num_steps: DDIM steps (inversion and sampling).
    guidance_scale: g of the edits.
    rng: unused by DDIM (eta 0); kept for the sampler's signature.
    mesh: split the batch over it.
    batch_size: videos (the reconstruction and the edits) per sampler
      call; 0: all at once.

  Returns:
    {'source': [1, F, h, w, c] latents, 'inverted': [1, F, h, w, c],
     'reconstruction': [1, F, h, w, c], 'edits': [P, F, h, w, c]}.
  """
  x = jnp.asarray(frames, jnp.float32)[None] / 127.5 - 1.0
  z0 = sd.codec.encode(sd.vae_params, x)
  denoise_fn = denoiser.make_pretrained_denoise_fn(
      module, params, sd.schedule, frames='video', mesh=mesh)
  grid = sd.schedule.grid('ddim', num_steps)
  target = sd.schedule.target
  empty = stable_diffusion.encode_prompts(sd, [''])
  z_t = sampling.ddim_invert(denoise_fn, z0, logsnr_fn=None, target=target,
                             cond={'text': empty}, logsnrs=grid['logsnrs'],
                             model_at_next=True)
  spec = sampling.SamplerSpec(sampler='ddim', num_steps=num_steps, eta=0.0,
                              gamma=0.0, clip_x=False)
  kw = dict(logsnr_fn=None, target=target, spec=spec,
            logsnrs=grid['logsnrs'], denoise_last=grid['denoise_last'],
            logsnrs_to=grid.get('logsnrs_to'))
  # The reconstruction is the empty prompt guided towards itself,
  # eps_u + g (eps_u - eps_u) = eps_u, i.e. unguided; it and the prompts
  # run `batch_size` videos per sampler call (each call's memory).
  texts = [''] + list(prompts)
  guided = guidance_scale > 1.0
  guidance = sampling.make_guidance(cfg_weight=guidance_scale - 1.0,
                                    null_text=guided)
  step = max(1, int(batch_size or len(texts)))
  parts = []
  for start in range(0, len(texts), step):
    n = len(texts[start:start + step])
    cond = {'text': stable_diffusion.encode_prompts(
        sd, texts[start:start + step])}
    if guided:
      cond['text_uncond'] = jnp.repeat(empty, n, axis=0)
    parts.append(sampling.sample(
        denoise_fn, rng, (n,) + z0.shape[1:], cond=cond, guidance=guidance,
        z_init=jnp.repeat(z_t, n, axis=0), **kw))
  out = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
  return {'source': z0, 'inverted': z_t, 'reconstruction': out[:1],
          'edits': out[1:]}


def edit(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Edits the tuned video of workdir under sample.prompt(s); writes it.

  Returns:
    The paths written (process 0) and 'reconstruction_error': the largest
    |reconstruction - source| of the latents.
  """
  prompts, frames, record = check(config, workdir)
  p, s = config.pretrained, config.sample
  if os.path.abspath(p.path) != record['pretrained_path']:
    logging.warning('pretrained.path %s is not the folder this workdir was '
                    'tuned on (%s).', p.path, record['pretrained_path'])
  mesh = sharding.make_mesh(config.mesh)
  sd = stable_diffusion.load(p.path, dtype=p.dtype, chunk=p.vae_chunk,
                             mesh=mesh, variant=p.variant or None)
  module, params, step, _ = tuned_sd.restore(sd, workdir, mesh)
  start = time.time()
  out = invert_and_edit(
      sd, module, params, frames, prompts, num_steps=int(s.num_steps),
      guidance_scale=float(s.guidance_scale),
      rng=jax.random.fold_in(jax.random.key(config.seed), 3), mesh=mesh,
      batch_size=int(s.batch_size))
  err = float(jnp.max(jnp.abs(out['reconstruction'] - out['source'])))
  decoded = sd.codec.decode(
      sd.vae_params, jnp.concatenate([out['reconstruction'], out['edits']]))
  videos = video_io.to_uint8(np.asarray(decoded))
  logging.info('Inverted and edited %d prompts in %.1f s (%d DDIM steps, '
               'guidance scale %.1f); reconstruction: max |latent error| '
               '%.3g.', len(prompts), time.time() - start, s.num_steps,
               s.guidance_scale, err)
  paths = {'reconstruction_error': err}
  if jax.process_index() != 0:
    return paths
  out_dir = os.path.join(workdir, 'samples', f'step_{step}', 'edit')
  source = frames[None]
  display = np.concatenate([np.repeat(source, len(prompts), 0),
                            np.repeat(videos[:1], len(prompts), 0),
                            videos[1:]], axis=3)
  paths.update(sample_lib.write_videos(
      videos[1:], out_dir, int(s.fps), display=display, prompts=prompts,
      source=source, reconstruction=videos[:1],
      latents_source=np.asarray(out['source']),
      latents_inverted=np.asarray(out['inverted']),
      latents_reconstruction=np.asarray(out['reconstruction'])))
  paths['grid'] = os.path.join(out_dir, 'grid.png')
  video_io.write_png_grid(
      paths['grid'], np.concatenate([source, videos]),
      captions=['source: ' + record['caption'], 'reconstruction (empty '
                'prompt)'] + prompts)
  return paths
