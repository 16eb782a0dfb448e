"""CLIP text and vision transformers (Radford et al. 2021) in Flax.

Mirrors transformers' PyTorch CLIP (transformers/models/clip/modeling_clip.py)
module for module, with the same submodule names (`text_model/embeddings/
token_embedding`, `encoder/layers_3/self_attn/q_proj`, ...), so that
vdm_jax/pretrained/clip.py maps a checkpoint's state dict onto the parameter
tree by name alone:

  CLIPTextModel     Stable Diffusion's text encoder: OpenAI CLIP ViT-L/14
                    (SD 1.x, quick_gelu) or OpenCLIP ViT-H/14 (SD 2.x, exact
                    gelu, 23 of its 24 layers); with `projection_dim` also
                    transformers' CLIPTextModelWithProjection.
  CLIPVisionModel   the vision tower; with `projection_dim`, transformers'
                    CLIPVisionModelWithProjection (Stable Video Diffusion's
                    image encoder, ViT-H/14).

Both are pre-LayerNorm transformers; the text one is causal and pools the
end-of-text token, the vision one pools the class token. Attention goes
through the library's dispatch (models/attention.py). Architectures only:
reading files lives in vdm_jax/pretrained/.
"""

from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vdm_jax.models import attention as attention_lib

Array = jax.Array

DTYPES = ('float32', 'bfloat16')
ACTIVATIONS = ('quick_gelu', 'gelu')
REMAT = ('none', 'block', 'dots_saveable')
# transformers' legacy CLIP configs set eos_token_id = 2 (before its PR
# #24773); it then pools at the argmax of the ids (the end-of-text token has
# the largest id in CLIP's vocabulary).
LEGACY_EOS_TOKEN_ID = 2


def check_fields(hidden_act: str, dtype: str, remat: str,
                 attention: str) -> None:
  """Raises ValueError naming an unsupported option, before compiling."""
  for name, value, choices in (('hidden_act', hidden_act, ACTIVATIONS),
                               ('dtype', dtype, DTYPES),
                               ('remat', remat, REMAT),
                               ('attention', attention,
                                attention_lib.IMPLEMENTATIONS)):
    if value not in choices:
      raise ValueError(f'CLIP {name}={value!r} is not supported; supported: '
                       f'{", ".join(choices)}.')


def activation(name: str, x: Array) -> Array:
  """transformers' ACT2FN: 'quick_gelu' x sigmoid(1.702 x), 'gelu' exact."""
  if name == 'quick_gelu':
    return x * jax.nn.sigmoid(1.702 * x)
  if name == 'gelu':
    return jax.nn.gelu(x, approximate=False)
  raise ValueError(f'CLIP hidden_act={name!r} is not supported; supported: '
                   f'{", ".join(ACTIVATIONS)}.')


def causal_mask(length: int, attention_mask: Optional[Array] = None
                ) -> Array:
  """Which keys each query may attend to, for the text transformer.

  Args:
    length: L, tokens per text.
    attention_mask: [B, L] 1 for real tokens, 0 for padding, or None.

  Returns:
    bool [1 or B, 1, L, L], True = attend: key j <= query i (and j a real
    token). Key 0 (the start token) is always allowed, so no row is empty.
  """
  mask = jnp.tril(jnp.ones((length, length), bool))[None, None]
  if attention_mask is not None:
    mask = mask & attention_mask.astype(bool)[:, None, None, :]
  return mask


class CLIPAttention(nn.Module):
  """Multi-head self-attention with separate q/k/v/out projections.

  Attributes:
    num_heads: attention heads; the width must divide by it.
    dtype: compute dtype.
    attention: implementation of models/attention.py.
  """

  num_heads: int
  dtype: Any = jnp.float32
  attention: str = 'auto'

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array] = None) -> Array:
    """x: [B, L, D]; mask: bool broadcastable to [B, heads, L, L]."""
    b, length, d = x.shape
    head_dim = d // self.num_heads

    def heads(name: str) -> Array:
      y = nn.Dense(d, dtype=self.dtype, name=name)(x)
      return y.reshape(b, length, self.num_heads, head_dim)

    q = heads('q_proj') * jnp.asarray(head_dim**-0.5, self.dtype)
    out = attention_lib.dot_product_attention(
        q, heads('k_proj'), heads('v_proj'), mask=mask,
        implementation=self.attention)
    return nn.Dense(d, dtype=self.dtype, name='out_proj')(
        out.reshape(b, length, d))


class CLIPMLP(nn.Module):
  """fc1 -> activation -> fc2 (activation in float32)."""

  intermediate_size: int
  hidden_act: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """x: [B, L, D] -> [B, L, D]."""
    h = nn.Dense(self.intermediate_size, dtype=self.dtype, name='fc1')(x)
    h = activation(self.hidden_act, h.astype(jnp.float32)).astype(self.dtype)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name='fc2')(h)


