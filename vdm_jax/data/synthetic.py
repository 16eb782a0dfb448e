"""Built-in procedural video dataset: bouncing coloured shapes (no download).

Each clip shows `num_objects` shapes of one kind on a plain dark background.
Every shape moves at a constant velocity and bounces off the frame borders;
the clip's label is the shape kind. Clips are a pure function of
`(seed, index)`: the random parameters come from a counter-based hash, so any
clip can be rendered on its own, in any order, on any host.

Geometry, in units of the frame size S (= image_size):
  - shape half-extent r in [0.15, 0.2] S (shapes span about a third of S);
  - speed in [1/8, 1/4] S per frame, in a uniformly random direction, so a
    shape crosses the frame and bounces within 8 frames.
Edges are antialiased from signed distance functions: a pixel's coverage is
`clip(0.5 - d, 0, 1)`, d the signed distance (in pixels) of its centre to the
shape's edge.
"""

from typing import Sequence

import numpy as np

# Shape kinds, in label order.
KINDS = ('square', 'disc', 'triangle', 'diamond', 'cross', 'ring', 'x',
         'frame')
# A few saturated colours (RGB); each shape picks one at random.
PALETTE = np.array(
    [
        [235, 50, 45],  # red
        [50, 205, 70],  # green
        [55, 100, 240],  # blue
        [245, 220, 40],  # yellow
        [40, 215, 225],  # cyan
        [225, 60, 215],  # magenta
        [250, 145, 30],  # orange
        [240, 240, 240],  # white
    ],
    dtype=np.float32,
)
BACKGROUND = np.array([14, 14, 22], dtype=np.float32)
# RGB -> luminance (ITU-R BT.601) for 1-channel videos.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)

MIN_RADIUS, MAX_RADIUS = 0.15, 0.2  # Half-extent, fraction of the frame.
MIN_SPEED, MAX_SPEED = 1 / 8, 1 / 4  # Fraction of the frame per frame.

_MASK64 = (1 << 64) - 1
# Random numbers drawn per clip: 1 for the label, then 6 per object.
_SLOTS_PER_OBJECT = 6


def _splitmix64(z: np.ndarray) -> np.ndarray:
  """The splitmix64 finaliser: a bijective uint64 -> uint64 mix."""
  z = z ^ (z >> np.uint64(30))
  z = z * np.uint64(0xBF58476D1CE4E5B9)
  z = z ^ (z >> np.uint64(27))
  z = z * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def uniform_hash(seed: int, indices: np.ndarray, num: int) -> np.ndarray:
  """Counter-based uniform numbers, a pure function of (seed, index, slot).

  Args:
    seed: any Python int.
    indices: int [B] clip indices (non-negative).
    num: numbers per index.

  Returns:
    float64 [B, num] in [0, 1).
  """
  key = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
  idx = np.asarray(indices, dtype=np.uint64)[:, None]
  slots = np.arange(num, dtype=np.uint64)[None, :]
  with np.errstate(over='ignore'):
    z = _splitmix64(key ^ _splitmix64(idx * np.uint64(0x9E3779B97F4A7C15)))
    z = _splitmix64(z + slots * np.uint64(0xD1B54A32D192ED03))
  return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _box(px, py, hx, hy):
  """Signed distance to an axis-aligned box with half sizes (hx, hy)."""
  qx, qy = np.abs(px) - hx, np.abs(py) - hy
  outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
  return outside + np.minimum(np.maximum(qx, qy), 0)


def _triangle(px, py, r):
  """Signed distance to an upward equilateral triangle, bbox centred at 0.

  Side 1.9 r, so the half-extents are 0.95 r (x) and 0.82 r (y).
  """
  half = 0.95 * r  # Half the side length.
  h = np.sqrt(3.0) * half  # Height.
  k = np.sqrt(3.0)
  # Image y points down, so flip it; the +h/6 shift moves the bounding box
  # (not the centroid) onto the shape's position.
  x = np.abs(px) - half
  y = -py + h / 6 + half / k
  fold = x + k * y > 0
  x, y = (np.where(fold, (x - k * y) / 2, x),
          np.where(fold, (-k * x - y) / 2, y))
  x = x - np.clip(x, -2 * half, 0)
  return -np.hypot(x, y) * np.sign(y)


