"""Stable Diffusion's UNet (diffusers' UNet2DConditionModel family) in Flax.

The denoiser of Latent Diffusion (Rombach et al. 2022), as diffusers writes
it (huggingface/diffusers, src/diffusers/models/unets/
unet_2d_condition.py): a sinusoidal timestep embedding and an MLP; conv_in;
down blocks of ResnetBlock2D (with Transformer2DModel after each in the
cross-attention blocks) and a stride-2 conv; a middle block (resnet,
transformer, resnet); up blocks consuming the skips in reverse, each
upsampled by nearest x2 (or to the skip's size when it is odd) and a conv;
GroupNorm, SiLU, conv_out.

Submodules are named as diffusers names the PyTorch modules, with `.N`
written `_N` (`down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k`),
so that vdm_jax.pretrained.unet2d loads a diffusers folder by the generic
rule of vdm_jax.pretrained.convert. Each block is a module with typed fields
that SVD's UNet and Tune-A-Video's inflation reuse; `timesteps` and
`context` are explicit arguments everywhere. Layout NHWC: x [B, H, W, C].

Numerics as diffusers: exact (erf) GELU in GEGLU; GroupNorm eps norm_eps in
the resnets and conv_norm_out, 1e-6 in the transformers; LayerNorm eps
1e-5; two-pass float32 statistics. 1x1-conv and linear projections
(`use_linear_projection`) are the same per-pixel matmul, so proj_in/proj_out
are Dense layers either way (the loader squeezes [O, I, 1, 1] weights).
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vdm_jax.models import attention as attention_lib

Array = jax.Array
Dtype = Any

DTYPES = ('float32', 'bfloat16')
REMAT = ('none', 'block', 'full', 'dots_saveable')
DOWN_BLOCK_TYPES = ('CrossAttnDownBlock2D', 'DownBlock2D')
UP_BLOCK_TYPES = ('CrossAttnUpBlock2D', 'UpBlock2D')
MID_BLOCK_TYPES = ('UNetMidBlock2DCrossAttn', None)
# diffusers' Transformer2DModel / BasicTransformerBlock defaults.
TRANSFORMER_GROUPNORM_EPS = 1e-6
LAYERNORM_EPS = 1e-5


def timestep_embedding(timesteps: Array, dim: int, flip_sin_to_cos: bool,
                       freq_shift: float, max_period: float = 10000.0
                       ) -> Array:
  """Sinusoidal embedding of (possibly fractional) timesteps.

  diffusers `models/embeddings.py` `get_timestep_embedding`: frequencies
  exp(-ln(max_period) i / (dim/2 - freq_shift)), [sin, cos] (or [cos, sin]
  with flip_sin_to_cos), zero-padded to an odd dim.

  Args:
    timesteps: [B] float timesteps.
    dim: embedding width.
    flip_sin_to_cos: cos first.
    freq_shift: diffusers' downscale_freq_shift.
    max_period: the longest period.

  Returns:
    [B, dim] float32.
  """
  half = dim // 2
  exponent = -np.log(max_period) * jnp.arange(half, dtype=jnp.float32)
  freqs = jnp.exp(exponent / (half - freq_shift))
  args = jnp.asarray(timesteps, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def nearest_resize(x: Array, size: Sequence[int]) -> Array:
  """torch.nn.functional.interpolate(mode='nearest') to `size`, NHWC.

  Output index i reads input floor(i * (in / out)) (float32, clipped), as
  PyTorch's `nearest_idx` (aten/src/ATen/native/UpSample.h); exactly 2x is
  a repeat.

  Args:
    x: [B, H, W, C].
    size: (H', W').

  Returns:
    [B, H', W', C].
  """
  for axis, out in zip((1, 2), size):
    n = x.shape[axis]
    if out == n:
      continue
    if out == 2 * n:
      x = jnp.repeat(x, 2, axis=axis)
      continue
    scale = np.float32(n) / np.float32(out)
    idx = np.minimum(np.floor(np.arange(out, dtype=np.float32) * scale),
                     n - 1).astype(np.int32)
    x = jnp.take(x, idx, axis=axis)
  return x


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm on NHWC: float32 two-pass statistics per group.

  Attributes:
    num_groups: channel groups.
    epsilon: variance offset.
    dtype: output dtype.
  """

  num_groups: int
  epsilon: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [N, ..., C] -> normalised [N, ..., C] of `dtype`."""
    n, c, g = x.shape[0], x.shape[-1], self.num_groups
    scale = self.param('scale', nn.initializers.ones, (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    xg = x.reshape(n, -1, g, c // g).astype(jnp.float32)
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    return (y * scale + bias).astype(self.dtype)


def _layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LAYERNORM_EPS, use_fast_variance=False,
                      dtype=dtype, name=name)


def _conv(features: int, dtype: Dtype, name: str, kernel: int = 3,
          strides: int = 1, padding: Any = None) -> nn.Conv:
  p = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=strides,
                 padding=padding or ((p, p), (p, p)), dtype=dtype, name=name)


class ResnetBlock2D(nn.Module):
  """diffusers `models/resnet.py` ResnetBlock2D, time_embedding_norm default.

  norm1, SiLU, conv1, + time_emb_proj(SiLU(temb)), norm2, SiLU, conv2; the
  input through conv_shortcut (1x1) when the channel count changes; the sum
  divided by output_scale_factor.

  Attributes:
    out_channels: output channels.
    groups: GroupNorm groups.
    eps: GroupNorm epsilon.
    output_scale_factor: divides the residual sum.
    dtype: compute dtype.
  """

  out_channels: int
  groups: int = 32
  eps: float = 1e-5
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array) -> Array:
    """x: [N, H, W, Cin], temb: [N, E] -> [N, H, W, out_channels]."""
    h = nn.silu(GroupNorm(self.groups, self.eps, self.dtype, name='norm1')(x))
    h = _conv(self.out_channels, self.dtype, 'conv1')(h)
    t = nn.Dense(self.out_channels, dtype=self.dtype, name='time_emb_proj')(
        nn.silu(temb.astype(self.dtype)))
    h = h + t[:, None, None, :]
    h = nn.silu(GroupNorm(self.groups, self.eps, self.dtype, name='norm2')(h))
    h = _conv(self.out_channels, self.dtype, 'conv2')(h)
    if x.shape[-1] != self.out_channels:
      x = _conv(self.out_channels, self.dtype, 'conv_shortcut', kernel=1)(x)
    return (x.astype(self.dtype) + h) / self.output_scale_factor


class Downsample2D(nn.Module):
  """diffusers `models/downsampling.py` Downsample2D: a stride-2 3x3 conv.

  Attributes:
    channels: output channels.
    padding: 1 pads one pixel on every side; 0 pads one pixel at the bottom
      and right only, as diffusers does for padding 0.
    dtype: compute dtype.
  """

  channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [N, H, W, C] -> [N, ceil(H/2), ceil(W/2), channels]."""
    pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
    return _conv(self.channels, self.dtype, 'conv', strides=2, padding=pad)(x)


