"""Stable Diffusion's building blocks (diffusers' PyTorch modules) in Flax.

The layers of Latent Diffusion's denoiser (Rombach et al. 2022) as
huggingface/diffusers writes them (src/diffusers/models/: resnet.py,
downsampling.py, upsampling.py, attention.py, attention_processor.py,
activations.py, embeddings.py, transformers/transformer_2d.py), shared by
SD's UNet (sd_unet.py), SVD's UNet and Tune-A-Video's inflation of SD.
Layout NHWC: x [N, H, W, C]; tokens [B, T, C].

Tune-A-Video's inflation (Wu et al. 2022, arXiv 2212.11565, Sec. 4.1; as
showlab/Tune-A-Video's tuneavideo/models/attention.py and resnet.py do it)
is a set of options whose defaults leave the image model as it is: a clip
is N = B * F frames on the batch axis (frames of one video consecutive);
`GroupNorm(frames=F)` pools its statistics over the F frames of a video (as
torch's GroupNorm on their 5-D tensor), `Attention(sparse_causal_frames=F)`
gives frame i the keys and values of frames 0 and i - 1, and
`BasicTransformerBlock(frames=F)` adds the temporal attention `attn_temp`
(with its LayerNorm `norm_temp`) after the feed-forward.

Submodules are named as diffusers names the PyTorch modules, with `.N`
written `_N` (`attn2/to_out_0`, `ff/net_0/proj`), so that vdm_jax.pretrained
loads diffusers folders by the generic rule of pretrained/convert.py.

Numerics as diffusers: exact (erf) GELU in GEGLU; GroupNorm with the
caller's eps in the resnets, 1e-6 in the transformers; LayerNorm eps 1e-5;
two-pass float32 statistics. 1x1-conv and linear projections
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
    frames: statistics pooled over this many consecutive batch entries (the
      frames of one video: Tune-A-Video's GroupNorm on [B, C, F, H, W]);
      1 = per image.
  """

  num_groups: int
  epsilon: float
  dtype: Dtype = jnp.float32
  frames: int = 1

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [N, ..., C] -> normalised [N, ..., C] of `dtype`; N a multiple of
    `frames`."""
    n, c, g = x.shape[0], x.shape[-1], self.num_groups
    scale = self.param('scale', nn.initializers.ones, (c,))
    bias = self.param('bias', nn.initializers.zeros, (c,))
    xg = x.reshape(n // self.frames, -1, g, c // g).astype(jnp.float32)
    mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + self.epsilon)).reshape(x.shape)
    return (y * scale + bias).astype(self.dtype)


def _layer_norm(dtype: Dtype, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LAYERNORM_EPS, use_fast_variance=False,
                      dtype=dtype, name=name)


def conv(features: int, dtype: Dtype, name: str, kernel: int = 3,
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
    norm_frames: GroupNorm's `frames` (Tune-A-Video's ResnetBlock3D pools
      norm1's and norm2's statistics over a video's frames).
  """

  out_channels: int
  groups: int = 32
  eps: float = 1e-5
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32
  norm_frames: int = 1

  @nn.compact
  def __call__(self, x: Array, temb: Array) -> Array:
    """x: [N, H, W, Cin], temb: [N, E] -> [N, H, W, out_channels]."""
    def norm(name):
      return GroupNorm(self.groups, self.eps, self.dtype, self.norm_frames,
                       name=name)

    h = nn.silu(norm('norm1')(x))
    h = conv(self.out_channels, self.dtype, 'conv1')(h)
    t = nn.Dense(self.out_channels, dtype=self.dtype, name='time_emb_proj')(
        nn.silu(temb.astype(self.dtype)))
    h = h + t[:, None, None, :]
    h = nn.silu(norm('norm2')(h))
    h = conv(self.out_channels, self.dtype, 'conv2')(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, self.dtype, 'conv_shortcut', kernel=1)(x)
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
    return conv(self.channels, self.dtype, 'conv', strides=2, padding=pad)(x)


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
    return conv(self.channels, self.dtype, 'conv')(nearest_resize(x, size))


