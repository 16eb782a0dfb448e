"""The attention dispatch (models/attention.py): parity, choice and errors.

Every implementation that can run on CPU is checked against independent
references, values and gradients w.r.t. q, k and v, with no mask, a key mask,
a bias, and a full mask plus bias:
  - 'xla' (the einsum) against a float64 NumPy softmax attention (values) and
    `jax.nn.dot_product_attention(implementation='xla')` (gradients);
  - the 'cudnn' branch's argument preparation (mask/bias broadcast to full
    [Tq, Tk], scale 1), run with jax.nn's XLA implementation, since cuDNN
    itself needs an NVIDIA GPU;
  - 'pallas': the TPU flash attention kernel itself, in TPU interpret mode
    (`pltpu.force_tpu_interpret_mode`), with its padding to 128-wide blocks
    and segment-id key masks.
float32 to 1e-5; bfloat16 inputs to BF16_ATOL against the float32 result on
the same (bf16-rounded) inputs.
"""

import jax
from jax.experimental.pallas import tpu as pltpu
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax.models import attention
from vdm_jax.models import layers

B, TQ, TK, N, D = 2, 40, 24, 2, 16
F32_TOL = 1e-5
# bf16 has an 8-bit mantissa (relative step 2^-8 ~ 4e-3); outputs are O(1)
# averages of values, so a few steps of rounding in q k, p and p v.
BF16_ATOL = 3e-2
CASES = ('none', 'key_mask', 'bias', 'mask_bias')


def _inputs(case, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal(s).astype(np.float32) * f
             for s, f in (((B, TQ, N, D), D**-0.5), ((B, TK, N, D), 1.0),
                          ((B, TK, N, D), 1.0)))
  mask = bias = None
  if case in ('key_mask', 'mask_bias'):
    keys = rng.random((B, TK)) < 0.6  # Not a prefix: a padding mask is one.
    keys[:, 0] = True
    keys[1, 7:] = False
    mask = keys[:, None, None, :]  # [B, 1, 1, Tk]
  if case == 'mask_bias':
    full = rng.random((B, 1, TQ, TK)) < 0.7
    full[..., 0] = True
    mask = full & mask
  if case in ('bias', 'mask_bias'):
    bias = rng.standard_normal((1, N, TQ, TK)).astype(np.float32)
  return q, k, v, mask, bias


