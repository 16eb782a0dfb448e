"""Stable Video Diffusion from a local diffusers pipeline folder.

A StableVideoDiffusionPipeline folder (model_index.json; unet/, vae/,
image_encoder/, feature_extractor/, scheduler/) becomes the pieces this
library samples with (Blattmann et al. 2023): the UNet as a `denoise_fn`
of log-SNR with EDM's preconditioning (denoiser.EDMApply), the temporal
autoencoder as the codec, the CLIP image encoder for the conditioning
frame's embedding, and the Euler scheduler's Karras sigmas as a log-SNR
grid (schedules.karras_grid) that the library's DDIM follows. Image-to-video
is then `sampling.sample` with the per-frame image guidance ramp, as
diffusers' StableVideoDiffusionPipeline.__call__ does (huggingface/
diffusers, pipelines/stable_video_diffusion/
pipeline_stable_video_diffusion.py): the same initial latents and
augmentation noise give the same frames.

Guidance convention: the pipeline's per-frame scale s_f =
linspace(min_guidance_scale, max_guidance_scale, F) forms pred_u + s_f
(pred_c - pred_u) (sampling.image_guided); no guidance unless the maximum
exceeds 1, as the pipeline decides.
"""

import dataclasses
import functools
import logging
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax import denoiser
from vdm_jax import latent
from vdm_jax import sampling
from vdm_jax import schedules
from vdm_jax.models import clip_preprocess
from vdm_jax.pretrained import autoencoder
from vdm_jax.pretrained import clip
from vdm_jax.pretrained import formats
from vdm_jax.pretrained import svd

PIPELINES = ('StableVideoDiffusionPipeline',)
COMPONENTS = {
    'unet': svd.CLASS_NAMES,
    'vae': ('AutoencoderKLTemporalDecoder',),
    'image_encoder': ('CLIPVisionModelWithProjection',),
    'feature_extractor': ('CLIPImageProcessor', 'CLIPImageProcessorFast',
                          'CLIPImageProcessorPil'),
    'scheduler': ('EulerDiscreteScheduler',),
}
# diffusers' StableVideoDiffusionPipeline.__call__ defaults.
DEFAULTS = dict(height=576, width=1024, num_steps=25, min_guidance_scale=1.0,
                max_guidance_scale=3.0, fps=7, motion_bucket_id=127,
                noise_aug_strength=0.02)
# The frame counts of the released checkpoints' training (img2vid, -xt).
TRAINED_FRAMES = (14, 25)


def check_folder(path: str) -> dict[str, str]:
  """{component: class name} of an SVD folder, checked before any read.

  Raises:
    FileNotFoundError / ValueError: not a pipeline folder, not SVD's
      pipeline (say which it is), a missing component or file, a class not
      supported, a scheduler without Karras sigmas.
  """
  classes = formats.check_pipeline(path, 'Stable Video Diffusion',
                                   PIPELINES, COMPONENTS,
                                   ('unet', 'vae', 'image_encoder'))
  sched = formats.model_config(os.path.join(path, 'scheduler'))
  if not sched.get('use_karras_sigmas'):
    raise ValueError(f'{path}: scheduler/ does not use Karras sigmas '
                     '(use_karras_sigmas), as SVD\'s does; not supported.')
  if sched.get('prediction_type', 'epsilon') != 'v_prediction':
    raise ValueError(f'{path}: scheduler prediction_type '
                     f'{sched.get("prediction_type")!r}; SVD predicts v.')
  return classes


@dataclasses.dataclass(frozen=True)
class StableVideoDiffusion:
  """The loaded pieces of an SVD folder."""

  path: str
  unet: Any
  unet_params: Any
  codec: latent.Autoencoder
  vae_params: Any
  image_model: Any
  image_params: Any
  image_mean: tuple[float, ...]
  image_std: tuple[float, ...]
  scheduler_config: Any

  @property
  def vae_factor(self) -> int:
    return self.codec.factor

  @property
  def num_frames(self) -> int:
    """The frame count the UNet was trained at (its config)."""
    return int(self.unet.num_frames)

  @property
  def size_multiple(self) -> int:
    """Pixels per latent at the UNet's coarsest level."""
    return self.vae_factor * 2 ** (len(self.unet.block_out_channels) - 1)

  def denoise_fn(self, mesh=None, params=None):
    return denoiser.make_edm_denoise_fn(
        self.unet, self.unet_params if params is None else params, mesh)


