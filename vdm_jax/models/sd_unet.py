"""Stable Diffusion's UNet (diffusers' UNet2DConditionModel family) in Flax.

The denoiser of Latent Diffusion (Rombach et al. 2022), as diffusers writes
it (huggingface/diffusers, src/diffusers/models/unets/
unet_2d_condition.py and unet_2d_blocks.py): a sinusoidal timestep
embedding and an MLP; conv_in; down blocks of ResnetBlock2D (with a
Transformer2DModel after each in the cross-attention blocks) and a stride-2
conv; a middle block (resnet, transformer, resnet); up blocks consuming the
skips in reverse, each upsampled by nearest x2 (or to the skip's size when
it is odd) and a conv; GroupNorm, SiLU, conv_out. The layers are in
sd_blocks.py.

Submodules are named as diffusers names the PyTorch modules, with `.N`
written `_N` (`down_blocks_0/attentions_1/transformer_blocks_0/attn2/to_k`),
so that vdm_jax.pretrained.unet2d loads a diffusers folder by the generic
rule of vdm_jax.pretrained.convert. The block types are modules with typed
fields that SVD's UNet and Tune-A-Video's inflation reuse; `timesteps` and
`context` are explicit arguments everywhere. Layout NHWC: x [B, H, W, C].

`inflated=True` is Tune-A-Video's inflation of this UNet (Wu et al. 2022,
arXiv 2212.11565, Sec. 4.1; showlab/Tune-A-Video, tuneavideo/models/):
x [B, F, H, W, C] runs as B * F frames through the same convolutions (their
InflatedConv3d), with the resnets' and conv_norm_out's GroupNorm statistics
over each video's frames (`frame_norm='pooled'`, their GroupNorm on a 5-D
tensor; 'per_frame' keeps SD's), sparse-causal attn1 and a temporal
attention after every transformer block's feed-forward (sd_blocks.py). SD's
parameters load unchanged; the new ones are every `attn_temp` and
`norm_temp` (vdm_jax.adapt.inflate_sd).
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm_jax.models import attention as attention_lib
from vdm_jax.models import sd_blocks
from vdm_jax.models.sd_blocks import conv
from vdm_jax.models.sd_blocks import Downsample2D
from vdm_jax.models.sd_blocks import GroupNorm
from vdm_jax.models.sd_blocks import ResnetBlock2D
from vdm_jax.models.sd_blocks import TimestepEmbedding
from vdm_jax.models.sd_blocks import Transformer2D
from vdm_jax.models.sd_blocks import Upsample2D

Array = jax.Array
Dtype = Any


DTYPES = ('float32', 'bfloat16')
REMAT = ('none', 'block', 'full', 'dots_saveable')
DOWN_BLOCK_TYPES = ('CrossAttnDownBlock2D', 'DownBlock2D')
UP_BLOCK_TYPES = ('CrossAttnUpBlock2D', 'UpBlock2D')
MID_BLOCK_TYPES = ('UNetMidBlock2DCrossAttn', None)
FRAME_NORMS = ('pooled', 'per_frame')


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
    frames: 0, or the frames per video of an inflated UNet (the
      transformer blocks' `frames`).
    norm_frames: the resnets' GroupNorm `frames`.
  """

  out_channels: int
  num_layers: int = 2
  add_downsample: bool = True
  groups: int = 32
  eps: float = 1e-5
  downsample_padding: int = 1
  remat_blocks: bool = False
  dtype: Dtype = jnp.float32
  frames: int = 0
  norm_frames: int = 1

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
              norm_frames=self.norm_frames, name=f'resnets_{i}')(x, temb)
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
        self.remat_blocks, self.dtype, self.frames, name=f'attentions_{i}')(
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
  frames: int = 0
  norm_frames: int = 1

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
              norm_frames=self.norm_frames, name=f'resnets_{i}')(x, temb)
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
  frames: int = 0
  norm_frames: int = 1

  @nn.compact
  def __call__(self, x: Array, temb: Array, context: Array,
               context_mask: Optional[Array] = None) -> Array:
    """x: [N, H, W, C], temb: [N, E], context: [N, L, D] -> [N, H, W, C]."""
    res = nn.remat(ResnetBlock2D) if self.remat_blocks else ResnetBlock2D
    c = x.shape[-1]
    kw = dict(groups=self.groups, eps=self.eps,
              output_scale_factor=self.output_scale_factor, dtype=self.dtype,
              norm_frames=self.norm_frames)
    x = res(c, name='resnets_0', **kw)(x, temb)
    x = Transformer2D(self.heads, c // self.heads, self.transformer_layers,
                      self.groups, False, self.attention, self.remat_blocks,
                      self.dtype, self.frames, name='attentions_0')(
                          x, context, context_mask)
    return res(c, name='resnets_1', **kw)(x, temb)


