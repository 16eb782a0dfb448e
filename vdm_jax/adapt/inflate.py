"""Tune-A-Video's inflation of a text-to-image UNet into a video UNet.

Tune-A-Video (Wu et al. 2022, arXiv 2212.11565, Sec. 4.1 and Fig. 3) turns
a pretrained text-to-image model into a video model: every spatial
self-attention becomes sparse-causal attention (the queries of frame i see
the keys and values of frames 0 and i - 1; layers.SpatialAttention with
pattern='sparse_causal'), and a temporal self-attention is added after
each spatial block. In this library the image model is a UNet3D with
model.temporal_attention=False (frames are a batch of images); inflating
it means model.temporal_attention=True and
model.spatial_attention='sparse_causal'. The new temporal attentions'
output projections start at zero, so they add nothing at step 0.

This module is the parameter side: copying the image parameters into the
video model's tree (the fused spatial 'qkv' projection is split into 'q'
and 'kv', since only the queries are tuned), choosing which parameters are
tuned, and splitting / merging the tuned and frozen halves. It imports no
optimizer and no program.
"""

import re
from typing import Any, Mapping

import flax
import jax.numpy as jnp

# What `trainable` in tuned_mask may be.
TRAINABLE = ('attention_queries', 'all')
# The model fields inflation changes; every other field must equal the
# image model's.
INFLATED_FIELDS = {'temporal_attention': True,
                   'spatial_attention': 'sparse_causal'}

_SPATIAL = re.compile(r'^(mid_)?sattn(_\d+)?$')
_CROSS = re.compile(r'^(mid_)?xattn(_\d+)?$')
_TEMPORAL = re.compile(r'^(mid_)?tattn(_\d+)?$')


def _flat(tree: Mapping[str, Any]) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def _is_temporal(path: tuple[str, ...]) -> bool:
  return any(_TEMPORAL.match(p) for p in path)


def is_tuned(path: tuple[str, ...], trainable: str = 'attention_queries'
             ) -> bool:
  """Whether Tune-A-Video trains the parameter at `path` (Sec. 4.2).

  'attention_queries': the query projections of the spatial (sparse-causal)
  and cross-attentions, and every parameter of the temporal attentions
  (their public code's trainable modules: attn1.to_q, attn2.to_q,
  attn_temp); 'all': full fine-tuning.
  """
  if trainable not in TRAINABLE:
    raise ValueError(f'Unknown tune.trainable {trainable!r}; choose one of'
                     f' {TRAINABLE}.')
  if trainable == 'all' or _is_temporal(path):
    return True
  return (len(path) >= 3 and path[-2] == 'q'
          and bool(_SPATIAL.match(path[-3]) or _CROSS.match(path[-3])))


def tuned_mask(params: Any, trainable: str = 'attention_queries') -> Any:
  """A bool pytree like `params`: True on the tuned leaves."""
  flat = _flat(params)
  return flax.traverse_util.unflatten_dict(
      {k: is_tuned(k, trainable) for k in flat})


def split(params: Any, trainable: str = 'attention_queries'
          ) -> tuple[dict, dict]:
  """(tuned, frozen): two nested dicts that `merge` puts back together."""
  flat = _flat(params)
  tuned = {k: v for k, v in flat.items() if is_tuned(k, trainable)}
  frozen = {k: v for k, v in flat.items() if k not in tuned}
  return (flax.traverse_util.unflatten_dict(tuned),
          flax.traverse_util.unflatten_dict(frozen))


def merge(tuned: Any, frozen: Any) -> dict:
  """The whole parameter tree from `split`'s halves."""
  flat = _flat(frozen)
  overlap = set(flat) & set(_flat(tuned))
  if overlap:
    raise ValueError(f'Parameters both tuned and frozen: {sorted(overlap)}.')
  flat.update(_flat(tuned))
  return flax.traverse_util.unflatten_dict(flat)


def inflate_params(image_params: Any, video_params: Any) -> dict:
  """The video model's parameters, from the image model's.

  Args:
    image_params: parameters of the UNet3D with temporal_attention=False
      (and spatial_attention='self').
    video_params: a fresh initialisation of the inflated UNet3D (same
      fields otherwise); its temporal attentions are kept, everything else
      is replaced by the image model's.

  Returns:
    The inflated parameter tree (the structure of video_params).

  Raises:
    ValueError: an image parameter that has no place in the video model,
      or a video parameter the image model lacks (other than the temporal
      attentions): the two configs describe different networks.
  """
  image = _flat(image_params)
  used = set()
  out = {}
  for path, init in _flat(video_params).items():
    if _is_temporal(path):
      out[path] = init
      continue
    src, cols = path, None
    if (len(path) >= 3 and path[-2] in ('q', 'kv')
        and _SPATIAL.match(path[-3])):
      # Image models fuse q, k, v of spatial attention into one 'qkv'
      # projection whose last axis is [q | k | v], C each.
      src = path[:-2] + ('qkv', path[-1])
      c = init.shape[-1] if path[-2] == 'q' else init.shape[-1] // 2
      cols = slice(0, c) if path[-2] == 'q' else slice(c, 3 * c)
    if src not in image:
      raise ValueError(
          f'The inflated model has a parameter {"/".join(path)} that the'
          ' image model lacks: its config differs in more than the inflated'
          f' fields {sorted(INFLATED_FIELDS)}.')
    value = image[src] if cols is None else image[src][..., cols]
    if value.shape != init.shape:
      raise ValueError(
          f'Parameter {"/".join(path)}: image model {value.shape}, inflated'
          f' model {init.shape}; the configs differ in model size.')
    used.add(src)
    out[path] = jnp.asarray(value, init.dtype)
  unused = sorted('/'.join(p) for p in set(image) - used)
  if unused:
    raise ValueError(
        f'Image model parameters with no place in the inflated model:'
        f' {unused[:5]}{" ..." if len(unused) > 5 else ""}; its config'
        ' differs in more than the inflated fields.')
  return flax.traverse_util.unflatten_dict(out)

