"""The factorized space-time UNet of Video Diffusion Models (Ho et al. 2022).

Section 3 and Fig. 1 of the paper: a DDPM UNet whose 3x3 convolutions become
space-only 1x3x3 convolutions, whose spatial attention treats frames as
batch, and where each spatial attention is followed by a temporal attention
over frames with relative positions (Shaw et al. 2018). Down/upsampling are
spatial only; skips are concatenations.

Choices the paper leaves open (docs/references.md): BigGAN/Wide-ResNet style
residual blocks with GroupNorm (per frame) and a scale/shift conditioning;
a learned per-head relative position bias clipped at `max_temporal_distance`;
temporal attention also in the middle block; heads = channels // head_dim;
attention output projections are zero-initialised like the last conv of
every residual block.

Text conditioning (text_length > 0): the token embeddings of a frozen text
encoder condition the network through cross-attention after each spatial
attention (Imagen Video's choice, Ho et al. 2022b) and/or an attention-pooled
vector added to the conditioning embedding (VDM 4.3); a learned null text
stands in for dropped or empty captions (classifier-free guidance).

Image-to-video (image_condition): a given first frame conditions the
network as in Stable Video Diffusion (Blattmann et al. 2023): the frame,
noise-augmented by the caller, is repeated over the T frames and
concatenated to the noisy input with a mask channel (1 on the frame it
was given for), and the augmentation level's embedding is added to the
conditioning vector. A dropped image (image_null: zeros, mask 0) is the
unconditional branch of classifier-free guidance.
"""

import dataclasses
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from vdm_jax.models import attention
from vdm_jax.models import layers

Array = jax.Array

DTYPES = ('float32', 'bfloat16')
REMAT = ('none', 'block', 'full', 'dots_saveable', 'offload')
# Names (jax.ad_checkpoint.checkpoint_name) of every block's output, the
# tensors that remat policies save or offload by name: residual blocks,
# spatial, cross- and temporal attention.
RES_OUT = 'res_out'
SATTN_OUT = 'sattn_out'
XATTN_OUT = 'xattn_out'
TATTN_OUT = 'tattn_out'
BLOCK_OUTPUTS = (RES_OUT, SATTN_OUT, XATTN_OUT, TATTN_OUT)
SPATIAL_ATTENTION = layers.PATTERNS
ATTENTION = layers.ATTENTION_IMPLEMENTATIONS


def _channel_plan(base_channels: int, channel_mults: Sequence[int],
                  num_res_blocks: int) -> list[tuple[int, int]]:
  """(input, output) channels of every residual block, down/middle/up order."""
  chans = [base_channels * m for m in channel_mults]
  skips = [chans[0]]
  blocks = []
  cur = chans[0]
  for level, ch in enumerate(chans):
    for _ in range(num_res_blocks):
      blocks.append((cur, ch))
      cur = ch
      skips.append(cur)
    if level != len(chans) - 1:
      skips.append(cur)
  blocks += [(cur, cur), (cur, cur)]
  for ch in reversed(chans):
    for _ in range(num_res_blocks + 1):
      cin = cur + skips.pop()
      blocks.append((cin, ch))
      cur = ch
  return blocks


