"""Layers of the factorized space-time UNet (Ho et al. 2022, section 3).

Inside the UNet, activations are kept as frames-as-batch images,
`[N, H, W, C]` with `N = B * T`: every space-only (1x3x3) convolution, every
GroupNorm and every spatial attention then treats frames independently, and
only `TemporalAttention` looks across frames (it reshapes to `[B, T, H*W, C]`).
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm_jax.models import attention

Array = jax.Array
Dtype = Any

# GroupNorm groups (DDPM/VDM standard); fewer when a layer is narrower.
MAX_GROUPS = 32


def num_groups(channels: int) -> int:
  """GroupNorm group count used for a layer of `channels` channels."""
  return min(MAX_GROUPS, channels)


def num_heads(channels: int, head_dim: int) -> int:
  """Attention heads of a layer: channels // head_dim, at least 1."""
  return max(1, channels // head_dim)


def logsnr_embedding(logsnr: Array, dim: int) -> Array:
  """Sinusoidal features of a rescaled log-SNR.

  The log-SNR range [-20, 20] is mapped linearly onto [0, 1000], the range
  of DDPM timesteps that the sinusoidal frequencies are tuned for.

  Args:
    logsnr: [...] float log-SNR values.
    dim: number of features.

  Returns:
    [..., dim] float32 features.
  """
  return sinusoidal_embedding((logsnr.astype(jnp.float32) + 20.0) * 25.0,
                              dim)


def sinusoidal_embedding(t: Array, dim: int) -> Array:
  """Transformer sinusoidal features of positions t (DDPM's timesteps).

  Args:
    t: [...] float or int positions.
    dim: number of features.

  Returns:
    [..., dim] float32 features.
  """
  t = jnp.asarray(t, jnp.float32)
  half = dim // 2
  freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(half, dtype=jnp.float32)
                  / max(half, 1))
  args = t[..., None] * freqs
  emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, [(0, 0)] * (emb.ndim - 1) + [(0, 1)])
  return emb


_DIMS = ('NHWC', 'HWIO', 'NHWC')


def _conv(x: Array, kernel: Array, strides: int) -> Array:
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(strides, strides), padding=((1, 1), (1, 1)),
      dimension_numbers=_DIMS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv3x3(x: Array, kernel: Array, strides: int = 1,
            kernel_grad: str = 'lax') -> Array:
  """3x3 NHWC convolution with padding 1; same values and gradients as lax.

  For stride 1 the input gradient is computed as a plain forward
  convolution of the output gradient with the flipped, in/out-transposed
  kernel, materialised in HWIO layout. lax's own transpose rule expresses the
  same convolution through swapped kernel dimension numbers, which XLA:CPU
  runs about 3x slower inside a `lax.scan` body (measured: a UNet's gradient
  w.r.t. its input took 4x longer per step inside the sampler's scan than
  jitted alone), and reconstruction guidance takes exactly that gradient at
  every sampler step.

  The kernel gradient is lax's by default. kernel_grad='taps' (stride 1)
  computes it as nine matmuls instead, one per tap, of the shifted input
  against the output gradient: inside a `lax.scan` body (gradient
  accumulation) XLA:CPU runs lax's kernel-gradient convolution ~60-100x
  slower than outside one (3x3, 64 -> 128 channels, two microbatches of
  2 x 64 x 64: 9.9 s against 0.10 s with 'taps'); outside loops 'taps' is
  as fast at large frames and up to ~2x slower at the UNet's small ones.

  Args:
    x: [N, H, W, Cin] input.
    kernel: [3, 3, Cin, Cout] kernel.
    strides: spatial stride (static).
    kernel_grad: 'lax' | 'taps' (static; 'taps' needs strides == 1).

  Returns:
    [N, H', W', Cout], H' = ceil(H / strides).
  """
  return _conv(x, kernel, strides)


def _conv3x3_fwd(x, kernel, strides, kernel_grad):
  del kernel_grad
  return _conv(x, kernel, strides), (x, kernel)


def _kernel_grad_taps(x: Array, dy: Array) -> Array:
  """[3, 3, Cin, Cout] gradient of a stride-1 3x3 conv, tap by tap."""
  height, width = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jnp.stack([
      jnp.stack([
          jnp.einsum('nhwc,nhwd->cd', padded[:, i:i + height, j:j + width],
                     dy) for j in range(3)
      ]) for i in range(3)
  ])


