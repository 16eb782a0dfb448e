"""Reading and writing videos: mp4, gif, png grids, npz.

Videos are uint8 [T, H, W, C] with C = 1 or 3 (model outputs in [-1, 1] go
through `to_uint8` first). Small videos are upscaled with nearest-neighbour
sampling when written as mp4/gif/png, so that 16x16 or 64x64 samples are
viewable. Every write goes through `fileio.atomic_path` (a temporary file
moved into place), so readers never see partial files.
"""

import math
import os
from typing import Any, Optional, Sequence
import zipfile

import imageio_ffmpeg
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageSequence

from vdm_jax import fileio

# mp4/gif frames are upscaled until their shorter side is at least this.
MIN_VIEW_SIZE = 128
# png grid cells are upscaled until their shorter side is at least this.
MIN_GRID_CELL = 64
# Pixels of the text line under each row of a PNG grid with captions.
CAPTION_HEIGHT = 14
FFMPEG_EXTENSIONS = ('.mp4', '.webm', '.avi')
READ_EXTENSIONS = FFMPEG_EXTENSIONS + ('.gif', '.npz')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')


def to_uint8(x: Any) -> np.ndarray:
  """Maps floats in [-1, 1] to uint8 [0, 255], rounding and clipping.

  Args:
    x: float array of any shape (numpy or jax); NaN maps to 0.

  Returns:
    uint8 array of the same shape.
  """
  x = np.asarray(x, dtype=np.float32)
  x = np.rint((np.nan_to_num(x, nan=-1.0) + 1.0) * 127.5)
  return np.clip(x, 0, 255).astype(np.uint8)


def _check_video(video: Any, ndim: int = 4) -> np.ndarray:
  video = np.asarray(video)
  if video.dtype != np.uint8:
    raise ValueError(
        f'Expected a uint8 video, got {video.dtype}; convert model outputs '
        'with to_uint8.')
  if video.ndim != ndim or video.shape[-1] not in (1, 3):
    layout = '[T, H, W, C]' if ndim == 4 else '[N, T, H, W, C]'
    raise ValueError(
        f'Expected a video of shape {layout} with C in (1, 3), got '
        f'{video.shape}.')
  return video


def _upscale(video: np.ndarray, min_size: int) -> np.ndarray:
  """Nearest-neighbour upscale of [..., H, W, C] by an integer factor."""
  factor = max(1, math.ceil(min_size / min(video.shape[-3:-1])))
  if factor > 1:
    video = video.repeat(factor, axis=-3).repeat(factor, axis=-2)
  return video


def _rgb(video: np.ndarray) -> np.ndarray:
  """[..., C] with C in (1, 3) -> [..., 3]."""
  return np.repeat(video, 3, axis=-1) if video.shape[-1] == 1 else video


def write_mp4(path: str, video: Any, fps: int = 8) -> None:
  """Writes an H.264 (yuv420p) mp4, viewable in browsers and players.

  Frames are upscaled (nearest) to a shorter side >= MIN_VIEW_SIZE and padded
  by edge replication to even sizes, which yuv420p requires; 1-channel videos
  become grey RGB.

  Args:
    path: output file (.mp4).
    video: uint8 [T, H, W, C], C in (1, 3).
    fps: frames per second.
  """
  video = _rgb(_upscale(_check_video(video), MIN_VIEW_SIZE))
  _, h, w, _ = video.shape
  video = np.pad(video, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode='edge')
  size = (video.shape[2], video.shape[1])
  with fileio.atomic_path(path) as tmp:
    writer = imageio_ffmpeg.write_frames(
        tmp, size, fps=fps, codec='libx264', pix_fmt_out='yuv420p',
        quality=8, macro_block_size=2, ffmpeg_log_level='error')
    writer.send(None)  # Starts ffmpeg.
    try:
      for frame in video:
        writer.send(np.ascontiguousarray(frame))
    finally:
      writer.close()


def write_gif(path: str, video: Any, fps: int = 8) -> None:
  """Writes a looping GIF, upscaled (nearest) to a shorter side >= 128.

  Each frame gets its own 256-colour palette (exact for videos with few
  colours). The encoder stores identical consecutive frames once, with the
  summed delay, so such a GIF reads back with fewer frames.

  Args:
    path: output file (.gif).
    video: uint8 [T, H, W, C], C in (1, 3); 1-channel videos stay grey.
    fps: frames per second (GIF stores delays in 10 ms units).
  """
  video = _upscale(_check_video(video), MIN_VIEW_SIZE)
  # 2-D arrays become 'L' (grey) images, [H, W, 3] arrays 'RGB' ones.
  frames = [Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f)
            for f in video]
  with fileio.atomic_path(path) as tmp:
    frames[0].save(tmp, format='GIF', save_all=True,
                   append_images=frames[1:], duration=round(1000 / fps),
                   loop=0, optimize=False)