def _sdf(kind: int, px: np.ndarray, py: np.ndarray, r: np.ndarray):
  """Signed distance (pixels; negative inside) to a shape of half-extent r.

  Args:
    kind: index into KINDS.
    px, py: float32 [..., H, W] pixel centre minus shape centre, in pixels.
    r: float32 broadcastable to px, the half-extent in pixels.

  Returns:
    float32 [..., H, W].
  """
  name = KINDS[kind]
  if name == 'square':
    return _box(px, py, 0.85 * r, 0.85 * r)
  if name == 'disc':
    return np.hypot(px, py) - r
  if name == 'triangle':
    return _triangle(px, py, r)
  if name == 'diamond':
    return (np.abs(px) + np.abs(py) - r) * np.float32(np.sqrt(0.5))
  if name == 'cross':
    return np.minimum(_box(px, py, 0.95 * r, 0.32 * r),
                      _box(px, py, 0.32 * r, 0.95 * r))
  if name == 'ring':
    return np.abs(np.hypot(px, py) - 0.72 * r) - 0.28 * r
  if name == 'x':
    u = (px + py) * np.float32(np.sqrt(0.5))
    v = (py - px) * np.float32(np.sqrt(0.5))
    return np.minimum(_box(u, v, 1.05 * r, 0.27 * r),
                      _box(u, v, 0.27 * r, 1.05 * r))
  if name == 'frame':
    return np.abs(_box(px, py, 0.72 * r, 0.72 * r)) - 0.23 * r
  raise ValueError(f'Unknown shape kind {kind}.')


def _bounce(p0: np.ndarray, v: np.ndarray, lo: np.ndarray, hi: np.ndarray,
            t: np.ndarray) -> np.ndarray:
  """Positions of points moving at velocity v, reflected inside [lo, hi].

  Args:
    p0, v, lo, hi: [B] start position, velocity (per frame) and bounds.
    t: [T] frame times.

  Returns:
    [B, T] positions.
  """
  span = np.maximum(hi - lo, 1e-6)[:, None]
  u = np.mod(p0[:, None] - lo[:, None] + v[:, None] * t[None, :], 2 * span)
  return lo[:, None] + np.where(u > span, 2 * span - u, u)


