"""A model's codec: where the diffusion runs (pixels, or a frozen autoencoder's
latent space).

Latent diffusion (Rombach et al. 2022, Sec. 3) runs the diffusion on
z = scaling_factor * (E(x) - shift_factor) of a frozen KL autoencoder E and
decodes samples with D(z / scaling_factor + shift_factor). Videos go through
the image autoencoder frame by frame, in chunks of `chunk` frames so that
the activations of a 512x512 (or 1024x576) decoder stay bounded
(`lax.map`), with each chunk split over the mesh's devices. Stable Video
Diffusion's temporal decoder (`AutoencoderKLTemporalDecoder`) decodes whole
clips: its chunks are clips.

`Identity` is the codec of pixel-space models, so programs call
`codec.encode` / `codec.decode` whatever the model.
"""

import dataclasses
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm_jax import sharding


@dataclasses.dataclass(frozen=True)
class Identity:
  """Pixel-space models: frames are the diffusion's variables."""

  factor: int = 1
  channels: Optional[int] = None

  def encode(self, params, frames, rng=None):
    del params, rng
    return jnp.asarray(frames, jnp.float32)

  def decode(self, params, latents):
    del params
    return jnp.asarray(latents, jnp.float32)

  def latent_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape)


def _constrain(x: jax.Array, mesh: Optional[jax.sharding.Mesh]) -> jax.Array:
  if mesh is not None and x.shape[0] % mesh.size == 0:
    return jax.lax.with_sharding_constraint(x, sharding.batch_sharding(mesh))
  return x


def _chunked(fn, x: jax.Array, chunk: int,
             mesh: Optional[jax.sharding.Mesh]) -> jax.Array:
  """fn over x's leading axis `chunk` items at a time (padded to a multiple)."""
  n = x.shape[0]
  chunk = max(1, min(chunk, n))
  pad = -n % chunk
  if pad:
    x = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)])
  xs = x.reshape((-1, chunk) + x.shape[1:])
  ys = jax.lax.map(lambda c: _constrain(fn(_constrain(c, mesh)), mesh), xs)
  return ys.reshape((-1,) + ys.shape[2:])[:n]


@dataclasses.dataclass(frozen=True)
class Autoencoder:
  """A frozen KL autoencoder as the codec of a latent diffusion model.

  Attributes:
    module: models.autoencoder.AutoencoderKL or AutoencoderKLTemporalDecoder.
    chunk: frames per encoder/decoder call (temporal decoder: frames per
      call, rounded down to whole clips).
    mesh: a mesh to split each chunk over (its batch axis), or None.
  """

  module: nn.Module
  chunk: int = 8
  mesh: Optional[jax.sharding.Mesh] = None

  @property
  def factor(self) -> int:
    return int(self.module.downsample_factor)

  @property
  def channels(self) -> int:
    return int(self.module.latent_channels)

  @property
  def temporal(self) -> bool:
    return hasattr(self.module, 'decoder') and (
        type(self.module).__name__ == 'AutoencoderKLTemporalDecoder')

  def _scale(self) -> tuple[float, float]:
    shift = getattr(self.module, 'shift_factor', None)
    return float(self.module.scaling_factor), float(shift or 0.0)

  def latent_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """[B, T, H, W, C] of frames -> [B, T, H/f, W/f, latent channels]."""
    *lead, h, w, _ = shape
    if h % self.factor or w % self.factor:
      raise ValueError(f'frames of {h}x{w} are not multiples of the '
                       f'autoencoder factor {self.factor}.')
    return (*lead, h // self.factor, w // self.factor, self.channels)

  @functools.partial(jax.jit, static_argnums=0)
  def encode(self, params: Any, frames: jax.Array,
             rng: Optional[jax.Array] = None) -> jax.Array:
    """Frames [B, T, H, W, 3] in [-1, 1] -> scaled latents [B, T, h, w, c].

    rng None takes the posterior mean (diffusers' `latent_dist.mode()`),
    else a sample (`latent_dist.sample()`, as SD's training scripts do).
    """
    b, t = frames.shape[:2]
    x = jnp.asarray(frames, jnp.float32).reshape((b * t,) + frames.shape[2:])

    def enc(c):
      return jnp.stack(self.module.apply({'params': params}, c,
                                         method='encode'), axis=1)

    moments = _chunked(enc, x, self.chunk, self.mesh)  # [N, 2, h, w, c]
    mean, logvar = moments[:, 0], moments[:, 1]
    if rng is not None:
      mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(
          rng, mean.shape)
    scale, shift = self._scale()
    z = scale * (mean - shift)
    return z.reshape((b, t) + z.shape[1:])

  @functools.partial(jax.jit, static_argnums=0)
  def decode(self, params: Any, latents: jax.Array) -> jax.Array:
    """Scaled latents [B, T, h, w, c] -> frames [B, T, H, W, 3] (unclipped)."""
    b, t = latents.shape[:2]
    scale, shift = self._scale()
    z = jnp.asarray(latents, jnp.float32) / scale + shift
    if self.temporal:
      # Whole clips per call: [B, T, ...] chunked over B.
      clips = max(1, self.chunk // t)

      def dec_clips(c):
        flat = c.reshape((-1,) + c.shape[2:])
        out = self.module.apply({'params': params}, flat, t, method='decode')
        return out.reshape(c.shape[:2] + out.shape[1:])

      return _chunked(dec_clips, z, clips, self.mesh)
    flat = z.reshape((b * t,) + z.shape[2:])

    def dec(c):
      return self.module.apply({'params': params}, c, method='decode')

    x = _chunked(dec, flat, self.chunk, self.mesh)
    return x.reshape((b, t) + x.shape[1:])

