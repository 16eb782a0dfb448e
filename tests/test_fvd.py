"""Tests of the FVD pipeline: resize, I3D, Frechet and kernel distances.

The I3D forward at 224x224 costs seconds per frame on a CPU, so the tests
share two small feature extractions (cached at module scope): the reference
example (black and white 15-frame 64x64 videos) and a 16-frame window of the
Kinetics test clip. The full 79-frame clip runs under the `slow` marker.
"""

import functools
import os
import pathlib

from absl.testing import absltest
from absl.testing import parameterized
import imageio.v3 as iio
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import pytest
import scipy.linalg
import tensorflow as tf

from vdm_jax.evaluation import fvd
from vdm_jax.evaluation import i3d
from vdm_jax.evaluation import protocols

_CLIP = pathlib.Path(__file__).parent / 'data' / 'v_CricketShot_g04_c01_rgb.gif'
_CRICKET = 'playing cricket'


@functools.cache
def _reference_example_features() -> dict[str, np.ndarray]:
  """Features of [black, white, white, black], 15 frames of 64x64.

  Two steps of 2 videos sharded over a 2-device 'data' mesh (conftest.py
  fakes 8 CPU devices): the two halves swap batch positions and devices,
  which checks that features depend on neither.
  """
  videos = np.zeros((4, 15, 64, 64, 3), np.uint8)
  videos[1:3] = 255
  return fvd.extract_features(
      videos, batch_size=2, mesh=_mesh(2), progress=False
  )


def _mesh(num_devices: int) -> Mesh:
  return Mesh(np.asarray(jax.devices()[:num_devices]), ('data',))


@functools.cache
def _clip() -> np.ndarray:
  """[T, 224, 224, 3] uint8, the I3D-ready Kinetics test clip."""
  return iio.imread(_CLIP)[..., :3]


def _top5(videos: np.ndarray) -> list[tuple[str, float]]:
  logits = fvd.extract_features(
      videos, batch_size=1, mesh=_mesh(1), progress=False
  )
  logits = logits['logits_mean'][0].astype(np.float64)
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  labels = i3d.kinetics400_labels()
  return [(labels[i], float(probs[i])) for i in np.argsort(-probs)[:5]]


class ResizeTest(parameterized.TestCase):
  """`preprocess` against TensorFlow's own resize kernels."""

  @parameterized.parameters((64, 64), (48, 80), (256, 320))
  def test_reference_matches_tf1_resize_bilinear(self, h, w):
    videos = np.random.default_rng(0).integers(
        0, 256, (2, 9, h, w, 3), np.uint8
    )
    ours = np.asarray(fvd.preprocess(videos))
    frames = tf.reshape(videos, (-1, h, w, 3))
    theirs = tf.compat.v1.image.resize_bilinear(frames, (224, 224))
    theirs = 2.0 * theirs.numpy().reshape(ours.shape) / 255.0 - 1.0
    np.testing.assert_allclose(ours, theirs, atol=1e-4)

  def test_magvit_matches_two_tf1_resizes(self):
    videos = np.random.default_rng(1).integers(
        0, 256, (1, 9, 128, 96, 3), np.uint8
    )
    ours = np.asarray(fvd.preprocess(videos, resize='magvit'))
    frames = tf.reshape(videos, (-1, 128, 96, 3))
    frames = tf.compat.v1.image.resize_bilinear(frames, (64, 64))
    theirs = tf.compat.v1.image.resize_bilinear(frames, (224, 224))
    theirs = 2.0 * theirs.numpy().reshape(ours.shape) / 255.0 - 1.0
    np.testing.assert_allclose(ours, theirs, atol=1e-4)

  def test_half_pixel_centers_matches_tf2_resize(self):
    frames = np.random.default_rng(2).uniform(0, 255, (3, 50, 70, 3))
    ours = fvd.resize_bilinear(jnp.asarray(frames), 224,
                               half_pixel_centers=True)
    theirs = tf.image.resize(frames.astype(np.float32), (224, 224),
                             method='bilinear', antialias=False)
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=2e-3)

  def test_float_ranges_agree_with_uint8(self):
    videos = np.random.default_rng(3).integers(
        0, 256, (1, 9, 16, 16, 3), np.uint8
    )
    ref = np.asarray(fvd.preprocess(videos))
    unit = videos / 255.0
    for x, rng in ((unit, None), (unit, (0, 1)), (unit * 2 - 1, (-1, 1)),
                   (videos.astype(np.float32), (0, 255))):
      np.testing.assert_allclose(
          np.asarray(fvd.preprocess(x, input_range=rng)), ref, atol=1e-5
      )


