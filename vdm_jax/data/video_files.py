"""Videos from files: one video file or a folder (searched recursively).

`VideoFiles(path, image_size=64)` is a random-access source for
`data.pipeline.Pipeline` over mp4/avi/webm/gif files, decoded lazily with
ffmpeg (imageio-ffmpeg, through `vdm_jax.video_io.read_video`) or Pillow.
Each decoded video is resized once (short side to `image_size`, antialiased)
and kept in a small LRU cache; clips are cropped from it to `image_size`
squared, at the centre or where the pipeline's random crop puts them. When
the cache holds fewer than half the files (a large folder, where most reads
miss), nothing is cached and only the frames a read picks are resized: the
same pixels (frames are resized one by one), for a fraction of the CPU.

Captions (data.captions=True): a sidecar .txt beside each video or one
captions.csv / captions.json in the folder (data/captions.py).

Labels come from sub-folder names, as in the UCF101 and Kinetics layouts
(`root/<class>/<video>`, or `root/<class>/<group>/<video>`: the first
folder below the root names the class). Classes are numbered in sorted
order; `label_names` lists them (see `sources.save_label_names`). A folder
with videos directly in the root, or a single file, is unlabelled (label 0).

A file that cannot be decoded (corrupt or truncated), or holds fewer frames
than a clip needs, is skipped: a warning names it, `num_skipped` counts it,
and the example is served by the next readable file (in sorted order,
wrapping around), so batches stay a pure function of the data position. If
no file can be read the source raises. In grain's worker processes each
worker keeps its own cache and finds bad files itself; each batch carries
the worker's `skipped` files back, and the pipeline adds them to the main
process's source (`merge_skipped`), so `num_skipped` counts them there.

The frame helpers here (`decode_image`, `resize_short_side`, `crop`) are
shared with the TFDS sources, so every source resizes and crops alike.
"""

import collections
import io
import math
import os
import threading
from typing import Callable, Optional, Sequence

from absl import logging
import numpy as np
from PIL import Image

from vdm_jax import video_io
from vdm_jax.data import captions as captions_lib

VIDEO_EXTENSIONS = ('.mp4', '.avi', '.webm', '.gif')


def _mode(channels: int) -> str:
  if channels not in (1, 3):
    raise ValueError(f'channels must be 1 or 3, got {channels}.')
  return 'L' if channels == 1 else 'RGB'


def _short_side_size(width: int, height: int, size: int) -> tuple[int, int]:
  """(width, height) with the shorter side `size`, aspect kept (rounded)."""
  short = min(width, height)
  return (max(size, round(width * size / short)),
          max(size, round(height * size / short)))


def _resize(image: Image.Image, size: int, channels: int) -> np.ndarray:
  """A PIL image -> uint8 [S, L, C], short side S = `size`, antialiased.

  Pillow's bilinear resize widens its filter by the downscale factor, like
  `tf.image.resize(..., antialias=True)`, so downscaling does not alias.
  """
  image = image.convert(_mode(channels))
  target = _short_side_size(*image.size, size)
  if image.size != target:
    image = image.resize(target, Image.Resampling.BILINEAR)
  frame = np.asarray(image)
  return frame[..., None] if frame.ndim == 2 else frame


def resize_short_side(video: np.ndarray, size: int,
                      channels: int = 3) -> np.ndarray:
  """Resizes frames so that the shorter side is `size` (antialiased).

  Args:
    video: uint8 [T, H, W, C], C in (1, 3).
    size: S, the shorter side after resizing.
    channels: output channels, 1 (luminance) or 3 (RGB; grey is repeated).

  Returns:
    uint8 [T, S, L, channels] (or [T, L, S, channels]), L >= S the longer
    side with the aspect ratio kept.
  """
  video = np.asarray(video)
  frames = [_resize(Image.fromarray(f[..., 0] if f.shape[-1] == 1 else f),
                    size, channels) for f in video]
  return np.stack(frames)


def decode_image(data: bytes, size: int, channels: int = 3) -> np.ndarray:
  """Decodes an encoded image (JPEG, PNG, ...) with its short side `size`.

  JPEGs are decoded at the smallest DCT scale (1/2, 1/4 or 1/8) that keeps
  the short side >= `size`, which makes decoding several times faster; the
  final resize is antialiased either way.

  Args:
    data: the encoded image.
    size: S, the shorter side of the result.
    channels: 1 or 3.

  Returns:
    uint8 [S, L, channels] or [L, S, channels].
  """
  image = Image.open(io.BytesIO(data))
  if image.format == 'JPEG':
    width, height = image.size
    scale = size / min(width, height)
    image.draft(_mode(channels),
                (math.ceil(width * scale), math.ceil(height * scale)))
  return _resize(image, size, channels)


