"""Stable Video Diffusion's UNet (UNetSpatioTemporalConditionModel) in Flax.

The video denoiser of Blattmann et al. 2023 ("Stable Video Diffusion:
Scaling Latent Video Diffusion Models to Large Datasets", Sec. 3 and App.
D) as huggingface/diffusers writes it (src/diffusers/models/unets/
unet_spatio_temporal_condition.py, unet_3d_blocks.py, resnet.py,
transformers/transformer_temporal.py, attention.py): SD's UNet layout
(sd_unet.py) in which every res block is a SpatioTemporalResBlock (a
per-frame ResnetBlock2D and a (3, 1, 1) temporal res block mixed by a
learned AlphaBlender) and every transformer a TransformerSpatioTemporalModel
(per frame: a BasicTransformerBlock over pixels; per pixel: a
TemporalBasicTransformerBlock over frames with a frame-index embedding;
mixed by another AlphaBlender). The time embedding adds the "added time
ids" (fps - 1, motion bucket, noise augmentation level) through
add_time_proj / add_embedding.

Submodules are named as diffusers names the PyTorch modules, with `.N`
written `_N`, so pretrained/svd.py loads a diffusers folder by
pretrained/convert.py's generic rule. Layers are reused from sd_blocks.py
(ResnetBlock2D, BasicTransformerBlock, Attention, FeedForward, ...) and
autoencoder.py (TemporalResnetBlock, AlphaBlender).

Generative Inbetweening (Wang et al. 2024, Sec. 3.2) controls the first
temporal self-attention of each spatio-temporal transformer
(`temporal_transformer_blocks_0/attn1`): applied with mutable=[CAPTURE] the
model returns its probabilities [B, H*W, heads, F(query), F(key)] under
each module path; given {INJECT: such a tree} it uses them instead of its
own (collections of models/layers.py, as the library's own UNet3D).

Layout: x [B, F, H, W, C] (channels last).
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm_jax.models import attention as attention_lib
from vdm_jax.models import layers
from vdm_jax.models import sd_blocks
from vdm_jax.models.autoencoder import AlphaBlender
from vdm_jax.models.autoencoder import TemporalResnetBlock
from vdm_jax.models.sd_blocks import BasicTransformerBlock
from vdm_jax.models.sd_blocks import conv
from vdm_jax.models.sd_blocks import Downsample2D
from vdm_jax.models.sd_blocks import FeedForward
from vdm_jax.models.sd_blocks import GroupNorm
from vdm_jax.models.sd_blocks import ResnetBlock2D
from vdm_jax.models.sd_blocks import TimestepEmbedding
from vdm_jax.models.sd_blocks import Upsample2D

Array = jax.Array
Dtype = Any

DTYPES = ('float32', 'bfloat16')
REMAT = ('none', 'block', 'full', 'dots_saveable')
DOWN_BLOCK_TYPES = ('CrossAttnDownBlockSpatioTemporal',
                    'DownBlockSpatioTemporal')
UP_BLOCK_TYPES = ('CrossAttnUpBlockSpatioTemporal', 'UpBlockSpatioTemporal')
# diffusers hard-codes 32 groups in every norm of this model.
GROUPS = 32
# The module path suffix of the controlled attention (Gen-Inb's
# `temporal_transformer_blocks.0.attn1`).
CONTROLLED = ('temporal_transformer_blocks_0', 'attn1')
# The merge of every AlphaBlender of the UNet (diffusers' defaults).
MERGE_FACTOR, MERGE_STRATEGY = 0.5, 'learned_with_images'


class SpatioTemporalResBlock(nn.Module):
  """diffusers `models/resnet.py` SpatioTemporalResBlock with a time emb.

  spatial_res_block (ResnetBlock2D per frame), temporal_res_block over
  frames (same eps), mixed by time_mixer: alpha x_spatial + (1 - alpha)
  x_temporal, alpha = sigmoid(mix_factor) (1 on image-only frames).

  Attributes:
    out_channels: output channels.
    num_frames: F, to unfold [B * F] into [B, F].
    eps: both res blocks' GroupNorm epsilon.
    dtype: compute dtype.
  """

  out_channels: int
  num_frames: int
  eps: float = 1e-6
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array, indicator: Array) -> Array:
    """x [B*F, H, W, Cin], temb [B*F, E], indicator [B, F] -> [B*F, H, W,
    out_channels]."""
    h = ResnetBlock2D(self.out_channels, GROUPS, self.eps, dtype=self.dtype,
                      name='spatial_res_block')(x, temb)
    bf, hh, ww, c = h.shape
    f = self.num_frames
    h5 = h.reshape(bf // f, f, hh, ww, c)
    t5 = TemporalResnetBlock(self.out_channels, GROUPS, self.eps, self.dtype,
                             name='temporal_res_block')(
                                 h5, temb.reshape(bf // f, f, -1))
    out = AlphaBlender(MERGE_FACTOR, MERGE_STRATEGY, name='time_mixer')(
        h5, t5, indicator)
    return out.reshape(bf, hh, ww, c)


class ControlledAttention(nn.Module):
  """Temporal self-attention whose probabilities can be captured/injected.

  diffusers' Attention (to_q, to_k, to_v without bias, to_out_0) over the
  frames of every pixel, computed by the einsum of models/attention.py so
  that its softmax probabilities exist: stored in the CAPTURE collection
  when it is mutable, replaced by the INJECT collection's when given
  (Generative Inbetweening, Sec. 3.2).

  Attributes:
    heads: attention heads.
    dim_head: channels per head.
    dtype: compute dtype.
  """

  heads: int
  dim_head: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x [B, S, F, C] (S pixels of F frames) -> [B, S, F, C]."""
    b, s, f, c = x.shape
    inner = self.heads * self.dim_head

    def proj(name):  # [B, S, F, C] -> [B, S, F, heads, dim_head]
      y = nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)(x)
      return y.reshape((b, s, f, self.heads, self.dim_head))

    q = proj('to_q') * (self.dim_head**-0.5)
    k, v = proj('to_k'), proj('to_v')
    spec = ('bsqhd', 'bskhd', 'bshqk')
    if self.has_variable(layers.INJECT, layers.PROBS):
      weights = self.get_variable(layers.INJECT, layers.PROBS)
      want = (b, s, self.heads, f, f)
      if weights.shape != want:
        raise ValueError(f'Injected attention probabilities at {self.path} '
                         f'are {weights.shape}; this layer needs {want}.')
    else:
      weights = attention_lib.attention_weights(q, k, spec, None, None)
    if self.is_mutable_collection(layers.CAPTURE):
      self.put_variable(layers.CAPTURE, layers.PROBS, weights)
    o = attention_lib.einsum_attention(q, k, v, spec, None, None, weights)
    return nn.Dense(c, dtype=self.dtype, name='to_out_0')(
        o.reshape((b, s, f, inner)))