# Over 60 lines: one check per model field, each with its own message.
def validate_model_config(image_size: int, num_frames: int,
                          **model_kwargs: Any) -> None:
  """Raises ValueError on settings UNet3D cannot run, before any compile.

  Args:
    image_size: frame height = width in pixels.
    num_frames: frames per example (video plus image frames).
    **model_kwargs: the fields of `config.model` (UNet3D attributes).

  Raises:
    ValueError: with what is wrong and how to fix it.
  """
  fields = set(UNet3D.__dataclass_fields__) - {'parent', 'name'}
  unknown = set(model_kwargs) - fields
  if unknown:
    raise ValueError(f'Unknown model fields {sorted(unknown)}; UNet3D takes '
                     f'{sorted(fields)}.')
  kw = {f: UNet3D.__dataclass_fields__[f].default for f in fields}
  kw.update(model_kwargs)
  missing = [f for f, v in kw.items() if v is dataclasses.MISSING]
  if missing:
    raise ValueError(f'Missing model fields {sorted(missing)}.')
  if num_frames < 1:
    raise ValueError(f'num_frames must be >= 1, got {num_frames}.')
  if kw['dtype'] not in DTYPES:
    raise ValueError(f'Unknown model.dtype {kw["dtype"]!r}; choose one of '
                     f'{DTYPES}.')
  if kw['spatial_attention'] not in SPATIAL_ATTENTION:
    raise ValueError(
        f'Unknown model.spatial_attention {kw["spatial_attention"]!r};'
        f' choose one of {SPATIAL_ATTENTION}.')
  if kw['attention'] not in ATTENTION:
    raise ValueError(f'Unknown model.attention {kw["attention"]!r}; choose '
                     f'one of {ATTENTION}.')
  attention.check_implementation(kw['attention'])  # This backend runs it.
  if kw['remat'] not in REMAT:
    raise ValueError(f'Unknown model.remat {kw["remat"]!r}; choose one of '
                     f'{REMAT}.')
  if kw['remat'] == 'offload':
    check_offload_supported()
  mults = tuple(kw['channel_mults'])
  base = kw['base_channels']
  if not mults or base < 1 or min(mults) < 1:
    raise ValueError('model.base_channels and model.channel_mults must be '
                     f'positive and non-empty, got {base} and {mults}.')
  if kw['num_res_blocks'] < 1 or kw['head_dim'] < 1:
    raise ValueError('model.num_res_blocks and model.head_dim must be >= 1.')
  if kw['emb_mlp_layers'] < 1:
    raise ValueError('model.emb_mlp_layers must be >= 1.')
  if kw['num_classes'] < 0 or kw['max_temporal_distance'] < 0:
    raise ValueError('model.num_classes and model.max_temporal_distance '
                     'must be >= 0.')
  if kw['text_length'] < 0:
    raise ValueError('text.max_length must be >= 1 for a text model.')
  if kw['text_length'] and not (kw['text_cross_attention']
                                or kw['text_pooling']):
    raise ValueError(
        'A text model needs model.text_cross_attention or model.text_pooling'
        " (else the text reaches nothing); or text.encoder='none'.")
  if not 0.0 <= kw['dropout'] < 1.0:
    raise ValueError(f'model.dropout must lie in [0, 1), got {kw["dropout"]}.')
  factor = 2**(len(mults) - 1)
  if image_size % factor:
    raise ValueError(
        f'image_size {image_size} is not divisible by 2**(len(channel_mults)'
        f' - 1) = {factor}; use an image size that is a multiple of {factor}'
        ' or fewer levels in model.channel_mults.')
  resolutions = [image_size // 2**i for i in range(len(mults))]
  for field in ('attn_resolutions', 'temporal_attn_resolutions'):
    bad = [r for r in kw[field] or () if r not in resolutions]
    if bad:
      raise ValueError(
          f'model.{field} {bad} never occur: with image_size '
          f'{image_size} and {len(mults)} levels the resolutions are '
          f'{resolutions}.')
  normed = {c for pair in _channel_plan(base, mults, kw['num_res_blocks'])
            for c in pair}
  bad = sorted(c for c in normed if c % layers.num_groups(c))
  if bad:
    raise ValueError(
        f'Channel counts {bad} (including skip concatenations) are not '
        f'divisible by the GroupNorm group count {layers.MAX_GROUPS}; use a '
        f'model.base_channels that is a multiple of {layers.MAX_GROUPS} (or '
        f'at most {layers.MAX_GROUPS} channels at every layer).')
  attn_at = set(kw['attn_resolutions']) | set(temporal_resolutions(
      kw['attn_resolutions'], kw['temporal_attn_resolutions']))
  attn_ch = {base * m for m, r in zip(mults, resolutions)
             if r in attn_at} | {base * mults[-1]}
  bad = sorted(c for c in attn_ch if c % layers.num_heads(c, kw['head_dim']))
  if bad:
    raise ValueError(
        f'Attention channel counts {bad} do not split into heads of '
        f'model.head_dim {kw["head_dim"]}; use a head_dim that divides them.')


def temporal_resolutions(attn_resolutions: Sequence[int],
                         temporal_attn_resolutions: Optional[Sequence[int]]
                         ) -> tuple[int, ...]:
  """The spatial sizes with temporal attention (None: attn_resolutions)."""
  if temporal_attn_resolutions is None:
    return tuple(attn_resolutions)
  return tuple(temporal_attn_resolutions)


def check_offload_supported() -> None:
  """Raises ValueError if the default device has no pinned host memory.

  model.remat='offload' moves the saved block outputs to the 'pinned_host'
  memory of the device (JAX memory kinds); CPU, GPU and TPU backends of JAX
  0.10 have one. Checked at trace time, before anything compiles.
  """
  device = jax.local_devices()[0]
  kinds = [m.kind for m in device.addressable_memories()]
  if 'pinned_host' not in kinds:
    raise ValueError(
        f"model.remat='offload' needs a 'pinned_host' memory on the device, "
        f'but {device.platform} device {device.id} has only {kinds}; use '
        "model.remat='block' (the same tensors, kept on the device) or "
        "'full'.")


def remat_policy(remat: str) -> Any:
  """The jax.checkpoint policy of the whole network, or None.

  'dots_saveable' saves every matmul and convolution output
  (jax.checkpoint_policies.dots_saveable) and recomputes the elementwise
  ops between them (GroupNorm, SiLU, softmax, residual adds); 'offload'
  moves the block outputs (BLOCK_OUTPUTS) to pinned host memory and
  recomputes everything else from them. Other policies ('none', 'block',
  'full') are not whole-network policies: None.
  """
  if remat == 'dots_saveable':
    return jax.checkpoint_policies.dots_saveable
  if remat == 'offload':
    return jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=(),
        names_which_can_be_offloaded=BLOCK_OUTPUTS,
        offload_src='device', offload_dst='pinned_host')
  return None