def _numpy_attention(q, k, v, mask, bias):
  """float64 softmax(q k^T + bias) v over allowed keys, BTNH."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum('bqhd,bkhd->bhqk', q, k)
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', p, v)


def _value_and_grads(fn, q, k, v):
  """fn(q, k, v) and the gradients of <fn, a fixed random cotangent>."""
  out = fn(q, k, v)
  cot = jnp.asarray(np.random.default_rng(9).standard_normal(out.shape),
                    out.dtype)
  grads = jax.grad(lambda *a: jnp.vdot(fn(*a).astype(jnp.float32),
                                       cot.astype(jnp.float32)),
                   argnums=(0, 1, 2))(q, k, v)
  return out, grads


def _assert_close(got, want, tol, what):
  (out_g, grads_g), (out_w, grads_w) = got, want
  np.testing.assert_allclose(np.float32(out_g), np.float32(out_w), atol=tol,
                             rtol=tol, err_msg=f'{what}: values')
  for name, g, w in zip('qkv', grads_g, grads_w):
    np.testing.assert_allclose(np.float32(g), np.float32(w), atol=tol,
                               rtol=tol, err_msg=f'{what}: d{name}')


def _dispatch(name, mask, bias, backend=None):
  return lambda q, k, v: attention.dot_product_attention(
      q, k, v, mask, bias, implementation=name, backend=backend)


def _jax_nn(mask, bias):
  return lambda q, k, v: jax.nn.dot_product_attention(
      q, k, v, bias=None if bias is None else jnp.broadcast_to(
          bias, (B, N, TQ, TK)), mask=mask, scale=1.0, implementation='xla')


@pytest.mark.parametrize('case', CASES)
def test_xla_matches_numpy_and_jax_nn(case):
  q, k, v, mask, bias = _inputs(case)
  got = _value_and_grads(_dispatch('xla', mask, bias), q, k, v)
  np.testing.assert_allclose(got[0], _numpy_attention(q, k, v, mask, bias),
                             atol=F32_TOL, rtol=F32_TOL)
  _assert_close(got, _value_and_grads(_jax_nn(mask, bias), q, k, v),
                F32_TOL, f'xla vs jax.nn ({case})')


@pytest.mark.parametrize('case', CASES)
def test_cudnn_branch_arguments(case):
  """The cuDNN branch's broadcasting and scale, run by jax.nn's XLA code."""
  q, k, v, mask, bias = _inputs(case)
  got = _value_and_grads(
      lambda *a: attention._jax_nn_attention(*a, mask, bias, 'xla'), q, k, v)
  want = _value_and_grads(_dispatch('xla', mask, bias), q, k, v)
  _assert_close(got, want, F32_TOL, f'cudnn branch ({case})')


@pytest.mark.parametrize('case', ('key_mask', 'mask_bias'))
def test_pallas_kernel_interpreted(case):
  q, k, v, mask, bias = _inputs(case)
  with pltpu.force_tpu_interpret_mode():
    got = _value_and_grads(_dispatch('pallas', mask, bias, 'tpu'), q, k, v)
  want = _value_and_grads(_dispatch('xla', mask, bias), q, k, v)
  _assert_close(got, want, F32_TOL, f'pallas ({case})')


def _kernel_in_xla(seen):
  """fa.flash_attention's contract (BNTH, additive ab, equal segment ids
  attend) in XLA, recording the batch each call sees."""

  def kernel(q, k, v, ab=None, segment_ids=None, sm_scale=1.0):
    seen.append(q.shape[0])
    logits = sm_scale * jnp.einsum('bnqd,bnkd->bnqk', q, k)
    if ab is not None:
      logits = logits + ab
    if segment_ids is not None:
      same = segment_ids.q[:, None, :, None] == segment_ids.kv[:, None, None]
      logits = jnp.where(same, logits, -1e30)
    return jnp.einsum('bnqk,bnkd->bnqd', jax.nn.softmax(logits), v)

  return kernel


@pytest.mark.parametrize('case', ('key_mask', 'mask_bias'))
def test_pallas_per_device_within_kernels_on(case, monkeypatch):
  """Within kernels_on the kernel runs in a shard_map, one batch row per
  device of a 2-device mesh, its padded inputs and segment ids split with
  it: values and gradients as unsplit. The kernel is replaced by its
  contract in XLA (the kernel itself: test_pallas_kernel_interpreted; in
  interpret mode its callbacks from several CPU devices can deadlock)."""
  seen = []
  monkeypatch.setattr(attention.fa, 'flash_attention', _kernel_in_xla(seen))
  q, k, v, mask, bias = _inputs(case)
  mesh = jax.sharding.Mesh(jax.devices()[:B], ('data',))
  split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  q, k, v = (jax.device_put(x, split) for x in (q, k, v))
  fn = jax.jit(_dispatch('pallas', mask, bias, 'tpu'))
  with attention.kernels_on(mesh, ('data', 'fsdp')):
    got = _value_and_grads(fn, q, k, v)
  assert seen and set(seen) == {1}, f'kernel batches {seen}, not per device'
  want = _value_and_grads(_dispatch('xla', mask, bias), q, k, v)
  _assert_close(got, want, F32_TOL, f'pallas per device ({case})')
  seen.clear()
  _dispatch('pallas', mask, bias, 'tpu')(q, k, v)  # Outside: unsplit.
  assert set(seen) == {B}


def test_auto_takes_pallas_only_where_it_is_placed():
  """XLA cannot partition the Pallas kernel: on a process with several
  devices (this suite has 8) 'auto' takes it only within kernels_on, and
  only where the rows divide over the mesh's batch axes."""
  q = (8, 1024, 8, 64)
  tpu = lambda *a: attention.resolve('auto', *a, backend='tpu')
  assert jax.device_count() > 1
  assert tpu(q, q, jnp.bfloat16) == 'xla'
  mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2),
                           ('data', 'fsdp'))
  with attention.kernels_on(mesh, ('data', 'fsdp')):
    assert tpu(q, q, jnp.bfloat16) == 'pallas'
    assert tpu((12,) + q[1:], (12,) + q[1:], jnp.bfloat16) == 'xla'
    with pytest.raises(ValueError, match='12 attention rows do not divide'
                       ' over 8 devices'):
      attention.resolve('pallas', (12,) + q[1:], (12,) + q[1:],
                        jnp.bfloat16, backend='tpu')
  with attention.kernels_on(mesh, ('data',)):  # 'fsdp' not a batch axis.
    assert tpu((12,) + q[1:], (12,) + q[1:], jnp.bfloat16) == 'pallas'
  # A deviceless TPU compile from this host (vdm_jax.plan) decides for the
  # TPU, and still needs kernels_on.
  with attention.compile_for('tpu'):
    assert attention.resolve('auto', q, q, jnp.bfloat16) == 'xla'
    with attention.kernels_on(mesh, ('data', 'fsdp')):
      assert attention.resolve('auto', q, q, jnp.bfloat16) == 'pallas'
  assert attention.resolve('auto', q, q, jnp.bfloat16) == 'xla'


