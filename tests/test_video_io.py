"""Video files: round trips, upscaling, errors, atomic writes."""

import os

import numpy as np
import pytest
from PIL import Image

from vdm_jax import fileio
from vdm_jax import video_io
from vdm_jax.data import synthetic

# Mean absolute error (0..255) allowed after an H.264 round trip at the
# quality write_mp4 uses (crf 10); measured about 1 on these videos.
MP4_MEAN_TOLERANCE = 4.0


def _videos(n=2, t=6, size=16, channels=3):
  return synthetic.SyntheticVideos(t, size, channels=channels).render_batch(
      range(n))['video']


def _upscaled(video, factor):
  return video.repeat(factor, axis=1).repeat(factor, axis=2)


def _no_temp_files(directory):
  return [f for f in os.listdir(directory) if '.tmp' in f] == []


def test_to_uint8():
  x = np.array([-1.0, -0.999, 0.0, 0.5, 1.0, 1.7, -3.0, np.nan])
  np.testing.assert_array_equal(video_io.to_uint8(x),
                                [0, 0, 128, 191, 255, 255, 0, 0])
  assert video_io.to_uint8(np.zeros((2, 3))).dtype == np.uint8


def test_mp4_round_trip_upscales_to_even_viewable_size(tmp_path):
  video = _videos()[0]
  path = str(tmp_path / 'a.mp4')
  video_io.write_mp4(path, video, fps=8)
  back = video_io.read_video(path)
  assert back.shape == (6, 128, 128, 3) and back.dtype == np.uint8
  error = np.abs(back.astype(float) - _upscaled(video, 8)).mean()
  assert error < MP4_MEAN_TOLERANCE
  assert video_io.read_video(path, max_frames=2).shape[0] == 2
  assert _no_temp_files(tmp_path)


def test_mp4_odd_size_and_one_channel(tmp_path):
  video = _videos(t=3, size=45, channels=1)[0]  # x3 -> 135: odd.
  path = str(tmp_path / 'b.mp4')
  video_io.write_mp4(path, video)
  back = video_io.read_video(path)
  assert back.shape == (3, 136, 136, 3)
  expected = np.repeat(_upscaled(video, 3), 3, axis=-1)
  error = np.abs(back[:, :135, :135].astype(float) - expected).mean()
  assert error < MP4_MEAN_TOLERANCE


@pytest.mark.parametrize('channels', [1, 3])
def test_gif_round_trip(tmp_path, channels):
  video = _videos(channels=channels)[1]
  path = str(tmp_path / 'a.gif')
  video_io.write_gif(path, video, fps=10)
  back = video_io.read_video(path)
  expected = _upscaled(video, 8)
  if channels == 1:
    expected = np.repeat(expected, 3, axis=-1)
  # Few colours per frame: the GIF palette holds them exactly.
  np.testing.assert_array_equal(back, expected)
  with Image.open(path) as image:
    assert image.info['loop'] == 0 and image.info['duration'] == 100


def test_npz_round_trip(tmp_path):
  videos = _videos(n=3)
  path = str(tmp_path / 'v.npz')
  video_io.save_npz(path, videos, labels=np.arange(3))
  with np.load(path) as data:
    np.testing.assert_array_equal(data['videos'], videos)
    np.testing.assert_array_equal(data['labels'], np.arange(3))
  single = str(tmp_path / 'one.npz')
  video_io.save_npz(single, videos[:1])
  np.testing.assert_array_equal(video_io.read_video(single), videos[0])
  with pytest.raises(ValueError, match='could not be decoded|Could not'):
    video_io.read_video(path)  # Three videos, not one.


def test_npz_float_rules(tmp_path):
  path = str(tmp_path / 'f.npz')
  np.savez(path, video=np.full((2, 4, 4, 3), -1.0), other=np.zeros(3))
  assert (video_io.read_video(path) == 0).all()
  np.savez(path, video=np.full((2, 4, 4, 1), 0.5))
  assert (video_io.read_video(path) == 128).all()
  np.savez(path, video=np.full((2, 4, 4, 3), 2.0))
  with pytest.raises(ValueError, match=r'\[-1, 1\] or \[0, 1\]'):
    video_io.read_video(path)


def test_read_npz_videos_keys_shapes_and_floats(tmp_path):
  videos = _videos(n=3, t=4, size=8)
  path = str(tmp_path / 'v.npz')
  # 'videos' wins over 'video' and over earlier arrays.
  np.savez(path, a=np.zeros(3), video=videos[:1], videos=videos)
  back = video_io.read_npz_videos(path)
  assert back.dtype == np.uint8
  np.testing.assert_array_equal(back, videos)
  # One video [T, H, W, C] is N = 1; the first array is used without keys.
  np.savez(path, clip=videos[1])
  np.testing.assert_array_equal(video_io.read_npz_videos(path), videos[1:2])
  # Floats in [-1, 1] (any value negative) and in [0, 1].
  np.savez(path, videos=np.array([-1.0, 0.0, 1.0]).reshape(1, 3, 1, 1, 1))
  np.testing.assert_array_equal(
      video_io.read_npz_videos(path).ravel(), [0, 128, 255])
  np.savez(path, videos=np.array([0.0, 0.5, 1.0],
                                 np.float32).reshape(1, 3, 1, 1, 1))
  np.testing.assert_array_equal(
      video_io.read_npz_videos(path).ravel(), [0, 128, 255])