def count_params(params: Any) -> int:
  """Total number of parameter entries in a pytree."""
  return sum(int(x.size) for x in jax.tree.leaves(params))


def temporal_attention_mask(frame_mask: Array) -> Array:
  """Which frames may attend to which (VDM section 3, joint training).

  Args:
    frame_mask: [B, T] bool, True = video frame, False = image frame.

  Returns:
    [B, T, T] bool: video frames attend to all video frames, each image frame
    only to itself.
  """
  t = frame_mask.shape[1]
  both = frame_mask[:, :, None] & frame_mask[:, None, :]
  return both | jnp.eye(t, dtype=bool)[None]


class _Level(nn.Module):
  """The residual (+ attention) blocks of one UNet level, down or up path.

  Each block: a residual block, then (use_attn) spatial attention and
  cross-attention (cross_attn), then (temporal) temporal attention.
  """

  channels: int
  num_blocks: int
  use_attn: bool
  up: bool
  num_frames: int
  head_dim: int
  max_distance: int
  dropout: float
  deterministic: bool
  remat_blocks: bool
  dtype: Any
  cross_attn: bool = False
  temporal: bool = True
  spatial_pattern: str = 'self'
  attention: str = 'auto'

  @nn.compact
  def __call__(self, h: Array, emb: Array, mask: Array,
               skips: Sequence[Array] = (), context: Optional[Array] = None,
               context_mask: Optional[Array] = None
               ) -> tuple[Array, list[Array]]:
    """Runs the blocks; down levels return their outputs for the skips.

    Args:
      h: [B*T, H, W, C] input.
      emb: [B*T, E] conditioning embedding.
      mask: [B, T, T] temporal attention mask.
      skips: up levels: the num_blocks [B*T, H, W, C_i] skips to consume,
        last one first.
      context, context_mask: text tokens [B, Tc, L, D] and mask [B, Tc, L]
        of the cross-attention (cross_attn only).

    Returns:
      ([B*T, H, W, channels] output, the outputs of each block (down only)).
    """
    res_cls, sattn_cls, tattn_cls, xattn_cls = _block_classes(
        self.remat_blocks)
    skips = list(skips)
    outs = []
    for i in range(self.num_blocks):
      if self.up:
        h = jnp.concatenate([h, skips.pop().astype(h.dtype)], axis=-1)
      h = checkpoint_name(
          res_cls(self.channels, self.dropout, self.deterministic,
                  self.dtype, name=f'res_{i}')(h, emb), RES_OUT)
      if self.use_attn:
        h = checkpoint_name(
            sattn_cls(self.head_dim, self.dtype, self.spatial_pattern,
                      self.num_frames, attention=self.attention,
                      name=f'sattn_{i}')(h), SATTN_OUT)
        if self.cross_attn:
          h = checkpoint_name(
              xattn_cls(self.head_dim, self.dtype, attention=self.attention,
                        name=f'xattn_{i}')(h, context, context_mask),
              XATTN_OUT)
      if self.temporal:
        h = checkpoint_name(
            tattn_cls(self.num_frames, self.head_dim, self.max_distance,
                      self.dtype, name=f'tattn_{i}')(h, mask), TATTN_OUT)
      outs.append(h)
    return h, outs