def test_bf16_within_tolerance():
  q, k, v, mask, bias = _inputs('mask_bias')
  q16, k16, v16 = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  want = _numpy_attention(*(np.float32(x) for x in (q16, k16, v16)), mask,
                          bias)
  outs = {
      'xla': _dispatch('xla', mask, bias)(q16, k16, v16),
      'cudnn branch': attention._jax_nn_attention(q16, k16, v16, mask, bias,
                                                  'xla'),
  }
  with pltpu.force_tpu_interpret_mode():
    outs['pallas'] = _dispatch('pallas', mask, bias, 'tpu')(q16, k16, v16)
  for name, out in outs.items():
    assert out.dtype == jnp.bfloat16, name
    np.testing.assert_allclose(np.float32(out), want, atol=BF16_ATOL,
                               err_msg=name)


def test_auto_choice():
  q, kv = (B, 1024, 8, 64), (B, 1024, 8, 64)
  for dtype in (jnp.float32, jnp.bfloat16):
    assert attention.resolve('auto', q, kv, dtype) == 'xla'  # This CPU.
    assert attention.resolve('auto', q, kv, dtype, backend='cpu') == 'xla'
  gpu = lambda *a, **kw: attention.resolve('auto', *a, backend='gpu', **kw)
  assert gpu(q, kv, jnp.bfloat16) == 'cudnn'
  assert gpu(q, kv, jnp.float16) == 'cudnn'
  assert gpu(q, kv, jnp.float32) == 'xla'
  assert gpu((B, 1024, 8, 12), (B, 1024, 8, 12), jnp.bfloat16) == 'xla'
  assert gpu(q, (B, 77, 8, 64), jnp.bfloat16) == 'cudnn'
  assert gpu(q, (B, 77, 8, 64), jnp.bfloat16, masked=True) == 'xla'
  tpu = lambda *a: attention.resolve('auto', *a, backend='tpu')
  one_device = jax.sharding.Mesh(jax.devices()[:1], ('data',))
  with attention.kernels_on(one_device, ('data',)):
    assert tpu(q, kv, jnp.float32) == 'pallas'
    assert tpu(q, kv, jnp.bfloat16) == 'pallas'
    assert tpu((B, 256, 8, 64), (B, 256, 8, 64), jnp.bfloat16) == 'xla'
    assert tpu(q, (B, 16, 8, 64), jnp.bfloat16) == 'xla'  # A text's tokens.
    assert tpu((B, 1024, 8, 192), (B, 1024, 8, 192), jnp.float32) == 'xla'