def load(path: str, *, dtype: str = 'float32', attention: str = 'auto',
         chunk: int = 8, mesh: Optional[jax.sharding.Mesh] = None,
         variant: Optional[str] = None, remat: str = 'none'
         ) -> StableVideoDiffusion:
  """Reads every component of an SVD folder (checked first)."""
  check_folder(path)
  unet, unet_params = svd.load(path, dtype=dtype, attention=attention,
                               remat=remat, variant=variant)
  vae, vae_params = autoencoder.load(path, dtype=dtype, attention=attention,
                                     variant=variant)
  image_model, image_params = clip.load(path, dtype=dtype,
                                        attention=attention, variant=variant,
                                        component='image_encoder')
  mean, std = clip.image_normalization(path)
  return StableVideoDiffusion(
      path=path, unet=unet, unet_params=unet_params,
      codec=latent.Autoencoder(vae, chunk=chunk, mesh=mesh),
      vae_params=vae_params, image_model=image_model,
      image_params=image_params, image_mean=mean, image_std=std,
      scheduler_config=formats.model_config(os.path.join(path, 'scheduler')))


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _embed(model, params, images, mean, std, size):
  pixels = clip_preprocess.svd_image_preprocess(images * 2.0 - 1.0, mean, std,
                                                size)
  return model.apply({'params': params}, pixels).image_embeds[:, None]


def encode_image(model: StableVideoDiffusion, images: jax.Array
                 ) -> jax.Array:
  """[B, 1, D] CLIP image embeddings of images [B, H, W, 3] in [0, 1]
  (the pipeline's `_encode_image`: antialiased resize to 224, no crop)."""
  return _embed(model.image_model, model.image_params,
                jnp.asarray(images, jnp.float32), model.image_mean,
                model.image_std, int(model.image_model.image_size))


@functools.partial(jax.jit, static_argnums=0)
def _mode(vae, params, frames):
  return vae.apply({'params': params}, frames, method='encode')[0]


def image_latents(model: StableVideoDiffusion, images: jax.Array,
                  noise_aug_strength: float, noise: jax.Array) -> jax.Array:
  """The conditioning latents [B, h, w, c]: the autoencoder's mode (NOT
  scaled) of images [B, H, W, 3] in [0, 1] taken to [-1, 1] plus
  noise_aug_strength * noise [B, H, W, 3], as the pipeline encodes them."""
  x = jnp.asarray(images, jnp.float32) * 2.0 - 1.0
  return _mode(model.codec.module, model.vae_params,
               x + noise_aug_strength * jnp.asarray(noise, jnp.float32))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _decode(vae, params, z, frames):
  return vae.apply({'params': params}, z, frames, method='decode')


def decode(model: StableVideoDiffusion, latents: jax.Array,
           decode_chunk_size: Optional[int] = None) -> jax.Array:
  """Scaled latents [B, F, h, w, c] -> frames [B, F, H, W, 3] in [0, 1].

  As the pipeline's decode_latents: the B * F latents in order, in chunks
  of decode_chunk_size frames (default F), each chunk decoded as one clip
  by the temporal decoder (a chunk may hold the end of one video and the
  start of the next, as diffusers' does).
  """
  b, f = latents.shape[:2]
  chunk = int(decode_chunk_size or f)
  flat = jnp.asarray(latents, jnp.float32).reshape((b * f,) + latents.shape[2:])
  flat = flat / float(model.codec.module.scaling_factor)
  out = [_decode(model.codec.module, model.vae_params, flat[i:i + chunk],
                 int(flat[i:i + chunk].shape[0]))
         for i in range(0, b * f, chunk)]
  frames = jnp.concatenate(out).reshape((b, f) + out[0].shape[1:])
  return jnp.clip(frames / 2.0 + 0.5, 0.0, 1.0)


def check_size(model: StableVideoDiffusion, height: int, width: int
               ) -> tuple[int, int]:
  """(height, width) rounded to the nearest multiples the UNet takes
  without uneven levels (size_multiple: 64 for SVD), with a warning."""
  m = model.size_multiple
  fixed = tuple(max(m, int(round(s / m)) * m) for s in (height, width))
  if fixed != (height, width):
    logging.warning('frame size %dx%d is not a multiple of %d (the '
                    "autoencoder's factor times the UNet's downsampling): "
                    'using %dx%d.', height, width, m, *fixed)
  return fixed


def check_frames(model: StableVideoDiffusion, num_frames: int) -> None:
  """Warns when num_frames is not the count the UNet was trained at."""
  if num_frames != model.num_frames:
    logging.warning('%d frames: this UNet was trained on %d (its config\'s '
                    'num_frames; SVD-img2vid 14, -xt 25); other counts run but'
                    ' are untested by its authors.', num_frames,
                    model.num_frames)


