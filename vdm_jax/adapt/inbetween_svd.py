"""Generative Inbetweening on Stable Video Diffusion, as their code does it.

Wang et al. 2024 ("Generative Inbetweening: Adapting Image-to-Video Models
for Keyframe Interpolation", arXiv 2408.15239; jeanne-wang/
svd_keyframe_interpolation: train_reverse_motion_with_attnflip.py,
attn_ctrl/attention_control.py, keyframe_interpolation.py,
custom_diffusers/pipelines/pipeline_frame_interpolation_with_noise_injection
.py) on models/svd_unet.py:
  - Sec. 3.3, the backward tune (`backward_loss`): only the to_v and
    to_out_0 kernels of every `temporal_transformer_blocks_0/attn1` are
    trained (24,780,800 weights at full size; the output bias frozen), on
    clips reversed in time and conditioned on their first frame (the
    forward clip's last), while the frozen reference model sees the forward
    clip with the noise flipped in time, conditioned on its first frame;
    its temporal attention probabilities, rotated by 180 degrees (both
    frame axes flipped), replace the tuned model's. EDM training: sigma ~
    lognormal(0.7, 1.6), loss weight (1 + sigma^2) / sigma^2 on the clean
    latents, added time ids [6, 127, 0.02].
  - Sec. 3.4, fused sampling (`make_pair_fn` with sampling.
    fused_bidirectional): the forward model from keyframe 1 stores its maps,
    the backward model (the same weights plus the tuned difference) runs on
    the time-flipped latents from keyframe 2 with the maps rotated.

The tuned kernels live as a flat {'/'-joined path: array} mapping (`split`,
`merge`); a --mode=tune_backward workdir stores them and their difference
to the base model (`save`, `restore`).
"""

import json
import os
from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax import denoiser
from vdm_jax import diffusion
from vdm_jax import fileio
from vdm_jax import sharding
from vdm_jax.models import layers
from vdm_jax.models import svd_unet

RECORD = 'svd_backward.json'
# Their training: sigma = exp(N(P_mean, P_std)); added time ids
# [fps, motion bucket, noise augmentation] = [6, 127, 0.02].
P_MEAN, P_STD = 0.7, 1.6
TRAIN_TIME_IDS = (6.0, 127.0, 0.02)


def _flat(params: Any) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(params))


def split(params: Any) -> dict[str, jax.Array]:
  """{'a/b/.../kernel': leaf} of the trainable kernels of `params`."""
  return {'/'.join(k): v for k, v in _flat(params).items()
          if svd_unet.trainable_inbetween(k)}


def merge(tuned: Mapping[str, jax.Array], params: Any) -> Any:
  """A new tree: `params` with the `tuned` leaves set."""
  flat = _flat(params)
  for name, value in tuned.items():
    key = tuple(name.split('/'))
    if key not in flat or flat[key].shape != value.shape:
      raise ValueError(f'Tuned weight {name} {value.shape} does not fit the '
                       'model (another SVD configuration?).')
    flat[key] = value
  return flax.traverse_util.unflatten_dict(flat)


def add_delta(delta: Mapping[str, jax.Array], params: Any) -> Any:
  """params + delta on the tuned leaves (their keyframe_interpolation.py
  adds tuned - img2vid onto another model's weights, e.g. -xt's)."""
  flat = _flat(params)
  return merge({k: flat[tuple(k.split('/'))] + v for k, v in delta.items()},
               params)


def rotate(probs: Any) -> Any:
  """Attention maps rotated by 180 degrees: both frame axes flipped."""
  return jax.tree.map(lambda p: jnp.flip(p, axis=(-2, -1)), probs)


def capture(model, params, z, logsnr, cond, mesh=None):
  """(v, the controlled attentions' probabilities) of the EDM model."""
  inputs = denoiser.EDMApply(model, mesh).inputs(z, logsnr, cond)
  pred, state = model.apply({'params': params}, *inputs,
                            mutable=[layers.CAPTURE])
  return pred, state[layers.CAPTURE]


def inject(model, params, z, logsnr, cond, probs, mesh=None):
  """v of the EDM model with the given attention probabilities."""
  inputs = denoiser.EDMApply(model, mesh).inputs(z, logsnr, cond)
  return model.apply({'params': params, layers.INJECT: probs}, *inputs)


class _Pair(flax.struct.PyTreeNode):
  """(params, z_f, z_b, logsnr, cond_f, cond_b) -> (v_f, v_b)."""

  model: Any = flax.struct.field(pytree_node=False)
  mesh: Any = flax.struct.field(pytree_node=False, default=None)

  def __call__(self, params, z_f, z_b, logsnr, cond_f, cond_b):
    pred_f, probs = capture(self.model, params['forward'], z_f, logsnr,
                            cond_f, self.mesh)
    pred_b = inject(self.model, params['backward'], z_b, logsnr, cond_b,
                    rotate(jax.lax.stop_gradient(probs)), self.mesh)
    return pred_f, pred_b