def test_explicit_choice_errors():
  with pytest.raises(ValueError, match=r"'cudnn'.*NVIDIA GPU.*'cpu'.*'xla'"):
    attention.check_implementation('cudnn', 'cpu')
  with pytest.raises(ValueError, match=r"'pallas'.*TPU.*'gpu'.*'cudnn'"):
    attention.check_implementation('pallas', 'gpu')
  with pytest.raises(ValueError, match='Unknown attention implementation'):
    attention.check_implementation('flash')
  for name in ('auto', 'xla'):
    for backend in ('cpu', 'gpu', 'tpu', None):
      attention.check_implementation(name, backend)
  attention.check_implementation('cudnn', 'gpu')
  attention.check_implementation('pallas', 'tpu')
  q = (B, 256, 4, 64)
  with pytest.raises(ValueError, match=r"bf16/fp16.*float32.*'xla'"):
    attention.resolve('cudnn', q, q, jnp.float32, backend='gpu')
  with pytest.raises(ValueError, match='even query and key lengths'):
    attention.resolve('cudnn', q, (B, 77, 4, 64), jnp.bfloat16, True, 'gpu')
  with pytest.raises(ValueError, match='multiple of 128'):
    attention.resolve('pallas', (B, 256, 4, 192), (B, 256, 4, 192),
                      jnp.float32, backend='tpu')
  qa, ka, va, _, _ = _inputs('none')
  for name in ('cudnn', 'pallas'):  # Raised at trace time on this CPU.
    with pytest.raises(ValueError, match=f"model.attention='{name}'"):
      attention.dot_product_attention(qa, ka, va, implementation=name)


def _layer_cases():
  rng = np.random.default_rng(3)
  b, t, hw, c, length = 2, 3, 4, 32, 5
  x = jnp.asarray(rng.standard_normal((b * t, hw, hw, c)), jnp.float32)
  context = jnp.asarray(rng.standard_normal((b, 1, length, 8)), jnp.float32)
  context_mask = jnp.asarray([[[1, 1, 0, 1, 0]], [[1, 0, 0, 0, 0]]], bool)
  return {
      'self': (layers.SpatialAttention(head_dim=16, attention='xla'), (x,)),
      'sparse_causal': (layers.SpatialAttention(
          head_dim=16, pattern='sparse_causal', num_frames=t,
          attention='xla'), (x,)),
      'cross': (layers.CrossAttention(head_dim=16, attention='xla'),
                (x, context, context_mask)),
  }


def _random_params(module, args):
  shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))
  leaves, tree = jax.tree_util.tree_flatten(shapes)
  rng = np.random.default_rng(4)
  return jax.tree_util.tree_unflatten(tree, [
      jnp.asarray(0.3 * rng.standard_normal(l.shape), l.dtype)
      for l in leaves])


@pytest.mark.parametrize('kind', ('self', 'sparse_causal', 'cross'))
def test_layers_use_the_dispatch(kind, monkeypatch):
  """model.attention reaches the dispatch with BTNH q, k, v (and the text's
  key mask): 'cudnn' refuses this CPU; 'pallas' on a pretended TPU calls the
  kernel's entry point (here a spy running the einsum: the kernel itself is
  checked above) and gives the 'xla' output; masked text tokens are
  ignored."""
  template, args = _layer_cases()[kind]
  make = lambda name: template.clone(attention=name)
  params = _random_params(make('xla'), args)
  want = make('xla').apply(params, *args)
  with pytest.raises(ValueError, match="model.attention='cudnn'"):
    make('cudnn').apply(params, *args)
  calls = []

  def spy(q, k, v, mask, bias):
    calls.append((q.shape, k.shape, None if mask is None else mask.shape))
    return attention.einsum_attention(q, k, v, attention.BTNH, bias, mask)

  monkeypatch.setattr(attention, '_platform', lambda backend: 'tpu')
  monkeypatch.setattr(attention, '_pallas_attention', spy)
  got = make('pallas').apply(params, *args)
  np.testing.assert_array_equal(got, want)
  tokens = {'self': 16, 'sparse_causal': 32, 'cross': 5}[kind]
  assert calls == [((6, 16, 2, 16), (6, tokens, 2, 16),
                    (6, 1, 1, 5) if kind == 'cross' else None)]
  if kind == 'cross':
    x, context, context_mask = args
    noise = jnp.where(context_mask[..., None], 0.0, 100.0)
    moved = make('xla').apply(params, x, context + noise, context_mask)
    np.testing.assert_allclose(moved, want, atol=F32_TOL, rtol=F32_TOL)
