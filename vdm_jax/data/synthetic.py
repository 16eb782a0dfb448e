"""Built-in procedural video dataset: bouncing coloured shapes (no download).

Each clip shows `num_objects` shapes of one kind on a plain dark background.
Every shape moves at a constant velocity and bounces off the frame borders;
the clip's label is the shape kind. Clips are a pure function of
`(seed, index)`: the random parameters come from a counter-based hash, so any
clip can be rendered on its own, in any order, on any host.

Geometry, in units of the frame size S (= image_size):
  - shape half-extent r in [0.16, 0.22] S (shapes span about a third of S);
  - speed in [1/8, 1/4] S per frame, in a uniformly random direction, so a
    shape crosses the frame and bounces within 8 frames.
Edges are antialiased from signed distance functions: a pixel's coverage is
`clip(0.5 - d, 0, 1)`, d the signed distance (in pixels) of its centre to the
shape's edge.

Captions (text-to-video): every clip has one, written from what is rendered:
colour, shape and motion of each object, in one of several templates ("a red
triangle moving left", "the circle is blue and moves up", ...), so the text
is not one string per class. With `motion='straight'` each shape moves in a
straight line in one of four directions (right, down, left, up) without
touching a border during the clip, so that its caption's direction holds on
every frame; the default `motion='bounce'` keeps the bouncing shapes (their
captions say "bouncing"). `caption_holdout=m > 0` leaves out of the dataset
the (shape, colour, direction) combinations with
(shape + 2 colour + direction) % m == 0 (`held_out`), whose prompts then test
composition: each attribute is seen in training, the combination never.
"""

import math
from typing import Optional, Sequence

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
# 1-channel videos use grey levels instead (a colour's luminance would make
# some shapes dim).
GREYS = np.linspace(110, 245, len(PALETTE), dtype=np.float32)[:, None]
BACKGROUND = np.array([14, 14, 22], dtype=np.float32)

# Caption words of KINDS and PALETTE.
SHAPE_WORDS = ('square', 'circle', 'triangle', 'diamond', 'cross', 'ring',
               'x', 'frame')
COLOUR_WORDS = ('red', 'green', 'blue', 'yellow', 'cyan', 'magenta',
                'orange', 'white')
# 'straight' motion: unit (dx, dy) per direction, y pointing down.
DIRECTIONS = ('right', 'down', 'left', 'up')
_DIRECTION_XY = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], np.float64)
MOTIONS = ('bounce', 'straight')
# Caption templates (one per clip, drawn from the clip's hash).
TEMPLATES = (
    'a {colour} {shape} moving {direction}',
    'a {colour} {shape} moves {direction}',
    '{colour} {shape} going {direction}',
    'the {shape} is {colour} and moves {direction}',
    'a {shape}, {colour}, sliding {direction}',
)
BOUNCE_TEMPLATES = (
    'a {colour} {shape} bouncing around',
    'a {colour} {shape} bounces off the walls',
    'the {shape} is {colour} and bounces',
)
# 'straight' motion: the shape travels this share of the free span over
# the clip (so it never reaches a border).
MIN_TRAVEL, MAX_TRAVEL = 0.45, 0.9

MIN_RADIUS, MAX_RADIUS = 0.16, 0.22  # Half-extent, fraction of the frame.
MIN_SPEED, MAX_SPEED = 1 / 8, 1 / 4  # Fraction of the frame per frame.

_MASK64 = (1 << 64) - 1
_SQRT_HALF = math.sqrt(0.5)
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