def make_pair_fn(model, forward_params, backward_params, mesh=None):
  """The pair_fn of sampling.fused_bidirectional: the backward model uses
  the forward model's rotated maps (a Partial: parameters stay traced)."""
  return jax.tree_util.Partial(
      _Pair(model, mesh), {'forward': forward_params,
                           'backward': backward_params})


def backward_loss(model, frozen: Any, tuned: Mapping[str, jax.Array],
                  latents: jax.Array, cond_f: Mapping[str, Any],
                  cond_b: Mapping[str, Any], rng: jax.Array) -> jax.Array:
  """Their backward-motion loss per example [B].

  Args:
    model: the SVD UNet.
    frozen: the base model's parameters (the reference model's, and the
      backward model's outside `tuned`).
    tuned: the trainable kernels (`split`).
    latents: [B, F, h, w, c] scaled latents of the clips, forward in time.
    cond_f: EDMApply cond of the forward clip's first frame (reference).
    cond_b: EDMApply cond of its last frame (the reversed clip's first).
    rng: draws sigma and the noise.

  Returns:
    [B] mean over elements of (1 + sigma^2) / sigma^2 (D - x_rev)^2, D the
    backward model's EDM denoised estimate of the reversed clip x_rev.
  """
  b = latents.shape[0]
  r_sigma, r_noise = jax.random.split(rng)
  sigma = jnp.exp(P_MEAN + P_STD * jax.random.normal(r_sigma, (b,)))
  logsnr = -2.0 * jnp.log(sigma)
  x_rev = jnp.flip(latents, axis=1)
  eps = jax.random.normal(r_noise, latents.shape)
  s = sigma[:, None, None, None, None]
  z_b = (x_rev + s * eps) / jnp.sqrt(s**2 + 1)  # x_VE -> VP z.
  # The reference sees the forward clip with the noise flipped: flip(z_b).
  _, probs = capture(model, frozen, jnp.flip(z_b, axis=1), logsnr, cond_f)
  v = inject(model, merge(tuned, frozen), z_b, logsnr, cond_b,
             rotate(jax.lax.stop_gradient(probs)))
  x_hat, _ = diffusion.prediction_to_x_eps(v, z_b, logsnr, 'v')
  weight = (1 + sigma**2) / sigma**2
  return weight * jnp.mean(jnp.square(x_hat - x_rev), axis=(1, 2, 3, 4))


def save(workdir: str, step: int, tuned: Mapping[str, Any],
         base: Mapping[str, Any], base_path: str) -> str:
  """Writes tuned kernels and their difference to the base (npz) and the
  record; returns the npz path."""
  name = f'svd_backward_{step:08d}.npz'
  path = os.path.join(workdir, name)
  arrays = {}
  for k, v in tuned.items():
    arrays['tuned:' + k] = np.asarray(v, np.float32)
    arrays['delta:' + k] = np.asarray(v, np.float32) - np.asarray(
        base[k], np.float32)
  with fileio.atomic_path(path) as tmp:
    with open(tmp, 'wb') as f:
      np.savez(f, **arrays)
  fileio.write_json(os.path.join(workdir, RECORD),
                    {'base_path': os.path.abspath(base_path), 'step': step,
                     'file': name})
  return path


def read_record(workdir: str) -> dict:
  path = os.path.join(workdir, RECORD)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{workdir} holds no SVD backward-motion weights ({RECORD} missing):'
        ' run --mode=tune_backward with configs/svd.py:inbetween and '
        'config.pretrained.path=<the SVD folder> into it first.')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def restore(workdir: str) -> tuple[dict, dict[str, np.ndarray],
                                   dict[str, np.ndarray]]:
  """(record, tuned kernels, their difference to the base) of a workdir."""
  record = read_record(workdir)
  with np.load(os.path.join(workdir, record['file'])) as data:
    tuned = {k[6:]: data[k] for k in data.files if k.startswith('tuned:')}
    delta = {k[6:]: data[k] for k in data.files if k.startswith('delta:')}
  return record, tuned, delta


def replicate(tree: Any, mesh) -> Any:
  """The tree placed replicated on the mesh (None: as it is)."""
  if mesh is None:
    return tree
  return jax.device_put(tree, sharding.replicated(mesh))