class TfConventionsTest(absltest.TestCase):
  """TF 'SAME' padding of strided convs and max pools (odd sizes)."""

  def test_strided_conv_matches_tf(self):
    x = np.random.default_rng(0).normal(size=(1, 9, 15, 13, 3))
    x = x.astype(np.float32)
    unit = i3d.Unit3D(4, (7, 7, 7), (2, 2, 2), batch_norm=False, relu=False)
    variables = unit.init(jax.random.key(0), x)
    kernel = np.asarray(variables['params']['Conv_0']['kernel'])
    ours = unit.apply(variables, x)
    theirs = tf.nn.conv3d(x, kernel, (1, 2, 2, 2, 1), 'SAME')
    np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), atol=1e-4)

  def test_max_pool_pads_with_minus_infinity(self):
    x = -1.0 - np.random.default_rng(0).uniform(size=(1, 9, 15, 13, 4))
    x = x.astype(np.float32)
    for window, strides in (((1, 3, 3), (1, 2, 2)), ((3, 3, 3), (2, 2, 2)),
                            ((2, 2, 2), (2, 2, 2))):
      ours = i3d._max_pool(jnp.asarray(x), window, strides)
      theirs = tf.nn.max_pool3d(x, (1, *window, 1), (1, *strides, 1), 'SAME')
      np.testing.assert_array_equal(np.asarray(ours), theirs.numpy())


class DistanceTest(parameterized.TestCase):

  @parameterized.parameters((500, 16), (40, 64))
  def test_frechet_matches_scipy_sqrtm(self, n, d):
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, d))
    b = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) * 0.3 + 0.5
    mu1, s1 = a.mean(0), np.cov(a, rowvar=False)
    mu2, s2 = b.mean(0), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root)
    got = fvd.frechet_distance(*fvd.feature_stats(a), *fvd.feature_stats(b))
    self.assertAlmostEqual(got, expected, delta=1e-6 * abs(expected))

  def test_frechet_of_a_set_with_itself_is_zero(self):
    feats = np.random.default_rng(0).normal(size=(64, 400)) * 5
    shuffled = feats[np.random.default_rng(1).permutation(64)]
    score = fvd.compute_fvd(feats, shuffled)
    # 64 videos < 400 dims: singular covariances; the square roots of their
    # ~336 round-off eigenvalues leave ~1e-7 of tr(S1) + tr(S2) (= 2e4).
    scale = 2 * np.trace(np.cov(feats, rowvar=False))
    self.assertLess(abs(score['fvd']), 1e-6 * scale)

  def test_kernel_distance_matches_pairwise_sums(self):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 8)), rng.normal(size=(20, 8)) + 0.3
    k = lambda u, v: (u @ v / 8 + 1) ** 3
    xx = np.mean([k(x[i], x[j]) for i in range(30) for j in range(30)
                  if i != j])
    yy = np.mean([k(y[i], y[j]) for i in range(20) for j in range(20)
                  if i != j])
    xy = np.mean([k(u, v) for u in x for v in y])
    kvd, std = fvd.kernel_distance(x, y)
    self.assertAlmostEqual(kvd, xx + yy - 2 * xy, places=9)
    self.assertTrue(np.isnan(std))
    kvd3, std3 = fvd.kernel_distance(x, y, max_block_size=10)
    self.assertTrue(np.isfinite(std3))

  def test_folds_report_mean_and_std(self):
    rng = np.random.default_rng(0)
    gen, real = rng.normal(size=(80, 4)), rng.normal(size=(80, 4)) + 1
    score = fvd.compute_fvd(gen, real, folds=4)
    parts = [fvd.frechet_distance(*fvd.feature_stats(g),
                                  *fvd.feature_stats(r))
             for g, r in zip(np.split(gen, 4), np.split(real, 4))]
    self.assertAlmostEqual(score['fvd'], np.mean(parts))
    self.assertAlmostEqual(score['fvd_std'], np.std(parts))


class InputErrorsTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ('too_few_frames', np.zeros((1, 8, 64, 64, 3), np.uint8), None,
       'at least 9 frames'),
      ('not_5d', np.zeros((16, 64, 64, 3), np.uint8), None, r'\[B, T, H, W'),
      ('four_channels', np.zeros((1, 16, 64, 64, 4), np.uint8), None,
       r'\[B, T, H, W'),
      ('float_minus_one_one', np.full((1, 16, 8, 8, 3), -0.5), None,
       'input_range'),
      ('float_0_255', np.full((1, 16, 8, 8, 3), 200.0), None, 'input_range'),
      ('wrong_range', np.full((1, 16, 8, 8, 3), 200.0), (0, 1),
       'outside input_range'),
      ('int16', np.full((1, 16, 8, 8, 3), 3, np.int16), None, 'input_range'),
  )
  def test_bad_inputs_raise(self, videos, input_range, message):
    with self.assertRaisesRegex(ValueError, message):
      fvd.preprocess(videos, input_range=input_range)

  def test_bad_resize_and_protocol(self):
    videos = np.zeros((1, 16, 8, 8, 3), np.uint8)
    with self.assertRaisesRegex(ValueError, 'resize'):
      fvd.preprocess(videos, resize='bicubic')
    with self.assertRaisesRegex(ValueError, 'Unknown FVD protocol'):
      fvd.evaluate_videos(videos, videos, 'ucf101')
    with self.assertRaisesRegex(ValueError, 'scores at 64x64'):
      fvd.evaluate_videos(videos, videos, 'bair_vdm')

  def test_protocols_are_complete(self):
    for name, proto in fvd.PROTOCOLS.items():
      self.assertEqual(proto.name, name)
      self.assertIn(proto.resize, fvd.RESIZE_MODES)
      self.assertIn(proto.feature, fvd.FEATURES)
      self.assertGreaterEqual(proto.num_frames, i3d.MIN_FRAMES)
      self.assertIn(proto.clip_start, protocols.CLIP_STARTS)
    # FitVid/VDM BAIR: the first 16 frames of each of the 256 test videos.
    self.assertEqual(fvd.PROTOCOLS['bair_vdm'].clip_start, 'first')
    self.assertEqual(fvd.PROTOCOLS['stylegan_v_2048'].clip_start, 'random')