def _sdf(kind: int, px: np.ndarray, py: np.ndarray, r: np.ndarray):
  """Signed distance (pixels; negative inside) to a shape of half-extent r.

  Distances are exact inside and near edges; outside corners some shapes use
  the cheaper max-of-edges distance, which only matters beyond the 1-pixel
  antialiasing band. Per-axis terms are computed on the small [..., 1, W]
  and [..., H, 1] arrays before broadcasting, which keeps this fast.

  Args:
    kind: index into KINDS.
    px: float32 [B, T, 1, W] pixel centre x minus shape centre x, in pixels.
    py: float32 [B, T, H, 1] the same for y (pointing down).
    r: float32 [B, 1, 1, 1] half-extent in pixels.

  Returns:
    float32 [B, T, H, W].
  """
  name = KINDS[kind]
  ax, ay = np.abs(px), np.abs(py)
  if name == 'square':
    return np.maximum(ax, ay) - 0.85 * r
  if name == 'disc':
    return np.sqrt(px * px + py * py) - r
  if name == 'triangle':
    # Upward equilateral triangle, side 1.9 r: half-extents 0.95 r (x) and
    # 0.82 r (y). With y pointing up and the centroid at 0 the edges are
    # -y = rho and (sqrt(3) |x| + y) / 2 = rho (rho the inradius, h / 3);
    # shifting y by h / 6 centres the bounding box instead of the centroid.
    h = math.sqrt(3.0) * 0.95 * r
    y = h / 6 - py
    return np.maximum(-y, (math.sqrt(3.0) * ax + y) / 2) - h / 3
  if name == 'diamond':
    return (ax + (ay - r)) * _SQRT_HALF
  if name == 'cross':
    return np.minimum(np.maximum(ax - 0.95 * r, ay - 0.32 * r),
                      np.maximum(ax - 0.32 * r, ay - 0.95 * r))
  if name == 'ring':
    return np.abs(np.sqrt(px * px + py * py) - 0.72 * r) - 0.28 * r
  if name == 'x':
    u = np.abs((px + py) * _SQRT_HALF)
    v = np.abs((py - px) * _SQRT_HALF)
    return np.minimum(np.maximum(u - 1.05 * r, v - 0.27 * r),
                      np.maximum(u - 0.27 * r, v - 1.05 * r))
  if name == 'frame':
    return np.abs(np.maximum(ax, ay) - 0.72 * r) - 0.23 * r
  raise ValueError(f'Unknown shape kind {kind}.')


def held_out(kind: np.ndarray, colour: np.ndarray, direction: np.ndarray,
             modulus: int) -> np.ndarray:
  """Whether (shape kind, colour, direction) combinations are held out."""
  if modulus <= 0:
    return np.zeros(np.shape(kind), bool)
  return (np.asarray(kind) + 2 * np.asarray(colour)
          + np.asarray(direction)) % modulus == 0


def caption(kind: int, colour: int, direction: int, template: int,
            motion: str = 'straight') -> str:
  """The caption of one object: e.g. 'a red triangle moving left'."""
  words = dict(shape=SHAPE_WORDS[kind], colour=COLOUR_WORDS[colour],
               direction=DIRECTIONS[direction])
  templates = TEMPLATES if motion == 'straight' else BOUNCE_TEMPLATES
  return templates[template % len(templates)].format(**words)


def _bounce(p0: np.ndarray, v: np.ndarray, lo: np.ndarray, hi: np.ndarray,
            t: np.ndarray) -> np.ndarray:
  """Positions of points moving at velocity v, reflected inside [lo, hi].

  Args:
    p0, v, lo, hi: [B] start position, velocity (per frame) and bounds.
    t: [T] or [B, T] frame times.

  Returns:
    [B, T] positions.
  """
  span = np.maximum(hi - lo, 1e-6)[:, None]
  u = np.mod(p0[:, None] - lo[:, None] + v[:, None] * t, 2 * span)
  return lo[:, None] + np.where(u > span, 2 * span - u, u)