class SyntheticVideos:
  """Random-access dataset of bouncing-shape clips.

  `videos[i]` is `{'video': uint8[T, H, W, C], 'label': int32 scalar}`, a
  pure function of `(seed, i)`. The label is the shape kind (KINDS order);
  all shapes of a clip share it.
  """

  def __init__(self, num_frames: int, image_size: int, channels: int = 3,
               num_examples: int = 100_000, num_objects: int = 1,
               num_classes: int = 3, seed: int = 0):
    """Initialises the dataset.

    Args:
      num_frames: T, frames per clip.
      image_size: H = W, frame size in pixels.
      channels: C, 3 (RGB) or 1 (luminance).
      num_examples: clips in the dataset (one epoch).
      num_objects: shapes per clip.
      num_classes: shape kinds used (labels 0..num_classes-1), at most
        len(KINDS); <= 0 means 3 kinds (labels are still returned).
      seed: dataset seed.
    """
    num_kinds = num_classes if num_classes > 0 else 3
    if num_kinds > len(KINDS):
      raise ValueError(
          f'num_classes={num_classes} exceeds the {len(KINDS)} shape kinds '
          f'{KINDS}.')
    if channels not in (1, 3):
      raise ValueError(f'channels must be 1 or 3, got {channels}.')
    if num_frames < 1 or image_size < 1:
      raise ValueError(
          f'num_frames and image_size must be >= 1, got {num_frames} and '
          f'{image_size}.')
    if num_examples < 1 or num_objects < 1:
      raise ValueError(
          f'num_examples and num_objects must be >= 1, got {num_examples} '
          f'and {num_objects}.')
    self.num_frames = num_frames
    self.image_size = image_size
    self.channels = channels
    self.num_examples = num_examples
    self.num_objects = num_objects
    self.num_kinds = num_kinds
    self.seed = seed

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    """Returns clip `index`: {'video': uint8[T, H, W, C], 'label': int32}."""
    index = int(index)
    if index < 0:
      index += self.num_examples
    if not 0 <= index < self.num_examples:
      raise IndexError(
          f'Index {index} out of range for {self.num_examples} examples.')
    batch = self.render_batch([index])
    return {'video': batch['video'][0], 'label': batch['label'][0]}

  def labels(self, indices: Sequence[int]) -> np.ndarray:
    """int32 [B] labels of the clips `indices`, without rendering them."""
    u = uniform_hash(self.seed, np.asarray(indices), 1)
    return np.minimum(u[:, 0] * self.num_kinds,
                      self.num_kinds - 1).astype(np.int32)

  def render_batch(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Renders several clips at once (vectorised; same as indexing each).

    Args:
      indices: [B] clip indices in [0, len(self)).

    Returns:
      {'video': uint8[B, T, H, W, C], 'label': int32[B]}.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size and (indices.min() < 0
                         or indices.max() >= self.num_examples):
      raise IndexError(
          f'Indices must lie in [0, {self.num_examples}), got '
          f'[{indices.min()}, {indices.max()}].')
    b, t, s = indices.size, self.num_frames, self.image_size
    u = uniform_hash(self.seed, indices,
                     1 + _SLOTS_PER_OBJECT * self.num_objects)
    labels = self.labels(indices)
    palette, background = PALETTE, BACKGROUND
    if self.channels == 1:
      palette, background = PALETTE @ _LUMA[:, None], BACKGROUND @ _LUMA[:, None]
    centres = np.arange(s, dtype=np.float32) + 0.5  # Pixel centres.
    times = np.arange(t, dtype=np.float64)
    canvas = None  # float32 [B, T, H, W, C]
    for o in range(self.num_objects):
      uo = u[:, 1 + _SLOTS_PER_OBJECT * o:1 + _SLOTS_PER_OBJECT * (o + 1)]
      r = s * (MIN_RADIUS + (MAX_RADIUS - MIN_RADIUS) * uo[:, 0])
      colour = palette[(uo[:, 1] * len(palette)).astype(np.int64)]
      angle = 2 * np.pi * uo[:, 2]
      speed = s * (MIN_SPEED + (MAX_SPEED - MIN_SPEED) * uo[:, 3])
      lo, hi = r, s - r
      x = _bounce(lo + (hi - lo) * uo[:, 4], speed * np.cos(angle), lo, hi,
                  times).astype(np.float32)
      y = _bounce(lo + (hi - lo) * uo[:, 5], speed * np.sin(angle), lo, hi,
                  times).astype(np.float32)
      r = r.astype(np.float32)
      alpha = np.empty((b, t, s, s, 1), dtype=np.float32)
      for kind in np.unique(labels):
        sel = labels == kind
        px = centres[None, None, None, :] - x[sel, :, None, None]
        py = centres[None, None, :, None] - y[sel, :, None, None]
        d = _sdf(int(kind), px, py, r[sel, None, None, None])
        alpha[sel, ..., 0] = np.clip(0.5 - d, 0.0, 1.0)
      if canvas is None:  # Composite over the plain background.
        canvas = alpha * (colour - background)[:, None, None, None, :]
        canvas += background
      else:
        alpha *= colour[:, None, None, None, :] - canvas
        canvas += alpha
    # A convex combination of in-range colours: adding 0.5 and truncating
    # rounds to nearest without clipping.
    canvas += 0.5
    video = canvas.astype(np.uint8)
    return {'video': video, 'label': labels}