def _conv3x3_bwd(strides, kernel_grad, res, dy):
  x, kernel = res
  if kernel_grad == 'taps' and strides == 1:
    dkernel = _kernel_grad_taps(x, dy).astype(kernel.dtype)
  else:
    _, vjp_kernel = jax.vjp(lambda k: _conv(x, k, strides), kernel)
    (dkernel,) = vjp_kernel(dy)
  if strides == 1:
    flipped = jnp.transpose(jnp.flip(kernel, (0, 1)), (0, 1, 3, 2))
    dx = _conv(dy, flipped, 1)
  else:
    _, vjp_x = jax.vjp(lambda x_: _conv(x_, kernel, strides), x)
    (dx,) = vjp_x(dy)
  return dx, dkernel


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


class Conv3x3(nn.Module):
  """Space-only (1x3x3) convolution of frames-as-batch images.

  A 1x3x3 convolution of a `[B, T, H, W, C]` video is a 2D 3x3 convolution of
  its `B * T` frames; it runs as one NHWC convolution (`conv3x3`).

  Attributes:
    features: output channels.
    strides: spatial stride (2 to downsample).
    zero_init: initialise the kernel to zero (last conv of a block).
    dtype: compute dtype; the parameters stay float32.
    kernel_grad: how the kernel gradient is computed (`conv3x3`).
  """

  features: int
  strides: int = 1
  zero_init: bool = False
  dtype: Dtype = jnp.float32
  kernel_grad: str = 'lax'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [N, H, W, Cin] -> [N, H', W', features]."""
    init = (nn.initializers.zeros if self.zero_init
            else nn.initializers.lecun_normal())
    kernel = self.param('kernel', init, (3, 3, x.shape[-1], self.features))
    bias = self.param('bias', nn.initializers.zeros, (self.features,))
    y = conv3x3(x.astype(self.dtype), kernel.astype(self.dtype), self.strides,
                self.kernel_grad)
    return y + bias.astype(self.dtype)


DEPTHWISE_IMPLEMENTATIONS = ('auto', 'conv', 'shifted')


def depthwise_conv(x: Array, kernel: Array, impl: str = 'auto') -> Array:
  """k x k depthwise NHWC convolution, 'SAME' zero padding, stride 1.

  Args:
    x: [N, H, W, C] input.
    kernel: [k, k, 1, C] kernel (flax's nn.Conv layout for
      feature_group_count=C), k odd.
    impl: 'conv' (one grouped `lax.conv_general_dilated`), 'shifted' (the
      sum over the k * k kernel taps of shifted copies of the padded input
      times a per-channel weight, which XLA fuses into one loop), or 'auto'
      ('shifted' on CPU, 'conv' on GPU and TPU, where the grouped
      convolution has a native kernel). XLA:CPU runs the grouped
      convolution through a slow generic path: for 7x7 taps over
      2 x 137 x 167 x 64 (SinFusion's crop) 'shifted' is ~13x faster forward
      and ~3.5x forward + backward (experiments/benchmark_conv.py
      --depthwise). Both give the same values and gradients to float32
      rounding (summation order).

  Returns:
    [N, H, W, C].
  """
  if impl not in DEPTHWISE_IMPLEMENTATIONS:
    raise ValueError(f'depthwise impl must be one of'
                     f' {DEPTHWISE_IMPLEMENTATIONS}, got {impl!r}.')
  k = kernel.shape[0]
  if kernel.shape != (k, k, 1, x.shape[-1]) or k % 2 != 1:
    raise ValueError(f'depthwise kernel must be [k, k, 1, {x.shape[-1]}] with'
                     f' k odd, got {kernel.shape}.')
  if impl == 'auto':
    impl = 'shifted' if jax.default_backend() == 'cpu' else 'conv'
  if impl == 'conv':
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(1, 1), padding='SAME',
        dimension_numbers=_DIMS, feature_group_count=x.shape[-1])
  return _shifted_depthwise(x, kernel[:, :, 0])


def _shifted_taps(x: Array, taps: Array) -> Array:
  """sum_ij pad(x)[:, i:i + H, j:j + W] * taps[i, j]; taps [k, k, C]."""
  k = taps.shape[0]
  p = k // 2
  height, width = x.shape[1:3]
  padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  out = jnp.zeros_like(x)
  for i in range(k):
    rows = padded[:, i:i + height]
    for j in range(k):
      out = out + rows[:, :, j:j + width] * taps[i, j]
  return jax.lax.optimization_barrier(out)


@jax.custom_vjp
def _shifted_depthwise(x: Array, taps: Array) -> Array:
  """'shifted' depthwise conv with a hand-written backward pass.

  Autodiff of `_shifted_taps` would keep each of the k * k shifted copies
  as a residual for the kernel gradient (49 copies of the activations per
  7x7 layer: 18 GiB of XLA temp for one SinFusion microbatch of two
  137x167 crops, against 2 GiB for the grouped conv). Here only x is kept;
  the input gradient is the same sum with the kernel flipped, and each tap's
  gradient one fused reduction over a shifted view.
  """
  return _shifted_taps(x, taps)


def _shifted_depthwise_fwd(x, taps):
  return _shifted_taps(x, taps), (x, taps)


def _shifted_depthwise_bwd(res, dy):
  x, taps = res
  k = taps.shape[0]
  p = k // 2
  height, width = x.shape[1:3]
  dx = _shifted_taps(dy, taps[::-1, ::-1])
  padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))

  def tap_grad(ij):
    view = jax.lax.dynamic_slice(padded, (0, ij[0], ij[1], 0), x.shape)
    return jnp.sum(view * dy, axis=(0, 1, 2))

  # One tap at a time (lax.map): XLA would otherwise materialise all k * k
  # products view * dy before reducing them (560 MiB of temp per 7x7 layer
  # at 2 x 137 x 167 x 64).
  ii, jj = jnp.meshgrid(jnp.arange(k), jnp.arange(k), indexing='ij')
  dtaps = jax.lax.map(tap_grad, jnp.stack([ii.ravel(), jj.ravel()], -1))
  dtaps = dtaps.reshape(k, k, -1)
  return dx, dtaps.astype(taps.dtype)


_shifted_depthwise.defvjp(_shifted_depthwise_fwd, _shifted_depthwise_bwd)


class DepthwiseConv(nn.Module):
  """nn.Conv(C, (k, k), feature_group_count=C) with a choice of kernel.

  The same parameters ('kernel' [k, k, 1, C], lecun-normal; 'bias' [C],
  zeros) and initial values as that nn.Conv, so checkpoints carry over.

  Attributes:
    kernel_size: k (odd).
    impl: see `depthwise_conv`.
  """

  kernel_size: int = 7
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [N, H, W, C] -> [N, H, W, C]."""
    k, channels = self.kernel_size, x.shape[-1]
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (k, k, 1, channels))
    bias = self.param('bias', nn.initializers.zeros, (channels,))
    return depthwise_conv(x, kernel, self.impl) + bias