def crop(video: np.ndarray, size: int,
         where: Optional[Sequence[float]] = None) -> np.ndarray:
  """Crops a `size` x `size` window out of short-side-resized frames.

  Args:
    video: uint8 [..., H, W, C] with min(H, W) >= size.
    size: S, the window side.
    where: None for the centre, or (u_y, u_x) in [0, 1): the window starts
      at floor(u * (slack + 1)) along each axis, slack = H - S or W - S.

  Returns:
    uint8 [..., S, S, C].
  """
  h, w = video.shape[-3:-1]
  if min(h, w) < size:
    raise ValueError(f'Cannot crop {size}x{size} out of {h}x{w} frames.')
  if where is None:
    y, x = (h - size) // 2, (w - size) // 2
  else:
    y = min(int(where[0] * (h - size + 1)), h - size)
    x = min(int(where[1] * (w - size + 1)), w - size)
  return video[..., y:y + size, x:x + size, :]


def find_videos(path: str) -> list[str]:
  """Video files under `path` (recursive, sorted), or `[path]` for a file."""
  path = os.fspath(path)
  if os.path.isfile(path):
    return [path]
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f'config.data.path={path!r} is neither a video file nor a folder.')
  found = []
  for directory, subdirs, files in os.walk(path, followlinks=True):
    subdirs.sort()
    found.extend(os.path.join(directory, f) for f in sorted(files)
                 if os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS)
  return sorted(found)


def folder_labels(root: str, files: Sequence[str]
                  ) -> tuple[Optional[list[str]], np.ndarray]:
  """Class names (sorted) and int32 [N] labels from first-level sub-folders.

  Returns (None, zeros) when any file lies directly in `root` (unlabelled).
  """
  classes = []
  for f in files:
    parts = os.path.relpath(f, root).split(os.sep)
    if len(parts) < 2:
      return None, np.zeros(len(files), dtype=np.int32)
    classes.append(parts[0])
  names = sorted(set(classes))
  index = {name: i for i, name in enumerate(names)}
  return names, np.asarray([index[c] for c in classes], dtype=np.int32)


