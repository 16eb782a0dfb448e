"""Parameters moved off their initialisation, for tests of trained models."""

import functools

import jax


@functools.partial(jax.jit, static_argnames='scale')  # One compile a tree.
def perturbed(params, rng, scale):
  """params + scale * N(0, 1), an independent draw per leaf.

  Zero-initialised layers (output projections) would otherwise hide the
  blocks before them, as they do at step 0 and not after training.
  """
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(rng, len(leaves))
  return jax.tree.unflatten(tree, [
      x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