class Upsample2D(nn.Module):
  """diffusers `models/upsampling.py` Upsample2D: nearest resize, 3x3 conv.

  Attributes:
    channels: output channels.
    dtype: compute dtype.
  """

  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array,
               output_size: Optional[Sequence[int]] = None) -> Array:
    """x: [N, H, W, C] -> [N, H', W', channels]; (H', W') = output_size or
    (2H, 2W)."""
    size = output_size or (2 * x.shape[1], 2 * x.shape[2])
    return _conv(self.channels, self.dtype, 'conv')(nearest_resize(x, size))


class Attention(nn.Module):
  """diffusers `models/attention_processor.py` Attention (AttnProcessor2_0).

  to_q, to_k, to_v without bias, to_out_0 with bias; softmax(q k^T /
  sqrt(dim_head)) v through the library's attention dispatch. Every
  implementation accumulates the logits in float32, which is what
  diffusers' `upcast_attention` asks for.

  Attributes:
    heads: attention heads.
    dim_head: channels per head.
    attention: the dispatch implementation (models/attention.py).
    dtype: compute dtype.
  """

  heads: int
  dim_head: int
  attention: str = 'auto'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Optional[Array] = None,
               context_mask: Optional[Array] = None) -> Array:
    """Self-attention (context None) or cross-attention.

    Args:
      x: [B, T, C] queries' tokens.
      context: [B, L, D] keys' and values' tokens, or None (x itself).
      context_mask: [B, L] bool, True = attend, or None.

    Returns:
      [B, T, C].
    """
    inner = self.heads * self.dim_head
    kv = x if context is None else context.astype(self.dtype)
    dense = lambda name, bias=False: nn.Dense(  # pylint: disable=g-long-lambda
        inner, use_bias=bias, dtype=self.dtype, name=name)
    split = lambda t: t.reshape(t.shape[:2] + (self.heads, self.dim_head))
    q = split(dense('to_q')(x)) * (self.dim_head**-0.5)
    k, v = split(dense('to_k')(kv)), split(dense('to_v')(kv))
    mask = None if context_mask is None else context_mask[:, None, None, :]
    o = attention_lib.dot_product_attention(
        q, k, v, mask=mask, implementation=self.attention)
    o = o.reshape(o.shape[:2] + (inner,))
    return nn.Dense(x.shape[-1], dtype=self.dtype, name='to_out_0')(o)


