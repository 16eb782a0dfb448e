"""PyTorch state dicts -> Flax parameter trees, by one rule table per family.

The Flax modules of vdm_jax.models name their submodules as diffusers and
transformers name the PyTorch ones, with `.N` written `_N` (a list of
submodules in Flax's `setup` is named `layers_0`, `layers_1`, ...). So one
generic rule maps almost every tensor, as diffusers' former Flax converter
did (diffusers 0.39 `models/modeling_flax_pytorch_utils.py`,
`rename_key_and_reshape_tensor`):

  1. the family's `renames` (regex, replacement), in order, on the torch key;
  2. split on '.', each numeric part fused onto the one before it with '_'
     (`down_blocks.0.resnets.1.conv1.weight` -> down_blocks_0/resnets_1/
     conv1/weight);
  3. the leaf `weight` becomes whichever of `kernel`, `scale`, `embedding`
     the Flax module has, a `kernel` in Flax's layout: Linear [out, in] ->
     [in, out]; Conv1d/2d/3d [out, in, *k] -> [*k, in, out]; a 1x1 Conv2d
     weight [out, in, 1, 1] into a Dense kernel squeezed first (attention
     saved as convolutions by old checkpoints); `bias` and any other leaf
     keep their name and layout.

Coverage is strict: every tensor is consumed (or matches the family's
`ignore`), every Flax parameter is filled once with its exact shape, or a
ValueError lists the keys left over on each side. Values are cast to the
abstract parameter's dtype and, given shardings, placed on the mesh slice by
slice as they are read (`jax.make_array_from_callback` over the memory-mapped
tensor), so a model never exists whole in host memory or on one device.
"""

import dataclasses
import re
from typing import Any, Mapping, Optional, Sequence

from flax import traverse_util
import jax
import numpy as np

WEIGHT_LEAVES = ('kernel', 'scale', 'embedding')
# Reported keys per side in a coverage error.
_SHOW = 20


@dataclasses.dataclass(frozen=True)
class RuleTable:
  """How one model family's torch keys map onto its Flax tree.

  Attributes:
    family: the family's name, for messages.
    renames: (pattern, replacement) pairs applied in order with re.sub to
      every torch key before the generic rule.
    ignore: patterns (re.fullmatch) of torch keys that are not parameters
      (buffers such as transformers' `position_ids`).
  """

  family: str
  renames: tuple[tuple[str, str], ...] = ()
  ignore: tuple[str, ...] = ()

  def flax_name(self, key: str) -> tuple[str, ...]:
    """The Flax path of a torch key before the leaf is resolved."""
    for pattern, repl in self.renames:
      key = re.sub(pattern, repl, key)
    parts = []
    for part in key.split('.'):
      if part.isdigit() and parts:
        parts[-1] = f'{parts[-1]}_{part}'
      else:
        parts.append(part)
    return tuple(parts)

  def ignored(self, key: str) -> bool:
    return any(re.fullmatch(p, key) for p in self.ignore)


def _transform(src: Sequence[int], dst: Sequence[int], leaf: str) -> str:
  """The layout change from a torch tensor of shape src to a Flax leaf."""
  if leaf != 'kernel':
    return 'none'
  if len(src) == len(dst) and len(src) >= 2:
    return 'transpose' if len(src) == 2 else f'conv{len(src) - 2}d'
  if len(src) == 4 and len(dst) == 2 and tuple(src[2:]) == (1, 1):
    return 'squeeze_transpose'
  return f'unsupported rank {len(src)} -> {len(dst)}'


def apply_transform(x: np.ndarray, transform: str) -> np.ndarray:
  """A torch tensor in the layout of its Flax leaf."""
  if transform == 'none':
    return x
  if transform == 'transpose':
    return x.T
  if transform == 'squeeze_transpose':
    return x[:, :, 0, 0].T
  if transform.startswith('conv'):
    n = x.ndim
    return np.transpose(x, tuple(range(2, n)) + (1, 0))
  raise ValueError(f'unknown transform {transform!r}')


def _shape_after(src: Sequence[int], transform: str) -> tuple[int, ...]:
  src = tuple(int(d) for d in src)
  if transform == 'transpose':
    return src[::-1]
  if transform == 'squeeze_transpose':
    return (src[1], src[0])
  if transform.startswith('conv'):
    return src[2:] + (src[1], src[0])
  return src


