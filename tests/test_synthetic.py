"""The built-in bouncing-shapes dataset: determinism, format, motion, labels."""

import numpy as np
import pytest

from vdm_jax.data import synthetic


def _foreground(video):
  """bool [T, H, W]: pixels clearly brighter than the background."""
  return video.max(axis=-1) > synthetic.BACKGROUND.max() + 30


def test_deterministic_and_seeded():
  ds = synthetic.SyntheticVideos(8, 32, seed=3)
  a, b = ds[17], ds[17]
  np.testing.assert_array_equal(a['video'], b['video'])
  assert a['label'] == b['label']
  # A fresh object with the same seed gives the same clip; another seed not.
  np.testing.assert_array_equal(
      synthetic.SyntheticVideos(8, 32, seed=3)[17]['video'], a['video'])
  other = synthetic.SyntheticVideos(8, 32, seed=4)
  assert not np.array_equal(other[17]['video'], a['video'])
  assert not np.array_equal(ds[18]['video'], a['video'])


def test_render_batch_matches_indexing():
  ds = synthetic.SyntheticVideos(6, 16, num_classes=5, num_objects=2)
  indices = [9, 2, 40, 2, 7, 31]
  batch = ds.render_batch(indices)
  for j, i in enumerate(indices):
    np.testing.assert_array_equal(batch['video'][j], ds[i]['video'])
    assert batch['label'][j] == ds[i]['label']
  np.testing.assert_array_equal(ds.labels(indices), batch['label'])


@pytest.mark.parametrize('frames,size,channels', [(5, 24, 1), (8, 16, 3),
                                                  (3, 33, 3)])
def test_dtype_shape_range(frames, size, channels):
  ds = synthetic.SyntheticVideos(frames, size, channels=channels,
                                 num_examples=10)
  assert len(ds) == 10
  ex = ds[-1]
  assert ex['video'].dtype == np.uint8
  assert ex['video'].shape == (frames, size, size, channels)
  assert ex['label'].dtype == np.int32 and ex['label'].shape == ()
  assert ex['video'].max() > 100  # A bright shape is present.
  with pytest.raises(IndexError):
    ds[10]


@pytest.mark.parametrize('size', [16, 32])
def test_motion_is_visible_and_bounces_stay_inside(size):
  t = 8
  ds = synthetic.SyntheticVideos(t, size, num_examples=1000)
  videos = ds.render_batch(range(64))['video']
  travelled = []
  ys, xs = np.mgrid[:size, :size]
  for video in videos:
    # Antialiased coverage in [0, 1] of the one shape, per pixel.
    value = video.max(axis=-1).astype(np.float64) - synthetic.BACKGROUND.max()
    coverage = np.clip(value / value.max(), 0, 1)
    area = coverage.sum(axis=(1, 2))
    # The shape never leaves the frame: its area stays constant.
    assert area.min() >= 0.9 * area.max()
    assert (0.03 * size**2 < area).all() and (area < 0.3 * size**2).all()
    com = np.stack([(coverage * xs).sum((1, 2)) / area,
                    (coverage * ys).sum((1, 2)) / area], axis=-1)
    steps = np.linalg.norm(np.diff(com, axis=0), axis=-1)
    assert steps.max() > 0.08 * size  # Consecutive frames differ visibly.
    travelled.append(steps.sum() / size)
    assert not np.array_equal(video[0], video[-1])
  # Speeds are 1/8..1/4 of the frame per frame (less during a bounce).
  assert 0.7 < np.median(travelled) < 2.0


def test_bounce_reverses_direction():
  x = synthetic._bounce(np.array([5.0]), np.array([3.0]), np.array([2.0]),
                        np.array([10.0]), np.arange(6.0))
  np.testing.assert_allclose(x[0], [5, 8, 9, 6, 3, 4])


@pytest.mark.parametrize('num_classes,kinds', [(3, 3), (0, 3), (-1, 3),
                                               (8, 8)])
def test_labels_cover_all_kinds(num_classes, kinds):
  ds = synthetic.SyntheticVideos(2, 16, num_classes=num_classes)
  labels = ds.labels(range(2000))
  assert labels.dtype == np.int32
  assert set(labels.tolist()) == set(range(kinds))


def test_every_kind_renders_distinct_shapes():
  ds = synthetic.SyntheticVideos(1, 32, num_classes=len(synthetic.KINDS),
                                 num_examples=400)
  batch = ds.render_batch(range(400))
  masks = {}
  for video, label in zip(batch['video'], batch['label']):
    masks.setdefault(int(label), _foreground(video)[0])
  assert len(masks) == len(synthetic.KINDS)
  areas = {k: m.sum() for k, m in masks.items()}
  assert min(areas.values()) > 20


def test_bad_arguments():
  with pytest.raises(ValueError, match='shape kinds'):
    synthetic.SyntheticVideos(4, 16, num_classes=len(synthetic.KINDS) + 1)
  with pytest.raises(ValueError, match='channels'):
    synthetic.SyntheticVideos(4, 16, channels=2)


def test_render_selected_frames():
  ds = synthetic.SyntheticVideos(7, 16, num_objects=2)
  frames = np.array([[0, 6, 3], [2, 2, 5]])
  full = ds.render_batch([4, 11])['video']
  some = ds.render_batch([4, 11], frames=frames)['video']
  np.testing.assert_array_equal(some, full[np.arange(2)[:, None], frames])
  with pytest.raises(IndexError):
    ds.render_batch([4], frames=np.array([[7]]))