class CLIPEncoderLayer(nn.Module):
  """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

  num_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float
  dtype: Any = jnp.float32
  attention: str = 'auto'

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array]) -> Array:
    """x: [B, L, D] (compute dtype); mask as CLIPAttention's."""
    def norm(name: str, y: Array) -> Array:
      y = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=jnp.float32,
                       name=name)(y.astype(jnp.float32))
      return y.astype(self.dtype)

    x = x + CLIPAttention(self.num_heads, self.dtype, self.attention,
                          name='self_attn')(norm('layer_norm1', x), mask)
    return x + CLIPMLP(self.intermediate_size, self.hidden_act, self.dtype,
                       name='mlp')(norm('layer_norm2', x))


class CLIPEncoder(nn.Module):
  """The stack of encoder layers (`layers_0`, `layers_1`, ...).

  Attributes:
    num_hidden_layers, num_heads, intermediate_size, hidden_act,
    layer_norm_eps, dtype, attention: as CLIPEncoderLayer's.
    remat: 'none', 'block' (recompute each layer in the backward pass) or
      'dots_saveable' (each layer keeps its matmul outputs only).
  """

  num_hidden_layers: int
  num_heads: int
  intermediate_size: int
  hidden_act: str
  layer_norm_eps: float
  dtype: Any = jnp.float32
  attention: str = 'auto'
  remat: str = 'none'

  @nn.compact
  def __call__(self, x: Array, mask: Optional[Array]) -> tuple[Array, ...]:
    """Returns the hidden states: the input and each layer's output.

    Args:
      x: [B, L, D] embeddings.
      mask: as CLIPAttention's, or None.

    Returns:
      num_hidden_layers + 1 arrays [B, L, D] (transformers'
      `hidden_states`; the last is the encoder's output).
    """
    layer_cls = CLIPEncoderLayer
    if self.remat == 'block':
      layer_cls = nn.remat(CLIPEncoderLayer)
    elif self.remat == 'dots_saveable':
      layer_cls = nn.remat(CLIPEncoderLayer,
                           policy=jax.checkpoint_policies.dots_saveable)
    states = [x]
    for i in range(self.num_hidden_layers):
      x = layer_cls(self.num_heads, self.intermediate_size, self.hidden_act,
                    self.layer_norm_eps, self.dtype, self.attention,
                    name=f'layers_{i}')(x, mask)
      states.append(x)
    return tuple(states)


@flax.struct.dataclass
class CLIPTextOutput:
  """What CLIPTextModel returns.

  Attributes:
    last_hidden_state: [B, L, D] final_layer_norm of the last layer.
    pooler_output: [B, D] last_hidden_state at the end-of-text token.
    hidden_states: num_hidden_layers + 1 arrays [B, L, D]: the embeddings
      and each layer's output (before final_layer_norm).
    context: [B, L, D] the cross-attention context of diffusers' Stable
      Diffusion pipelines: last_hidden_state, or with `clip_skip` = k > 0
      final_layer_norm(hidden_states[-(k + 1)]).
    text_embeds: [B, projection_dim] text_projection(pooler_output), or
      None without a projection.
  """

  last_hidden_state: Array
  pooler_output: Array
  hidden_states: tuple[Array, ...]
  context: Array
  text_embeds: Optional[Array] = None


class CLIPTextTransformer(nn.Module):
  """transformers' CLIPTextModel body: embeddings, encoder, final norm."""

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_attention_heads: int
  num_hidden_layers: int
  max_position_embeddings: int
  hidden_act: str
  layer_norm_eps: float
  eos_token_id: int
  dtype: Any = jnp.float32
  attention: str = 'auto'
  remat: str = 'none'

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Optional[Array],
               clip_skip: int) -> CLIPTextOutput:
    b, length = input_ids.shape
    if length > self.max_position_embeddings:
      raise ValueError(f'{length} tokens per text; the CLIP text model takes '
                       f'at most {self.max_position_embeddings}.')
    x = _TextEmbeddings(self.vocab_size, self.hidden_size,
                        self.max_position_embeddings, name='embeddings')(
                            input_ids).astype(self.dtype)
    states = CLIPEncoder(
        self.num_hidden_layers, self.num_attention_heads,
        self.intermediate_size, self.hidden_act, self.layer_norm_eps,
        self.dtype, self.attention, self.remat, name='encoder')(
            x, causal_mask(length, attention_mask))
    states = tuple(s.astype(jnp.float32) for s in states)
    final_norm = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=jnp.float32,
                              name='final_layer_norm')
    last = final_norm(states[-1])
    if self.eos_token_id == LEGACY_EOS_TOKEN_ID:
      eos = jnp.argmax(input_ids, axis=-1)
    else:
      eos = jnp.argmax(input_ids == self.eos_token_id, axis=-1)
    pooled = last[jnp.arange(b), eos]
    context = last if clip_skip == 0 else final_norm(states[-(clip_skip + 1)])
    return CLIPTextOutput(last_hidden_state=last, pooler_output=pooled,
                          hidden_states=states, context=context)