class TemporalBasicTransformerBlock(nn.Module):
  """diffusers `models/attention.py` TemporalBasicTransformerBlock.

  Over the frames of each pixel: x + ff_in(norm_in(x)), + attn1(norm1)
  (self-attention over frames; `ControlledAttention` when `controlled`),
  + attn2(norm2, context), + ff(norm3). dim == time_mix_inner_dim as SVD
  builds it (residual ff_in).

  Attributes:
    heads: attention heads.
    dim_head: channels per head.
    controlled: attn1 can be captured / injected.
    attention: the dispatch implementation of attn2.
    dtype: compute dtype.
  """

  heads: int
  dim_head: int
  controlled: bool = False
  attention: str = 'auto'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array) -> Array:
    """x [B, S, F, C], context [B, L, D] -> [B, S, F, C]."""
    b, s, f, c = x.shape
    ln = lambda name: sd_blocks._layer_norm(self.dtype, name)  # pylint: disable=protected-access
    x = x + FeedForward(dtype=self.dtype, name='ff_in')(ln('norm_in')(x))
    h = ln('norm1')(x)
    if self.controlled:
      h = ControlledAttention(self.heads, self.dim_head, self.dtype,
                              name='attn1')(h)
    else:
      h = sd_blocks.Attention(self.heads, self.dim_head, self.attention,
                              self.dtype, name='attn1')(
                                  h.reshape(b * s, f, c)).reshape(x.shape)
    x = x + h
    # Every pixel of a video attends to its video's context.
    h = ln('norm2')(x).reshape(b, s * f, c)
    h = sd_blocks.Attention(self.heads, self.dim_head, self.attention,
                            self.dtype, name='attn2')(h, context)
    x = x + h.reshape(x.shape)
    return x + FeedForward(dtype=self.dtype, name='ff')(ln('norm3')(x))