def bfchw_latents(latents: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Initial latents as diffusers' [B, F, C, h, w] (or this library's
  [B, F, h, w, C]) -> [B, F, h, w, C] of `shape`."""
  x = np.asarray(latents, np.float32)
  b, f, h, w, c = shape
  if x.shape == (b, f, c, h, w):
    x = x.transpose(0, 1, 3, 4, 2)
  if x.shape != tuple(shape):
    raise ValueError(f'initial latents of shape {latents.shape} do not fit '
                     f'[B, F, C, h, w] = {(b, f, c, h, w)} (diffusers) or '
                     f'[B, F, h, w, C] = {shape}.')
  return x


def conditioning(model: StableVideoDiffusion, images: jax.Array,
                 rng: jax.Array, *, fps: int, motion_bucket_id: int,
                 noise_aug_strength: float, height: int, width: int,
                 aug_noise: Optional[jax.Array] = None) -> dict[str, Any]:
  """The denoiser's cond for images [B, H0, W0, 3] in [0, 1].

  The embedding from the images as given; the latent from the images at
  (height, width) (resized with Lanczos if they differ, as the pipeline's
  preprocessing resizes) plus the augmentation noise (drawn from rng unless
  given, [B, height, width, 3]).
  """
  images = jnp.asarray(images, jnp.float32)
  b = images.shape[0]
  embed = encode_image(model, images)
  if images.shape[1:3] != (height, width):
    images = jnp.clip(jax.image.resize(images, (b, height, width, 3),
                                       'lanczos3'), 0.0, 1.0)
  if aug_noise is None:
    aug_noise = jax.random.normal(rng, images.shape)
  ids = jnp.tile(jnp.asarray([[fps - 1, motion_bucket_id,
                               noise_aug_strength]], jnp.float32), (b, 1))
  return {'image_latent': image_latents(model, images, noise_aug_strength,
                                        aug_noise),
          'image_embed': embed, 'added_time_ids': ids}


def image_to_video(model: StableVideoDiffusion, images: jax.Array,
                   rng: jax.Array, *, num_frames: Optional[int] = None,
                   num_steps: int = DEFAULTS['num_steps'],
                   min_guidance_scale: float = 1.0,
                   max_guidance_scale: float = 3.0, fps: int = 7,
                   motion_bucket_id: int = 127,
                   noise_aug_strength: float = 0.02,
                   decode_chunk_size: Optional[int] = None,
                   height: Optional[int] = None, width: Optional[int] = None,
                   init_latents: Optional[np.ndarray] = None,
                   aug_noise: Optional[np.ndarray] = None,
                   mesh: Optional[jax.sharding.Mesh] = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Videos from first frames, as StableVideoDiffusionPipeline.__call__.

  Args:
    model: the loaded SVD.
    images: [B, H, W, 3] first frames in [0, 1].
    rng: draws the initial latents and augmentation noise unless given.
    num_frames: F (default: the UNet's num_frames; others warned about).
    num_steps: Euler (= DDIM) steps on the Karras sigmas.
    min_guidance_scale, max_guidance_scale: the per-frame ramp's ends.
    fps: frames per second; the UNet sees fps - 1, as the pipeline passes.
    motion_bucket_id: the motion conditioning id.
    noise_aug_strength: the conditioning frame's noise level.
    decode_chunk_size: frames per decoder call (default F).
    height, width: frame size (default 576 x 1024; rounded to multiples of
      model.size_multiple with a warning).
    init_latents: diffusers' `latents` [B, F, C, h, w] (unit normal, before
      init_noise_sigma) or [B, F, h, w, C]; None draws them.
    aug_noise: the augmentation noise [B, H, W, 3] (the pipeline draws it
      itself); None draws it.
    mesh: split the batch over this mesh's devices.

  Returns:
    (frames float32 [B, F, H, W, 3] in [0, 1], latents [B, F, h, w, c]).
  """
  height, width = check_size(model, height or DEFAULTS['height'],
                             width or DEFAULTS['width'])
  f = int(num_frames or model.num_frames)
  check_frames(model, f)
  b = int(np.shape(images)[0])
  r_cond, r_init, r_sample = jax.random.split(rng, 3)
  cond = conditioning(model, images, r_cond, fps=fps,
                      motion_bucket_id=motion_bucket_id,
                      noise_aug_strength=noise_aug_strength, height=height,
                      width=width, aug_noise=aug_noise)
  shape = (b, f, height // model.vae_factor, width // model.vae_factor,
           model.codec.channels)
  grid = schedules.karras_grid(model.scheduler_config, num_steps)
  init = (jax.random.normal(r_init, shape) if init_latents is None
          else jnp.asarray(bfchw_latents(init_latents, shape)))
  fn = model.denoise_fn(mesh)
  if max_guidance_scale > 1.0:
    fn = sampling.image_guided(fn, sampling.guidance_ramp(
        min_guidance_scale, max_guidance_scale, f))
  z = sampling.sample(
      fn, r_sample, shape, logsnr_fn=None, target='v',
      spec=sampling.SamplerSpec(sampler='ddim', num_steps=num_steps, eta=0.0,
                                clip_x=False),
      cond=cond, z_init=init * grid['init_scale'], logsnrs=grid['logsnrs'],
      denoise_last=grid['denoise_last'])
  frames = decode(model, z, decode_chunk_size)
  return np.asarray(frames), np.asarray(z)
