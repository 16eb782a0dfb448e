"""Stable Diffusion from a local diffusers pipeline folder, in latent space.

A StableDiffusionPipeline folder (model_index.json; unet/, vae/,
text_encoder/, tokenizer/, scheduler/) becomes the pieces this library
samples with: the UNet as a `denoise_fn` of log-SNR (denoiser.
DiscreteTimeApply), the autoencoder as the codec (latent.Autoencoder), the
CLIP text encoder and tokenizer for prompts, and the scheduler's betas as a
DiscreteSchedule whose grids the library's samplers follow. Text-to-image
is then `sampling.sample` on one-frame videos with classifier-free guidance
on the negative prompt, as diffusers' StableDiffusionPipeline.__call__
does (pipelines/stable_diffusion/pipeline_stable_diffusion.py): the same
initial latents give the same images.

Guidance convention: diffusers' guidance_scale g forms
eps_u + g (eps_c - eps_u); this library's weight w forms
(1 + w) eps_c - w eps_u (VDM 2), so w = g - 1 (g = 7.5 is w = 6.5).
"""

import dataclasses
import functools
import logging
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax import denoiser
from vdm_jax import latent
from vdm_jax import sampling
from vdm_jax import schedules
from vdm_jax import sharding
from vdm_jax.pretrained import autoencoder
from vdm_jax.pretrained import clip
from vdm_jax.pretrained import clip_tokenizer
from vdm_jax.pretrained import formats
from vdm_jax.pretrained import unet2d

# SD-1.5's scheduler/scheduler_config.json (its PNDM settings, read by any
# of this library's samplers): for planning and benchmarking without a
# folder, and the tests' tiny folders.
SD15_SCHEDULER = {
    'beta_end': 0.012, 'beta_schedule': 'scaled_linear',
    'beta_start': 0.00085, 'num_train_timesteps': 1000,
    'set_alpha_to_one': False, 'skip_prk_steps': True, 'steps_offset': 1,
    'trained_betas': None, 'clip_sample': False}

PIPELINES = ('StableDiffusionPipeline',)
# The components read, with the classes each may have.
COMPONENTS = {
    'unet': unet2d.CLASS_NAMES,
    'vae': ('AutoencoderKL',),
    'text_encoder': clip.TEXT_CLASSES,
    'tokenizer': ('CLIPTokenizer', 'CLIPTokenizerFast'),
    'scheduler': None,  # Any: only its betas are read.
}
# The sampler a folder's scheduler class suggests (config.sample.sampler
# 'auto'); PNDM (SD-1.x folders) has no counterpart here: DDIM, the
# deterministic sampler its pipeline is most often run with.
DEFAULT_SAMPLERS = {'EulerDiscreteScheduler': 'euler',
                    'DDPMScheduler': 'ancestral'}
# diffusers' StableDiffusionPipeline defaults.
DEFAULT_STEPS, DEFAULT_GUIDANCE_SCALE = 50, 7.5


def check_folder(path: str) -> dict[str, str]:
  """{component: class name} of a Stable Diffusion folder, checked.

  Raises:
    FileNotFoundError / ValueError: not a pipeline folder, a missing
      component or file, or a class not supported (listing the supported
      ones); all before anything is read or compiled.
  """
  classes = formats.check_pipeline(path, 'Stable Diffusion', PIPELINES,
                                   COMPONENTS,
                                   ('unet', 'vae', 'text_encoder'))
  formats.model_config(os.path.join(path, 'scheduler'))
  return classes


@dataclasses.dataclass(frozen=True)
class StableDiffusion:
  """The loaded pieces of a Stable Diffusion folder."""

  path: str
  unet: Any
  unet_params: Any
  codec: latent.Autoencoder
  vae_params: Any
  text_model: Any
  text_params: Any
  tokenizer: clip_tokenizer.CLIPTokenizer
  schedule: schedules.DiscreteSchedule
  scheduler_class: str

  @property
  def vae_factor(self) -> int:
    return self.codec.factor

  def default_size(self) -> int:
    """The image size the UNet was trained at (sample_size x factor)."""
    return int(self.unet.sample_size) * self.vae_factor

  def denoise_fn(self, mesh=None):
    return denoiser.make_pretrained_denoise_fn(
        self.unet, self.unet_params, self.schedule, mesh=mesh)


def _shardings(family, folder: str, mesh, param_sharding: str, **kw):
  """Shardings of a family's parameters on the mesh, from abstract shapes
  (None without a mesh: the default device)."""
  if mesh is None:
    return None
  module = family.build(formats.model_config(folder), **kw)
  return sharding.state_shardings(family.abstract_params(module), mesh,
                                  param_sharding)


def load(path: str, *, dtype: str = 'float32', attention: str = 'auto',
         chunk: int = 8, mesh: Optional[jax.sharding.Mesh] = None,
         variant: Optional[str] = None,
         param_sharding: str = 'replicated') -> StableDiffusion:
  """Reads every component of a Stable Diffusion folder (checked first).

  With a mesh, each parameter is placed on its devices as it is read:
  replicated, or with param_sharding='fsdp' split along its largest
  dimension divisible by the mesh's 'fsdp' axis (sharding.state_shardings).
  """
  classes = check_folder(path)
  place = functools.partial(_shardings, mesh=mesh,
                            param_sharding=param_sharding)
  unet, unet_params = unet2d.load(
      path, dtype=dtype, attention=attention, variant=variant,
      shardings=place(unet2d, os.path.join(path, 'unet')))
  vae, vae_params = autoencoder.load(
      path, dtype=dtype, attention=attention, variant=variant,
      shardings=place(autoencoder, os.path.join(path, 'vae')))
  text_model, text_params = clip.load(
      path, dtype=dtype, attention=attention, variant=variant,
      shardings=place(clip, os.path.join(path, 'text_encoder')))
  tokenizer = clip_tokenizer.load(path)
  schedule = schedules.from_scheduler_config(
      formats.model_config(os.path.join(path, 'scheduler')))
  return StableDiffusion(
      path=path, unet=unet, unet_params=unet_params,
      codec=latent.Autoencoder(vae, chunk=chunk, mesh=mesh),
      vae_params=vae_params, text_model=text_model, text_params=text_params,
      tokenizer=tokenizer, schedule=schedule,
      scheduler_class=classes['scheduler'])