class TransformerSpatioTemporal(nn.Module):
  """diffusers TransformerSpatioTemporalModel.

  GroupNorm (eps 1e-6), proj_in; per layer: a BasicTransformerBlock over
  each frame's pixels (cross-attending to its video's context), a
  TemporalBasicTransformerBlock over each pixel's frames (its input plus
  time_pos_embed of the frame index), mixed by time_mixer; proj_out, plus
  the input.

  Attributes:
    heads: attention heads (inner width heads * dim_head).
    dim_head: channels per head.
    num_frames: F.
    num_layers: spatial / temporal block pairs.
    attention: the dispatch implementation (spatial and cross-attention).
    remat_blocks: rematerialise each block.
    dtype: compute dtype.
  """

  heads: int
  dim_head: int
  num_frames: int
  num_layers: int = 1
  attention: str = 'auto'
  remat_blocks: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array, indicator: Array) -> Array:
    """x [B*F, H, W, C], context [B, L, D], indicator [B, F] -> [B*F, H, W,
    C]."""
    bf, hgt, wid, c = x.shape
    f = self.num_frames
    b = bf // f
    inner = self.heads * self.dim_head
    h = GroupNorm(GROUPS, sd_blocks.TRANSFORMER_GROUPNORM_EPS, self.dtype,
                  name='norm')(x)
    h = nn.Dense(inner, dtype=self.dtype, name='proj_in')(
        h.reshape(bf, hgt * wid, c))
    frames = sd_blocks.timestep_embedding(jnp.arange(f, dtype=jnp.float32),
                                          c, True, 0.0)
    emb = TimestepEmbedding(4 * c, self.dtype, out_dim=c,
                            name='time_pos_embed')(frames.astype(self.dtype))
    context_frames = jnp.repeat(context, f, axis=0)
    spatial = (nn.remat(BasicTransformerBlock) if self.remat_blocks
               else BasicTransformerBlock)
    temporal = (nn.remat(TemporalBasicTransformerBlock) if self.remat_blocks
                else TemporalBasicTransformerBlock)
    mixer = AlphaBlender(MERGE_FACTOR, MERGE_STRATEGY, name='time_mixer')
    for i in range(self.num_layers):
      h = spatial(self.heads, self.dim_head, attention=self.attention,
                  dtype=self.dtype, name=f'transformer_blocks_{i}')(
                      h, context_frames)
      # [B*F, S, C] -> [B, S, F, C], plus the frame embedding.
      hm = h.reshape(b, f, hgt * wid, inner) + emb[None, :, None, :]
      hm = temporal(self.heads, self.dim_head, i == 0, self.attention,
                    self.dtype, name=f'temporal_transformer_blocks_{i}')(
                        hm.transpose(0, 2, 1, 3), context)
      hm = hm.transpose(0, 2, 1, 3)
      h = mixer(h.reshape(b, f, hgt * wid, 1, inner), hm[:, :, :, None],
                indicator).reshape(bf, hgt * wid, inner)
    h = nn.Dense(c, dtype=self.dtype, name='proj_out')(h)
    return h.reshape(bf, hgt, wid, c) + x.astype(self.dtype)


class DownBlockSpatioTemporal(nn.Module):
  """diffusers DownBlockSpatioTemporal / CrossAttnDownBlockSpatioTemporal.

  num_layers SpatioTemporalResBlocks (each followed by a
  TransformerSpatioTemporal named attentions_i when `heads`), then
  Downsample2D (padding 1); every output is a skip.

  Attributes:
    out_channels: channels.
    num_frames: F.
    num_layers: res blocks.
    add_downsample: end with a stride-2 conv.
    heads: transformer heads, or 0 for the plain block.
    transformer_layers: layers per transformer.
    eps: the res blocks' epsilon (diffusers: 1e-6 with attention, 1e-5
      without).
    attention: the dispatch implementation.
    remat_blocks: rematerialise each res block and transformer block.
    dtype: compute dtype.
  """

  out_channels: int
  num_frames: int
  num_layers: int = 2
  add_downsample: bool = True
  heads: int = 0
  transformer_layers: int = 1
  eps: float = 1e-5
  attention: str = 'auto'
  remat_blocks: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array, context: Array, indicator: Array
               ) -> tuple[Array, tuple[Array, ...]]:
    """x [B*F, H, W, Cin] -> ([B*F, H', W', out_channels], skips)."""
    res = (nn.remat(SpatioTemporalResBlock) if self.remat_blocks
           else SpatioTemporalResBlock)
    skips = []
    for i in range(self.num_layers):
      x = res(self.out_channels, self.num_frames, self.eps, self.dtype,
              name=f'resnets_{i}')(x, temb, indicator)
      if self.heads:
        x = TransformerSpatioTemporal(
            self.heads, self.out_channels // self.heads, self.num_frames,
            self.transformer_layers, self.attention, self.remat_blocks,
            self.dtype, name=f'attentions_{i}')(x, context, indicator)
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, 1, self.dtype,
                       name='downsamplers_0')(x)
      skips.append(x)
    return x, tuple(skips)