class _TextEmbeddings(nn.Module):
  """token_embedding(ids) + position_embedding(0..L-1)."""

  vocab_size: int
  hidden_size: int
  max_position_embeddings: int

  @nn.compact
  def __call__(self, input_ids: Array) -> Array:
    """input_ids: int [B, L], L <= max_position_embeddings -> [B, L, D]."""
    tokens = nn.Embed(self.vocab_size, self.hidden_size,
                      name='token_embedding')(input_ids)
    positions = nn.Embed(self.max_position_embeddings, self.hidden_size,
                         name='position_embedding')(
                             jnp.arange(input_ids.shape[-1]))
    return tokens + positions[None]


class CLIPTextModel(nn.Module):
  """transformers' CLIPTextModel (and CLIPTextModelWithProjection).

  Parameters: `text_model/{embeddings, encoder, final_layer_norm}` and,
  with a projection, `text_projection` (no bias), as the state dict keys of
  Stable Diffusion's `text_encoder/` folders.

  Attributes:
    vocab_size: tokens in the vocabulary (49408 for CLIP's BPE).
    hidden_size: D, the width.
    intermediate_size: hidden units of each MLP.
    num_attention_heads: heads per layer (D must divide by it).
    num_hidden_layers: encoder layers.
    max_position_embeddings: the longest text, L <= this (77).
    hidden_act: 'quick_gelu' (OpenAI CLIP) or 'gelu' (exact; OpenCLIP).
    layer_norm_eps: LayerNorm epsilon.
    eos_token_id: the end-of-text id whose first occurrence is pooled; the
      legacy value 2 pools at the argmax of the ids, as transformers does.
    projection_dim: width of `text_embeds` (CLIPTextModelWithProjection),
      or None for the plain CLIPTextModel.
    dtype: compute dtype 'float32' or 'bfloat16' (parameters stay float32;
      LayerNorms, activations and the outputs are float32).
    attention: implementation of models/attention.py ('auto', 'xla', ...).
    remat: 'none', 'block' or 'dots_saveable' (CLIPEncoder).
  """

  vocab_size: int = 49408
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_attention_heads: int = 12
  num_hidden_layers: int = 12
  max_position_embeddings: int = 77
  hidden_act: str = 'quick_gelu'
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407
  projection_dim: Optional[int] = None
  dtype: str = 'float32'
  attention: str = 'auto'
  remat: str = 'none'

  @nn.compact
  def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
               clip_skip: int = 0) -> CLIPTextOutput:
    """Encodes token ids.

    Args:
      input_ids: int [B, L] token ids (pretrained/clip_tokenizer.py).
      attention_mask: [B, L] 1 = real token, 0 = padding, or None (what
        Stable Diffusion's pipelines pass: padding is seen, causally).
      clip_skip: 0, or k > 0 for the context of the k-th last layer
        (diffusers' `clip_skip`), see CLIPTextOutput.context.

    Returns:
      CLIPTextOutput, float32.
    """
    check_fields(self.hidden_act, self.dtype, self.remat, self.attention)
    out = CLIPTextTransformer(
        self.vocab_size, self.hidden_size, self.intermediate_size,
        self.num_attention_heads, self.num_hidden_layers,
        self.max_position_embeddings, self.hidden_act, self.layer_norm_eps,
        self.eos_token_id, jnp.dtype(self.dtype), self.attention,
        self.remat, name='text_model')(input_ids, attention_mask, clip_skip)
    if self.projection_dim is None:
      return out
    embeds = nn.Dense(self.projection_dim, use_bias=False,
                      name='text_projection')(out.pooler_output)
    return out.replace(text_embeds=embeds)


@flax.struct.dataclass
class CLIPVisionOutput:
  """What CLIPVisionModel returns.

  Attributes:
    last_hidden_state: [B, 1 + N, D] the encoder's output (class token
      first, then the N patches in row-major order).
    pooler_output: [B, D] post_layernorm of the class token.
    hidden_states: num_hidden_layers + 1 arrays [B, 1 + N, D]: the
      pre_layrnorm output and each layer's output.
    image_embeds: [B, projection_dim] visual_projection(pooler_output), or
      None without a projection.
  """

  last_hidden_state: Array
  pooler_output: Array
  hidden_states: tuple[Array, ...]
  image_embeds: Optional[Array] = None