def test_real_feature_cache_is_written_atomically_and_read_back(
    tmp_path, monkeypatch):
  """The npz cache of real features (I3D replaced by a cheap stand-in)."""
  calls = []

  def fake_extract(videos, *, resize, **unused_kwargs):
    calls.append(resize)
    feats = np.asarray(videos, np.float32).reshape(len(videos), -1)[:, :4]
    return {'logits_mean': feats, 'pool': feats}

  monkeypatch.setattr(fvd, 'extract_features', fake_extract)
  cache = str(tmp_path / 'cache')
  proto = protocols.PROTOCOLS['stylegan_v_2048']
  videos = np.arange(3 * 16 * 2 * 2 * 3, dtype=np.uint8).reshape(
      3, 16, 2, 2, 3)
  first = fvd.real_features(videos, proto, cache_dir=cache,
                            fingerprint='data-A')
  # Only the cache file, no temporary beside it.
  assert os.listdir(cache) == [
      fvd._cache_path(cache, proto, 'data-A').name]
  again = fvd.real_features(None, proto, cache_dir=cache,
                            fingerprint='data-A')
  np.testing.assert_array_equal(first, again)
  assert len(calls) == 1
  with pytest.raises(ValueError, match='no cache entry matches'):
    fvd.real_features(None, proto, cache_dir=cache, fingerprint='data-B')


class I3DTest(absltest.TestCase):
  """The published network: weights, preprocessing, reference example."""

  def test_weights_fill_the_module(self):
    variables = i3d.load_i3d_params()
    shapes = jax.eval_shape(
        i3d.I3D().init, jax.random.key(0), jnp.zeros((1, 9, 224, 224, 3))
    )
    self.assertEqual(
        jax.tree.map(lambda s: s.shape, shapes),
        jax.tree.map(np.shape, variables),
    )

  def test_reference_example_black_vs_white(self):
    # frechet_video_distance/example.py: 16 zero vs 16 x 255 videos of
    # 15x64x64, "FVD ... should be around 131". Identical videos have
    # identical features, so one of each is tiled to 16.
    feats = _reference_example_features()['logits_mean']
    black = np.repeat(feats[:1], 16, axis=0)
    white = np.repeat(feats[1:2], 16, axis=0)
    score = fvd.compute_fvd(black, white)['fvd']
    self.assertBetween(score, 128.0, 136.0)

  def test_features_do_not_depend_on_batching(self):
    feats = _reference_example_features()
    for key in fvd.FEATURES:
      np.testing.assert_allclose(feats[key][0], feats[key][3], atol=1e-4)
      np.testing.assert_allclose(feats[key][1], feats[key][2], atol=1e-4)
    self.assertEqual(feats['pool'].shape, (4, 1024))

  def test_streamed_features_equal_one_array(self):
    # The same four videos as a stream of batches of 1 and 3 (as
    # --mode=eval feeds them): regrouped into the same 2-video steps, so
    # the features are exactly those of the whole array.
    videos = np.zeros((4, 15, 64, 64, 3), np.uint8)
    videos[1:3] = 255
    streamed = fvd.extract_features(
        iter([videos[:1], videos[1:]]), batch_size=2, mesh=_mesh(2),
        progress=False, num_videos=4)
    whole = _reference_example_features()
    for key in fvd.FEATURES:
      np.testing.assert_array_equal(streamed[key], whole[key])

  def test_set_against_itself(self):
    # The same two videos, extracted in another order and batch position.
    feats = _reference_example_features()['logits_mean']
    score = fvd.compute_fvd(feats[:2], feats[2:])
    self.assertLess(abs(score['fvd']), 1e-3)

  def test_clip_window_is_playing_cricket(self):
    top5 = _top5(_clip()[None, :16])
    self.assertEqual(top5[0][0], _CRICKET, top5)
    self.assertGreater(top5[0][1], 0.5, top5)

  @pytest.mark.slow
  def test_full_clip_is_playing_cricket(self):
    top5 = _top5(_clip()[None])
    self.assertEqual(top5[0][0], _CRICKET, top5)
    self.assertGreater(top5[0][1], 0.9, top5)


if __name__ == '__main__':
  absltest.main()