def write_png_grid(path: str, videos: Any, pad: int = 2,
                   captions: Optional[Sequence[str]] = None,
                   max_frames: Optional[int] = None) -> None:
  """Writes a PNG with one row per video and one column per frame.

  Frames are upscaled (nearest) to a shorter side >= MIN_GRID_CELL; cells
  are separated by `pad` white pixels.

  Args:
    path: output file (.png).
    videos: uint8 [N, T, H, W, C], C in (1, 3).
    pad: pixels between cells and around the grid.
    captions: N texts (e.g. the prompts), each drawn under its row.
    max_frames: at most this many columns, evenly spaced from the first
      frame to the last (None: every frame). A 4x upsampled 32-frame clip
      has 125 frames: a PNG 32,000 pixels wide at 256 wide frames.
  """
  videos = _check_video(videos, ndim=5)
  if max_frames is not None and videos.shape[1] > max_frames:
    keep = np.round(np.linspace(0, videos.shape[1] - 1, max_frames))
    videos = videos[:, keep.astype(int)]
  videos = _rgb(_upscale(videos, MIN_GRID_CELL))
  n, t, h, w, _ = videos.shape
  if captions is not None and len(captions) != n:
    raise ValueError(f'{len(captions)} captions for {n} videos.')
  text_h = CAPTION_HEIGHT if captions is not None else 0
  row = h + pad + text_h
  grid = np.full((n * row + pad, t * (w + pad) + pad, 3), 255,
                 dtype=np.uint8)
  for i in range(n):
    for j in range(t):
      y, x = pad + i * row, pad + j * (w + pad)
      grid[y:y + h, x:x + w] = videos[i, j]
  image = Image.fromarray(grid)
  if captions is not None:
    draw = ImageDraw.Draw(image)
    for i, text in enumerate(captions):
      draw.text((pad, pad + i * row + h + 1), text or '(empty prompt)',
                fill=(0, 0, 0))
  with fileio.atomic_path(path) as tmp:
    image.save(tmp, format='PNG')


def save_npz(path: str, videos: Any, **extra: Any) -> None:
  """Saves `videos` (key 'videos') and `extra` arrays to a compressed npz.

  Args:
    path: output file (.npz).
    videos: array, e.g. uint8 [N, T, H, W, C].
    **extra: further arrays (labels, ...), saved under their names.
  """
  with fileio.atomic_path(path) as tmp:
    with open(tmp, 'wb') as f:
      np.savez_compressed(f, videos=np.asarray(videos), **extra)


# Over 60 lines with its docstring: one clear error per way an npz can be
# wrong (missing, unreadable, empty, bad shape, dtype or range).
def read_npz_videos(path: str) -> np.ndarray:
  """Reads the videos of an npz file (e.g. another run's samples.npz).

  The videos are the array 'videos', else 'video', else the first array of
  the file, shaped [N, T, H, W, C], or [T, H, W, C] / [T, H, W] for one
  video, with C in (1, 3). uint8 values are taken as they are; float values
  as [-1, 1] if any is negative, else as [0, 1] (others raise).

  Args:
    path: the .npz file.

  Returns:
    uint8 [N, T, H, W, C] (C = 1 for a [T, H, W] array).

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: the file is not an npz archive, or its array is not videos
      (the message names the file, the array and what is wrong).
  """
  path = os.fspath(path)
  try:
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
      raise ValueError('it holds one .npy array, not an npz archive')
    with data:
      keys = [k for k in ('videos', 'video') if k in data.files]
      key = keys[0] if keys else (data.files[0] if data.files else None)
      if key is None:
        raise ValueError('the npz holds no arrays')
      videos = data[key]
  except FileNotFoundError as e:
    raise FileNotFoundError(f'No such npz file: {path}') from e
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise ValueError(
        f'{path} is not a readable npz of videos: {_summary(e)}') from e
  if videos.ndim == 3:
    videos = videos[..., None]
  if videos.ndim == 4:
    videos = videos[None]
  if videos.ndim != 5 or videos.shape[-1] not in (1, 3):
    raise ValueError(
        f'{path}: array {key!r} has shape {videos.shape}; expected videos'
        ' [N, T, H, W, C] or one video [T, H, W, C] with C in (1, 3), or'
        ' [T, H, W].')
  if not videos.size:
    raise ValueError(
        f'{path}: array {key!r} of shape {videos.shape} holds no frames.')
  if np.issubdtype(videos.dtype, np.floating):
    lo, hi = float(videos.min()), float(videos.max())
    if not np.isfinite([lo, hi]).all() or lo < -1 or hi > 1:
      raise ValueError(
          f'{path}: array {key!r}: float values must lie in [-1, 1] or'
          f' [0, 1], got [{lo}, {hi}].')
    if lo < 0:
      videos = to_uint8(videos)
    else:
      videos = np.rint(videos * 255.0).astype(np.uint8)
  elif videos.dtype != np.uint8:
    raise ValueError(
        f'{path}: array {key!r} has dtype {videos.dtype}; expected uint8 or'
        ' float.')
  return videos