def _resolve(name: tuple[str, ...], flat: Mapping[tuple[str, ...], Any]
             ) -> Optional[tuple[str, ...]]:
  """The Flax path of a torch name: `weight` resolved against the tree."""
  module, leaf = name[:-1], name[-1]
  if leaf != 'weight':
    return name if name in flat else None
  found = [module + (c,) for c in WEIGHT_LEAVES if module + (c,) in flat]
  return found[0] if len(found) == 1 else None


def _format_keys(keys: Sequence[str]) -> str:
  keys = sorted(keys)
  more = f' ... and {len(keys) - _SHOW} more' if len(keys) > _SHOW else ''
  return ', '.join(keys[:_SHOW]) + more


def plan(shapes: Mapping[str, Sequence[int]], abstract_params: Any,
         table: RuleTable) -> list[dict[str, Any]]:
  """Which torch tensor fills which Flax parameter, from shapes alone.

  Args:
    shapes: {torch key: shape} (e.g. a meta-device state dict's shapes or
      formats.tensor_shapes).
    abstract_params: the Flax parameter tree (ShapeDtypeStructs or arrays).
    table: the family's rules.

  Returns:
    One {'source', 'target' (tuple path), 'transform', 'shape'} per
    tensor, in torch key order.

  Raises:
    ValueError: tensors left over, parameters not filled, filled twice or
      with the wrong shape (all named, with counts).
  """
  flat = traverse_util.flatten_dict(dict(abstract_params))
  entries, unmatched, wrong, filled = [], [], [], {}
  for key in sorted(shapes):
    if table.ignored(key):
      continue
    target = _resolve(table.flax_name(key), flat)
    if target is None:
      unmatched.append(key)
      continue
    src = tuple(int(d) for d in shapes[key])
    transform = _transform(src, flat[target].shape, target[-1])
    got = _shape_after(src, transform)
    if transform.startswith('unsupported') or got != tuple(flat[target].shape):
      wrong.append(f'{key} {src} -> {"/".join(target)} '
                   f'{tuple(flat[target].shape)}')
      continue
    if target in filled:
      wrong.append(f'{key} and {filled[target]} both -> {"/".join(target)}')
      continue
    filled[target] = key
    entries.append({'source': key, 'target': target, 'transform': transform,
                    'shape': got})
  missing = ['/'.join(p) for p in flat if p not in filled]
  if unmatched or missing or wrong:
    lines = [f'{table.family}: the checkpoint does not match the model.']
    if unmatched:
      lines.append(f'{len(unmatched)} checkpoint tensors have no parameter: '
                   f'{_format_keys(unmatched)}')
    if missing:
      lines.append(f'{len(missing)} parameters have no checkpoint tensor: '
                   f'{_format_keys(missing)}')
    if wrong:
      lines.append(f'{len(wrong)} shape or duplicate conflicts: '
                   f'{_format_keys(wrong)}')
    lines.append('Check that the folder holds this model family and that its '
                 'config.json matches its weights.')
    raise ValueError('\n'.join(lines))
  return entries


def convert(tensors: Mapping[str, np.ndarray], abstract_params: Any,
            table: RuleTable, shardings: Any = None) -> dict[str, Any]:
  """The Flax parameter tree of a torch state dict.

  Args:
    tensors: {torch key: array} (numpy or memory-mapped, any float dtype).
    abstract_params: the Flax parameter tree of the module (from
      jax.eval_shape of its init); gives each leaf's shape and dtype.
    table: the family's rules.
    shardings: None (arrays on the default device) or a tree of
      jax.sharding.Sharding matching abstract_params: each parameter is
      assembled on its devices from the slices they hold.

  Returns:
    A nested dict of jax.Arrays, abstract_params' structure and dtypes.
  """
  entries = plan({k: v.shape for k, v in tensors.items()}, abstract_params,
                 table)
  flat = traverse_util.flatten_dict(dict(abstract_params))
  flat_sh = (traverse_util.flatten_dict(dict(shardings))
             if shardings is not None else {})
  out = {}
  for e in entries:
    leaf = flat[e['target']]
    value = apply_transform(tensors[e['source']], e['transform'])
    sharding = flat_sh.get(e['target'])
    if sharding is None:
      out[e['target']] = jax.device_put(np.asarray(value, leaf.dtype))
    else:
      out[e['target']] = jax.make_array_from_callback(
          tuple(leaf.shape), sharding,
          lambda idx, v=value, d=leaf.dtype: np.asarray(v[idx], d))
  return traverse_util.unflatten_dict(out)


def count(abstract_params: Any) -> int:
  """Parameters in a tree of arrays or ShapeDtypeStructs."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params))
