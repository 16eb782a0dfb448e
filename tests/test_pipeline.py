"""Batches: layout, joint image frames, determinism, resume, sharding."""

import gc
import time

import numpy as np
import pytest

from vdm_jax.data import pipeline
from vdm_jax.data import synthetic


class _TaggedSource:
  """Videos whose pixels name them: channel 0 = example, channel 1 = frame."""

  def __init__(self, size=40, frames=12, fail_at=None):
    self.size, self.frames, self.fail_at = size, frames, fail_at

  def __len__(self):
    return self.size

  def __getitem__(self, i):
    if i == self.fail_at:
      raise RuntimeError(f'broken example {i}')
    video = np.zeros((self.frames, 4, 4, 3), dtype=np.uint8)
    video[..., 0] = i
    video[..., 1] = np.arange(self.frames)[:, None, None]
    return {'video': video, 'label': i % 5}


def _example(video):
  """Example index of each frame of uint8 [..., T, H, W, 3] tagged videos."""
  return video[..., 0, 0, 0].astype(int)


def _frame(video):
  return video[..., 0, 0, 1].astype(int)


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def _make(source=None, **kw):
  args = dict(global_batch_size=8, num_frames=4, seed=0)
  args.update(kw)
  source = _TaggedSource() if source is None else source
  return pipeline.Pipeline(source, **args)


def test_shapes_dtypes_and_frame_mask():
  source = synthetic.SyntheticVideos(10, 16, num_examples=50)
  p = _make(source, num_frames=5, image_frames=3, frame_stride=2)
  assert p.num_frames_total == 8
  batch = p.batch_for_step(0)
  assert batch['video'].shape == (8, 8, 16, 16, 3)
  assert batch['video'].dtype == np.uint8
  assert batch['label'].shape == (8,) and batch['label'].dtype == np.int32
  assert batch['frame_mask'].dtype == bool
  np.testing.assert_array_equal(
      batch['frame_mask'], np.tile([True] * 5 + [False] * 3, (8, 1)))
  assert set(batch) == {'video', 'label', 'image_label', 'frame_mask'}
  assert batch['image_label'].shape == (8, 3)
  assert batch['image_label'].dtype == np.int32
  no_images = _make(source, num_frames=5).batch_for_step(0)
  assert no_images['frame_mask'].shape == (8, 5) and no_images[
      'frame_mask'].all()
  assert no_images['image_label'].shape == (8, 0)


class _ReadFramesSource(_TaggedSource):
  """The tagged videos through `read_frames` (the TFDS / file path)."""

  def read_frames(self, index, select, crop=None):
    del crop
    item = self[index]
    return {'video': item['video'][select(self.frames)],
            'label': item['label']}


class _RenderBatchSource(_TaggedSource):
  """The tagged videos through `render_batch` (the synthetic path)."""

  def render_batch(self, indices, frames):
    return {'video': np.stack([self[int(i)]['video'][f]
                               for i, f in zip(indices, frames)]),
            'label': np.asarray([int(i) % 5 for i in indices], np.int32)}


@pytest.mark.parametrize('source_cls', [
    _TaggedSource, _ReadFramesSource, _RenderBatchSource])
def test_image_labels_are_those_of_the_image_frames_videos(source_cls):
  """Each image frame comes with its own video's label, not the clip's."""
  p = _make(source_cls(), global_batch_size=16, num_frames=3,
            image_frames=5)
  mismatched = 0
  for step in range(3):
    batch = p.batch_for_step(step)
    examples = _example(batch['video'])
    np.testing.assert_array_equal(batch['label'], examples[:, 0] % 5)
    np.testing.assert_array_equal(batch['image_label'],
                                  examples[:, 3:] % 5)
    mismatched += (batch['image_label'] != batch['label'][:, None]).sum()
  assert mismatched > 0  # Image frames of other classes do occur.


def test_synthetic_image_labels_match_their_examples():
  source = synthetic.SyntheticVideos(6, 16, num_examples=30, num_classes=3)
  p = _make(source, num_frames=4, image_frames=3)
  batch = p.batch_for_step(1)
  # The same positions read one example at a time give the same labels.
  plain = _make(_Unbatched(source), num_frames=4, image_frames=3)
  _assert_batches_equal(batch, plain.batch_for_step(1))
  assert (batch['image_label'] != batch['label'][:, None]).any()


def test_clip_frames_follow_stride_and_labels_match():
  p = _make(num_frames=4, frame_stride=3)  # Span 10 of 12 frames.
  batch = p.batch_for_step(2)
  frames = _frame(batch['video'])
  np.testing.assert_array_equal(np.diff(frames, axis=1), 3)
  assert set(frames[:, 0]) <= {0, 1, 2}
  np.testing.assert_array_equal(batch['label'],
                                _example(batch['video'])[:, 0] % 5)
  fixed = _make(num_frames=4, frame_stride=3, random_start=False)
  np.testing.assert_array_equal(_frame(fixed.batch_for_step(2)['video']),
                                np.tile([0, 3, 6, 9], (8, 1)))