@pytest.mark.parametrize('array,match', [
    (np.zeros((2, 3, 4, 4, 4), np.uint8), r"'videos' has shape \(2, 3, 4"),
    (np.zeros((4, 4), np.uint8), r"'videos' has shape \(4, 4\)"),
    (np.zeros((0, 3, 4, 4, 3), np.uint8), 'holds no frames'),
    (np.full((1, 2, 4, 4, 3), 1.5), r'\[-1, 1\] or \[0, 1\], got'),
    (np.full((1, 2, 4, 4, 3), np.nan), r'\[-1, 1\] or \[0, 1\], got'),
    (np.zeros((1, 2, 4, 4, 3), np.int64), 'dtype int64; expected uint8'),
])
def test_read_npz_videos_errors_name_file_and_problem(tmp_path, array, match):
  path = str(tmp_path / 'bad.npz')
  np.savez(path, videos=array)
  with pytest.raises(ValueError, match=match) as error:
    video_io.read_npz_videos(path)
  assert 'bad.npz' in str(error.value)


def test_read_npz_videos_unreadable_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='missing.npz'):
    video_io.read_npz_videos(str(tmp_path / 'missing.npz'))
  junk = tmp_path / 'junk.npz'
  junk.write_bytes(b'PK\x03\x04' + bytes(40))  # A broken zip.
  with pytest.raises(ValueError, match='junk.npz is not a readable npz'):
    video_io.read_npz_videos(str(junk))
  empty = str(tmp_path / 'empty.npz')
  np.savez(empty)
  with pytest.raises(ValueError, match='holds no arrays'):
    video_io.read_npz_videos(empty)
  npy = tmp_path / 'plain.npz'
  with open(npy, 'wb') as f:
    np.save(f, np.zeros((2, 4, 4, 3), np.uint8))
  with pytest.raises(ValueError, match='not an npz archive'):
    video_io.read_npz_videos(str(npy))


def test_png_grid(tmp_path):
  videos = _videos(n=3, t=5, size=16)
  path = str(tmp_path / 'grid.png')
  video_io.write_png_grid(path, videos, pad=2)
  grid = np.asarray(Image.open(path))
  cell = 64  # 16 px frames upscaled x4.
  assert grid.shape == (3 * (cell + 2) + 2, 5 * (cell + 2) + 2, 3)
  np.testing.assert_array_equal(
      grid[2 + cell + 2:2 + 2 * cell + 2, 2:2 + cell],
      _upscaled(videos[1], 4)[0])
  assert _no_temp_files(tmp_path)


def test_png_grid_keeps_at_most_max_frames_first_and_last(tmp_path):
  videos = _videos(n=1, t=9, size=16)
  path = str(tmp_path / 'grid.png')
  video_io.write_png_grid(path, videos, pad=2, max_frames=3)
  grid = np.asarray(Image.open(path))
  cell = 64
  assert grid.shape[1] == 3 * (cell + 2) + 2
  up = _upscaled(videos[0], 4)
  for col, frame in enumerate((0, 4, 8)):
    x = 2 + col * (cell + 2)
    np.testing.assert_array_equal(grid[2:2 + cell, x:x + cell], up[frame])


def test_corrupt_missing_and_unsupported_files(tmp_path):
  bad = tmp_path / 'x.mp4'
  bad.write_bytes(np.random.default_rng(0).bytes(2000))
  with pytest.raises(ValueError, match='Could not decode.*x.mp4'):
    video_io.read_video(str(bad))
  bad_gif = tmp_path / 'x.gif'
  bad_gif.write_bytes(b'GIF89a' + bytes(50))
  with pytest.raises(ValueError, match='x.gif'):
    video_io.read_video(str(bad_gif))
  with pytest.raises(FileNotFoundError, match='missing.webm'):
    video_io.read_video(str(tmp_path / 'missing.webm'))
  with pytest.raises(ValueError, match=r'\.mp4, \.webm, \.avi, \.gif, \.npz'):
    video_io.read_video(str(tmp_path / 'clip.mkv'))


def test_failed_write_leaves_no_partial_file(tmp_path):
  path = tmp_path / 'a.gif'
  with pytest.raises(ValueError, match='uint8'):
    video_io.write_gif(str(path), np.zeros((2, 8, 8, 3), np.float32))
  video_io.write_gif(str(path), _videos()[0])
  before = path.read_bytes()
  with pytest.raises(ValueError):
    video_io.write_png_grid(str(tmp_path / 'g.png'), _videos()[0])  # 4-D.
  with pytest.raises(RuntimeError):
    with fileio.atomic_path(str(path)) as tmp:
      with open(tmp, 'wb') as f:
        f.write(b'partial')
      raise RuntimeError('interrupted')
  assert path.read_bytes() == before
  assert sorted(os.listdir(tmp_path)) == ['a.gif']
