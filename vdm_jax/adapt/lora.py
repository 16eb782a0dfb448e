"""LoRA (Hu et al. 2021, arXiv 2106.09685) on a Flax parameter tree.

The diffusers / peft convention: on every attention's to_q, to_k, to_v and
to_out.0, W x becomes W x + (alpha / r) B A x with A [r, in] drawn as
peft's default (kaiming_uniform(a=sqrt(5)): uniform in +-1/sqrt(in)) and B
[out, r] zero, so the model starts equal to the base. Here the update is
merged into the kernel before the forward (kernel + s * A^T B^T in Flax's
[in, out] layout): the same function, one extra [in, out] product per
layer, and the modules stay as they are. Only A and B are trained: the
optimizer state and checkpoint hold r (in + out) numbers per layer.

The tree of LoRA factors mirrors the parameters:
`.../attn1/to_q/lora_a` [in, r] and `.../attn1/to_q/lora_b` [r, out].
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp

TARGETS = ('to_q', 'to_k', 'to_v', 'to_out_0')


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def targets(params: Any) -> list[tuple[str, ...]]:
  """Module paths of every kernel LoRA adapts (sorted)."""
  return sorted(k[:-1] for k in _flat(params)
                if len(k) >= 2 and k[-1] == 'kernel' and k[-2] in TARGETS)


def init(params: Any, rng: jax.Array, rank: int = 4) -> dict:
  """LoRA factors for `params` (arrays or ShapeDtypeStructs).

  Args:
    params: the base parameters.
    rng: draws the A factors.
    rank: r.

  Returns:
    {path + ('lora_a',): [in, r], path + ('lora_b',): [r, out] zeros}
    as a nested dict.
  """
  if rank < 1:
    raise ValueError(f'tune.lora_rank={rank} must be >= 1.')
  flat = _flat(params)
  out = {}
  for i, path in enumerate(targets(params)):
    d_in, d_out = flat[path + ('kernel',)].shape
    bound = d_in ** -0.5
    out[path + ('lora_a',)] = jax.random.uniform(
        jax.random.fold_in(rng, i), (d_in, rank), jnp.float32, -bound, bound)
    out[path + ('lora_b',)] = jnp.zeros((rank, d_out), jnp.float32)
  return flax.traverse_util.unflatten_dict(out)


def expected_count(params: Any, rank: int) -> int:
  """r (in + out) summed over the adapted layers."""
  flat = _flat(params)
  return sum(rank * sum(flat[p + ('kernel',)].shape) for p in targets(params))


def apply(params: Any, factors: Any, scale: float) -> dict:
  """params with each adapted kernel W + scale * A B ([in, out] layout).

  Args:
    params: the base parameters.
    factors: `init`'s tree (trained).
    scale: alpha / r.

  Returns:
    The merged parameter tree (params' structure).
  """
  flat = _flat(params)
  lora = _flat(factors)
  for path in {k[:-1] for k in lora}:
    a, b = lora[path + ('lora_a',)], lora[path + ('lora_b',)]
    kernel = flat[path + ('kernel',)]
    flat[path + ('kernel',)] = kernel + (scale * (a @ b)).astype(kernel.dtype)
  return flax.traverse_util.unflatten_dict(flat)
