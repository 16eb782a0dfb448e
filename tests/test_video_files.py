"""Video-file sources: folders of mp4/gif files the tests write themselves,
labels from sub-folders, corrupt files, crops, and one tiny train step."""

import json
import os

import numpy as np
import pytest

from configs import tiny
from vdm_jax import train
from vdm_jax import video_io
from vdm_jax.data import pipeline
from vdm_jax.data import sources
from vdm_jax.data import video_files

FRAMES = 10


def _video(tag, height=48, width=64):
  """uint8 [FRAMES, H, W, 3]: red = tag, green = 20 * frame, blue ramps in x
  (so crops at different x differ)."""
  video = np.zeros((FRAMES, height, width, 3), dtype=np.uint8)
  video[..., 0] = tag
  video[..., 1] = 20 * np.arange(FRAMES)[:, None, None]
  video[..., 2] = np.linspace(0, 255, width).astype(np.uint8)
  return video


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """root/{apple,banana,cherry}/... with one corrupt and one truncated file."""
  root = tmp_path_factory.mktemp('videos')
  for name in ('apple', 'banana', 'cherry/takes'):
    os.makedirs(root / name)
  video_io.write_mp4(str(root / 'apple' / 'a0.mp4'), _video(40))
  video_io.write_gif(str(root / 'apple' / 'a1.gif'), _video(80))
  video_io.write_mp4(str(root / 'banana' / 'b0.mp4'), _video(120))
  video_io.write_mp4(str(root / 'cherry' / 'takes' / 'c0.mp4'), _video(160))
  (root / 'banana' / 'b1_corrupt.mp4').write_bytes(b'not a video' * 100)
  data = (root / 'apple' / 'a0.mp4').read_bytes()
  (root / 'cherry' / 'c1_truncated.mp4').write_bytes(data[:len(data) // 3])
  (root / 'cherry' / 'notes.txt').write_text('not a video')
  return str(root)


def _data(path, **overrides):
  data = tiny.get_config().data
  data.name, data.path, data.num_classes = 'video_files', path, 3
  for key, value in overrides.items():
    data[key] = value
  return data


def test_finds_videos_and_labels_classes_by_folder(folder):
  source = sources.get_source(_data(folder), seed=0)
  names = [os.path.relpath(f, folder) for f in source.files]
  assert names == ['apple/a0.mp4', 'apple/a1.gif', 'banana/b0.mp4',
                   'banana/b1_corrupt.mp4', 'cherry/c1_truncated.mp4',
                   'cherry/takes/c0.mp4']
  assert source.label_names == ['apple', 'banana', 'cherry']
  np.testing.assert_array_equal(source.labels, [0, 0, 1, 1, 2, 2])
  for index, tag in ((0, 40), (1, 80), (2, 120), (5, 160)):
    item = source[index]
    assert item['video'].shape == (FRAMES, 16, 16, 3)
    assert item['video'].dtype == np.uint8
    assert item['label'] == source.labels[index]
    np.testing.assert_allclose(item['video'][..., 0].mean(), tag, atol=8)
    np.testing.assert_allclose(item['video'][:, 8, 8, 1],
                               20 * np.arange(FRAMES), atol=8)


def test_corrupt_files_are_skipped_and_counted(folder, caplog):
  source = sources.get_source(_data(folder), seed=0)
  assert source.num_skipped == 0
  # Example 3 is corrupt: the next readable file (cherry/takes/c0) serves
  # it, once example 4 (truncated to a third: too few frames) is skipped.
  item = source.read_frames(3, np.arange)
  assert item['label'] == 2
  np.testing.assert_allclose(item['video'][..., 0].mean(), 160, atol=8)
  assert source.num_skipped == 2
  assert sorted(os.path.basename(f) for f in source.skipped) == [
      'b1_corrupt.mp4', 'c1_truncated.mp4']
  assert 'b1_corrupt.mp4' in caplog.text
  batch = pipeline.Pipeline(source, global_batch_size=6, num_frames=4,
                            seed=0).batch_for_step(0)
  assert batch['video'].shape == (6, 4, 16, 16, 3)


def test_no_readable_file_is_a_clear_error(tmp_path):
  (tmp_path / 'x.mp4').write_bytes(b'junk')
  source = video_files.VideoFiles(str(tmp_path), image_size=16)
  with pytest.raises(ValueError, match='None of the 1 video files'):
    source[0]
  os.makedirs(tmp_path / 'empty')
  with pytest.raises(ValueError, match='No video files'):
    video_files.VideoFiles(str(tmp_path / 'empty'), image_size=8)
  with pytest.raises(FileNotFoundError, match='neither a video file'):
    video_files.VideoFiles(str(tmp_path / 'missing'), image_size=8)


def test_single_file_and_short_side_resize(folder):
  path = os.path.join(folder, 'banana', 'b0.mp4')
  source = sources.get_source(_data(path, num_classes=0), seed=0)
  assert len(source) == 1 and source.label_names is None
  # 64x48 (written upscaled to 170x128): short side to 16, width 21.
  left = source.read_frames(0, np.arange, crop=(0.0, 0.0))['video']
  right = source.read_frames(0, np.arange, crop=(0.999, 0.999))['video']
  centre = source[0]['video']
  assert left.shape == right.shape == centre.shape == (FRAMES, 16, 16, 3)
  blue = [v[..., 2].mean() for v in (left, centre, right)]
  assert blue[0] < blue[1] < blue[2]
  with pytest.raises(ValueError, match='num_classes=3'):
    sources.get_source(_data(path), seed=0)


def test_stride_flips_processes_and_resume(folder):
  data = _data(folder, frame_stride=2, random_flip=True, crop='random')
  source = sources.get_source(data, seed=0)

  def make(**kw):
    args = dict(global_batch_size=4, num_frames=4, seed=0, frame_stride=2,
                random_start=False, **sources.pipeline_options(data))
    args.update(kw)
    return pipeline.Pipeline(source, **args)

  batch = make().batch_for_step(0)
  green = batch['video'][:, :, 8, 8, 1].astype(float)
  np.testing.assert_allclose(green, np.tile([0, 40, 80, 120], (4, 1)),
                             atol=8)
  straight = [make(random_start=True).batch_for_step(s) for s in range(3)]
  with make(random_start=True).iterate(start_step=1) as resumed:
    for step in (1, 2):
      got = next(resumed)
      for key in got:
        np.testing.assert_array_equal(got[key], straight[step][key])
  halves = [make(process_index=p, process_count=2).batch_for_step(0)
            for p in range(2)]
  for key in batch:
    np.testing.assert_array_equal(
        np.concatenate([h[key] for h in halves]), batch[key])


def test_uncached_reads_resize_only_the_picked_frames_to_the_same_pixels(
    folder, monkeypatch):
  """A cache below half the folder resizes only the frames a read picks
  (and caches nothing): the same batches, bit for bit, as the cached path,
  bad files skipped alike."""
  data = _data(folder, frame_stride=2, random_flip=True, crop='random')
  cached = sources.get_source(data, seed=0)
  data.cache_size = 2  # 6 files: the cache holds less than half.
  uncached = sources.get_source(data, seed=0)
  assert cached.resize_all and not uncached.resize_all
  sizes = []
  real_resize = video_files.resize_short_side

  def resize(video, *args):
    sizes.append(len(video))
    return real_resize(video, *args)

  def batches(source):
    make = pipeline.Pipeline(source, global_batch_size=4, num_frames=4,
                             seed=0, frame_stride=2, image_frames=2,
                             **sources.pipeline_options(data))
    sizes.clear()
    with monkeypatch.context() as patch:
      patch.setattr(video_files, 'resize_short_side', resize)
      return [make.batch_for_step(step) for step in range(3)], list(sizes)

  (want, whole), (got, picked) = batches(cached), batches(uncached)
  for step in range(3):
    for key in want[step]:
      np.testing.assert_array_equal(got[step][key], want[step][key])
  assert not uncached._cache  # pylint: disable=protected-access
  assert uncached.num_skipped == cached.num_skipped == 2
  # Cached: whole videos, each once. Uncached: 4-frame clips, 1-frame images.
  assert set(whole) == {FRAMES} and len(whole) <= 4  # each at most once
  assert sorted(set(picked)) == [1, 4] and len(picked) == 3 * 4 * 3


def test_label_names_are_saved_beside_the_checkpoint(folder, tmp_path):
  source = sources.get_source(_data(folder), seed=0)
  path = sources.save_label_names(source, str(tmp_path))
  assert path == str(tmp_path / 'labels.json')
  assert json.loads((tmp_path / 'labels.json').read_text()) == [
      'apple', 'banana', 'cherry']
  assert sources.load_label_names(str(tmp_path)) == source.label_names
  assert sources.save_label_names(object(), str(tmp_path / 'x')) is None


def test_one_train_step_on_a_video_folder(folder, tmp_path):
  config = tiny.get_config()
  config.data.name, config.data.path = 'video_files', folder
  config.data.random_flip, config.data.crop = True, 'random'
  assert config.data.num_classes == 3  # apple, banana, cherry.
  config.training.num_train_steps = 1
  state = train.train(config, str(tmp_path))
  assert int(state.step) == 1
  # Training saved the class names beside the checkpoint.
  assert sources.load_label_names(str(tmp_path)) == [
      'apple', 'banana', 'cherry']