class SyntheticVideos:
  """Random-access dataset of bouncing-shape clips.

  `videos[i]` is `{'video': uint8[T, H, W, C], 'label': int32 scalar}`, a
  pure function of `(seed, i)`. The label is the shape kind (KINDS order);
  all shapes of a clip share it.
  """

  def __init__(self, num_frames: int, image_size: int, channels: int = 3,
               num_examples: int = 100_000, num_objects: int = 1,
               num_classes: int = 3, seed: int = 0, motion: str = 'bounce',
               caption_holdout: int = 0):
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
      motion: 'bounce' (shapes bounce off the borders) or 'straight' (one
        of four directions, no border reached within the clip).
      caption_holdout: m > 0 leaves out the combinations `held_out` names
        (their colour is moved to the next palette colour).
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
    if motion not in MOTIONS:
      raise ValueError(f'Unknown data.motion {motion!r}; choose one of'
                       f' {MOTIONS}.')
    if caption_holdout < 0:
      raise ValueError('data.caption_holdout must be >= 0.')
    self.motion = motion
    self.caption_holdout = caption_holdout

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
    return {'video': batch['video'][0], 'label': batch['label'][0],
            'caption': batch['caption'][0]}

  def labels(self, indices: Sequence[int]) -> np.ndarray:
    """int32 [B] labels of the clips `indices`, without rendering them."""
    u = uniform_hash(self.seed, np.asarray(indices), 1)
    return np.minimum(u[:, 0] * self.num_kinds,
                      self.num_kinds - 1).astype(np.int32)

  def attributes(self, indices: Sequence[int]) -> dict[str, np.ndarray]:
    """Per clip and object: int 'kind' [B], 'colour', 'direction' [B, O].

    'direction' indexes DIRECTIONS ('straight' motion; for 'bounce' the
    direction of the initial velocity, rounded to the nearest axis).
    Held-out combinations are already moved away (see `held_out`).
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    u = uniform_hash(self.seed, indices,
                     1 + _SLOTS_PER_OBJECT * self.num_objects)
    kind = self.labels(indices)
    colours, directions = [], []
    for o in range(self.num_objects):
      uo = u[:, 1 + _SLOTS_PER_OBJECT * o:1 + _SLOTS_PER_OBJECT * (o + 1)]
      colour = (uo[:, 1] * len(PALETTE)).astype(np.int64)
      direction = np.mod(np.round(uo[:, 2] * 4), 4).astype(np.int64)
      if self.motion == 'straight':
        direction = np.minimum(uo[:, 2] * 4, 3).astype(np.int64)
      held = held_out(kind, colour, direction, self.caption_holdout)
      colour = np.where(held, (colour + 1) % len(PALETTE), colour)
      colours.append(colour)
      directions.append(direction)
    return {'kind': kind, 'colour': np.stack(colours, 1),
            'direction': np.stack(directions, 1)}

  def captions(self, indices: Sequence[int]) -> list[str]:
    """The caption of each clip (objects joined by ' and ')."""
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    a = self.attributes(indices)
    template = (uniform_hash(self.seed, indices, 2 + _SLOTS_PER_OBJECT
                             * self.num_objects)[:, -1] * 60).astype(int)
    return [' and '.join(
        caption(int(a['kind'][i]), int(a['colour'][i, o]),
                int(a['direction'][i, o]), int(template[i]), self.motion)
        for o in range(self.num_objects)) for i in range(indices.size)]

  # Over 60 lines: the vectorised fast path of `render`, kept in one piece so
  # it can be checked line by line against it (tests/test_synthetic.py).
  def render_batch(self, indices: Sequence[int],
                   frames: Optional[np.ndarray] = None
                   ) -> dict[str, np.ndarray]:
    """Renders several clips at once (vectorised; same as indexing each).

    Args:
      indices: [B] clip indices in [0, len(self)).
      frames: optional int [B, K] frame indices in [0, T) to render for each
        clip; None renders all T frames. Equal to
        `render_batch(indices)['video'][b, frames[b]]`, only cheaper.

    Returns:
      {'video': uint8[B, K, H, W, C] (K = T without `frames`),
       'label': int32[B], 'caption': list of B str}.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if indices.size and (indices.min() < 0
                         or indices.max() >= self.num_examples):
      raise IndexError(
          f'Indices must lie in [0, {self.num_examples}), got '
          f'[{indices.min()}, {indices.max()}].')
    b, s = indices.size, self.image_size
    if frames is None:
      times = np.arange(self.num_frames, dtype=np.float64)[None, :]
    else:
      frames = np.asarray(frames)
      if (frames.ndim != 2 or frames.shape[0] != b or frames.size and (
          frames.min() < 0 or frames.max() >= self.num_frames)):
        raise IndexError(
            f'frames must be [{b}, K] indices in [0, {self.num_frames}), got '
            f'shape {frames.shape}.')
      times = frames.astype(np.float64)
    t = times.shape[1]
    times = np.broadcast_to(times, (b, t))
    u = uniform_hash(self.seed, indices,
                     1 + _SLOTS_PER_OBJECT * self.num_objects)
    labels = self.labels(indices)
    attributes = self.attributes(indices)
    palette, background = PALETTE, BACKGROUND
    if self.channels == 1:
      palette, background = GREYS, BACKGROUND[:1]
    centres = np.arange(s, dtype=np.float32) + 0.5  # Pixel centres.
    # Render clips grouped by kind (contiguous slices), then restore order.
    order = np.argsort(labels, kind='stable')
    u, sorted_labels, times = u[order], labels[order], times[order]
    colour_index = attributes['colour'][order]
    direction_xy = _DIRECTION_XY[attributes['direction'][order]]
    bounds = np.searchsorted(sorted_labels, np.arange(self.num_kinds + 1))
    # One float32 [B, T, H, W] plane per channel: numpy is much faster on
    # these than on a channels-last array with a size-3 inner axis.
    planes = None
    for o in range(self.num_objects):
      uo = u[:, 1 + _SLOTS_PER_OBJECT * o:1 + _SLOTS_PER_OBJECT * (o + 1)]
      r = s * (MIN_RADIUS + (MAX_RADIUS - MIN_RADIUS) * uo[:, 0])
      colour = palette[colour_index[:, o]]
      lo, hi = r, s - r
      if self.motion == 'straight':
        x, y = self._straight(uo, direction_xy[:, o], lo, hi, times)
      else:
        angle = 2 * math.pi * uo[:, 2]
        speed = s * (MIN_SPEED + (MAX_SPEED - MIN_SPEED) * uo[:, 3])
        x = _bounce(lo + (hi - lo) * uo[:, 4], speed * np.cos(angle), lo,
                    hi, times).astype(np.float32)
        y = _bounce(lo + (hi - lo) * uo[:, 5], speed * np.sin(angle), lo,
                    hi, times).astype(np.float32)
      px = centres[None, None, None, :] - x[:, :, None, None]  # [B,T,1,W]
      py = centres[None, None, :, None] - y[:, :, None, None]  # [B,T,H,1]
      r = r.astype(np.float32)[:, None, None, None]
      alpha = np.empty((b, t, s, s), dtype=np.float32)
      for kind in range(self.num_kinds):
        k = slice(bounds[kind], bounds[kind + 1])
        if k.start < k.stop:
          d = _sdf(kind, px[k], py[k], r[k])
          np.subtract(0.5, d, out=d)
          np.clip(d, 0.0, 1.0, out=alpha[k])
      if planes is None:  # Composite over the plain background.
        planes = []
        for c in range(self.channels):
          plane = alpha * (colour[:, c] - background[c])[:, None, None, None]
          plane += background[c]
          planes.append(plane)
      else:
        for c, plane in enumerate(planes):
          plane += alpha * (colour[:, c, None, None, None] - plane)
    video = np.empty((b, t, s, s, self.channels), dtype=np.uint8)
    for c, plane in enumerate(planes):
      # A convex combination of in-range colours: adding 0.5 and truncating
      # rounds to nearest without clipping.
      plane += 0.5
      video[..., c] = plane
    video[order] = video.copy()
    return {'video': video, 'label': labels,
            'caption': self.captions(indices)}

  def _straight(self, uo: np.ndarray, dxy: np.ndarray, lo: np.ndarray,
                hi: np.ndarray, times: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray]:
    """Centres [B, T] of shapes moving straight, never reaching a border.

    The shape travels MIN_TRAVEL..MAX_TRAVEL of its free span over the
    clip's T frames, starting where the whole path fits.
    """
    span = hi - lo
    travel = span * (MIN_TRAVEL + (MAX_TRAVEL - MIN_TRAVEL) * uo[:, 3])
    speed = travel / max(self.num_frames - 1, 1)
    out = []
    for axis, u in ((0, uo[:, 4]), (1, uo[:, 5])):
      d = dxy[:, axis]
      # Moving: start in [lo, hi - travel] (+) or [lo + travel, hi] (-).
      free = np.where(d != 0, span - travel, span)
      start = lo + np.where(d < 0, travel, 0.0) + free * u
      out.append((start[:, None] + (d * speed)[:, None] * times).astype(
          np.float32))
    return out[0], out[1]
