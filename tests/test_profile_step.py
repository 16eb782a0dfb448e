"""experiments/profile_step.py reads compiled HLO correctly.

The classification of executed operations (what its sums mean) on a small
compiled program with a convolution, a dot and a reduction; nothing traced
with the profiler.
"""

import importlib.util
import os

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
  spec = importlib.util.spec_from_file_location(
      'profile_step', os.path.join(ROOT, 'experiments', 'profile_step.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_operations_are_classified_by_what_they_compute():
  profile_step = _load()

  def f(x, k, w):
    y = jax.lax.conv_general_dilated(
        x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return jnp.sum(y ** 2, axis=(1, 2)) @ w

  args = (jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 4)), jnp.ones((4, 4)))
  # With XLA's optimisations (tests/conftest.py turns most off), as a real
  # step is compiled: some operations arrive fused.
  was = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', False)
  try:
    text = jax.jit(f).lower(*args).compile().as_text()
  finally:
    jax.config.update('jax_disable_most_optimizations', was)
  comps, instructions = profile_step.parse_hlo(text)
  entry = next(line for line in text.splitlines()
               if line.startswith('ENTRY'))
  assert entry.split()[1].lstrip('%') in comps
  kinds = {profile_step.kind_of(name, comps, instructions)
           for name in instructions}
  assert 'fusion' not in kinds, kinds  # Every fusion is looked into.
  # The convolution, the dot and the sum each land in their own kind,
  # whether XLA left them alone or fused them.
  assert {'convolution', 'fusion:convolution'} & kinds, kinds
  assert {'dot', 'fusion:dot'} & kinds, kinds
  assert {'reduce', 'fusion:reduce'} & kinds, kinds
  # sum(y ** 2) arrives as one fusion (a multiply into a reduce), read as a
  # reduction, not as elementwise work.
  assert 'fusion:reduce' in kinds, kinds
  assert profile_step.kind_of('no such op', comps, instructions) is None