def sparse_causal(t: Array, frames: int) -> Array:
  """Tune-A-Video's sparse-causal keys or values (SparseCausalAttention).

  Frame i of each video attends to frame 0's tokens then frame i - 1's
  (frame 0 to its own, twice: the same softmax as once).

  Args:
    t: [B * F, L, ...] keys or values, a video's F frames consecutive.
    frames: F.

  Returns:
    [B * F, 2 L, ...].
  """
  n, length = t.shape[:2]
  v = t.reshape((n // frames, frames) + t.shape[1:])
  former = np.maximum(np.arange(frames) - 1, 0)
  first = jnp.broadcast_to(v[:, :1], v.shape)
  return jnp.concatenate([first, v[:, former]], axis=2).reshape(
      (n, 2 * length) + t.shape[2:])


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
    sparse_causal_frames: 0, or F: self-attention becomes Tune-A-Video's
      sparse-causal attention over videos of F frames (`sparse_causal`).
  """

  heads: int
  dim_head: int
  attention: str = 'auto'
  dtype: Dtype = jnp.float32
  sparse_causal_frames: int = 0

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

    def proj(name, tokens):  # [B, T, D] -> [B, T, heads, dim_head]
      y = nn.Dense(inner, use_bias=False, dtype=self.dtype, name=name)(tokens)
      return y.reshape(y.shape[:2] + (self.heads, self.dim_head))

    q = proj('to_q', x) * (self.dim_head**-0.5)
    k, v = proj('to_k', kv), proj('to_v', kv)
    if self.sparse_causal_frames and context is None:
      k = sparse_causal(k, self.sparse_causal_frames)
      v = sparse_causal(v, self.sparse_causal_frames)
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
  With frames F > 0 (Tune-A-Video's block): attn1 is sparse-causal, and
  x + attn_temp(norm_temp(x)) follows over each pixel's F frames (no
  positional encoding).

  Attributes:
    heads: attention heads.
    dim_head: channels per head.
    only_cross_attention: attn1 attends to the context too (without its
      mask, as diffusers passes attn1 the UNet's attention_mask only).
    attention: the dispatch implementation.
    dtype: compute dtype.
    frames: 0 (an image block), or the F frames of each video in the batch.
  """

  heads: int
  dim_head: int
  only_cross_attention: bool = False
  attention: str = 'auto'
  dtype: Dtype = jnp.float32
  frames: int = 0

  @nn.compact
  def __call__(self, x: Array, context: Array,
               context_mask: Optional[Array] = None) -> Array:
    """x: [B, T, C], context: [B, L, D], context_mask: [B, L] -> [B, T, C]."""
    def attn(name, sparse_causal_frames=0):
      return Attention(self.heads, self.dim_head, self.attention, self.dtype,
                       sparse_causal_frames, name=name)

    h = _layer_norm(self.dtype, 'norm1')(x)
    x = x + attn('attn1', self.frames)(
        h, context if self.only_cross_attention else None)
    h = _layer_norm(self.dtype, 'norm2')(x)
    x = x + attn('attn2')(h, context, context_mask)
    h = _layer_norm(self.dtype, 'norm3')(x)
    x = x + FeedForward(dtype=self.dtype, name='ff')(h)
    if not self.frames:
      return x
    n, d, c = x.shape  # (b f) d c -> (b d) f c.
    f = self.frames
    h = x.reshape(n // f, f, d, c).transpose(0, 2, 1, 3).reshape(-1, f, c)
    h = h + attn('attn_temp')(_layer_norm(self.dtype, 'norm_temp')(h))
    return h.reshape(n // f, d, f, c).transpose(0, 2, 1, 3).reshape(n, d, c)


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
    frames: the blocks' `frames` (Tune-A-Video); the GroupNorm stays per
      frame, as their Transformer3DModel has it.
  """

  heads: int
  dim_head: int
  num_layers: int = 1
  groups: int = 32
  only_cross_attention: bool = False
  attention: str = 'auto'
  remat_blocks: bool = False
  dtype: Dtype = jnp.float32
  frames: int = 0

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
                self.attention, self.dtype, self.frames,
                name=f'transformer_blocks_{i}')(
                    h, context, context_mask)
    h = nn.Dense(c, dtype=self.dtype, name='proj_out')(h)
    return h.reshape(n, hgt, wid, c) + x.astype(self.dtype)




class TimestepEmbedding(nn.Module):
  """diffusers `models/embeddings.py` TimestepEmbedding: linear_1, SiLU,
  linear_2 (to out_dim, default dim)."""

  dim: int
  dtype: Dtype = jnp.float32
  out_dim: Optional[int] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, Cin] -> [B, out_dim or dim]."""
    x = nn.Dense(self.dim, dtype=self.dtype, name='linear_1')(x)
    return nn.Dense(self.out_dim or self.dim, dtype=self.dtype,
                    name='linear_2')(nn.silu(x))