class GroupNorm(nn.Module):
  """GroupNorm of each leading-axis entry (each frame) separately.

  Statistics are float32 and computed in one pass (E[x], E[x^2]); the
  normalisation, the learned affine map and an optional conditioning
  scale/shift are folded into one multiply-add per element.

  Attributes:
    epsilon: variance offset.
    dtype: output dtype.
  """

  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, scale: Optional[Array] = None,
               shift: Optional[Array] = None) -> Array:
    """Normalises x, then applies `* (1 + scale) + shift` if given.

    Args:
      x: [N, ..., C] activations; statistics per N and channel group.
      scale: optional [N, C] conditioning scale.
      shift: optional [N, C] conditioning shift.

    Returns:
      [N, ..., C] normalised activations of `dtype`.
    """
    n, c = x.shape[0], x.shape[-1]
    g = num_groups(c)
    gamma = self.param('scale', nn.initializers.ones, (c,))
    beta = self.param('bias', nn.initializers.zeros, (c,))
    xg = x.reshape(n, -1, g, c // g).astype(jnp.float32)
    mean = jnp.mean(xg, axis=(1, 3))
    mean_sq = jnp.mean(jnp.square(xg), axis=(1, 3))
    var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
    inv = jax.lax.rsqrt(var + self.epsilon)  # [N, G]
    inv = jnp.repeat(inv, c // g, axis=1)  # [N, C]
    mean = jnp.repeat(mean, c // g, axis=1)
    a = gamma * inv
    b = beta - mean * a
    if scale is not None:
      a = a * (1.0 + scale)
      b = b * (1.0 + scale)
    if shift is not None:
      b = b + shift
    bshape = (n,) + (1,) * (x.ndim - 2) + (c,)
    y = x.astype(jnp.float32) * a.reshape(bshape) + b.reshape(bshape)
    return y.astype(self.dtype)


class ResBlock(nn.Module):
  """Residual block with space-only convs and log-SNR/label conditioning.

  GroupNorm, SiLU, conv; GroupNorm with a conditioning scale/shift, SiLU,
  dropout, zero-initialised conv; a 1x1 projection of the skip when the
  channel count changes.

  Attributes:
    out_channels: output channels.
    dropout: dropout rate (active only when not deterministic).
    deterministic: disables dropout.
    dtype: compute dtype.
  """

  out_channels: int
  dropout: float = 0.0
  deterministic: bool = True
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, emb: Array) -> Array:
    """x: [N, H, W, Cin], emb: [N, E] -> [N, H, W, out_channels]."""
    c = self.out_channels
    h = nn.silu(GroupNorm(dtype=self.dtype, name='norm_0')(x))
    h = Conv3x3(c, dtype=self.dtype, name='conv_0')(h)
    ss = nn.Dense(2 * c, dtype=jnp.float32, name='emb_proj')(nn.silu(emb))
    scale, shift = jnp.split(ss, 2, axis=-1)
    h = nn.silu(GroupNorm(dtype=self.dtype, name='norm_1')(h, scale, shift))
    h = nn.Dropout(self.dropout)(h, deterministic=self.deterministic)
    h = Conv3x3(c, zero_init=True, dtype=self.dtype, name='conv_1')(h)
    if x.shape[-1] != c:
      x = nn.Dense(c, dtype=self.dtype, name='skip')(x)
    return x.astype(self.dtype) + h


# The einsum attention ('xla'), kept for temporal attention, which needs its
# probabilities (capture / injection); spatial and cross-attention go through
# attention.dot_product_attention.
attention_weights = attention.attention_weights
_attention = attention.einsum_attention


# Variable collections of temporal attention control (Generative
# Inbetweening, Wang et al. 2024, Sec. 3.2): a pass applied with
# mutable=[CAPTURE] returns every temporal attention's probabilities
# [B, H*W, heads, T(query), T(key)] under its module path; a pass given
# {INJECT: those (e.g. flipped)} uses them instead of its own.
CAPTURE = 'attention_capture'
INJECT = 'attention_inject'
PROBS = 'probs'


PATTERNS = ('self', 'sparse_causal')
# Implementations of spatial and cross-attention (models/attention.py).
ATTENTION_IMPLEMENTATIONS = attention.IMPLEMENTATIONS


def sparse_causal_frames(num_frames: int) -> tuple[Any, Any]:
  """The two key frames of each query frame in sparse-causal attention.

  Tune-A-Video (Wu et al. 2022, Sec. 4.1, Eq. 3): frame i attends to the
  pixels of frame 0 and frame i - 1 (frame 0 to frame 0 twice).

  Returns:
    (first, previous): int arrays [T], the frame indices.
  """
  frames = jnp.arange(num_frames)
  return jnp.zeros_like(frames), jnp.maximum(frames - 1, 0)


class SpatialAttention(nn.Module):
  """Self-attention over the pixels of a frame (frames as batch).

  pattern='self': each frame attends to its own pixels (VDM). pattern=
  'sparse_causal': the queries of frame i attend to the keys and values of
  frames 0 and i - 1, concatenated (Tune-A-Video's inflated attention;
  `sparse_causal_frames`); the query projection is then its own 'q'
  parameter beside 'kv' (one-shot tuning trains the queries alone;
  adapt/inflate.py splits an image model's fused 'qkv' into the two).

  Attributes:
    head_dim: target head width; heads = channels // head_dim (>= 1).
    dtype: compute dtype.
    pattern: 'self' or 'sparse_causal'.
    num_frames: T (sparse_causal: to fold the frames-as-batch axis back).
  """

  head_dim: int = 64
  dtype: Dtype = jnp.float32
  pattern: str = 'self'
  num_frames: int = 1
  attention: str = 'auto'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [N, H, W, C] -> [N, H, W, C] (residual included)."""
    n, hgt, wid, c = x.shape
    heads = num_heads(c, self.head_dim)
    d = c // heads
    h = GroupNorm(dtype=self.dtype, name='norm')(x)
    if self.pattern == 'self':
      qkv = nn.Dense(3 * c, dtype=self.dtype, name='qkv')(h)
      qkv = qkv.reshape(n, hgt * wid, 3, heads, d)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
      q = q * jnp.asarray(d**-0.5, q.dtype)
      out = attention.dot_product_attention(
          q, k, v, implementation=self.attention)
    elif self.pattern == 'sparse_causal':
      t = self.num_frames
      b = n // t
      q = nn.Dense(c, dtype=self.dtype, name='q')(h)
      q = q.reshape(b, t, hgt * wid, heads, d) * jnp.asarray(d**-0.5,
                                                             q.dtype)
      kv = nn.Dense(2 * c, dtype=self.dtype, name='kv')(h)
      kv = kv.reshape(b, t, hgt * wid, 2, heads, d)
      first, previous = sparse_causal_frames(t)
      kv = jnp.concatenate([kv[:, first], kv[:, previous]], axis=2)
      kv = kv.reshape(n, 2 * hgt * wid, 2, heads, d)
      out = attention.dot_product_attention(
          q.reshape(n, hgt * wid, heads, d), kv[:, :, 0], kv[:, :, 1],
          implementation=self.attention)
    else:
      raise ValueError(f'Unknown attention pattern {self.pattern!r}; choose'
                       f' one of {PATTERNS}.')
    out = nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                   name='out')(out.reshape(n, hgt, wid, c))
    return x.astype(self.dtype) + out


class TemporalAttention(nn.Module):
  """Self-attention over frames at every pixel, with relative position bias.

  The logits get a learned bias per head and clipped frame distance
  (Shaw et al. 2018): there is no absolute notion of time. A frame mask
  restricts video frames to video frames and each image frame to itself
  (joint image-video training, VDM section 3). Its probabilities can be
  captured (collection CAPTURE) and replaced by given ones (collection
  INJECT): Generative Inbetweening's attention control.

  Attributes:
    num_frames: T (to fold the frames-as-batch axis back).
    head_dim: target head width; heads = channels // head_dim (>= 1).
    max_distance: frame distances are clipped to [-max_distance,
      max_distance].
    dtype: compute dtype.
  """

  num_frames: int
  head_dim: int = 64
  max_distance: int = 32
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, mask: Array) -> Array:
    """Applies temporal attention.

    Args:
      x: [B*T, H, W, C] frames as batch.
      mask: [B, T, T] bool, True where query frame t may attend to key frame
        u.

    Returns:
      [B*T, H, W, C] (residual included).
    """
    n, hgt, wid, c = x.shape
    t = self.num_frames
    b = n // t
    heads = num_heads(c, self.head_dim)
    d = c // heads
    h = GroupNorm(dtype=self.dtype, name='norm')(x)
    qkv = nn.Dense(3 * c, dtype=self.dtype, name='qkv')(h)
    qkv = qkv.reshape(b, t, hgt * wid, 3, heads, d)
    q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
    q = q * jnp.asarray(d**-0.5, q.dtype)
    m = self.max_distance
    table = self.param('rel_bias', nn.initializers.zeros, (2 * m + 1, heads))
    pos = jnp.arange(t)
    rel = jnp.clip(pos[None, :] - pos[:, None], -m, m) + m  # [T(q), T(k)]
    bias = jnp.transpose(table[rel], (2, 0, 1))  # [heads, T, T]
    spec = ('btshd', 'bushd', 'bshtu')
    if self.has_variable(INJECT, PROBS):
      weights = self.get_variable(INJECT, PROBS)
      want = (b, hgt * wid, heads, t, t)
      if weights.shape != want:
        raise ValueError(f'Injected attention probabilities at {self.path}'
                         f' are {weights.shape}; this layer needs {want}.')
    else:
      weights = attention_weights(q, k, spec, bias, mask[:, None, None])
    if self.is_mutable_collection(CAPTURE):
      self.put_variable(CAPTURE, PROBS, weights)
    out = _attention(q, k, v, spec, None, None, weights)
    out = nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                   name='out')(out.reshape(n, hgt, wid, c))
    return x.astype(self.dtype) + out


class CrossAttention(nn.Module):
  """Attention from the pixels of each frame to the tokens of a text.

  Imagen Video's text conditioning (Ho et al. 2022b, frozen T5 embeddings):
  queries from the frame's pixels, keys and values from the (layer-normed)
  token embeddings, masked to each text's tokens. The output projection is
  zero-initialised, so a new cross-attention starts as the identity.

  Attributes:
    head_dim: target head width; heads = channels // head_dim (>= 1).
    dtype: compute dtype.
  """

  head_dim: int = 64
  dtype: Dtype = jnp.float32
  attention: str = 'auto'

  @nn.compact
  def __call__(self, x: Array, context: Array, context_mask: Array) -> Array:
    """Applies cross-attention.

    Args:
      x: [B*T, H, W, C] frames as batch.
      context: [B, Tc, L, D] token embeddings, Tc = 1 (one text per video)
        or T (a text per frame: joint training's image frames).
      context_mask: [B, Tc, L] bool, True on tokens; every row has one.

    Returns:
      [B*T, H, W, C] (residual included).
    """
    n, hgt, wid, c = x.shape
    b, tc, length = context.shape[:3]
    t = n // b
    heads = num_heads(c, self.head_dim)
    d = c // heads
    h = GroupNorm(dtype=self.dtype, name='norm')(x)
    q = nn.Dense(c, dtype=self.dtype, name='q')(h)
    q = q.reshape(b, t, hgt * wid, heads, d) * jnp.asarray(d**-0.5, q.dtype)
    ctx = nn.LayerNorm(dtype=self.dtype, name='norm_context')(context)
    kv = nn.Dense(2 * c, dtype=self.dtype, name='kv')(ctx)
    kv = jnp.broadcast_to(kv.reshape(b, tc, 1, length, 2 * c),
                          (b, tc, t // tc, length, 2 * c)).reshape(
                              n, length, 2, heads, d)
    mask = jnp.broadcast_to(context_mask.reshape(b, tc, 1, length),
                            (b, tc, t // tc, length)).reshape(n, 1, 1, length)
    out = attention.dot_product_attention(
        q.reshape(n, hgt * wid, heads, d), kv[:, :, 0], kv[:, :, 1], mask,
        implementation=self.attention)
    out = nn.Dense(c, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                   name='out')(out.reshape(n, hgt, wid, c))
    return x.astype(self.dtype) + out


class AttentionPool(nn.Module):
  """A text's tokens pooled by attention from a learned query (VDM 4.3).

  Attributes:
    features: output width (the conditioning embedding's).
    head_dim: target head width of the pooling attention.
  """

  features: int
  head_dim: int = 64

  @nn.compact
  def __call__(self, tokens: Array, mask: Array) -> Array:
    """[..., L, D] tokens, [..., L] mask -> [..., features]."""
    heads = num_heads(self.features, self.head_dim)
    d = self.features // heads
    h = nn.LayerNorm(name='norm')(tokens.astype(jnp.float32))
    kv = nn.Dense(2 * heads * d, name='kv')(h)
    kv = kv.reshape(kv.shape[:-1] + (2, heads, d))
    k, v = kv[..., 0, :, :], kv[..., 1, :, :]  # [..., L, heads, d]
    query = self.param('query', nn.initializers.normal(1.0), (heads, d))
    logits = jnp.einsum('...lhd,hd->...hl', k, query) * d**-0.5
    logits = jnp.where(mask[..., None, :], logits,
                       jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1)
    pooled = jnp.einsum('...hl,...lhd->...hd', weights, v)
    return nn.Dense(self.features, name='out')(
        pooled.reshape(pooled.shape[:-2] + (heads * d,)))
