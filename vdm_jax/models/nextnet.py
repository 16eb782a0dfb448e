"""NextNet: the fully convolutional ConvNeXt denoiser of SinFusion.

SinFusion (Nikankin, Haim, Irani 2022, arXiv 2211.11743) trains a diffusion
model on one image or one video. Its denoiser has no attention and no
down/up-sampling, so that its receptive field stays bounded and it learns
the statistics of patches rather than the whole frame. Here:

  [z, condition frames] --conv 3x3--> width channels
    --depth x ConvNeXt block--> LayerNorm --conv 1x1--> prediction

  ConvNeXt block (x -> x + h):
    h = depthwise conv k x k (x)
    h = h + Dense(gelu(emb))            (log-SNR and frame-offset embedding)
    h = conv 3x3 (LayerNorm(h)) -> gelu -> conv 3x3 (LayerNorm(.))

LayerNorm normalises each pixel over its channels (as in ConvNeXt), never
over space, so no statistic couples distant pixels. The receptive field is
a (2r + 1) x (2r + 1) square with r = 1 + depth * ((kernel_size - 1) / 2 + 2)
(`receptive_field_radius`); an output pixel does not depend on inputs
farther than r pixels (Chebyshev distance) from it. The defaults of
configs/single_video.py (depth 8, kernel 7) give r = 41.

Layout: frames are images [B, H, W, C] (no time axis): every SinFusion model
maps one noisy frame, plus 0, 1 or 2 clean condition frames concatenated on
channels, to one prediction.
"""

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm_jax.models import layers

Array = jax.Array


def receptive_field_radius(depth: int, kernel_size: int) -> int:
  """Pixels r such that outputs depend only on inputs within distance r.

  The stem conv (3x3) adds 1, each block a depthwise conv ((k - 1) / 2) and
  two 3x3 convs (1 each); the 1x1 output conv and LayerNorms add nothing.
  """
  return 1 + depth * ((kernel_size - 1) // 2 + 2)


CONV_IMPLEMENTATIONS = ('auto', 'xla', 'cpu')


def _conv_kernels(conv_impl: str) -> tuple[str, str]:
  """(depthwise impl, 3x3 kernel_grad) of NextNet.conv_impl."""
  if conv_impl not in CONV_IMPLEMENTATIONS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPLEMENTATIONS}, got'
                     f' {conv_impl!r}.')
  if conv_impl == 'auto':
    conv_impl = 'cpu' if jax.default_backend() == 'cpu' else 'xla'
  return ('shifted', 'taps') if conv_impl == 'cpu' else ('conv', 'lax')


class ConvNeXtBlock(nn.Module):
  """One residual ConvNeXt block conditioned on an embedding.

  Attributes:
    width: channels in and out.
    kernel_size: size of the depthwise conv (odd).
    mult: expansion of the hidden 3x3 conv.
    conv_impl: see NextNet.
  """

  width: int
  kernel_size: int = 7
  mult: int = 2
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: Array, emb: Array) -> Array:
    """x: [B, H, W, width]; emb: [B, E] -> [B, H, W, width]."""
    depthwise, kernel_grad = _conv_kernels(self.conv_impl)
    h = layers.DepthwiseConv(self.kernel_size, depthwise, name='dwconv')(x)
    h = h + nn.Dense(self.width, name='emb')(nn.gelu(emb))[:, None, None, :]
    h = nn.LayerNorm(name='norm1')(h)
    h = nn.gelu(layers.Conv3x3(self.width * self.mult,
                               kernel_grad=kernel_grad, name='conv1')(h))
    h = nn.LayerNorm(name='norm2')(h)
    h = layers.Conv3x3(self.width, kernel_grad=kernel_grad, name='conv2')(h)
    return x + h


class NextNet(nn.Module):
  """SinFusion denoiser: (z, logsnr, condition frames, offset k) -> pred.

  Attributes:
    out_channels: channels C of the predicted frame.
    width: channels of every block.
    depth: number of ConvNeXt blocks.
    kernel_size: depthwise conv size (odd).
    mult: hidden expansion inside a block.
    emb_dim: width of the conditioning embedding.
    num_cond_frames: clean frames concatenated to z on channels (Projector
      0, Predictor 1, Interpolator 2).
    max_offset: |k| <= max_offset for the frame-offset embedding; 0 means
      the model takes no offset.
    conv_impl: how the convolutions run; the parameters are the same for
      each. 'xla': lax's convolutions (grouped for the depthwise ones).
      'cpu': the depthwise convs as fused shifted multiply-adds
      (layers.depthwise_conv 'shifted') and the 3x3 kernels' gradients tap
      by tap (layers.conv3x3 kernel_grad='taps'): XLA:CPU's grouped
      convolution is slow, and its kernel-gradient convolution is ~60x
      slower inside the gradient-accumulation loop (experiments/
      benchmark_conv.py --depthwise and --in-loop). 'auto': 'cpu' on CPU,
      'xla' elsewhere.
  """

  out_channels: int = 3
  width: int = 64
  depth: int = 8
  kernel_size: int = 7
  mult: int = 2
  emb_dim: int = 256
  num_cond_frames: int = 0
  max_offset: int = 0
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(
      self,
      z: Array,
      logsnr: Array,
      frames: Optional[Array] = None,
      k: Optional[Array] = None,
      *,
      train: bool = False,
  ) -> Array:
    """Predicts from a noisy frame.

    Args:
      z: [B, H, W, C] noisy frame.
      logsnr: [B] log-SNR of z.
      frames: [B, H, W, num_cond_frames * C] clean condition frames
        (required iff num_cond_frames > 0).
      k: int32 [B] frame offset in [-max_offset, max_offset] (required iff
        max_offset > 0).
      train: unused (no dropout); taken so that every denoiser binds the
        same way (denoiser.make_denoise_fn).

    Returns:
      [B, H, W, out_channels] prediction (float32).
    """
    del train
    if self.kernel_size % 2 != 1:
      raise ValueError(f'kernel_size must be odd, got {self.kernel_size}.')
    if (frames is None) != (self.num_cond_frames == 0):
      raise ValueError(
          f'NextNet with num_cond_frames={self.num_cond_frames} got'
          f' frames={None if frames is None else frames.shape}.'
      )
    if (k is None) != (self.max_offset == 0):
      raise ValueError(
          f'NextNet with max_offset={self.max_offset} got k={k}.'
      )
    emb = layers.logsnr_embedding(logsnr, self.width)
    emb = nn.Dense(self.emb_dim, name='emb_in')(emb)
    if k is not None:
      index = jnp.clip(k.astype(jnp.int32) + self.max_offset, 0,
                       2 * self.max_offset)
      emb = emb + nn.Embed(2 * self.max_offset + 1, self.emb_dim,
                           name='offset_emb')(index)
    emb = nn.Dense(self.emb_dim, name='emb_out')(nn.gelu(emb))
    x = z if frames is None else jnp.concatenate([z, frames], axis=-1)
    kernel_grad = _conv_kernels(self.conv_impl)[1]
    x = layers.Conv3x3(self.width, kernel_grad=kernel_grad, name='stem')(x)
    for i in range(self.depth):
      x = ConvNeXtBlock(self.width, self.kernel_size, self.mult,
                        self.conv_impl, name=f'block_{i}')(x, emb)
    x = nn.LayerNorm(name='norm_out')(x)
    return nn.Conv(self.out_channels, (1, 1), name='head')(x).astype(
        jnp.float32)