class _VisionEmbeddings(nn.Module):
  """Patch embedding (a bias-free strided conv), class token, positions."""

  hidden_size: int
  image_size: int
  patch_size: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixel_values: Array) -> Array:
    """pixel_values: [B, H, W, C] with H = W = image_size -> [B, 1+N, D]."""
    b = pixel_values.shape[0]
    p = self.patch_size
    patches = nn.Conv(self.hidden_size, (p, p), strides=(p, p),
                      padding='VALID', use_bias=False, dtype=self.dtype,
                      name='patch_embedding')(pixel_values.astype(self.dtype))
    patches = patches.reshape(b, -1, self.hidden_size)
    cls = self.param('class_embedding', nn.initializers.normal(1.0),
                     (self.hidden_size,))
    cls = jnp.broadcast_to(cls.astype(patches.dtype),
                           (b, 1, self.hidden_size))
    x = jnp.concatenate([cls, patches], axis=1)
    positions = nn.Embed(x.shape[1], self.hidden_size,
                         name='position_embedding')(jnp.arange(x.shape[1]))
    return x.astype(jnp.float32) + positions[None]


class CLIPVisionTransformer(nn.Module):
  """transformers' CLIPVisionModel body (the `vision_model` of a state dict).

  Attributes: as CLIPVisionModel's.
  """

  hidden_size: int
  intermediate_size: int
  num_attention_heads: int
  num_hidden_layers: int
  image_size: int
  patch_size: int
  hidden_act: str
  layer_norm_eps: float
  dtype: Any = jnp.float32
  attention: str = 'auto'
  remat: str = 'none'

  @nn.compact
  def __call__(self, pixel_values: Array) -> CLIPVisionOutput:
    _, h, w, _ = pixel_values.shape
    if (h, w) != (self.image_size, self.image_size):
      raise ValueError(f'Image of {h}x{w} pixels; the CLIP vision model takes '
                       f'{self.image_size}x{self.image_size} (resize it with '
                       'models/clip_preprocess.py).')
    x = _VisionEmbeddings(self.hidden_size, self.image_size, self.patch_size,
                          self.dtype, name='embeddings')(pixel_values)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=jnp.float32,
                     name='pre_layrnorm')(x)
    states = CLIPEncoder(
        self.num_hidden_layers, self.num_attention_heads,
        self.intermediate_size, self.hidden_act, self.layer_norm_eps,
        self.dtype, self.attention, self.remat, name='encoder')(
            x.astype(self.dtype), None)
    states = tuple(s.astype(jnp.float32) for s in states)
    pooled = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=jnp.float32,
                          name='post_layernorm')(states[-1][:, 0])
    return CLIPVisionOutput(last_hidden_state=states[-1],
                            pooler_output=pooled, hidden_states=states)


class CLIPVisionModel(nn.Module):
  """transformers' CLIPVisionModel / CLIPVisionModelWithProjection.

  Parameters: `vision_model/{embeddings, pre_layrnorm (sic, transformers'
  spelling), encoder, post_layernorm}` and, with a projection,
  `visual_projection` (no bias), as the keys of SVD's `image_encoder/`.

  Attributes:
    hidden_size, intermediate_size, num_attention_heads, num_hidden_layers,
    hidden_act, layer_norm_eps, dtype, attention, remat: as CLIPTextModel's.
    image_size: H = W of the input (224).
    patch_size: side of the square patches (14 for ViT-H/14).
    projection_dim: width of `image_embeds`, or None for CLIPVisionModel.
  """

  hidden_size: int = 1280
  intermediate_size: int = 5120
  num_attention_heads: int = 16
  num_hidden_layers: int = 32
  image_size: int = 224
  patch_size: int = 14
  hidden_act: str = 'gelu'
  layer_norm_eps: float = 1e-5
  projection_dim: Optional[int] = 1024
  dtype: str = 'float32'
  attention: str = 'auto'
  remat: str = 'none'

  @nn.compact
  def __call__(self, pixel_values: Array) -> CLIPVisionOutput:
    """Encodes images.

    Args:
      pixel_values: [B, image_size, image_size, 3] CLIP-normalised images
        (clip_preprocess.svd_image_preprocess).

    Returns:
      CLIPVisionOutput, float32.
    """
    check_fields(self.hidden_act, self.dtype, self.remat, self.attention)
    out = CLIPVisionTransformer(
        self.hidden_size, self.intermediate_size, self.num_attention_heads,
        self.num_hidden_layers, self.image_size, self.patch_size,
        self.hidden_act, self.layer_norm_eps, jnp.dtype(self.dtype),
        self.attention, self.remat, name='vision_model')(pixel_values)
    if self.projection_dim is None:
      return out
    embeds = nn.Dense(self.projection_dim, use_bias=False,
                      name='visual_projection')(out.pooler_output)
    return out.replace(image_embeds=embeds)