class UpBlockSpatioTemporal(nn.Module):
  """diffusers UpBlockSpatioTemporal / CrossAttnUpBlockSpatioTemporal.

  num_layers SpatioTemporalResBlocks on [h, skip] (skips from the end),
  each followed by a transformer when `heads`, then Upsample2D to
  `upsample_size` (None: 2x).

  Attributes: as DownBlockSpatioTemporal (eps 1e-6 in both up blocks), with
    add_upsample and upsample_size.
  """

  out_channels: int
  num_frames: int
  num_layers: int = 3
  add_upsample: bool = True
  heads: int = 0
  transformer_layers: int = 1
  eps: float = 1e-6
  attention: str = 'auto'
  remat_blocks: bool = False
  upsample_size: Optional[tuple[int, int]] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, skips: Sequence[Array], temb: Array,
               context: Array, indicator: Array) -> Array:
    """x [B*F, H, W, C], this level's skips -> [B*F, H', W', out]."""
    res = (nn.remat(SpatioTemporalResBlock) if self.remat_blocks
           else SpatioTemporalResBlock)
    skips = list(skips)
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
      x = res(self.out_channels, self.num_frames, self.eps, self.dtype,
              name=f'resnets_{i}')(x, temb, indicator)
      if self.heads:
        x = TransformerSpatioTemporal(
            self.heads, self.out_channels // self.heads, self.num_frames,
            self.transformer_layers, self.attention, self.remat_blocks,
            self.dtype, name=f'attentions_{i}')(x, context, indicator)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, self.dtype, name='upsamplers_0')(
          x, self.upsample_size)
    return x


class UNetMidBlockSpatioTemporal(nn.Module):
  """diffusers UNetMidBlockSpatioTemporal: resnets_0, attentions_0,
  resnets_1 (eps 1e-5)."""

  num_frames: int
  heads: int
  transformer_layers: int = 1
  attention: str = 'auto'
  remat_blocks: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array, context: Array, indicator: Array
               ) -> Array:
    """x [B*F, H, W, C] -> [B*F, H, W, C]."""
    res = (nn.remat(SpatioTemporalResBlock) if self.remat_blocks
           else SpatioTemporalResBlock)
    c = x.shape[-1]
    x = res(c, self.num_frames, 1e-5, self.dtype, name='resnets_0')(
        x, temb, indicator)
    x = TransformerSpatioTemporal(
        self.heads, c // self.heads, self.num_frames, self.transformer_layers,
        self.attention, self.remat_blocks, self.dtype,
        name='attentions_0')(x, context, indicator)
    return res(c, self.num_frames, 1e-5, self.dtype, name='resnets_1')(
        x, temb, indicator)


