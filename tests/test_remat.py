"""model.remat policies: same gradients, fewer kept bytes, clear errors.

One UNet level (8 channels, 8x8 pixels, 2 frames) with every block kind but
cross-attention (no text), dropout on, random non-zero parameters (the real
init zeroes every output projection, so most gradients would be zero).
What the backward pass keeps is read from the jaxpr of jax.vjp's closure, as
experiments/remat_memory.py does (traced, nothing compiled).
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax.models import unet3d

jax.config.update('jax_disable_most_optimizations', True)

MICRO = dict(base_channels=8, channel_mults=(1,), num_res_blocks=1,
             attn_resolutions=(8,), head_dim=8, dropout=0.1)
SIZE, FRAMES = 8, 2


def _model(remat):
  return unet3d.UNet3D(**MICRO, remat=remat)


def _inputs(b):
  rng = np.random.default_rng(1)
  z = jnp.asarray(rng.standard_normal((b, FRAMES, SIZE, SIZE, 3)),
                  jnp.float32)
  return z, jnp.linspace(-5.0, 5.0, b)


def _params():
  z, logsnr = _inputs(1)
  shapes = jax.eval_shape(lambda: _model('none').init(
      jax.random.key(0), z, logsnr))['params']
  leaves, tree = jax.tree.flatten(shapes)
  rng = np.random.default_rng(0)
  return tree.unflatten([jnp.asarray(
      0.3 * rng.standard_normal(x.shape) / np.sqrt(max(x.shape[0], 1)),
      jnp.float32) for x in leaves])


def _loss(remat):
  def loss(params, z, logsnr):
    out = _model(remat).apply({'params': params}, z, logsnr, train=True,
                              rngs={'dropout': jax.random.key(2)})
    return jnp.mean(jnp.square(out - z))
  return loss


def _residual_bytes(remat, b):
  """{'device', 'host'}: bytes the backward pass keeps (traced)."""
  params = jax.eval_shape(_params)
  z, logsnr = _inputs(b)
  closed = jax.make_jaxpr(lambda p, z, s: jax.vjp(
      lambda q: _loss(remat)(q, z, s), p)[1])(params, z, logsnr)
  out = {'device': 0, 'host': 0}
  for var in {id(v): v for v in closed.jaxpr.outvars}.values():
    space = var.aval.memory_space.name.lower()
    out['host' if space == 'host' else 'device'] += (
        var.aval.size * var.aval.dtype.itemsize)
  return out


def _per_example(remat):
  one, two = _residual_bytes(remat, 1), _residual_bytes(remat, 2)
  return {k: two[k] - one[k] for k in one}


def test_every_policy_has_the_gradients_of_none():
  """Same loss and gradients as 'none' (float32, dropout on).

  Not bitwise: the recomputed forward pass is scheduled and fused
  differently (measured: losses equal, gradients within 3e-8 absolute of
  'none', for gradients up to about 1), so the tolerance is rtol 1e-5 and
  atol 1e-7.
  """
  params = _params()
  z, logsnr = _inputs(2)
  grad = {r: jax.jit(jax.value_and_grad(_loss(r)))(params, z, logsnr)
          for r in unet3d.REMAT}
  loss_none, g_none = grad['none']
  assert max(np.max(np.abs(g)) for g in jax.tree.leaves(g_none)) > 1e-2
  for remat in unet3d.REMAT[1:]:
    np.testing.assert_allclose(grad[remat][0], loss_none, rtol=1e-6,
                               err_msg=remat)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5,
                              atol=1e-7, err_msg=remat)
    jax.tree.map(close, grad[remat][1], g_none)


def test_residual_bytes_order():
  """Per example: none > dots_saveable > block > full > offload on device.

  Measured on this model: none 876 kB, dots_saveable 357 kB, block 90 kB,
  full 53 kB; offload keeps 4 kB on the device and moves 53 kB (every
  block output) to pinned host memory.
  """
  kept = {r: _per_example(r) for r in unet3d.REMAT}
  device = {r: kept[r]['device'] for r in unet3d.REMAT}
  assert (device['none'] > device['dots_saveable'] > device['block']
          > device['full'] > device['offload']), device
  assert device['block'] < device['none'] / 5, device
  assert all(kept[r]['host'] == 0 for r in unet3d.REMAT if r != 'offload')
  # The block outputs themselves: as many bytes as 'full' keeps at most.
  assert 0 < kept['offload']['host'] <= device['block'], kept['offload']
  assert device['offload'] < kept['offload']['host'] / 5, kept['offload']


def _names(jaxpr):
  """Names of the checkpoint_name equations in a jaxpr and its sub-jaxprs."""
  names = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'name':
      names.append(eqn.params['name'])
    for v in eqn.params.values():
      for sub in (v if isinstance(v, (tuple, list)) else (v,)):
        if hasattr(sub, 'eqns'):
          names += _names(sub)
        elif hasattr(sub, 'jaxpr') and hasattr(sub.jaxpr, 'eqns'):
          names += _names(sub.jaxpr)
  return names


@pytest.mark.parametrize('remat', ['none', 'offload'])
def test_every_block_output_is_named(remat):
  """5 residual blocks (down 1, middle 2, up 2) and 4 of each attention."""
  z, logsnr = _inputs(1)
  closed = jax.make_jaxpr(_loss(remat))(jax.eval_shape(_params), z, logsnr)
  names = _names(closed.jaxpr)
  assert {n: names.count(n) for n in set(names)} == {
      unet3d.RES_OUT: 5, unet3d.SATTN_OUT: 4, unet3d.TATTN_OUT: 4}


def test_unknown_policy_is_a_clear_error():
  with pytest.raises(ValueError, match=r"Unknown model.remat 'dots'; choose "
                     r"one of \('none', 'block', 'full', 'dots_saveable', "
                     r"'offload'\)"):
    unet3d.validate_model_config(SIZE, FRAMES, **MICRO, remat='dots')


def test_offload_without_pinned_host_is_a_clear_error(monkeypatch):
  """Raised when the model is traced, before anything compiles."""
  device = types.SimpleNamespace(
      platform='fake', id=0,
      addressable_memories=lambda: [types.SimpleNamespace(kind='device')])
  monkeypatch.setattr(unet3d.jax, 'local_devices', lambda: [device])
  z, logsnr = _inputs(1)
  with pytest.raises(ValueError, match="model.remat='offload' needs a "
                     "'pinned_host' memory"):
    jax.eval_shape(lambda: _model('offload').init(jax.random.key(0), z,
                                                  logsnr))
