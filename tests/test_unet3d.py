"""Factorized space-time UNet: shapes, parameter count and invariants.

The models are tiny (8-16 channels, 16x16, 4-6 frames). Parameters come from
`jax.eval_shape` of `init`, filled with random values (the real init zeroes
every output projection, which would make most properties hold trivially).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax.models import layers
from vdm_jax.models import unet3d

jax.config.update('jax_disable_most_optimizations', True)

TINY = dict(base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
            attn_resolutions=(8,), head_dim=8)
SIZE = 16


def _model(**overrides):
  return unet3d.UNet3D(**{**TINY, **overrides})


def _random_params(model, b, t, label=False, seed=0):
  """Parameters with the model's shapes and random, non-zero values."""
  z = jnp.zeros((b, t, SIZE, SIZE, 3))
  kw = {'label': jnp.zeros((b,), jnp.int32)} if label else {}
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), z, jnp.zeros((b,)), **kw)
  )['params']
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    x = rng.standard_normal(leaf.shape).astype(np.float32)
    if name == 'kernel':
      x /= np.sqrt(np.prod(leaf.shape[:-1]))
    elif name == 'scale':
      x = 1.0 + 0.1 * x
    elif name == 'bias':
      x *= 0.1
    return jnp.asarray(x, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes), shapes


def _video(b, t, seed=1):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(
      (b, t, SIZE, SIZE, 3)), jnp.float32)


def _apply(model, params, *args, **kwargs):
  return jax.jit(lambda p, *a: model.apply({'params': p}, *a, **kwargs))(
      params, *args)


@pytest.mark.parametrize('per_frame', [False, True])
def test_output_shape(per_frame):
  model = _model(out_channels=5, remat='full' if per_frame else 'none')
  params, _ = _random_params(model, 2, 4)
  logsnr = jnp.linspace(-20.0, 20.0, 8).reshape(2, 4)
  logsnr = logsnr if per_frame else logsnr[:, 0]
  out = _apply(model, params, _video(2, 4), logsnr)
  assert out.shape == (2, 4, SIZE, SIZE, 5)
  assert out.dtype == jnp.float32
  assert np.all(np.isfinite(out))


def _conv(cin, cout):
  return 9 * cin * cout + cout


def _dense(cin, cout):
  return cin * cout + cout


def _res(cin, cout, emb):
  skip = _dense(cin, cout) if cin != cout else 0
  return (2 * cin + _conv(cin, cout) + _dense(emb, 2 * cout) + 2 * cout
          + _conv(cout, cout) + skip)


def _attn(c):
  return 2 * c + _dense(c, 3 * c) + _dense(c, c)


def test_param_count_matches_hand_count():
  # TINY: levels of 8 (16x16, no attention) and 16 channels (8x8, attention
  # with 2 heads of 8); emb width 32; 3 classes + the null label.
  e, rel = 32, (2 * 32 + 1) * 2
  attn = _attn(16) + _attn(16) + rel
  expected = (
      _dense(8, e) + _dense(e, e) + 4 * e  # log-SNR MLP + label table
      + _conv(3, 8)  # conv_in
      + _res(8, 8, e) + _conv(8, 8)  # down 0 + downsample
      + _res(8, 16, e) + attn  # down 1
      + 2 * _res(16, 16, e) + attn  # middle
      + _res(32, 16, e) + _res(24, 16, e) + 2 * attn  # up 1 (skips 16, 8)
      + _conv(16, 16)  # upsample
      + _res(24, 8, e) + _res(16, 8, e)  # up 0 (skips 8, 8)
      + 2 * 8 + _conv(8, 3)  # norm_out + conv_out
  )
  _, shapes = _random_params(_model(num_classes=3), 1, 4, label=True)
  assert unet3d.count_params(shapes) == expected == 53819


