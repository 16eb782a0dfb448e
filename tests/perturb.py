"""Parameters moved off their initialisation, for tests of trained models."""

import jax
import numpy as np


def perturbed(params, seed, scale):
  """params + scale * N(0, 1), an independent draw per leaf (NumPy, seed).

  Zero-initialised layers (output projections) would otherwise hide the
  blocks before them, as they do at step 0 and not after training. Drawn on
  the host: a jitted draw compiles one threefry program per leaf shape, 6-8 s
  a model on 2 cores (28 s of the suite, 2026-12-06), for tiny arrays.
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda x: jax.numpy.asarray(
          np.asarray(x) + scale * rng.standard_normal(x.shape).astype(x.dtype)),
      params)