class GEGLU(nn.Module):
  """diffusers `models/activations.py` GEGLU: proj to 2x, a * gelu(b)."""

  inner_dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, T, C] -> [B, T, inner_dim]."""
    h = nn.Dense(2 * self.inner_dim, dtype=self.dtype, name='proj')(x)
    a, gate = jnp.split(h, 2, axis=-1)
    return a * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """diffusers `models/attention.py` FeedForward with GEGLU: net_0, net_2."""

  mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, T, C] -> [B, T, C]."""
    dim = x.shape[-1]
    h = GEGLU(dim * self.mult, self.dtype, name='net_0')(x)
    return nn.Dense(dim, dtype=self.dtype, name='net_2')(h)


class BasicTransformerBlock(nn.Module):
  """diffusers `models/attention.py` BasicTransformerBlock (layer_norm).

  x + attn1(norm1(x)) (self-attention, or cross-attention with
  only_cross_attention); x + attn2(norm2(x), context); x + ff(norm3(x)).

  Attributes:
    heads: attention heads.
    dim_head: channels per head.
    only_cross_attention: attn1 attends to the context too (without its
      mask, as diffusers passes attn1 the UNet's attention_mask only).
    attention: the dispatch implementation.
    dtype: compute dtype.
  """

  heads: int
  dim_head: int
  only_cross_attention: bool = False
  attention: str = 'auto'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array,
               context_mask: Optional[Array] = None) -> Array:
    """x: [B, T, C], context: [B, L, D], context_mask: [B, L] -> [B, T, C]."""
    attn = lambda name: Attention(self.heads, self.dim_head,  # pylint: disable=g-long-lambda
                                  self.attention, self.dtype, name=name)
    h = _layer_norm(self.dtype, 'norm1')(x)
    x = x + attn('attn1')(h, context if self.only_cross_attention else None)
    h = _layer_norm(self.dtype, 'norm2')(x)
    x = x + attn('attn2')(h, context, context_mask)
    h = _layer_norm(self.dtype, 'norm3')(x)
    return x + FeedForward(dtype=self.dtype, name='ff')(h)


class Transformer2D(nn.Module):
  """diffusers `models/transformers/transformer_2d.py` Transformer2DModel.

  GroupNorm (eps 1e-6), proj_in, transformer_blocks_0..num_layers-1 on the
  H*W tokens, proj_out, plus the input.

  Attributes:
    heads: attention heads.
    dim_head: channels per head (inner width heads * dim_head).
    num_layers: transformer blocks.
    groups: GroupNorm groups.
    only_cross_attention: see BasicTransformerBlock.
    attention: the dispatch implementation.
    remat_blocks: rematerialise each transformer block.
    dtype: compute dtype.
  """

  heads: int
  dim_head: int
  num_layers: int = 1
  groups: int = 32
  only_cross_attention: bool = False
  attention: str = 'auto'
  remat_blocks: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array,
               context_mask: Optional[Array] = None) -> Array:
    """x: [N, H, W, C], context: [N, L, D], mask: [N, L] -> [N, H, W, C]."""
    n, hgt, wid, c = x.shape
    h = GroupNorm(self.groups, TRANSFORMER_GROUPNORM_EPS, self.dtype,
                  name='norm')(x)
    h = nn.Dense(self.heads * self.dim_head, dtype=self.dtype,
                 name='proj_in')(h.reshape(n, hgt * wid, c))
    block = (nn.remat(BasicTransformerBlock) if self.remat_blocks
             else BasicTransformerBlock)
    for i in range(self.num_layers):
      h = block(self.heads, self.dim_head, self.only_cross_attention,
                self.attention, self.dtype, name=f'transformer_blocks_{i}')(
                    h, context, context_mask)
    h = nn.Dense(c, dtype=self.dtype, name='proj_out')(h)
    return h.reshape(n, hgt, wid, c) + x.astype(self.dtype)