class UNetSpatioTemporalConditionModel(nn.Module):
  """diffusers' UNetSpatioTemporalConditionModel (SVD) in Flax.

  pretrained/svd.module_kwargs turns a config.json into these fields.

  Attributes:
    sample_size: the latent size of the training data (information; SVD:
      96 = 768 px); any size runs.
    in_channels: input channels (SVD: 4 noisy + 4 image latent channels).
    out_channels: output channels.
    block_out_channels: channels per level (multiples of 32).
    down_block_types: per level, one of DOWN_BLOCK_TYPES.
    up_block_types: per level (deepest first), one of UP_BLOCK_TYPES.
    layers_per_block: res blocks per down block (up blocks have one more).
    transformer_layers_per_block: layers per transformer, per level.
    num_attention_heads: heads per level (head width channels // heads).
    cross_attention_dim: the context's width (the image embedding's).
    addition_time_embed_dim: sinusoidal width of each added time id.
    projection_class_embeddings_input_dim: add_embedding's input width
      (addition_time_embed_dim x the number of ids, 3).
    num_frames: the frame count it was trained at (information; any F runs).
    attention: the attention dispatch implementation.
    dtype: compute dtype, 'float32' or 'bfloat16' (parameters float32).
    remat: 'none'; 'block' (each res block and transformer block); 'full'
      (also each level); 'dots_saveable' (one checkpoint keeping matmul
      and conv outputs).
  """

  sample_size: Optional[int] = 96
  in_channels: int = 8
  out_channels: int = 4
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  down_block_types: Sequence[str] = (
      ('CrossAttnDownBlockSpatioTemporal',) * 3 + ('DownBlockSpatioTemporal',))
  up_block_types: Sequence[str] = (
      ('UpBlockSpatioTemporal',) + ('CrossAttnUpBlockSpatioTemporal',) * 3)
  layers_per_block: Sequence[int] = (2, 2, 2, 2)
  transformer_layers_per_block: Sequence[int] = (1, 1, 1, 1)
  num_attention_heads: Sequence[int] = (5, 10, 20, 20)
  cross_attention_dim: int = 1024
  addition_time_embed_dim: int = 256
  projection_class_embeddings_input_dim: int = 768
  num_frames: int = 25
  attention: str = 'auto'
  dtype: str = 'float32'
  remat: str = 'none'

  def check(self) -> None:
    """Raises ValueError naming a field the module does not support."""
    n = len(self.block_out_channels)
    for name, (value, ok) in dict(
        dtype=(self.dtype, DTYPES), remat=(self.remat, REMAT),
        attention=(self.attention, attention_lib.IMPLEMENTATIONS)).items():
      if value not in ok:
        raise ValueError(f'svd_unet: {name}={value!r} is not supported; '
                         f'supported: {ok}.')
    for name, ok in (('down_block_types', DOWN_BLOCK_TYPES),
                     ('up_block_types', UP_BLOCK_TYPES)):
      bad = [t for t in getattr(self, name) if t not in ok]
      if bad:
        raise ValueError(f'svd_unet: {name} {bad} not supported; supported: '
                         f'{ok}.')
    for name in ('down_block_types', 'up_block_types', 'layers_per_block',
                 'transformer_layers_per_block', 'num_attention_heads'):
      if len(getattr(self, name)) != n:
        raise ValueError(f'svd_unet: {name} has {len(getattr(self, name))} '
                         f'entries, block_out_channels {n}.')
    bad = [c for c in self.block_out_channels if c % GROUPS]
    if bad:
      raise ValueError(f'svd_unet: block_out_channels {bad} are not '
                       f'multiples of {GROUPS} (its GroupNorm groups).')

  def example_inputs(self, batch: int = 1, num_frames: Optional[int] = None,
                     size: Optional[tuple[int, int]] = None
                     ) -> tuple[Any, ...]:
    """ShapeDtypeStructs (x, timesteps, context, added_time_ids)."""
    f = num_frames or self.num_frames
    h, w = size or (self.sample_size,) * 2
    s = jax.ShapeDtypeStruct
    ids = self.projection_class_embeddings_input_dim // (
        self.addition_time_embed_dim)
    return (s((batch, f, h, w, self.in_channels), jnp.float32),
            s((batch,), jnp.float32),
            s((batch, 1, self.cross_attention_dim), jnp.float32),
            s((batch, ids), jnp.float32))

  @nn.compact
  def __call__(self, x: Array, timesteps: Array, context: Array,
               added_time_ids: Array,
               image_only_indicator: Optional[Array] = None) -> Array:
    """The UNet's raw output (SVD: EDM's F, a v-prediction).

    Args:
      x: [B, F, H, W, in_channels] (EDM's c_in-scaled noisy latents and the
        conditioning image's latents, on channels).
      timesteps: [B] (or scalar) float, EDM's c_noise = ln(sigma) / 4.
      context: [B, L, D] (SVD: the CLIP image embedding, L = 1).
      added_time_ids: [B, n_ids] (SVD: fps - 1, motion bucket id, noise
        augmentation strength).
      image_only_indicator: [B, F], nonzero = an image frame (the
        AlphaBlenders take the spatial path alone); None: zeros, as
        diffusers' forward passes.

    Returns:
      [B, F, H, W, out_channels] float32.
    """
    self.check()
    dtype = jnp.dtype(self.dtype)
    b, f = x.shape[:2]
    c0 = self.block_out_channels[0]
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (b,))
    temb = sd_blocks.timestep_embedding(t, c0, True, 0.0)
    temb = TimestepEmbedding(4 * c0, dtype, name='time_embedding')(
        temb.astype(dtype))
    ids = jnp.asarray(added_time_ids, jnp.float32)
    aug = sd_blocks.timestep_embedding(ids.reshape(-1),
                                       self.addition_time_embed_dim, True,
                                       0.0).reshape(b, -1)
    temb = temb + TimestepEmbedding(4 * c0, dtype, name='add_embedding')(
        aug.astype(dtype))
    temb = jnp.repeat(temb, f, axis=0)
    indicator = (jnp.zeros((b, f), dtype) if image_only_indicator is None
                 else jnp.asarray(image_only_indicator))
    trunk = UNetSpatioTemporalConditionModel._trunk
    if self.remat == 'dots_saveable':
      trunk = nn.remat(trunk, policy=jax.checkpoint_policies.dots_saveable)
    h = trunk(self, x.reshape((b * f,) + x.shape[2:]).astype(dtype), temb,
              jnp.asarray(context).astype(dtype), indicator)
    return h.reshape((b, f) + h.shape[1:]).astype(jnp.float32)

  # Over 60 lines: the network reads top to bottom as diffusers' forward.
  def _trunk(self, x: Array, temb: Array, context: Array, indicator: Array
             ) -> Array:
    """conv_in .. conv_out on [B*F, H, W, C] (compute dtype)."""
    dtype = jnp.dtype(self.dtype)
    n = len(self.block_out_channels)
    f = indicator.shape[1]
    lift = nn.remat if self.remat == 'full' else (lambda c: c)
    common = dict(num_frames=f, attention=self.attention,
                  remat_blocks=self.remat in ('block', 'full'), dtype=dtype)
    h = conv(self.block_out_channels[0], dtype, 'conv_in')(x)
    skips = [h]
    for i, kind in enumerate(self.down_block_types):
      cross = kind == 'CrossAttnDownBlockSpatioTemporal'
      h, outs = lift(DownBlockSpatioTemporal)(
          self.block_out_channels[i], num_layers=self.layers_per_block[i],
          add_downsample=i < n - 1,
          heads=self.num_attention_heads[i] if cross else 0,
          transformer_layers=self.transformer_layers_per_block[i],
          eps=1e-6 if cross else 1e-5, name=f'down_blocks_{i}', **common)(
              h, temb, context, indicator)
      skips += outs

    h = lift(UNetMidBlockSpatioTemporal)(
        heads=self.num_attention_heads[-1],
        transformer_layers=self.transformer_layers_per_block[-1],
        name='mid_block', **common)(h, temb, context, indicator)

    rev = lambda seq: list(reversed(seq))
    for i, kind in enumerate(self.up_block_types):
      layers_ = rev(self.layers_per_block)[i] + 1
      level_skips = tuple(skips[-layers_:])
      del skips[-layers_:]
      final = i == n - 1
      cross = kind == 'CrossAttnUpBlockSpatioTemporal'
      h = lift(UpBlockSpatioTemporal)(
          rev(self.block_out_channels)[i], num_layers=layers_,
          add_upsample=not final,
          heads=rev(self.num_attention_heads)[i] if cross else 0,
          transformer_layers=rev(self.transformer_layers_per_block)[i],
          upsample_size=None if final else tuple(skips[-1].shape[1:3]),
          name=f'up_blocks_{i}', **common)(
              h, level_skips, temb, context, indicator)

    h = nn.silu(GroupNorm(GROUPS, 1e-5, dtype, name='conv_norm_out')(h))
    return conv(self.out_channels, dtype, 'conv_out')(h)


def trainable_inbetween(path: tuple[str, ...]) -> bool:
  """Generative Inbetweening's trainable parameters (their
  train_reverse_motion_with_attnflip.py): the kernels of to_v and to_out_0
  of every controlled attention (`temporal_transformer_blocks.0.attn1`);
  the output bias stays frozen."""
  names = '/'.join(path)
  return ('/'.join(CONTROLLED) + '/' in names and path[-1] == 'kernel'
          and path[-2] in ('to_v', 'to_out_0'))
