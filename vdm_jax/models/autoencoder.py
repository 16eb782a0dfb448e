"""KL autoencoders of latent diffusion: SD's AutoencoderKL, SVD's temporal one.

Flax mirrors of diffusers' PyTorch modules (huggingface/diffusers, pinned
0.42.1), named as diffusers names them (`down_blocks.0.resnets.1.conv1` is
`down_blocks_0/resnets_1/conv1` here) so that pretrained/autoencoder.py maps
a state dict onto the parameter tree by rule:

  AutoencoderKL (Rombach et al. 2022, "High-Resolution Image Synthesis with
    Latent Diffusion Models", App. G; diffusers
    models/autoencoders/autoencoder_kl.py, vae.py): Encoder -> quant_conv ->
    diagonal Gaussian (mean, logvar) -> post_quant_conv -> Decoder.
  AutoencoderKLTemporalDecoder (Blattmann et al. 2023, "Stable Video
    Diffusion"; diffusers models/autoencoders/
    autoencoder_kl_temporal_decoder.py, models/unets/unet_3d_blocks.py,
    models/resnet.py): SD's encoder and quant_conv, and a decoder whose res
    blocks mix a per-frame ResnetBlock2D with a temporal (3, 1, 1) Conv3d
    block through a learned AlphaBlender, ending in a temporal Conv3d.

Layout NHWC: frames x [N, H, W, C] in [-1, 1]; latents [N, H/f, W/f,
latent_channels] with f = 2 ** (len(block_out_channels) - 1). The temporal
decoder takes frames stacked as diffusers does, [B * F, h, w, C] with the F
frames of each video consecutive, and `num_frames` = F.

Parameters are float32; `dtype` is the compute dtype ('float32' or
'bfloat16'); GroupNorm statistics and the returned moments and pixels are
float32. These modules hold no scaling factor logic: `scaling_factor` and
`shift_factor` are fields for the latent codec to apply (latents for the
diffusion model are (z - shift) * scale).
"""

from typing import Any, Optional, Sequence

import flax
from flax import linen as nn
import jax
import jax.numpy as jnp

from vdm_jax.models import attention as attention_lib

Array = jax.Array

DTYPES = ('float32', 'bfloat16')
# diffusers clamps the encoder's log-variance to this range
# (models/autoencoders/vae.py, DiagonalGaussianDistribution).
LOGVAR_RANGE = (-30.0, 20.0)
MERGE_STRATEGIES = ('learned', 'fixed', 'learned_with_images')


def _check_dtype(dtype: str) -> Any:
  if dtype not in DTYPES:
    raise ValueError(f'Unknown dtype {dtype!r}; choose one of {DTYPES}.')
  return jnp.dtype(dtype)


def _conv(features: int, kernel: int, dtype: Any, name: str,
          strides: int = 1, padding: Any = None) -> nn.Conv:
  """torch's Conv2d(kernel, stride, padding=kernel // 2) in NHWC."""
  if padding is None:
    padding = ((kernel // 2, kernel // 2),) * 2
  return nn.Conv(features, (kernel, kernel), strides=strides,
                 padding=padding, dtype=dtype, name=name)


def _norm(groups: int, eps: float, name: str) -> nn.GroupNorm:
  # Two-pass variance in float32, as torch's GroupNorm.
  return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False,
                      dtype=jnp.float32, name=name)


@flax.struct.dataclass
class DiagonalGaussian:
  """The encoder's latent distribution, N(mean, exp(logvar)) per element.

  diffusers models/autoencoders/vae.py DiagonalGaussianDistribution; both
  fields [N, h, w, latent_channels], logvar already clipped to LOGVAR_RANGE.
  """

  mean: Array
  logvar: Array

  @property
  def std(self) -> Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> Array:
    return jnp.exp(self.logvar)

  def sample(self, noise: Array) -> Array:
    """mean + std * noise, noise ~ N(0, I) of the mean's shape."""
    return self.mean + self.std * noise

  def mode(self) -> Array:
    return self.mean

  def kl(self) -> Array:
    """[N] KL divergence to N(0, I), summed over h, w and channels."""
    return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar,
                         axis=(1, 2, 3))