def test_temporal_attention_at_more_levels_than_spatial():
  # temporal_attn_resolutions=(8, 16): the 16x16 level (8 channels, 1 head)
  # gains a temporal attention after each of its 3 residual blocks (1 down,
  # 2 up) and no spatial attention; the relative bias has 2 * 32 + 1 taps.
  tattn_8 = _attn(8) + (2 * 32 + 1)
  _, shapes = _random_params(
      _model(num_classes=3, temporal_attn_resolutions=(8, 16)), 1, 4,
      label=True)
  assert unet3d.count_params(shapes) == 53819 + 3 * tattn_8
  for level in ('down_0', 'up_0'):
    assert any(k.startswith('tattn_') for k in shapes[level])
    assert not any(k.startswith('sattn_') for k in shapes[level])
  # None means attn_resolutions: the same network, bit for bit; and
  # temporal_attention=False still leaves every temporal attention out.
  model = _model()
  params, shapes = _random_params(model, 1, 4)
  z, logsnr = _video(1, 4), jnp.array([0.5])
  same = _model(temporal_attn_resolutions=(8,))
  assert jax.tree.structure(_random_params(same, 1, 4)[1]) == (
      jax.tree.structure(shapes))
  np.testing.assert_array_equal(_apply(same, params, z, logsnr),
                                _apply(model, params, z, logsnr))
  _, images = _random_params(
      _model(temporal_attention=False, temporal_attn_resolutions=(8, 16)),
      1, 4)
  assert 'tattn' not in str(jax.tree_util.tree_structure(images))


def test_temporal_resolutions_in_the_checkpoint_compatibility(tmp_path):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from vdm_jax import checkpoint  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)
  checkpoint.save_config(tiny.get_config(), workdir)
  config = tiny.get_config()
  assert config.model.temporal_attn_resolutions is None
  config.model.temporal_attn_resolutions = tuple(
      config.model.attn_resolutions)
  checkpoint.check_compatible(config, workdir)  # None: the same levels.
  config.model.temporal_attn_resolutions += (config.data.image_size,)
  with pytest.raises(ValueError,
                     match='model.temporal_attn_resolutions: saved'):
    checkpoint.check_compatible(config, workdir)


def test_real_init_zeroes_last_convs_and_keeps_f32_params():
  # The whole UNet's init compiles slowly on CPU; check its blocks.
  x = _video(1, 2).reshape(2, SIZE, SIZE, 3)
  emb = jnp.ones((2, 4))
  block = layers.ResBlock(3, dtype=jnp.bfloat16)
  variables = block.init(jax.random.key(0), x, emb)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  out = block.apply(variables, x, emb)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_array_equal(out, x.astype(jnp.bfloat16))  # identity
  conv = layers.Conv3x3(5, zero_init=True)
  np.testing.assert_array_equal(conv.apply(conv.init(jax.random.key(0), x),
                                           x), 0.0)


def test_image_frames_are_independent():
  model = _model()
  params, _ = _random_params(model, 1, 4)
  base = _video(1, 4)
  frame_mask = jnp.array([[True, True, False, False]])
  # Batch: original; frame 0 (video) changed; frame 3 (image) changed.
  z = jnp.concatenate([base, base.at[:, 0].multiply(-1.0),
                       base.at[:, 3].multiply(-1.0)])
  logsnr = jnp.array([0.0, 0.0, 0.0])
  out = _apply(model, params, z, logsnr, None, jnp.tile(frame_mask, (3, 1)))
  np.testing.assert_allclose(out[1, 2], out[0, 2], atol=1e-6)
  np.testing.assert_allclose(out[2, 2], out[0, 2], atol=1e-6)
  np.testing.assert_allclose(out[2, :2], out[0, :2], atol=1e-6)
  # Video frame 1 sees video frame 0.
  assert np.max(np.abs(out[1, 1] - out[0, 1])) > 1e-3


def test_temporal_translation_equivariance():
  """A clip before vs after 3 image frames: the same video outputs."""
  model = _model(max_temporal_distance=2)
  params, _ = _random_params(model, 3, 6)
  clip, images = _video(1, 3, seed=2)[0], _video(1, 3, seed=3)[0]
  first = jnp.concatenate([clip, images])
  last = jnp.concatenate([images, clip])
  reversed_clip = jnp.concatenate([clip[::-1], images])
  z = jnp.stack([first, last, reversed_clip])
  mask_first = jnp.array([True] * 3 + [False] * 3)
  frame_mask = jnp.stack([mask_first, mask_first[::-1], mask_first])
  out = _apply(model, params, z, jnp.zeros((3,)), None, frame_mask)
  np.testing.assert_allclose(out[1, 3:], out[0, :3], atol=1e-5)
  np.testing.assert_allclose(out[1, :3], out[0, 3:], atol=1e-5)
  # The model does see frame order (via the relative bias), so the match
  # above is not trivial.
  assert np.max(np.abs(out[2, :3][::-1] - out[0, :3])) > 1e-3