class DownBlock2D(nn.Module):
  """diffusers `models/unets/unet_2d_blocks.py` DownBlock2D.

  num_layers ResnetBlock2D, then Downsample2D (add_downsample); every
  block's output is a skip.

  Attributes:
    out_channels: channels of every resnet.
    num_layers: resnets.
    add_downsample: end with a stride-2 conv (all but the last level).
    groups: GroupNorm groups.
    eps: the resnets' GroupNorm epsilon.
    downsample_padding: see Downsample2D.
    remat_blocks: rematerialise each resnet (and transformer block).
    dtype: compute dtype.
  """

  out_channels: int
  num_layers: int = 2
  add_downsample: bool = True
  groups: int = 32
  eps: float = 1e-5
  downsample_padding: int = 1
  remat_blocks: bool = False
  dtype: Dtype = jnp.float32

  def _attend(self, i: int, h: Array, context: Optional[Array],
              context_mask: Optional[Array]) -> Array:
    del i, context, context_mask
    return h

  @nn.compact
  def __call__(self, x: Array, temb: Array, context: Optional[Array] = None,
               context_mask: Optional[Array] = None
               ) -> tuple[Array, tuple[Array, ...]]:
    """The level's resnets (and transformers), then the downsampler.

    Args:
      x: [N, H, W, Cin].
      temb: [N, E] time embedding.
      context: [N, L, D] encoder hidden states (cross-attention blocks).
      context_mask: [N, L] bool or None.

    Returns:
      ([N, H', W', out_channels], the skips in the order made).
    """
    res = nn.remat(ResnetBlock2D) if self.remat_blocks else ResnetBlock2D
    skips = []
    for i in range(self.num_layers):
      x = res(self.out_channels, self.groups, self.eps, dtype=self.dtype,
              name=f'resnets_{i}')(x, temb)
      x = self._attend(i, x, context, context_mask)
      skips.append(x)
    if self.add_downsample:
      x = Downsample2D(self.out_channels, self.downsample_padding, self.dtype,
                       name='downsamplers_0')(x)
      skips.append(x)
    return x, tuple(skips)


class _CrossAttn:
  """Mixin: a Transformer2D named attentions_i after the i-th resnet."""

  def _attend(self, i: int, h: Array, context: Optional[Array],
              context_mask: Optional[Array]) -> Array:
    return Transformer2D(
        self.heads, h.shape[-1] // self.heads, self.transformer_layers,
        self.groups, self.only_cross_attention, self.attention,
        self.remat_blocks, self.dtype, name=f'attentions_{i}')(
            h, context, context_mask)


class CrossAttnDownBlock2D(_CrossAttn, DownBlock2D):
  """diffusers CrossAttnDownBlock2D: DownBlock2D with a Transformer2D after
  each resnet (heads heads of out_channels // heads channels)."""

  heads: int = 8
  transformer_layers: int = 1
  only_cross_attention: bool = False
  attention: str = 'auto'