def test_image_frames_come_from_other_examples():
  p = _make(global_batch_size=16, num_frames=3, image_frames=5)
  for step in range(3):
    batch = p.batch_for_step(step)
    examples = _example(batch['video'])
    for row in examples:
      clip, images = row[:3], row[3:]
      assert (clip == clip[0]).all()
      assert clip[0] not in images
      assert len(set(images)) == 5  # Each from a different example.
  # Image frames are drawn from all frames of the other videos.
  frames = np.concatenate([_frame(p.batch_for_step(s)['video'])[:, 3:]
                           for s in range(10)])
  assert set(frames.ravel()) == set(range(12))


def test_batch_for_step_is_pure():
  p1 = _make(image_frames=2, seed=7)
  p2 = _make(image_frames=2, seed=7)
  _assert_batches_equal(p1.batch_for_step(5), p2.batch_for_step(5))
  p1.batch_for_step(9)
  _assert_batches_equal(p1.batch_for_step(5), p2.batch_for_step(5))
  other = _make(image_frames=2, seed=8).batch_for_step(5)
  assert not np.array_equal(other['video'], p2.batch_for_step(5)['video'])


def test_iterate_equals_batch_for_step_and_closes():
  p = _make(image_frames=1)
  it = p.iterate(4)
  for step in range(4, 8):
    _assert_batches_equal(next(it), p.batch_for_step(step))
  it.close()
  with pytest.raises(StopIteration):
    next(it)
  assert not it._thread.is_alive()


def test_exact_resume():
  p = _make(image_frames=2, seed=3)
  with p.iterate(0) as it:
    full = [next(it) for _ in range(5)]
  with _make(image_frames=2, seed=3).iterate(3) as it:
    resumed = [next(it) for _ in range(2)]
  for a, b in zip(full[3:], resumed):
    _assert_batches_equal(a, b)


def test_thread_stops_when_iterator_is_dropped():
  p = _make()
  it = p.iterate(0)
  next(it)
  thread = it._thread
  del it
  gc.collect()
  thread.join(timeout=5)
  assert not thread.is_alive()


def test_two_processes_split_the_global_batch():
  single = _make(global_batch_size=8)
  halves = [_make(global_batch_size=8, process_index=i, process_count=2)
            for i in range(2)]
  for step in (0, 3, 7):  # 40 examples: step 7 straddles two epochs.
    whole = _example(single.batch_for_step(step)['video'])[:, 0]
    parts = [_example(h.batch_for_step(step)['video'])[:, 0] for h in halves]
    assert all(len(part) == 4 for part in parts)
    assert not set(parts[0]) & set(parts[1])
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    _assert_batches_equal(
        halves[1].batch_for_step(step),
        {k: v[4:] for k, v in single.batch_for_step(step).items()})


def test_each_epoch_covers_every_example_once():
  p = _make(_TaggedSource(size=24), global_batch_size=8)
  seen = np.concatenate([_example(p.batch_for_step(s)['video'])[:, 0]
                         for s in range(6)])
  np.testing.assert_array_equal(np.sort(seen[:24]), np.arange(24))
  np.testing.assert_array_equal(np.sort(seen[24:]), np.arange(24))
  assert not np.array_equal(seen[:24], seen[24:])  # Reshuffled per epoch.


def test_thread_exceptions_reach_the_consumer():
  source = _TaggedSource(size=8, fail_at=5)
  p = pipeline.Pipeline(source, global_batch_size=4, num_frames=2, seed=0,
                        random_start=False)
  it = p.iterate(0)
  with pytest.raises(RuntimeError, match='broken example 5'):
    for _ in range(4):
      next(it)
  with pytest.raises(StopIteration):
    next(it)
  it._thread.join(timeout=5)
  assert not it._thread.is_alive()


def test_prefetch_queue_is_bounded():
  p = _make()
  it = p.iterate(0, prefetch=2)
  time.sleep(0.3)
  assert it._queue.qsize() <= 2
  it.close()
  assert not it._thread.is_alive()


@pytest.mark.parametrize('kwargs,message', [
    (dict(global_batch_size=6, process_count=4), 'multiple of process_count'),
    (dict(num_frames=7, frame_stride=2), r'T\' >= .* = 13'),
    (dict(image_frames=-1), 'image_frames=-1'),
    (dict(process_index=2, process_count=2), 'process_index'),
])
def test_errors(kwargs, message):
  with pytest.raises(ValueError, match=message):
    _make(**kwargs)


def test_empty_and_tiny_sources():
  with pytest.raises(ValueError, match='empty'):
    _make(_TaggedSource(size=0))
  with pytest.raises(ValueError, match='other examples'):
    _make(_TaggedSource(size=3), image_frames=3)


class _Unbatched:
  """A source without `render_batch`: the pipeline's generic path."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return self.source[i]


@pytest.mark.parametrize('random_start', [True, False])
def test_batched_and_generic_sources_give_the_same_batches(random_start):
  source = synthetic.SyntheticVideos(9, 16, num_examples=30, seed=2)
  kw = dict(num_frames=3, frame_stride=2, image_frames=2,
            random_start=random_start)
  batched, generic = _make(source, **kw), _make(_Unbatched(source), **kw)
  for step in (0, 4):
    _assert_batches_equal(batched.batch_for_step(step),
                          generic.batch_for_step(step))