class VideoFiles:
  """Random-access source over video files with lazy, cached decoding.

  `source[i]` is `{'video': uint8[T, S, S, C], 'label': int}` (centre crop,
  all frames); `read_frames(i, select, crop)` decodes (or takes from the
  cache) video i and returns only the frames `select(T)` picks.
  """

  def __init__(self, path: str, *, image_size: int, channels: int = 3,
               min_frames: int = 1, cache_size: int = 32,
               read_fn: Callable[[str], np.ndarray] = video_io.read_video,
               captions: bool = False, allow_empty_captions: bool = False):
    """Lists the files (decoding nothing yet).

    Args:
      path: a video file, or a folder searched recursively for
        VIDEO_EXTENSIONS files.
      image_size: S, the side of the square output frames.
      channels: 1 (luminance) or 3 (RGB).
      min_frames: videos with fewer frames are skipped (a clip's span,
        `sources.num_source_frames(config.data)`).
      cache_size: decoded, resized videos kept in memory.
      read_fn: decodes a file into uint8 [T, H, W, C]; raises on failure.
      captions: read each video's caption (data/captions.py); items then
        hold 'caption'.
      allow_empty_captions: a missing caption is '' instead of an error.

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: no video files under `path`.
    """
    _mode(channels)
    self.path = os.fspath(path)
    self.files = find_videos(self.path)
    if not self.files:
      raise ValueError(
          f'No video files ({", ".join(VIDEO_EXTENSIONS)}) under '
          f'config.data.path={self.path!r}.')
    if os.path.isdir(self.path):
      self.label_names, self.labels = folder_labels(self.path, self.files)
    else:
      self.label_names = None
      self.labels = np.zeros(1, dtype=np.int32)
    self.captions = None
    if captions:
      root = self.path if os.path.isdir(self.path) else os.path.dirname(
          self.path)
      self.captions = captions_lib.load_captions(root, self.files,
                                                 allow_empty_captions)
    self.image_size = image_size
    self.channels = channels
    self.min_frames = min_frames
    self.cache_size = max(1, cache_size)
    # Caching pays when the cache holds a good share of the files; below
    # half of them most random reads miss, and resizing every frame of a
    # video to serve one clip (0.13 of the 0.21 CPU s of a 186-frame
    # 320x240 mp4, docs/data.md) is wasted.
    self.resize_all = 2 * self.cache_size >= len(self.files)
    self._read_fn = read_fn
    self._cache = collections.OrderedDict()
    self._bad = {}  # File index -> reason it was skipped.
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.files)

  def __getstate__(self) -> dict:
    """For grain's worker processes: no lock, an empty cache."""
    state = dict(self.__dict__)
    del state['_lock']
    state['_cache'] = collections.OrderedDict()
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def describe(self, index: int) -> str:
    """The file of example `index` (for error messages)."""
    return self.files[int(index)]

  def merge_skipped(self, skipped: dict[str, str]) -> None:
    """Counts files another process (a grain worker) skipped.

    Args:
      skipped: file path -> why, as `skipped` gives it.
    """
    index = {f: i for i, f in enumerate(self.files)}
    with self._lock:
      for path, why in skipped.items():
        self._bad.setdefault(index[path], why)

  @property
  def num_skipped(self) -> int:
    """Files skipped so far (found unreadable or too short)."""
    return len(self._bad)

  @property
  def skipped(self) -> dict[str, str]:
    """File path -> why it was skipped, for the files found so far."""
    return {self.files[i]: why for i, why in sorted(self._bad.items())}

  def _decode(self, index: int) -> np.ndarray:
    """Decoded uint8 [T, H, W, C] of file `index`, not resized; raises."""
    video = self._read_fn(self.files[index])
    if video.shape[0] < self.min_frames:
      raise ValueError(
          f'{video.shape[0]} frames, fewer than the {self.min_frames} a clip '
          'needs')
    return video

  def _load(self, index: int) -> tuple[np.ndarray, int]:
    """(video, file index) of example `index`, skipping bad files (the file
    index names the file that serves it). With `resize_all` the video is
    resized ([T, S, L, C]) and cached; without, it is as decoded."""
    n = len(self.files)
    for k in range(n):
      i = (index + k) % n
      with self._lock:
        if i in self._cache:
          self._cache.move_to_end(i)
          return self._cache[i], i
        if i in self._bad:
          continue
      try:
        video = self._decode(i)
      except (OSError, ValueError) as e:
        with self._lock:
          self._bad[i] = str(e)
          count = len(self._bad)
        logging.warning('Skipping video %s (%d skipped so far): %s',
                        self.files[i], count, e)
        continue
      if self.resize_all:
        video = resize_short_side(video, self.image_size, self.channels)
        with self._lock:
          self._cache[i] = video
          while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
      return video, i
    raise ValueError(
        f'None of the {n} video files under {self.path!r} could be used '
        f'(each needs >= {self.min_frames} decodable frames); first problem: '
        f'{next(iter(self.skipped.items()))}.')

  def read_frames(self, index: int, select: Callable[[int], np.ndarray],
                  crop: Optional[Sequence[float]] = None) -> dict:
    """Frames `select(T)` of video `index`, cropped (see `pipeline`).

    Args:
      index: example index in [0, len(self)).
      select: maps the video length T to int [K] frame indices.
      crop: None (centre) or (u_y, u_x) in [0, 1) placing the window.

    Returns:
      {'video': uint8[K, S, S, C], 'label': int} and, with captions,
      'caption': str (of the file that served the example).
    """
    if not 0 <= index < len(self.files):
      raise IndexError(f'Index {index} out of range for {len(self)} videos.')
    video, i = self._load(int(index))
    video = video[np.asarray(select(video.shape[0]))]
    if not self.resize_all:
      video = resize_short_side(video, self.image_size, self.channels)
    item = {'video': _crop(video, self.image_size, crop),
            'label': int(self.labels[i])}
    if self.captions is not None:
      item['caption'] = self.captions[i]
    return item

  def __getitem__(self, index: int) -> dict:
    """All frames of video `index`: {'video': uint8[T, S, S, C], 'label'}."""
    return self.read_frames(int(index), np.arange)


_crop = crop  # `read_frames` has an argument named `crop`.