class UpBlock2D(nn.Module):
  """diffusers `models/unets/unet_2d_blocks.py` UpBlock2D.

  num_layers ResnetBlock2D, each on [h, skip] concatenated on channels with
  the skips taken from the end, then Upsample2D (add_upsample).

  Attributes: as DownBlock2D, with add_upsample.
  """

  out_channels: int
  num_layers: int = 3
  add_upsample: bool = True
  groups: int = 32
  eps: float = 1e-5
  remat_blocks: bool = False
  dtype: Dtype = jnp.float32

  def _attend(self, i: int, h: Array, context: Optional[Array],
              context_mask: Optional[Array]) -> Array:
    del i, context, context_mask
    return h

  @nn.compact
  def __call__(self, x: Array, skips: Sequence[Array], temb: Array,
               context: Optional[Array] = None,
               context_mask: Optional[Array] = None,
               upsample_size: Optional[tuple[int, int]] = None) -> Array:
    """The level's resnets on the skips (and transformers), then upsampling.

    Args:
      x: [N, H, W, C].
      skips: this level's num_layers skips [N, H, W, Ci], in the order the
        down path made them (consumed from the end).
      temb: [N, E].
      context: [N, L, D] or None.
      context_mask: [N, L] bool or None.
      upsample_size: (H', W') of the upsampled output; None = (2H, 2W).

    Returns:
      [N, H', W', out_channels] (or [N, H, W, out_channels] without
      upsampling).
    """
    res = nn.remat(ResnetBlock2D) if self.remat_blocks else ResnetBlock2D
    skips = list(skips)
    for i in range(self.num_layers):
      x = jnp.concatenate([x, skips.pop().astype(x.dtype)], axis=-1)
      x = res(self.out_channels, self.groups, self.eps, dtype=self.dtype,
              name=f'resnets_{i}')(x, temb)
      x = self._attend(i, x, context, context_mask)
    if self.add_upsample:
      x = Upsample2D(self.out_channels, self.dtype, name='upsamplers_0')(
          x, upsample_size)
    return x


class CrossAttnUpBlock2D(_CrossAttn, UpBlock2D):
  """diffusers CrossAttnUpBlock2D: UpBlock2D with a Transformer2D after each
  resnet."""

  heads: int = 8
  transformer_layers: int = 1
  only_cross_attention: bool = False
  attention: str = 'auto'


class UNetMidBlock2DCrossAttn(nn.Module):
  """diffusers UNetMidBlock2DCrossAttn: resnets_0, attentions_0, resnets_1.

  Attributes: as CrossAttnDownBlock2D; output_scale_factor divides the
  resnets' sums (the UNet's mid_block_scale_factor). diffusers gives the
  middle transformer no only_cross_attention.
  """

  heads: int = 8
  transformer_layers: int = 1
  groups: int = 32
  eps: float = 1e-5
  output_scale_factor: float = 1.0
  attention: str = 'auto'
  remat_blocks: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array, context: Array,
               context_mask: Optional[Array] = None) -> Array:
    """x: [N, H, W, C], temb: [N, E], context: [N, L, D] -> [N, H, W, C]."""
    res = nn.remat(ResnetBlock2D) if self.remat_blocks else ResnetBlock2D
    c = x.shape[-1]
    kw = dict(groups=self.groups, eps=self.eps,
              output_scale_factor=self.output_scale_factor, dtype=self.dtype)
    x = res(c, name='resnets_0', **kw)(x, temb)
    x = Transformer2D(self.heads, c // self.heads, self.transformer_layers,
                      self.groups, False, self.attention, self.remat_blocks,
                      self.dtype, name='attentions_0')(x, context, context_mask)
    return res(c, name='resnets_1', **kw)(x, temb)