def inbetween(model, first: jax.Array, last: jax.Array, rng: jax.Array, *,
              forward_params: Any, backward_params: Any,
              num_frames: Optional[int] = None, num_steps: int = 50,
              weight: str = 'half', guidance: str = 'auto',
              min_guidance_scale: float = 1.0,
              max_guidance_scale: float = 3.0, fps: int = 7,
              motion_bucket_id: int = 127, noise_aug_strength: float = 0.02,
              reinject_fraction: float = 0.5, reinject_repeats: int = 5,
              decode_chunk_size: Optional[int] = None,
              height: Optional[int] = None, width: Optional[int] = None,
              init_latents: Optional[np.ndarray] = None,
              mesh=None) -> tuple[np.ndarray, np.ndarray]:
  """Frames between two keyframes (their FrameInterpolationWithNoise-
  InjectionPipeline with the library's sampler and fused denoiser).

  Args:
    model: a loaded pretrained.stable_video_diffusion.StableVideoDiffusion
      (its UNet; its parameters are not used).
    first, last: [B, H, W, 3] keyframes in [0, 1], the same size.
    rng: draws the initial latents and augmentation noise.
    forward_params: the forward model (e.g. SVD-xt, unmodified).
    backward_params: the backward model (forward + the tuned difference).
    num_frames: F (default the UNet's).
    num_steps: Euler (= DDIM) steps on the Karras sigmas (theirs: 50).
    weight: sampling.fusion_weights kind ('half': w = 0.5; 'ramp': their
      --weighted_average).
    guidance: 'averaged' (the ramp averaged with its flip: a constant 2 for
      1 -> 3), 'own' (the ramp in each model's own time) or 'auto' (their
      code: 'averaged' with 'half', 'own' with 'ramp').
    min_guidance_scale, max_guidance_scale: the ramp's ends.
    fps, motion_bucket_id, noise_aug_strength: SVD's conditioning.
    reinject_fraction, reinject_repeats: noise re-injection over the first
      fraction of the steps, repeats re-noisings each (theirs: 0.5, 5).
    decode_chunk_size, height, width, init_latents, mesh: as
      stable_video_diffusion.image_to_video.

  Returns:
    (frames [B, F, H, W, 3] in [0, 1], latents [B, F, h, w, c]).
  """
  from vdm_jax import sampling  # pylint: disable=g-import-not-at-top
  from vdm_jax import schedules  # pylint: disable=g-import-not-at-top
  from vdm_jax.pretrained import stable_video_diffusion as svdp  # pylint: disable=g-import-not-at-top
  if np.shape(first) != np.shape(last):
    raise ValueError(f'The keyframes differ in shape: {np.shape(first)} and '
                     f'{np.shape(last)}.')
  height, width = svdp.check_size(model, height or svdp.DEFAULTS['height'],
                                  width or svdp.DEFAULTS['width'])
  f = int(num_frames or model.num_frames)
  svdp.check_frames(model, f)
  b = int(np.shape(first)[0])
  r_cond, r_init, r_sample = jax.random.split(rng, 3)
  kw = dict(fps=fps, motion_bucket_id=motion_bucket_id,
            noise_aug_strength=noise_aug_strength, height=height, width=width)
  aug = jax.random.normal(r_cond, (b, height, width, 3))
  cond_f = svdp.conditioning(model, first, r_cond, aug_noise=aug, **kw)
  cond_b = svdp.conditioning(model, last, r_cond, aug_noise=aug, **kw)
  scale = None
  if max_guidance_scale > 1.0:
    scale = sampling.guidance_ramp(min_guidance_scale, max_guidance_scale, f)
    if guidance == 'auto':
      guidance = 'averaged' if weight == 'half' else 'own'
    if guidance == 'averaged':
      scale = sampling.averaged_ramp(scale)
    elif guidance != 'own':
      raise ValueError(f"Unknown inbetween guidance {guidance!r}; choose "
                       "'auto', 'averaged' or 'own'.")
  fused = sampling.fused_bidirectional(
      make_pair_fn(model.unet, forward_params, backward_params, mesh),
      sampling.fusion_weights(weight, f), scale)
  shape = (b, f, height // model.vae_factor, width // model.vae_factor,
           model.codec.channels)
  grid = schedules.karras_grid(model.scheduler_config, num_steps)
  init = (jax.random.normal(r_init, shape) if init_latents is None
          else jnp.asarray(svdp.bfchw_latents(init_latents, shape)))
  z = sampling.sample(
      fused, r_sample, shape, logsnr_fn=None, target='v',
      spec=sampling.SamplerSpec(sampler='ddim', num_steps=num_steps, eta=0.0,
                                clip_x=False),
      cond={'forward': cond_f, 'backward': cond_b},
      z_init=init * grid['init_scale'], logsnrs=grid['logsnrs'],
      denoise_last=grid['denoise_last'],
      reinject=(int(reinject_fraction * num_steps), int(reinject_repeats)))
  return np.asarray(svdp.decode(model, z, decode_chunk_size)), np.asarray(z)