@functools.partial(jax.jit, static_argnums=0)
def _encode_ids(text_model, params, ids):
  return text_model.apply({'params': params}, ids).last_hidden_state


def encode_prompts(sd: StableDiffusion, prompts: Sequence[str]) -> jax.Array:
  """[B, L, D] text-encoder states of prompts (padded to the tokenizer's
  max length, truncated with a warning), as the pipeline's encode_prompt."""
  ids = jnp.asarray(sd.tokenizer(list(prompts)), jnp.int32)
  return _encode_ids(sd.text_model, sd.text_params, ids)


def default_sampler(scheduler_class: str) -> str:
  return DEFAULT_SAMPLERS.get(scheduler_class, 'ddim')


def check_size(sd: StableDiffusion, height: int, width: int
               ) -> tuple[int, int]:
  """(height, width) the model can take: multiples of the autoencoder's
  factor, rounded to the nearest (at least one factor) with a warning."""
  f = sd.vae_factor
  fixed = tuple(max(f, int(round(s / f)) * f) for s in (height, width))
  if fixed != (height, width):
    logging.warning('image size %dx%d is not a multiple of the '
                    "autoencoder's factor %d: using %dx%d.", height, width, f,
                    *fixed)
  return fixed


def nchw_latents(latents: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Initial latents given as diffusers' [B, C, h, w] (or this library's
  [B, h, w, C] / [B, 1, h, w, C]) -> [B, 1, h, w, C] of `shape`."""
  x = np.asarray(latents, np.float32)
  b, _, h, w, c = shape
  if x.shape == (b, c, h, w):
    x = x.transpose(0, 2, 3, 1)
  x = x.reshape(x.shape[0], 1, *x.shape[-3:]) if x.ndim == 4 else x
  if x.shape != tuple(shape):
    raise ValueError(f'initial latents of shape {latents.shape} do not fit '
                     f'[B, C, h, w] = {(b, c, h, w)} (diffusers) or '
                     f'[B, h, w, C] = {(b, h, w, c)}.')
  return x


def text_to_image(sd: StableDiffusion, prompts: Sequence[str], rng: jax.Array,
                  *, negative_prompt: str = '', sampler: str = 'ddim',
                  num_steps: int = DEFAULT_STEPS,
                  guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
                  height: Optional[int] = None, width: Optional[int] = None,
                  eta: float = 0.0, init_latents: Optional[np.ndarray] = None,
                  mesh: Optional[jax.sharding.Mesh] = None
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Images from prompts, as StableDiffusionPipeline.__call__ makes them.

  Args:
    sd: the loaded model.
    prompts: B prompts.
    rng: draws the initial latents (unless given) and the step noise.
    negative_prompt: the unconditional branch's prompt ('' as diffusers).
    sampler: 'ddim', 'euler' (diffusers' EulerDiscreteScheduler) or
      'ancestral' (DDPM) on the scheduler config's timesteps.
    num_steps: sampler steps.
    guidance_scale: diffusers' g (<= 1: no guidance).
    height, width: image size (default: the UNet's sample_size x factor).
    eta: DDIM's eta.
    init_latents: diffusers' initial `latents` [B, C, h, w] (unit normal,
      before the scheduler's init_noise_sigma), or None to draw them.
    mesh: split the batch over this mesh's devices.

  Returns:
    (images float32 [B, H, W, 3] in [0, 1], final latents [B, h, w, C]).
  """
  size = sd.default_size()
  height, width = check_size(sd, height or size, width or size)
  f = sd.vae_factor
  b = len(prompts)
  shape = (b, 1, height // f, width // f, sd.codec.channels)
  grid = sd.schedule.grid(sampler, num_steps)
  z_init = None
  if init_latents is not None:
    z_init = jnp.asarray(nchw_latents(init_latents, shape)
                         * grid['init_scale'])
  elif grid['init_scale'] != 1.0:
    z_init = jax.random.normal(jax.random.fold_in(rng, 1), shape) * (
        grid['init_scale'])
  cond = {'text': encode_prompts(sd, prompts)}
  guided = guidance_scale > 1.0
  if guided:
    cond['text_uncond'] = encode_prompts(sd, [negative_prompt] * b)
  guidance = sampling.make_guidance(cfg_weight=guidance_scale - 1.0,
                                    null_text=guided)
  spec = sampling.SamplerSpec(
      sampler='ancestral' if sampler == 'ancestral' else 'ddim',
      num_steps=num_steps, eta=eta, gamma=0.0, clip_x=False)
  z = sampling.sample(
      sd.denoise_fn(mesh), rng, shape, logsnr_fn=None,
      target=sd.schedule.target, spec=spec, cond=cond, guidance=guidance,
      z_init=z_init, logsnrs=grid['logsnrs'],
      denoise_last=grid['denoise_last'], logsnrs_to=grid.get('logsnrs_to'))
  frames = sd.codec.decode(sd.vae_params, z)
  images = jnp.clip(frames[:, 0] / 2 + 0.5, 0.0, 1.0)
  return np.asarray(images), np.asarray(z[:, 0])