def _block_classes(remat: bool):
  classes = (layers.ResBlock, layers.SpatialAttention,
             layers.TemporalAttention, layers.CrossAttention)
  if remat:
    return tuple(nn.remat(c) for c in classes)
  return classes


class UNet3D(nn.Module):
  """Factorized space-time UNet: (z, logsnr, label, frame_mask) -> prediction.

  Attributes:
    base_channels: width of the first level.
    channel_mults: channel multiplier per level; resolution halves between
      levels.
    num_res_blocks: residual blocks per level (num_res_blocks + 1 on the up
      path).
    attn_resolutions: spatial sizes (pixels) with spatial (and cross-)
      attention, and temporal attention unless temporal_attn_resolutions
      says otherwise.
    temporal_attn_resolutions: spatial sizes with temporal attention; None
      means attn_resolutions. Temporal attention is cheap where spatial
      attention is not (T keys per pixel against H*W), so it can run at
      the finer levels too, as in lucidrains/video-diffusion-pytorch's
      Unet3D (temporal attention at every level).
    head_dim: attention head width; heads = channels // head_dim (>= 1).
    dropout: dropout rate inside residual blocks (train=True only).
    num_classes: label classes; 0 = unconditional. Label num_classes is the
      null label of classifier-free guidance.
    emb_dim: conditioning embedding width; None means 4 * base_channels.
    emb_mlp_layers: Dense layers of the conditioning MLP.
    max_temporal_distance: clipping range of the relative position bias.
    dtype: compute dtype 'float32' or 'bfloat16'. 'bfloat16' is mixed
      precision: parameters (and so their gradients, EMA and optimizer
      state) stay float32 and are cast at each use; convolutions, attention
      projections, activations and the residual stream are bfloat16;
      attention logits and softmax, GroupNorm statistics and the affine
      map, and the conditioning path (log-SNR/label/text embedding MLPs,
      each block's scale/shift projection) are float32; the output is cast
      to float32, so the loss is float32 (docs/scaling.md).
    remat: what the backward pass recomputes instead of keeping
      (docs/scaling.md has the bytes each keeps): 'none'; 'block'
      (rematerialise each residual/attention block: keep only its input);
      'full' (also each whole level: keep only the level inputs);
      'dots_saveable' (keep every matmul/convolution output, recompute the
      elementwise ops; one jax.checkpoint over the network); 'offload'
      (move every block output to pinned host memory and recompute the rest
      from them; one jax.checkpoint over the network; needs a backend with
      a 'pinned_host' memory, which CPU, GPU and TPU have).
    out_channels: output channels; None means the input channels.
    text_length: L, tokens per text of the text encoder; 0: no text.
    text_cross_attention: cross-attention to the text tokens after every
      spatial attention (text_length > 0).
    text_pooling: add the attention-pooled text to the conditioning
      embedding (text_length > 0).
    temporal_attention: False leaves out every temporal attention: frames
      are independent images (a text-to-image model, the base that
      Tune-A-Video inflates; adapt/inflate.py).
    spatial_attention: 'self' (each frame's own pixels) or 'sparse_causal'
      (frame i attends to frames 0 and i - 1: Tune-A-Video,
      layers.SpatialAttention).
    image_condition: an image-to-video model: the call takes the first
      frame (`image`, its noise level `image_sigma`).
    attention: implementation of spatial and cross-attention: 'auto' (by
      backend and shape), 'xla', 'cudnn' or 'pallas' (models/attention.py).
      Not a parameter: any checkpoint samples under any choice.
    frame_positions: add each video frame's index (sinusoidal features
      through a zero-initialised Dense) to its conditioning embedding;
      image frames of joint training get none. Without it the network
      knows only relative frame distances (the temporal attention's bias),
      so its prediction from pure noise is the same for every frame: what
      only shows in absolute time (a caption's direction of motion, which
      decides where the object starts and ends) must be learnt from the
      frames' correlations alone.
  """

  base_channels: int
  channel_mults: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  temporal_attn_resolutions: Optional[Sequence[int]] = None
  head_dim: int = 64
  dropout: float = 0.0
  num_classes: int = 0
  emb_dim: Optional[int] = None
  emb_mlp_layers: int = 2
  max_temporal_distance: int = 32
  dtype: str = 'float32'
  remat: str = 'none'
  out_channels: Optional[int] = None
  text_length: int = 0
  text_cross_attention: bool = True
  text_pooling: bool = True
  temporal_attention: bool = True
  spatial_attention: str = 'self'
  image_condition: bool = False
  attention: str = 'auto'
  frame_positions: bool = False

  def _config(self) -> dict[str, Any]:
    fields = set(UNet3D.__dataclass_fields__) - {'parent', 'name'}
    return {f: getattr(self, f) for f in fields}

  def _text(self, text: Optional[Array], text_mask: Optional[Array],
            text_null: Optional[Array], b: int, t: int
            ) -> tuple[Optional[Array], Optional[Array]]:
    """Text tokens [B, Tc, L, D] and mask [B, Tc, L] (Tc = 1 or T).

    Rows that are null (text_null, or no token at all: the empty text)
    take the learned null text, whose L tokens are all attended to.
    """
    if not self.text_length:
      if text is not None:
        raise ValueError(
            'A text was given but this model has no text conditioning'
            " (trained with text.encoder='none').")
      return None, None
    if text is None:
      raise ValueError('This text-conditioned model needs cond text and'
                       ' text_mask (the empty text for none).')
    per_frame = text.ndim == 4
    if text.shape[:1 + per_frame] not in ((b,), (b, t)) or (
        text.shape[-2] != self.text_length):
      raise ValueError(
          f'text must be [B, L, D] or [B, T, L, D] with B={b}, T={t},'
          f' L=text_length={self.text_length}; got {text.shape}.')
    if not per_frame:
      text, text_mask = text[:, None], text_mask[:, None]
    text_mask = jnp.asarray(text_mask, bool)
    null = ~jnp.any(text_mask, axis=-1)  # [B, Tc]
    if text_null is not None:
      text_null = jnp.asarray(text_null, bool)
      null = null | (text_null[:, None] if text_null.ndim == 1
                     else text_null)
    null_text = self.param('null_text', nn.initializers.normal(1.0),
                           (self.text_length, text.shape[-1]))
    text = jnp.where(null[..., None, None], null_text,
                     jnp.asarray(text, jnp.float32))
    text_mask = jnp.where(null[..., None], True, text_mask)
    return text, text_mask

  def _embed(self, logsnr: Array, label: Optional[Array], b: int,
             t: int, text: Optional[Array] = None,
             text_mask: Optional[Array] = None,
             image_sigma: Optional[Array] = None,
             frame_mask: Optional[Array] = None) -> Array:
    """Conditioning embedding [B*T, E] from logsnr, label, text, image.

    Each of logsnr and label is per example ([B]) or per frame ([B, T]);
    text [B, Tc, L, D] (from `_text`) adds its attention-pooled vector;
    image_sigma [B] (image models) the embedding of the conditioning
    frame's noise level; frame_mask [B, T] (frame_positions) which frames
    are video frames, numbered 0, 1, ... in order.
    """
    emb_dim = self.emb_dim or 4 * self.base_channels
    logsnr = jnp.asarray(logsnr, jnp.float32)
    if logsnr.shape not in ((b,), (b, t)):
      raise ValueError(f'logsnr must have shape [B]={(b,)} or [B, T]='
                       f'{(b, t)}, got {logsnr.shape}.')
    emb = layers.logsnr_embedding(logsnr, self.base_channels)
    for i in range(self.emb_mlp_layers):
      if i:
        emb = nn.silu(emb)
      emb = nn.Dense(emb_dim, name=f'emb_mlp_{i}')(emb)
    if image_sigma is not None:
      # The noise level as a log-SNR of the image's own scale (sigma^2
      # against 1), embedded like the diffusion time (SVD embeds it too).
      level = -2.0 * jnp.log(jnp.maximum(
          jnp.asarray(image_sigma, jnp.float32), 1e-4))
      image_emb = nn.Dense(emb_dim, name='image_noise_emb')(nn.silu(
          layers.logsnr_embedding(level, self.base_channels)))
      emb = emb + (image_emb if emb.ndim == 2 else image_emb[:, None])
    if self.num_classes > 0:
      if label is None:
        label = jnp.full((b,), self.num_classes, jnp.int32)
      if jnp.shape(label) not in ((b,), (b, t)):
        raise ValueError(f'label must have shape [B]={(b,)} or [B, T]='
                         f'{(b, t)}, got {jnp.shape(label)}.')
      label_emb = nn.Embed(self.num_classes + 1, emb_dim,
                           name='label_emb')(label)  # [B, E] or [B, T, E]
      if emb.ndim != label_emb.ndim:
        if emb.ndim == 2:
          emb = emb[:, None]
        else:
          label_emb = label_emb[:, None]
      emb = emb + label_emb
    elif label is not None:
      raise ValueError('A label was given but model.num_classes is 0.')
    if emb.ndim == 2:
      emb = jnp.broadcast_to(emb[:, None], (b, t, emb_dim))
    if self.frame_positions:
      is_video = jnp.asarray(frame_mask, jnp.float32)
      index = jnp.cumsum(is_video, axis=1) - 1.0
      emb = emb + is_video[..., None] * nn.Dense(
          emb_dim, kernel_init=nn.initializers.zeros, name='frame_pos')(
              layers.sinusoidal_embedding(index, self.base_channels))
    if text is not None and self.text_pooling:
      emb = emb + layers.AttentionPool(emb_dim, self.head_dim,
                                       name='text_pool')(text, text_mask)
    return emb.reshape(b * t, emb_dim)

  def _image_input(self, z: Array, image: Optional[Array],
                   image_sigma: Optional[Array], image_null: Optional[Array]
                   ) -> tuple[Array, Optional[Array]]:
    """z with the image channels of an image model: [B, T, H, W, 2C + 1].

    The image is repeated over the frames, the mask channel is 1 on the
    first frame (where the image was given) unless the image is null.
    Returns (z, image_sigma [B] or None).
    """
    b, t, hgt, wid, c = z.shape
    if not self.image_condition:
      if image is not None:
        raise ValueError('An image was given but this model is not an'
                         ' image-to-video model (model.image_condition).')
      return z, None
    if image is None:
      image = jnp.zeros((b, hgt, wid, c), jnp.float32)
      image_null = jnp.ones((b,), bool)
    if image.shape != (b, hgt, wid, c):
      raise ValueError(f'image must be [B, H, W, C] = {(b, hgt, wid, c)},'
                       f' got {image.shape}.')
    keep = jnp.ones((b,), jnp.float32)
    if image_null is not None:
      keep = 1.0 - jnp.asarray(image_null, jnp.float32).reshape(b)
    if image_sigma is None:
      image_sigma = jnp.zeros((b,), jnp.float32)
    image = jnp.asarray(image, jnp.float32) * keep[:, None, None, None]
    frames = jnp.broadcast_to(image[:, None], (b, t, hgt, wid, c))
    mask = jnp.zeros((b, t, hgt, wid, 1), jnp.float32).at[:, 0].set(
        keep[:, None, None, None])
    z = jnp.concatenate([z.astype(jnp.float32), frames, mask], axis=-1)
    return z, jnp.asarray(image_sigma, jnp.float32).reshape(b)

  @nn.compact
  def __call__(self, z: Array, logsnr: Array, label: Optional[Array] = None,
               frame_mask: Optional[Array] = None, *,
               text: Optional[Array] = None,
               text_mask: Optional[Array] = None,
               text_null: Optional[Array] = None,
               image: Optional[Array] = None,
               image_sigma: Optional[Array] = None,
               image_null: Optional[Array] = None,
               train: bool = False) -> Array:
    """Predicts eps / v / x from a noisy video.

    Args:
      z: [B, T, H, W, C] noisy video.
      logsnr: [B] or [B, T] float32 log-SNR (per frame when [B, T]).
      label: [B] int32 in [0, num_classes], or [B, T] (a label per frame:
        the image frames of joint training come from other videos, each
        with its own class); None = the null label.
      frame_mask: [B, T] bool, True = video frame, False = independent image
        frame; None = all video frames.
      text: [B, L, D] float token embeddings of each video's text, or
        [B, T, L, D] (a text per frame: joint training's image frames).
      text_mask: [B, L] or [B, T, L] bool, True on tokens (none: the empty
        text, i.e. the null text).
      text_null: [B] or [B, T] bool: use the learned null text instead
        (caption dropout; the unconditional branch of guidance).
      image: image models: [B, H, W, C] the (noise-augmented) first frame,
        in [-1, 1]; None: no image (as image_null).
      image_sigma: [B] the noise level the image was augmented with.
      image_null: [B] bool: drop the image (zeros, mask 0; image dropout,
        the unconditional branch of guidance).
      train: enables dropout (needs a 'dropout' rng).

    Returns:
      [B, T, H, W, out_channels] float32.
    """
    b, t, hgt, wid, c = z.shape
    validate_model_config(hgt, t, **self._config())
    out_ch = self.out_channels or c
    text, text_mask = self._text(text, text_mask, text_null, b, t)
    z, image_sigma = self._image_input(z, image, image_sigma, image_null)
    if frame_mask is None:
      frame_mask = jnp.ones((b, t), bool)
    emb = self._embed(logsnr, label, b, t, text, text_mask, image_sigma,
                      frame_mask)
    mask = temporal_attention_mask(frame_mask.astype(bool))

    trunk = functools.partial(UNet3D._trunk, out_channels=out_ch,
                              train=train)
    policy = remat_policy(self.remat)
    if policy is not None:
      # One checkpoint over the network, so that the policy alone decides
      # what is kept: checkpointing each level instead would also keep
      # every level's inputs on the device, among them all the skips.
      trunk = nn.remat(trunk, policy=policy)
    h = trunk(self, z.reshape(b * t, hgt, wid, z.shape[-1]), emb, mask, text,
              text_mask)
    return h.reshape(b, t, hgt, wid, out_ch).astype(jnp.float32)

  # Over 60 lines: the network reads top to bottom (stem, down levels, middle,
  # up levels, head) as in the DDPM UNet it follows; split, it would not.
  def _trunk(self, x: Array, emb: Array, mask: Array, text: Optional[Array],
             text_mask: Optional[Array], *, out_channels: int,
             train: bool) -> Array:
    """The UNet on frames-as-batch inputs.

    Args:
      x: [B*T, H, W, Cin] input frames (noisy video, image channels).
      emb: [B*T, E] conditioning embedding.
      mask: [B, T, T] temporal attention mask.
      text, text_mask: [B, Tc, L, D] and [B, Tc, L] (from `_text`), or None.
      out_channels: output channels.
      train: enables dropout.

    Returns:
      [B*T, H, W, out_channels] in the compute dtype.
    """
    hgt, t = x.shape[1], mask.shape[1]
    dtype = jnp.dtype(self.dtype)
    cross = text is not None and self.text_cross_attention
    level_cls = nn.remat(_Level) if self.remat == 'full' else _Level
    remat_blocks = self.remat in ('block', 'full')
    res_cls, sattn_cls, tattn_cls, xattn_cls = _block_classes(remat_blocks)
    common = dict(num_frames=t, head_dim=self.head_dim,
                  max_distance=self.max_temporal_distance,
                  dropout=self.dropout, deterministic=not train,
                  remat_blocks=remat_blocks, dtype=dtype,
                  cross_attn=cross, spatial_pattern=self.spatial_attention,
                  attention=self.attention)
    ctx = dict(context=text, context_mask=text_mask) if cross else {}
    chans = [self.base_channels * m for m in self.channel_mults]
    last = len(chans) - 1
    temporal_at = temporal_resolutions(self.attn_resolutions,
                                       self.temporal_attn_resolutions)
    # Per level: spatial attention, temporal attention.
    attn = [(hgt >> i in self.attn_resolutions,
             self.temporal_attention and hgt >> i in temporal_at)
            for i in range(len(chans))]

    h = layers.Conv3x3(chans[0], dtype=dtype, name='conv_in')(x)
    skips = [h]
    for i, ch in enumerate(chans):
      h, outs = level_cls(ch, self.num_res_blocks, attn[i][0],
                          temporal=attn[i][1], up=False,
                          name=f'down_{i}', **common)(h, emb, mask, **ctx)
      skips += outs
      if i != last:
        h = layers.Conv3x3(ch, strides=2, dtype=dtype, name=f'downsample_{i}')(
            h)
        skips.append(h)

    h = checkpoint_name(
        res_cls(chans[-1], self.dropout, not train, dtype, name='mid_res_0')(
            h, emb), RES_OUT)
    h = checkpoint_name(
        sattn_cls(self.head_dim, dtype, self.spatial_attention, t,
                  attention=self.attention, name='mid_sattn')(h), SATTN_OUT)
    if cross:
      h = checkpoint_name(
          xattn_cls(self.head_dim, dtype, attention=self.attention,
                    name='mid_xattn')(h, text, text_mask), XATTN_OUT)
    if self.temporal_attention:
      h = checkpoint_name(
          tattn_cls(t, self.head_dim, self.max_temporal_distance, dtype,
                    name='mid_tattn')(h, mask), TATTN_OUT)
    h = checkpoint_name(
        res_cls(chans[-1], self.dropout, not train, dtype, name='mid_res_1')(
            h, emb), RES_OUT)

    n_up = self.num_res_blocks + 1
    for i in reversed(range(len(chans))):
      level_skips = skips[-n_up:]
      del skips[-n_up:]
      h, _ = level_cls(chans[i], n_up, attn[i][0], temporal=attn[i][1],
                       up=True, name=f'up_{i}', **common)(
                           h, emb, mask, level_skips, **ctx)
      if i:
        n, hh, ww, cc = h.shape
        h = jnp.broadcast_to(h[:, :, None, :, None],
                             (n, hh, 2, ww, 2, cc)).reshape(
                                 n, 2 * hh, 2 * ww, cc)
        h = layers.Conv3x3(chans[i], dtype=dtype, name=f'upsample_{i}')(h)

    h = nn.silu(layers.GroupNorm(dtype=dtype, name='norm_out')(h))
    h = layers.Conv3x3(out_channels, zero_init=True, dtype=dtype,
                       name='conv_out')(h)
    return h