def _ffmpeg_video(path: str, max_frames: Optional[int]) -> np.ndarray:
  """Decodes a video file with ffmpeg into uint8 [T, H, W, 3]."""
  reader = imageio_ffmpeg.read_frames(path, pix_fmt='rgb24')
  frames = []
  try:
    meta = next(reader)
    w, h = meta['size']
    for raw in reader:
      frames.append(np.frombuffer(raw, dtype=np.uint8).reshape(h, w, 3))
      if max_frames is not None and len(frames) >= max_frames:
        break
  finally:
    reader.close()
  if not frames:
    raise ValueError('no frames')
  return np.stack(frames)


def _gif_video(path: str, max_frames: Optional[int]) -> np.ndarray:
  """Decodes a GIF into uint8 [T, H, W, 3] (composited frames)."""
  frames = []
  with Image.open(path) as image:
    for frame in ImageSequence.Iterator(image):
      frames.append(np.asarray(frame.convert('RGB')))
      if max_frames is not None and len(frames) >= max_frames:
        break
  return np.stack(frames)


def read_image(path: str) -> np.ndarray:
  """Reads an image file (.png/.jpg/.jpeg/.bmp/.webp) as uint8 [H, W, 3].

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: unsupported extension or undecodable.
  """
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in IMAGE_EXTENSIONS:
    raise ValueError(f'Unsupported image extension {ext!r} of {path};'
                     f' supported: {", ".join(IMAGE_EXTENSIONS)}.')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No such image file: {path}')
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert('RGB'))
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'Could not decode image file {path}: {_summary(e)}'
                     ) from e


def _summary(error: Exception) -> str:
  """First and last lines of an error message (ffmpeg's are long)."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  if len(lines) > 2:
    lines = [lines[0], '...', lines[-1]]
  return ' '.join(lines) or type(error).__name__


def read_video(path: str, max_frames: Optional[int] = None) -> np.ndarray:
  """Reads a video file as uint8 [T, H, W, 3].

  Formats by extension: .mp4/.webm/.avi (ffmpeg), .gif, .npz (one video,
  read as `read_npz_videos` reads it: [T, H, W, C], [1, T, H, W, C] or
  [T, H, W], uint8 or float). 1-channel videos are repeated to RGB.

  Args:
    path: the file.
    max_frames: read at most this many frames (None: all).

  Returns:
    uint8 [T, H, W, 3].

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: unsupported extension, or the file could not be decoded
      (an npz: see `read_npz_videos`; or it holds more than one video).
  """
  path = os.fspath(path)
  ext = os.path.splitext(path)[1].lower()
  if ext not in READ_EXTENSIONS:
    raise ValueError(
        f'Unsupported video extension {ext!r} of {path}; supported: '
        f'{", ".join(READ_EXTENSIONS)}.')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'No such video file: {path}')
  if ext == '.npz':
    videos = read_npz_videos(path)
    if len(videos) != 1:
      raise ValueError(
          f'Could not read one video from {path}: it holds {len(videos)}'
          ' videos; read them with read_npz_videos.')
    return _rgb(videos[0, :max_frames])
  try:
    if ext == '.gif':
      video = _gif_video(path, max_frames)
    else:
      video = _ffmpeg_video(path, max_frames)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f'Could not decode video file {path}: {_summary(e)}') from e
  return _rgb(video)