def test_frame_positions_give_absolute_time():
  """The same frame T times: one output per frame only with positions."""
  still = jnp.tile(_video(1, 1, seed=4), (1, 4, 1, 1, 1))
  for positions in (False, True):
    model = _model(frame_positions=positions)
    params, _ = _random_params(model, 1, 4)
    out = _apply(model, params, still, jnp.zeros((1,)))
    spread = float(jnp.max(jnp.abs(out - out[:, :1])))
    if positions:
      assert spread > 1e-3  # Frame 0 and frame 3 now differ.
    else:
      assert spread < 1e-5  # Relative distances alone: all alike.


def test_frame_positions_count_video_frames_only():
  """Image frames get no position; a clip's numbering starts at its first
  frame wherever the image frames are, and the zero init changes nothing."""
  model = _model(frame_positions=True)
  params, _ = _random_params(model, 2, 6)
  clip, images = _video(1, 3, seed=2)[0], _video(1, 3, seed=3)[0]
  z = jnp.stack([jnp.concatenate([clip, images]),
                 jnp.concatenate([images, clip])])
  mask_first = jnp.array([True] * 3 + [False] * 3)
  frame_mask = jnp.stack([mask_first, mask_first[::-1]])
  out = _apply(model, params, z, jnp.zeros((2,)), None, frame_mask)
  np.testing.assert_allclose(out[1, 3:], out[0, :3], atol=1e-5)
  # An image frame's output is the one it has without frame_positions.
  plain = {k: v for k, v in params.items() if k != 'frame_pos'}
  out_plain = _apply(_model(), plain, z, jnp.zeros((2,)), None, frame_mask)
  np.testing.assert_allclose(out[0, 3:], out_plain[0, 3:], atol=1e-6)
  assert np.max(np.abs(out[0, :3] - out_plain[0, :3])) > 1e-3
  # As initialised (zero kernel and bias) it is the network without it.
  zero = dict(params, frame_pos=jax.tree.map(jnp.zeros_like,
                                             params['frame_pos']))
  np.testing.assert_array_equal(
      _apply(model, zero, z, jnp.zeros((2,)), None, frame_mask),
      out_plain)


def test_frame_positions_in_the_checkpoint_compatibility(tmp_path):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  from vdm_jax import checkpoint  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path)
  old = tiny.get_config()
  del old.model['frame_positions']  # A config saved before the field.
  checkpoint.save_config(old, workdir)
  checkpoint.check_compatible(tiny.get_config(), workdir)  # Absent: off.
  config = tiny.get_config()
  config.model.frame_positions = True
  with pytest.raises(ValueError, match='model.frame_positions: saved'):
    checkpoint.check_compatible(config, workdir)


def test_label_conditioning():
  model = _model(num_classes=3)
  params, _ = _random_params(model, 3, 2, label=True)
  z = jnp.tile(_video(1, 2), (3, 1, 1, 1, 1))
  out = _apply(model, params, z, jnp.zeros((3,)), jnp.array([0, 1, 3]))
  null = _apply(model, params, z[:1], jnp.zeros((1,)))
  assert np.max(np.abs(out[0] - out[1])) > 1e-3
  np.testing.assert_allclose(null[0], out[2], rtol=1e-5, atol=1e-5)