BLOCKS = {
    'CrossAttnDownBlock2D': CrossAttnDownBlock2D,
    'DownBlock2D': DownBlock2D,
    'CrossAttnUpBlock2D': CrossAttnUpBlock2D,
    'UpBlock2D': UpBlock2D,
}


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
    inflated: Tune-A-Video's video UNet (module docstring): x is
      [B, F, H, W, C]; adds attn_temp / norm_temp to every transformer
      block.
    frame_norm: inflated only: 'pooled' (their ResnetBlock3D: the resnets'
      and conv_norm_out's GroupNorm over all frames of a video) or
      'per_frame' (SD's GroupNorm on each frame).
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
  inflated: bool = False
  frame_norm: str = 'pooled'

  def check(self) -> None:
    """Raises ValueError naming a field the module does not support."""
    n = len(self.block_out_channels)
    choices = dict(dtype=(self.dtype, DTYPES), remat=(self.remat, REMAT),
                   mid_block_type=(self.mid_block_type, MID_BLOCK_TYPES),
                   downsample_padding=(self.downsample_padding, (0, 1)),
                   frame_norm=(self.frame_norm, FRAME_NORMS),
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
                     size: Optional[int] = None, frames: int = 1
                     ) -> tuple[Any, Any, Any]:
    """ShapeDtypeStructs (x, timesteps, context) for init / lowering
    (x [batch, frames, s, s, C] when inflated)."""
    s = size or self.sample_size
    lead = (batch, frames) if self.inflated else (batch,)
    return (jax.ShapeDtypeStruct(lead + (s, s, self.in_channels),
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
        upsampled to the skips' sizes as diffusers does); inflated:
        [B, F, H, W, in_channels], a clip of F frames.
      timesteps: [B] (or scalar) float, the model's own time input: the
        discrete training timestep, possibly fractional.
      context: [B, L, D] encoder hidden states (the text encoder's).
      context_mask: [B, L] bool, True = attend (diffusers'
        encoder_attention_mask), or None.

    Returns:
      [B, H, W, out_channels] float32 (inflated: [B, F, H, W, ...]).
    """
    self.check()
    dtype = jnp.dtype(self.dtype)
    b = x.shape[0]
    c0 = self.block_out_channels[0]
    t = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (b,))
    if self.inflated:  # b f h w c -> (b f) h w c; t, context per frame.
      f = x.shape[1]
      x = x.reshape((b * f,) + x.shape[2:])
      t = jnp.repeat(t, f)
      context = jnp.repeat(context, f, axis=0)
      if context_mask is not None:
        context_mask = jnp.repeat(context_mask, f, axis=0)
      h = self._call_frames(x, t, context, context_mask, f)
      return h.reshape((b, f) + h.shape[1:])
    return self._call_frames(x, t, context, context_mask, 0)

  def _call_frames(self, x: Array, t: Array, context: Array,
                   context_mask: Optional[Array], frames: int) -> Array:
    """x: [N, H, W, Cin], t: [N] -> [N, H, W, Cout] float32 (N = B * frames
    when inflated)."""
    dtype = jnp.dtype(self.dtype)
    c0 = self.block_out_channels[0]
    temb = sd_blocks.timestep_embedding(t, c0, self.flip_sin_to_cos,
                                        self.freq_shift)
    temb = TimestepEmbedding(self.time_embedding_dim or 4 * c0, dtype,
                             name='time_embedding')(temb.astype(dtype))
    trunk = UNet2DConditionModel._trunk
    if self.remat == 'dots_saveable':
      trunk = nn.remat(trunk, policy=jax.checkpoint_policies.dots_saveable,
                       static_argnums=(5,))
    h = trunk(self, x.astype(dtype), temb, context.astype(dtype),
              context_mask, frames)
    return h.astype(jnp.float32)

  # Over 60 lines: the network reads top to bottom (conv_in, down blocks,
  # middle, up blocks, head) as diffusers' forward does.
  def _trunk(self, x: Array, temb: Array, context: Array,
             context_mask: Optional[Array], frames: int = 0) -> Array:
    """conv_in .. conv_out: [B, H, W, Cin] -> [B, H, W, Cout] (compute
    dtype); frames > 0: B = videos x frames (inflated)."""
    dtype = jnp.dtype(self.dtype)
    n = len(self.block_out_channels)
    blocks = self.remat in ('block', 'full')
    lift = ((lambda c, s=(): nn.remat(c, static_argnums=s))
            if self.remat == 'full' else (lambda c, s=(): c))
    norm_frames = frames if frames and self.frame_norm == 'pooled' else 1
    common = dict(groups=self.norm_num_groups, eps=self.norm_eps,
                  remat_blocks=blocks, dtype=dtype)
    if frames:  # Only an inflated UNet names them (the image one as before).
      common.update(frames=frames, norm_frames=norm_frames)
    cross = dict(attention=self.attention)

    h = conv(self.block_out_channels[0], dtype, 'conv_in',
              kernel=self.conv_in_kernel)(x)
    skips = [h]
    for i, kind in enumerate(self.down_block_types):
      kw = dict(common, downsample_padding=self.downsample_padding)
      if kind == 'CrossAttnDownBlock2D':
        kw.update(cross, heads=self.num_attention_heads[i],
                  transformer_layers=self.transformer_layers_per_block[i],
                  only_cross_attention=self.only_cross_attention[i])
      cls = lift(BLOCKS[kind])
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
      cls = lift(BLOCKS[kind], (6,))
      h = cls(rev(self.block_out_channels)[i], layers, not final,
              name=f'up_blocks_{i}', **kw)(
                  h, level_skips, temb, context, context_mask, size)

    h = nn.silu(GroupNorm(self.norm_num_groups, self.norm_eps, dtype,
                          norm_frames, name='conv_norm_out')(h))
    return conv(self.out_channels, dtype, 'conv_out',
                 kernel=self.conv_out_kernel)(h)