class TimestepEmbedding(nn.Module):
  """diffusers `models/embeddings.py` TimestepEmbedding: linear_1, SiLU,
  linear_2."""

  dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, Cin] -> [B, dim]."""
    x = nn.Dense(self.dim, dtype=self.dtype, name='linear_1')(x)
    return nn.Dense(self.dim, dtype=self.dtype, name='linear_2')(nn.silu(x))


class UNet2DConditionModel(nn.Module):
  """diffusers' UNet2DConditionModel (Stable Diffusion 1.x / 2.x) in Flax.

  Per-level settings are resolved per down block (index i; the up blocks
  read them reversed), as diffusers resolves them: vdm_jax.pretrained.
  unet2d.module_kwargs turns a config.json into these fields (e.g. SD-1.5's
  `attention_head_dim: 8`, which diffusers takes as the number of heads).

  Attributes:
    sample_size: the latent size the model was trained at (information for
      callers; any size runs).
    in_channels: input channels.
    out_channels: output channels.
    block_out_channels: channels per level.
    down_block_types: per level, one of DOWN_BLOCK_TYPES.
    up_block_types: per level (deepest first), one of UP_BLOCK_TYPES.
    mid_block_type: one of MID_BLOCK_TYPES.
    layers_per_block: resnets per down block (up blocks have one more).
    transformer_layers_per_block: transformer blocks per Transformer2D.
    num_attention_heads: heads per level (head width channels // heads).
    only_cross_attention: per level, attn1 attends to the context.
    cross_attention_dim: the context's width (for example inputs only).
    norm_num_groups: GroupNorm groups.
    norm_eps: the resnets' and conv_norm_out's GroupNorm epsilon.
    flip_sin_to_cos: timestep embedding [cos, sin].
    freq_shift: timestep embedding frequency shift.
    time_embedding_dim: time embedding width (None: 4 block_out_channels[0]).
    conv_in_kernel: conv_in's kernel size.
    conv_out_kernel: conv_out's kernel size.
    downsample_padding: see Downsample2D.
    mid_block_scale_factor: divides the middle resnets' sums.
    attention: the attention dispatch implementation ('auto', 'xla',
      'cudnn', 'pallas').
    dtype: compute dtype, 'float32' or 'bfloat16' (parameters float32).
    remat: 'none'; 'block' (each resnet and transformer block); 'full'
      (also each down/mid/up block as a whole); 'dots_saveable' (one
      checkpoint that keeps matmul and conv outputs).
  """

  sample_size: int = 64
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: Sequence[int] = (320, 640, 1280, 1280)
  down_block_types: Sequence[str] = (('CrossAttnDownBlock2D',) * 3
                                     + ('DownBlock2D',))
  up_block_types: Sequence[str] = ('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3
  mid_block_type: Optional[str] = 'UNetMidBlock2DCrossAttn'
  layers_per_block: Sequence[int] = (2, 2, 2, 2)
  transformer_layers_per_block: Sequence[int] = (1, 1, 1, 1)
  num_attention_heads: Sequence[int] = (8, 8, 8, 8)
  only_cross_attention: Sequence[bool] = (False, False, False, False)
  cross_attention_dim: int = 768
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0.0
  time_embedding_dim: Optional[int] = None
  conv_in_kernel: int = 3
  conv_out_kernel: int = 3
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0
  attention: str = 'auto'
  dtype: str = 'float32'
  remat: str = 'none'

  def check(self) -> None:
    """Raises ValueError naming a field the module does not support."""
    n = len(self.block_out_channels)
    choices = dict(dtype=(self.dtype, DTYPES), remat=(self.remat, REMAT),
                   mid_block_type=(self.mid_block_type, MID_BLOCK_TYPES),
                   downsample_padding=(self.downsample_padding, (0, 1)),
                   attention=(self.attention, attention_lib.IMPLEMENTATIONS))
    for name, (value, ok) in choices.items():
      if value not in ok:
        raise ValueError(f'sd_unet: {name}={value!r} is not supported; '
                         f'supported: {ok}.')
    for name, ok in (('down_block_types', DOWN_BLOCK_TYPES),
                     ('up_block_types', UP_BLOCK_TYPES)):
      bad = [t for t in getattr(self, name) if t not in ok]
      if bad:
        raise ValueError(f'sd_unet: {name} {bad} not supported; supported: '
                         f'{ok}.')
    for name in ('down_block_types', 'up_block_types', 'layers_per_block',
                 'transformer_layers_per_block', 'num_attention_heads',
                 'only_cross_attention'):
      if len(getattr(self, name)) != n:
        raise ValueError(f'sd_unet: {name} has {len(getattr(self, name))} '
                         f'entries, block_out_channels {n}.')
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f'sd_unet: block_out_channels {bad} are not multiples'
                       f' of norm_num_groups={self.norm_num_groups}.')
    if self.conv_in_kernel % 2 == 0 or self.conv_out_kernel % 2 == 0:
      raise ValueError('sd_unet: conv_in_kernel and conv_out_kernel must be '
                       'odd.')
    attention_lib.check_implementation(self.attention)

  def example_inputs(self, batch: int = 1, context_length: int = 77,
                     size: Optional[int] = None) -> tuple[Any, Any, Any]:
    """ShapeDtypeStructs (x, timesteps, context) for init / lowering."""
    s = size or self.sample_size
    return (jax.ShapeDtypeStruct((batch, s, s, self.in_channels),
                                 jnp.float32),
            jax.ShapeDtypeStruct((batch,), jnp.float32),
            jax.ShapeDtypeStruct(
                (batch, context_length, self.cross_attention_dim),
                jnp.float32))

  @nn.compact
  def __call__(self, x: Array, timesteps: Array, context: Array,
               context_mask: Optional[Array] = None) -> Array:
    """The UNet's prediction (SD: eps, or v for v-prediction models).

    Args:
      x: [B, H, W, in_channels] noisy latents (any H, W; odd sizes are
        upsampled to the skips' sizes as diffusers does).
      timesteps: [B] (or scalar) float, the model's own time input: the
        discrete training timestep, possibly fractional.
      context: [B, L, D] encoder hidden states (the text encoder's).
      context_mask: [B, L] bool, True = attend (diffusers'
        encoder_attention_mask), or None.

    Returns:
      [B, H, W, out_channels] float32.
    """
    self.check()
    dtype = jnp.dtype(self.dtype)
    b = x.shape[0]
    c0 = self.block_out_channels[0]
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (b,))
    temb = timestep_embedding(t, c0, self.flip_sin_to_cos, self.freq_shift)
    temb = TimestepEmbedding(self.time_embedding_dim or 4 * c0, dtype,
                             name='time_embedding')(temb.astype(dtype))
    trunk = UNet2DConditionModel._trunk
    if self.remat == 'dots_saveable':
      trunk = nn.remat(trunk, policy=jax.checkpoint_policies.dots_saveable)
    h = trunk(self, x.astype(dtype), temb, context.astype(dtype),
              context_mask)
    return h.astype(jnp.float32)

  # Over 60 lines: the network reads top to bottom (conv_in, down blocks,
  # middle, up blocks, head) as diffusers' forward does.
  def _trunk(self, x: Array, temb: Array, context: Array,
             context_mask: Optional[Array]) -> Array:
    """conv_in .. conv_out: [B, H, W, Cin] -> [B, H, W, Cout] (compute
    dtype)."""
    dtype = jnp.dtype(self.dtype)
    n = len(self.block_out_channels)
    blocks = self.remat in ('block', 'full')
    lift = ((lambda c, s=(): nn.remat(c, static_argnums=s))
            if self.remat == 'full' else (lambda c, s=(): c))
    common = dict(groups=self.norm_num_groups, eps=self.norm_eps,
                  remat_blocks=blocks, dtype=dtype)
    cross = dict(attention=self.attention)

    h = _conv(self.block_out_channels[0], dtype, 'conv_in',
              kernel=self.conv_in_kernel)(x)
    skips = [h]
    for i, kind in enumerate(self.down_block_types):
      kw = dict(common, downsample_padding=self.downsample_padding)
      if kind == 'CrossAttnDownBlock2D':
        kw.update(cross, heads=self.num_attention_heads[i],
                  transformer_layers=self.transformer_layers_per_block[i],
                  only_cross_attention=self.only_cross_attention[i])
      cls = lift(globals()[kind])
      h, outs = cls(self.block_out_channels[i], self.layers_per_block[i],
                    i < n - 1, name=f'down_blocks_{i}', **kw)(
                        h, temb, context, context_mask)
      skips += outs

    if self.mid_block_type is not None:
      h = lift(UNetMidBlock2DCrossAttn)(
          self.num_attention_heads[-1], self.transformer_layers_per_block[-1],
          output_scale_factor=self.mid_block_scale_factor,
          name='mid_block', **cross, **common)(h, temb, context, context_mask)

    rev = lambda seq: list(reversed(seq))
    for i, kind in enumerate(self.up_block_types):
      layers = rev(self.layers_per_block)[i] + 1
      level_skips = tuple(skips[-layers:])
      del skips[-layers:]
      final = i == n - 1
      # Upsample to the next skip's size: 2x unless a size was odd
      # (diffusers' forward passes upsample_size then).
      size = None if final else tuple(skips[-1].shape[1:3])
      kw = dict(common)
      if kind == 'CrossAttnUpBlock2D':
        kw.update(cross, heads=rev(self.num_attention_heads)[i],
                  transformer_layers=rev(self.transformer_layers_per_block)[i],
                  only_cross_attention=rev(self.only_cross_attention)[i])
      cls = lift(globals()[kind], (6,))
      h = cls(rev(self.block_out_channels)[i], layers, not final,
              name=f'up_blocks_{i}', **kw)(
                  h, level_skips, temb, context, context_mask, size)

    h = nn.silu(GroupNorm(self.norm_num_groups, self.norm_eps, dtype,
                          name='conv_norm_out')(h))
    return _conv(self.out_channels, dtype, 'conv_out',
                 kernel=self.conv_out_kernel)(h)