def test_per_frame_labels_condition_their_own_frame():
  """label [B, T]: each frame is embedded with its own label (image frames
  of joint training come from other videos, with their own classes)."""
  model = _model(num_classes=3)
  params, _ = _random_params(model, 3, 4, label=True)
  z = jnp.tile(_video(1, 4), (3, 1, 1, 1, 1))
  images = jnp.zeros((3, 4), bool)  # All frames independent images.
  labels = jnp.array([[0, 1, 2, 3], [0, 1, 0, 3], [0, 0, 0, 0]])
  out = _apply(model, params, z, jnp.zeros((3,)), labels, images)
  # Only frame 2's label differs between rows 0 and 1: only frame 2 moves.
  np.testing.assert_allclose(out[1, [0, 1, 3]], out[0, [0, 1, 3]],
                             atol=1e-6)
  assert np.max(np.abs(out[1, 2] - out[0, 2])) > 1e-3
  # A per-frame label that is the same on every frame is the [B] label.
  per_example = _apply(model, params, z[:1], jnp.zeros((1,)),
                       jnp.array([0]), images[:1])
  np.testing.assert_allclose(out[2], per_example[0], atol=1e-5)
  # Also with a per-frame log-SNR.
  per_frame_logsnr = _apply(model, params, z, jnp.zeros((3, 4)), labels,
                            images)
  np.testing.assert_allclose(per_frame_logsnr, out, atol=1e-5)
  with pytest.raises(ValueError, match='label must have shape'):
    _apply(model, params, z, jnp.zeros((3,)), labels[:, :2], images)


def test_dropout_only_in_training():
  model = _model(dropout=0.5)
  params, _ = _random_params(model, 1, 2)
  z, logsnr = _video(1, 2), jnp.zeros((1,))
  eval_out = _apply(model, params, z, logsnr)
  no_dropout = _apply(_model(), params, z, logsnr)
  np.testing.assert_allclose(eval_out, no_dropout, atol=1e-6)
  train = jax.jit(lambda p, key: model.apply(
      {'params': p}, z, logsnr, train=True, rngs={'dropout': key}))
  a, b = train(params, jax.random.key(1)), train(params, jax.random.key(2))
  assert np.max(np.abs(a - b)) > 1e-3
  assert np.max(np.abs(a - eval_out)) > 1e-3


def test_bfloat16_close_to_float32():
  params, shapes = _random_params(_model(), 1, 2)
  z, logsnr = _video(1, 2), jnp.zeros((1,))
  f32 = _apply(_model(), params, z, logsnr)
  bf16 = _apply(_model(dtype='bfloat16', remat='block'), params, z, logsnr)
  assert bf16.dtype == jnp.float32 and np.all(np.isfinite(bf16))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))
  err = np.max(np.abs(bf16 - f32)) / np.max(np.abs(f32))
  assert err < 0.05, err


@pytest.mark.parametrize('image_size,num_frames,overrides,match', [
    (17, 4, {}, 'not divisible by 2'),
    (16, 4, {'attn_resolutions': (4,)}, r'resolutions are \[16, 8\]'),
    (16, 4, {'temporal_attn_resolutions': (8, 32)},
     r'temporal_attn_resolutions \[32\] never occur'),
    (16, 4, {'base_channels': 48}, 'GroupNorm group count'),
    (16, 4, {'dtype': 'float16'}, 'model.dtype'),
    (16, 4, {'remat': 'all'}, 'model.remat'),
    (16, 4, {'attention': 'flash'}, 'model.attention'),
    # On this CPU backend: the config is refused before anything traces.
    (16, 4, {'attention': 'cudnn'}, "needs an NVIDIA GPU, but the backend"),
    (16, 4, {'attention': 'pallas'}, 'needs a TPU'),
    (16, 0, {}, 'num_frames'),
    (16, 4, {'bogus': 1}, 'Unknown model fields'),
])
def test_validate_model_config_errors(image_size, num_frames, overrides,
                                      match):
  with pytest.raises(ValueError, match=match):
    unet3d.validate_model_config(image_size, num_frames,
                                 **{**TINY, **overrides})


def test_validate_model_config_accepts_default_config():
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  unet3d.validate_model_config(config.data.image_size, config.data.num_frames,
                               **config.model)
  assert layers.num_heads(8, 64) == 1


@pytest.mark.parametrize('strides', [1, 2])
def test_conv3x3_matches_lax_values_and_gradients(strides):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((3, 8, 6, 5)), jnp.float32)
  kernel = jnp.asarray(rng.standard_normal((3, 3, 5, 7)), jnp.float32)

  def ref(x, k):
    return jax.lax.conv_general_dilated(
        x, k, (strides, strides), ((1, 1), (1, 1)),
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  y, vjp = jax.vjp(lambda a, b: layers.conv3x3(a, b, strides), x, kernel)
  y_ref, vjp_ref = jax.vjp(ref, x, kernel)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
  for got, want in zip(vjp(dy), vjp_ref(dy)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