def moments_to_gaussian(moments: Array) -> tuple[Array, Array]:
  """Splits [N, h, w, 2 * C] moments into (mean, clipped logvar), float32."""
  moments = moments.astype(jnp.float32)
  mean, logvar = jnp.split(moments, 2, axis=-1)
  return mean, jnp.clip(logvar, *LOGVAR_RANGE)


class ResnetBlock2D(nn.Module):
  """diffusers models/resnet.py ResnetBlock2D without a time embedding.

  norm1, SiLU, conv1, norm2, SiLU, conv2, plus the input (through a 1x1
  `conv_shortcut` when the channel count changes); output_scale_factor 1.

  Attributes:
    out_channels: output channels.
    groups: GroupNorm groups.
    eps: GroupNorm epsilon.
    dtype: compute dtype.
  """

  out_channels: int
  groups: int = 32
  eps: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[N, H, W, C_in] -> [N, H, W, out_channels]."""
    h = nn.silu(_norm(self.groups, self.eps, 'norm1')(x)).astype(self.dtype)
    h = _conv(self.out_channels, 3, self.dtype, 'conv1')(h)
    h = nn.silu(_norm(self.groups, self.eps, 'norm2')(h)).astype(self.dtype)
    h = _conv(self.out_channels, 3, self.dtype, 'conv2')(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, 1, self.dtype, 'conv_shortcut')(x)
    return x.astype(h.dtype) + h


class TemporalResnetBlock(nn.Module):
  """diffusers models/resnet.py TemporalResnetBlock.

  As ResnetBlock2D with (3, 1, 1) Conv3d's padded (1, 0, 0) over frames;
  given a time embedding (SVD's UNet; the VAE has none), SiLU and
  `time_emb_proj` of it are added per frame after conv1.

  Attributes:
    out_channels: output channels.
    groups: GroupNorm groups (statistics over frames and pixels).
    eps: GroupNorm epsilon.
    dtype: compute dtype.
  """

  out_channels: int
  groups: int = 32
  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Optional[Array] = None) -> Array:
    """[B, F, H, W, C_in], temb [B, F, E] or None -> [B, F, H, W, out]."""
    def conv(name, kernel=(3, 1, 1), pad=((1, 1), (0, 0), (0, 0))):
      return nn.Conv(self.out_channels, kernel, padding=pad,
                     dtype=self.dtype, name=name)
    h = nn.silu(_norm(self.groups, self.eps, 'norm1')(x)).astype(self.dtype)
    h = conv('conv1')(h)
    if temb is not None:
      t = nn.Dense(self.out_channels, dtype=self.dtype, name='time_emb_proj')(
          nn.silu(temb.astype(self.dtype)))
      h = h + t[:, :, None, None, :]
    h = nn.silu(_norm(self.groups, self.eps, 'norm2')(h)).astype(self.dtype)
    h = conv('conv2')(h)
    if x.shape[-1] != self.out_channels:
      x = conv('conv_shortcut', (1, 1, 1), 'VALID')(x)
    return x.astype(h.dtype) + h


class AlphaBlender(nn.Module):
  """diffusers models/resnet.py AlphaBlender: alpha x_spatial + (1-alpha) x_t.

  alpha is `mix_factor` ('fixed'), sigmoid(mix_factor) ('learned'), or that
  except 1 on frames flagged by `image_only_indicator`
  ('learned_with_images'); `switch_spatial_to_temporal_mix` uses 1 - alpha
  (SVD's temporal decoder). `mix_factor` is a [1] parameter (a buffer in
  torch for 'fixed', which a state dict still carries).

  Attributes:
    alpha: initial mix_factor.
    merge_strategy: one of MERGE_STRATEGIES.
    switch_spatial_to_temporal_mix: swap the roles of the two inputs.
  """

  alpha: float = 0.0
  merge_strategy: str = 'learned'
  switch_spatial_to_temporal_mix: bool = False

  @nn.compact
  def __call__(self, x_spatial: Array, x_temporal: Array,
               image_only_indicator: Optional[Array] = None) -> Array:
    """Mixes two [B, F, H, W, C] tensors.

    Args:
      x_spatial: [B, F, H, W, C].
      x_temporal: [B, F, H, W, C].
      image_only_indicator: [B, F], nonzero = image frame; used by
        'learned_with_images' only.

    Returns:
      [B, F, H, W, C] in x_spatial's dtype.
    """
    if self.merge_strategy not in MERGE_STRATEGIES:
      raise ValueError(f'Unknown merge_strategy {self.merge_strategy!r}; '
                       f'supported: {MERGE_STRATEGIES}.')
    mix = self.param('mix_factor', nn.initializers.constant(self.alpha), (1,))
    if self.merge_strategy == 'fixed':
      alpha = mix
    else:
      alpha = jax.nn.sigmoid(mix)
    if self.merge_strategy == 'learned_with_images':
      if image_only_indicator is None:
        raise ValueError("merge_strategy 'learned_with_images' needs "
                         'image_only_indicator.')
      alpha = jnp.where(image_only_indicator.astype(bool), 1.0, alpha)
      alpha = alpha[:, :, None, None, None]
    alpha = alpha.astype(x_spatial.dtype)
    if self.switch_spatial_to_temporal_mix:
      alpha = 1.0 - alpha
    return alpha * x_spatial + (1.0 - alpha) * x_temporal.astype(
        x_spatial.dtype)


class SpatioTemporalResBlock(nn.Module):
  """diffusers models/resnet.py SpatioTemporalResBlock as SVD's VAE uses it.

  spatial_res_block (eps 1e-6) per frame, temporal_res_block (eps 1e-5)
  over frames, mixed by time_mixer (learned, switched). No time embedding.

  Attributes:
    out_channels: output channels.
    num_frames: frames per video F.
    groups: GroupNorm groups.
    dtype: compute dtype.
  """

  out_channels: int
  num_frames: int
  groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B * F, H, W, C_in] -> [B * F, H, W, out_channels]."""
    h = ResnetBlock2D(self.out_channels, self.groups, 1e-6, self.dtype,
                      name='spatial_res_block')(x)
    bf, hh, ww, c = h.shape
    h5 = h.reshape(bf // self.num_frames, self.num_frames, hh, ww, c)
    t5 = TemporalResnetBlock(self.out_channels, self.groups, 1e-5, self.dtype,
                             name='temporal_res_block')(h5)
    out = AlphaBlender(0.0, 'learned', True, name='time_mixer')(h5, t5)
    return out.reshape(bf, hh, ww, c)


class VAEAttention(nn.Module):
  """diffusers' Attention as the VAE mid blocks build it (AttnProcessor2_0).

  group_norm, to_q / to_k / to_v over the H*W tokens, `to_out_0`, plus the
  input (residual_connection, rescale 1). SD's VAE has one head of all
  channels.

  Attributes:
    heads: attention heads (channels // attention_head_dim).
    groups: GroupNorm groups.
    eps: GroupNorm epsilon.
    attention: implementation for attention.dot_product_attention.
    dtype: compute dtype.
  """

  heads: int = 1
  groups: int = 32
  eps: float = 1e-6
  attention: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[N, H, W, C] -> [N, H, W, C]."""
    n, hh, ww, c = x.shape
    head_dim = c // self.heads
    h = _norm(self.groups, self.eps, 'group_norm')(x).astype(self.dtype)
    h = h.reshape(n, hh * ww, c)

    def proj(name):
      y = nn.Dense(c, dtype=self.dtype, name=name)(h)
      return y.reshape(n, hh * ww, self.heads, head_dim)

    q = proj('to_q') * jnp.asarray(head_dim ** -0.5, self.dtype)
    out = attention_lib.dot_product_attention(
        q, proj('to_k'), proj('to_v'), implementation=self.attention)
    out = nn.Dense(c, dtype=self.dtype, name='to_out_0')(
        out.reshape(n, hh * ww, c))
    return out.reshape(n, hh, ww, c) + x.astype(out.dtype)


class Downsample2D(nn.Module):
  """diffusers models/downsampling.py Downsample2D(use_conv, padding=0).

  Pads (0, 1, 0, 1) (right and bottom), then a VALID stride-2 3x3 `conv`.
  """

  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[N, H, W, C] -> [N, H/2, W/2, channels] (H, W even)."""
    return _conv(self.channels, 3, self.dtype, 'conv', strides=2,
                 padding=((0, 1), (0, 1)))(x)


class Upsample2D(nn.Module):
  """diffusers models/upsampling.py Upsample2D(use_conv): nearest x2, conv."""

  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[N, H, W, C] -> [N, 2H, 2W, channels]."""
    x = jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)
    return _conv(self.channels, 3, self.dtype, 'conv')(x)


class DownEncoderBlock2D(nn.Module):
  """diffusers unet_2d_blocks.py DownEncoderBlock2D: resnets, downsampler.

  Attributes:
    out_channels: output channels.
    num_layers: ResnetBlock2D's.
    add_downsample: a Downsample2D at the end (`downsamplers_0`).
    groups: GroupNorm groups.
    dtype: compute dtype.
  """

  out_channels: int
  num_layers: int
  add_downsample: bool
  groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[N, H, W, C] -> [N, H/2, W/2, out_channels] (or H, W unchanged)."""
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, 1e-6, self.dtype,
                        name=f'resnets_{j}')(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, self.dtype,
                       name='downsamplers_0')(x)
    return x


class UpDecoderBlock2D(nn.Module):
  """diffusers unet_2d_blocks.py UpDecoderBlock2D: resnets, upsampler.

  Attributes:
    out_channels: output channels.
    num_layers: ResnetBlock2D's.
    add_upsample: an Upsample2D at the end (`upsamplers_0`).
    groups: GroupNorm groups.
    dtype: compute dtype.
  """

  out_channels: int
  num_layers: int
  add_upsample: bool
  groups: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[N, H, W, C] -> [N, 2H, 2W, out_channels] (or H, W unchanged)."""
    for j in range(self.num_layers):
      x = ResnetBlock2D(self.out_channels, self.groups, 1e-6, self.dtype,
                        name=f'resnets_{j}')(x)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, self.dtype, name='upsamplers_0')(x)
    return x


class MidBlock2D(nn.Module):
  """diffusers UNetMidBlock2D of the VAE: resnets_0, attentions_0, resnets_1.

  Attributes:
    groups: GroupNorm groups.
    add_attention: whether attentions_0 exists (mid_block_add_attention).
    attention: attention implementation.
    dtype: compute dtype.
  """

  groups: int = 32
  add_attention: bool = True
  attention: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[N, h, w, C] -> [N, h, w, C]."""
    c = x.shape[-1]
    x = ResnetBlock2D(c, self.groups, 1e-6, self.dtype, name='resnets_0')(x)
    if self.add_attention:
      x = VAEAttention(1, self.groups, 1e-6, self.attention, self.dtype,
                       name='attentions_0')(x)
    return ResnetBlock2D(c, self.groups, 1e-6, self.dtype, name='resnets_1')(x)


class Encoder(nn.Module):
  """diffusers models/autoencoders/vae.py Encoder (DownEncoderBlock2D's).

  conv_in; per level `layers_per_block` ResnetBlock2D's and, except on the
  last level, a stride-2 3x3 conv padded (0, 1, 0, 1) (Downsample2D with
  padding 0); mid_block (resnet, attention, resnet); conv_norm_out, SiLU,
  conv_out to 2 * latent_channels moments.

  Attributes:
    block_out_channels: channels per level.
    layers_per_block: res blocks per level.
    latent_channels: latent channels (the output has twice as many).
    norm_num_groups: GroupNorm groups.
    mid_block_add_attention: the attention of the mid block.
    attention: attention implementation.
    dtype: compute dtype.
  """

  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  norm_num_groups: int = 32
  mid_block_add_attention: bool = True
  attention: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[N, H, W, in_channels] -> [N, H/f, W/f, 2 * latent_channels]."""
    g, dt = self.norm_num_groups, self.dtype
    h = _conv(self.block_out_channels[0], 3, dt, 'conv_in')(x.astype(dt))
    last = len(self.block_out_channels) - 1
    for i, ch in enumerate(self.block_out_channels):
      h = DownEncoderBlock2D(ch, self.layers_per_block, i < last, g, dt,
                             name=f'down_blocks_{i}')(h)
    h = MidBlock2D(g, self.mid_block_add_attention, self.attention, dt,
                   name='mid_block')(h)
    h = nn.silu(_norm(g, 1e-6, 'conv_norm_out')(h)).astype(dt)
    return _conv(2 * self.latent_channels, 3, dt, 'conv_out')(h)


class Decoder(nn.Module):
  """diffusers models/autoencoders/vae.py Decoder (UpDecoderBlock2D's).

  conv_in; mid_block; per level, from the deepest, `layers_per_block + 1`
  ResnetBlock2D's and, except on the last level, nearest x2 and a 3x3 conv;
  conv_norm_out, SiLU, conv_out.

  Attributes:
    block_out_channels: channels per level (encoder order).
    layers_per_block: the encoder's res blocks per level.
    out_channels: output channels.
    norm_num_groups: GroupNorm groups.
    mid_block_add_attention: the attention of the mid block.
    attention: attention implementation.
    dtype: compute dtype.
  """

  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int = 3
  norm_num_groups: int = 32
  mid_block_add_attention: bool = True
  attention: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: Array) -> Array:
    """[N, h, w, latent_channels] -> [N, h*f, w*f, out_channels]."""
    g, dt = self.norm_num_groups, self.dtype
    chans = list(reversed(self.block_out_channels))
    h = _conv(chans[0], 3, dt, 'conv_in')(z.astype(dt))
    h = MidBlock2D(g, self.mid_block_add_attention, self.attention, dt,
                   name='mid_block')(h)
    for i, ch in enumerate(chans):
      h = UpDecoderBlock2D(ch, self.layers_per_block + 1, i < len(chans) - 1,
                           g, dt, name=f'up_blocks_{i}')(h)
    h = nn.silu(_norm(g, 1e-6, 'conv_norm_out')(h)).astype(dt)
    return _conv(self.out_channels, 3, dt, 'conv_out')(h)


class AutoencoderKL(nn.Module):
  """diffusers models/autoencoders/autoencoder_kl.py AutoencoderKL (SD's VAE).

  `encode` gives the latent distribution's (mean, logvar); `decode` maps
  unscaled latents back to pixels; `__call__` (encode, mode, decode) is
  diffusers' forward with sample_posterior=False and initialises every
  parameter.

  Attributes:
    block_out_channels: channels per level; the latents are downsampled by
      2 ** (len - 1).
    layers_per_block: encoder res blocks per level (decoder: one more).
    latent_channels: latent channels.
    in_channels: image channels in.
    out_channels: image channels out.
    norm_num_groups: GroupNorm groups.
    use_quant_conv: the 1x1 conv on the moments.
    use_post_quant_conv: the 1x1 conv on the latents before decoding.
    mid_block_add_attention: attention in both mid blocks.
    scaling_factor: the latents' scale for the diffusion model (the codec's).
    shift_factor: the latents' shift, or None (the codec's).
    latents_mean: per-channel latent means some configs carry, or None
      (metadata for the codec; SD's pipelines do not use them).
    latents_std: per-channel latent stds, likewise.
    attention: attention implementation (models/attention.py).
    dtype: compute dtype, 'float32' or 'bfloat16'.
  """

  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  in_channels: int = 3
  out_channels: int = 3
  norm_num_groups: int = 32
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  scaling_factor: float = 0.18215
  shift_factor: Optional[float] = None
  latents_mean: Optional[tuple[float, ...]] = None
  latents_std: Optional[tuple[float, ...]] = None
  attention: str = 'auto'
  dtype: str = 'float32'

  def setup(self):
    dt = _check_dtype(self.dtype)
    attention_lib.check_implementation(self.attention)
    self.encoder = Encoder(
        self.block_out_channels, self.layers_per_block, self.latent_channels,
        self.norm_num_groups, self.mid_block_add_attention, self.attention,
        dt)
    self.decoder = Decoder(
        self.block_out_channels, self.layers_per_block, self.out_channels,
        self.norm_num_groups, self.mid_block_add_attention, self.attention,
        dt)
    c = 2 * self.latent_channels
    if self.use_quant_conv:
      self.quant_conv = _conv(c, 1, dt, None)
    if self.use_post_quant_conv:
      self.post_quant_conv = _conv(self.latent_channels, 1, dt, None)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def encode(self, x: Array) -> tuple[Array, Array]:
    """Encodes frames to their latent distribution.

    Args:
      x: [N, H, W, in_channels] frames in [-1, 1]; H, W multiples of
        downsample_factor.

    Returns:
      (mean, logvar), each float32 [N, H/f, W/f, latent_channels]; logvar
      clipped to LOGVAR_RANGE. DiagonalGaussian(mean, logvar) samples it.
    """
    moments = self.encoder(x)
    if self.use_quant_conv:
      moments = self.quant_conv(moments)
    return moments_to_gaussian(moments)

  def decode(self, z: Array) -> Array:
    """Decodes unscaled latents [N, h, w, latent_channels] to float32 pixels.

    Returns:
      [N, h*f, w*f, out_channels], nominally in [-1, 1] (not clipped).
    """
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z.astype(_check_dtype(self.dtype)))
    return self.decoder(z).astype(jnp.float32)

  def __call__(self, x: Array) -> Array:
    """Reconstruction through the posterior mode: [N, H, W, C] -> same."""
    mean, _ = self.encode(x)
    return self.decode(mean)


class MidBlockTemporalDecoder(nn.Module):
  """diffusers unet_3d_blocks.py MidBlockTemporalDecoder.

  `num_layers` SpatioTemporalResBlocks and one attention, run as diffusers
  does: resnets_0, then zip(resnets[1:], attentions), i.e. attentions_0 and
  resnets_1 only. Any other resnets (num_layers > 2), and the attention when
  num_layers is 1, hold parameters that the output never uses (they are
  built so that every tensor of a state dict has its place; jit drops them).

  Attributes:
    num_layers: SpatioTemporalResBlocks (the VAE's layers_per_block).
    num_frames: frames per video F.
    attention: attention implementation.
    dtype: compute dtype.
  """

  num_layers: int
  num_frames: int
  attention: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B * F, h, w, C] -> [B * F, h, w, C]."""
    c = x.shape[-1]
    resnets = [SpatioTemporalResBlock(c, self.num_frames, 32, self.dtype,
                                      name=f'resnets_{j}')
               for j in range(self.num_layers)]
    attn = VAEAttention(1, 32, 1e-6, self.attention, self.dtype,
                        name='attentions_0')
    h = resnets[0](x)
    if self.num_layers > 1:
      h = resnets[1](attn(h))
    elif self.is_initializing():
      attn(h)
    if self.is_initializing():
      for resnet in resnets[2:]:
        resnet(h)
    return h


class UpBlockTemporalDecoder(nn.Module):
  """diffusers unet_3d_blocks.py UpBlockTemporalDecoder: resnets, upsampler.

  Attributes:
    out_channels: output channels.
    num_layers: SpatioTemporalResBlocks.
    num_frames: frames per video F.
    add_upsample: an Upsample2D at the end (`upsamplers_0`).
    dtype: compute dtype.
  """

  out_channels: int
  num_layers: int
  num_frames: int
  add_upsample: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B * F, H, W, C] -> [B * F, 2H, 2W, out_channels] (or H, W kept)."""
    for j in range(self.num_layers):
      x = SpatioTemporalResBlock(self.out_channels, self.num_frames, 32,
                                 self.dtype, name=f'resnets_{j}')(x)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, self.dtype, name='upsamplers_0')(x)
    return x


class TemporalDecoder(nn.Module):
  """diffusers autoencoder_kl_temporal_decoder.py TemporalDecoder.

  conv_in; mid_block (resnets_0, attentions_0, resnets_1; diffusers builds
  `layers_per_block` resnets but runs only the first two); per level
  `layers_per_block + 1` SpatioTemporalResBlocks and, except on the last,
  nearest x2 and a 3x3 conv; conv_norm_out, SiLU, conv_out, then
  time_conv_out, a (3, 1, 1) Conv3d over frames. GroupNorms have 32 groups.

  Attributes:
    block_out_channels: channels per level (encoder order).
    layers_per_block: the encoder's res blocks per level.
    out_channels: output channels.
    attention: attention implementation.
    dtype: compute dtype.
  """

  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int = 3
  attention: str = 'auto'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: Array, num_frames: int) -> Array:
    """[B * F, h, w, latent] -> [B * F, h*f, w*f, out_channels], F frames."""
    dt, f = self.dtype, num_frames
    chans = list(reversed(self.block_out_channels))
    h = _conv(chans[0], 3, dt, 'conv_in')(z.astype(dt))

    h = MidBlockTemporalDecoder(self.layers_per_block, f, self.attention,
                                dt, name='mid_block')(h)
    for i, ch in enumerate(chans):
      h = UpBlockTemporalDecoder(ch, self.layers_per_block + 1, f,
                                 i < len(chans) - 1, dt,
                                 name=f'up_blocks_{i}')(h)
    h = nn.silu(_norm(32, 1e-6, 'conv_norm_out')(h)).astype(dt)
    h = _conv(self.out_channels, 3, dt, 'conv_out')(h)
    bf, hh, ww, c = h.shape
    h = nn.Conv(c, (3, 1, 1), padding=((1, 1), (0, 0), (0, 0)), dtype=dt,
                name='time_conv_out')(h.reshape(bf // f, f, hh, ww, c))
    return h.reshape(bf, hh, ww, c)


class AutoencoderKLTemporalDecoder(nn.Module):
  """diffusers AutoencoderKLTemporalDecoder (SVD's VAE).

  SD's encoder with quant_conv; a temporal decoder without post_quant_conv.
  `__call__` (encode, mode, decode) initialises every parameter.

  Attributes:
    block_out_channels: channels per level (multiples of 32).
    layers_per_block: encoder res blocks per level (decoder: one more).
    latent_channels: latent channels.
    in_channels: image channels in.
    out_channels: image channels out.
    scaling_factor: the latents' scale for the diffusion model (the codec's).
    attention: attention implementation (models/attention.py).
    dtype: compute dtype, 'float32' or 'bfloat16'.
  """

  block_out_channels: Sequence[int] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  in_channels: int = 3
  out_channels: int = 3
  scaling_factor: float = 0.18215
  attention: str = 'auto'
  dtype: str = 'float32'

  # The latent codec reads these alike for both autoencoders.
  shift_factor = None

  def setup(self):
    dt = _check_dtype(self.dtype)
    attention_lib.check_implementation(self.attention)
    self.encoder = Encoder(
        self.block_out_channels, self.layers_per_block, self.latent_channels,
        32, True, self.attention, dt)
    self.quant_conv = _conv(2 * self.latent_channels, 1, dt, None)
    self.decoder = TemporalDecoder(
        self.block_out_channels, self.layers_per_block, self.out_channels,
        self.attention, dt)

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.block_out_channels) - 1)

  def encode(self, x: Array) -> tuple[Array, Array]:
    """As AutoencoderKL.encode: frames [N, H, W, C] -> (mean, logvar)."""
    return moments_to_gaussian(self.quant_conv(self.encoder(x)))

  def decode(self, z: Array, num_frames: int) -> Array:
    """Decodes unscaled latents of whole videos to float32 pixels.

    Args:
      z: [B * F, h, w, latent_channels], the F frames of each video
        consecutive (diffusers' stacking); N must be a multiple of F.
      num_frames: F (static).

    Returns:
      [B * F, h*f, w*f, out_channels], nominally in [-1, 1].
    """
    if z.shape[0] % num_frames:
      raise ValueError(f'{z.shape[0]} latent frames are not a whole number '
                       f'of videos of num_frames={num_frames}.')
    return self.decoder(z, num_frames).astype(jnp.float32)

  def __call__(self, x: Array, num_frames: int = 1) -> Array:
    """Reconstruction through the posterior mode: [B * F, H, W, C] -> same."""
    mean, _ = self.encode(x)
    return self.decode(mean, num_frames)
