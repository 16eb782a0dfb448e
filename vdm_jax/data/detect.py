"""Attribute detector for synthetic clips: shape, colour and direction.

Scores text-to-video samples against their prompts where the truth is known
(docs/benchmarks.md, "Text-to-video: prompt alignment"). The detector is
built from the renderer of synthetic.py, not learned, so it needs no
training data and its errors on ground-truth clips can be measured
(tests/test_detect.py):

  - foreground: pixels far from BACKGROUND; the colour is the PALETTE entry
    nearest to the median of the strongly-foreground pixels of the clip;
  - coverage: each pixel's alpha, its projection onto the line from
    BACKGROUND to that median colour (the renderer composites
    `background + alpha (colour - background)`), kept on the largest
    connected blob of each frame;
  - direction: the axis and sign of the centroid's travel over the clip (a
    least-squares line through the per-frame centroids);
  - shape: per frame, each kind's mask is rendered with synthetic._sdf at
    the measured centroid and at the half-extent whose area matches the
    measured area; the kind with the highest soft IoU (sum of min over sum
    of max of the two coverages), averaged over frames, wins.

This is analysis by synthesis: template matching against the generator
itself. It measures the few attributes the captions name, nothing about
video quality.
"""

import functools

import numpy as np
from scipy import ndimage

from vdm_jax.data import synthetic

PALETTE = synthetic.PALETTE
BACKGROUND = synthetic.BACKGROUND
# Index into synthetic.DIRECTIONS of the travel (axis, sign): x+ right,
# y+ down, x- left, y- up (y pointing down).
DIRECTION_OF = {(0, 1): 0, (1, 1): 1, (0, -1): 2, (1, -1): 3}
# Pixels at least this share of the nearest palette colour's distance from
# the background count as strongly foreground (used for the colour).
STRONG = 0.75
# Of those, the colour is the median of the pixels within STRONG_OF_FULL of
# the FULL_QUANTILE of their distances (the clip's fully covered pixels).
FULL_QUANTILE, STRONG_OF_FULL = 0.9, 0.85
# Coverage above which a pixel joins a frame's blob.
BLOB_ALPHA = 0.25
# 'valid' thresholds: the colour is within this RGB distance of a palette
# entry; the main blob holds this share of each frame's coverage; each
# frame's area is within these factors of the renderer's size range; the
# mean best IoU is at least MIN_IOU.
MAX_COLOUR_DISTANCE = 80.0
MIN_BLOB_SHARE = 0.8
AREA_SLACK = (0.4, 2.0)
MIN_IOU = 0.5
# ... and at least MIN_EXPLAINED of the pixels far from the background
# (beyond half the nearest palette distance) lie within EXPLAIN_DISTANCE
# (RGB) of the background -> colour line (a second colour does not).
MIN_EXPLAINED, EXPLAIN_DISTANCE = 0.9, 60.0
# A centroid travelling less than this share of the frame has no direction
# (-1): the prompt's 'moving <direction>' is not shown.
MIN_TRAVEL = 0.1
# 8-connected within a frame, never across frames or clips.
_BLOB_STRUCTURE = np.zeros((3, 3, 3), bool)
_BLOB_STRUCTURE[1] = True


@functools.lru_cache(maxsize=None)
def kind_geometry(kind: int) -> tuple[float, float, float]:
  """The rendered area and centroid offset of a kind, per unit half-extent.

  Measured on the renderer's own coverage at a large half-extent r, so that
  they match synthetic._sdf exactly (antialiasing included).

  Returns:
    (area / r^2, centroid x offset / r, centroid y offset / r), the offsets
    from the shape's centre (the renderer's position) to its centroid.
  """
  s, r = 256, 80.0
  centres = np.arange(s, dtype=np.float64) + 0.5 - s / 2
  px, py = centres[None, None, None, :], centres[None, None, :, None]
  alpha = np.clip(0.5 - synthetic._sdf(kind, px, py, np.float64(r)), 0, 1)
  alpha = alpha[0, 0]
  area = alpha.sum()
  cx = (alpha * centres[None, :]).sum() / area
  cy = (alpha * centres[:, None]).sum() / area
  return area / r**2, cx / r, cy / r


def _colour(videos: np.ndarray, palette: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Median colour of each clip's strongly-foreground pixels.

  Args:
    videos: float32 [N, T, H, W, 3].
    palette: float32 [P, 3].

  Returns:
    (median float32 [N, 3] (BACKGROUND where no pixel is strong), nearest
    palette index int [N], its RGB distance float [N]).
  """
  n = videos.shape[0]
  flat = videos.reshape(n, -1, 3)
  dist = np.linalg.norm(flat - BACKGROUND, axis=-1)  # [N, T H W]
  threshold = STRONG * np.linalg.norm(palette - BACKGROUND, axis=-1).min()
  median = np.tile(BACKGROUND, (n, 1))
  for i in range(n):
    fore = dist[i] > threshold
    if fore.any():
      # Edge pixels of a bright colour pass the absolute threshold too:
      # keep those near the clip's own full-coverage distance.
      full = np.quantile(dist[i, fore], FULL_QUANTILE)
      strong = flat[i, fore & (dist[i] >= STRONG_OF_FULL * full)]
      median[i] = np.median(strong, axis=0)
  gaps = np.linalg.norm(median[:, None] - palette[None], axis=-1)  # [N, P]
  index = gaps.argmin(1)
  return median, index, gaps[np.arange(n), index]


def _main_blob(alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Keeps each frame's largest connected blob of coverage.

  Args:
    alpha: float32 [M, H, W] coverage of M frames.

  Returns:
    (alpha on the blob, dilated by one pixel to keep its antialiased edge,
    float32 [M, H, W]; the blob's share of the frame's coverage above
    BLOB_ALPHA [M], 0 for empty frames).
  """
  m = alpha.shape[0]
  labels, count = ndimage.label(alpha > BLOB_ALPHA, _BLOB_STRUCTURE)
  mass = np.bincount(labels.ravel(), alpha.ravel(), count + 1)
  frame = np.zeros(count + 1, np.int64)
  frame[labels.ravel()] = np.repeat(np.arange(m), alpha[0].size)
  best = np.zeros(m, np.int64)  # Label 0 (nothing) for empty frames.
  order = np.argsort(mass[1:], kind='stable') + 1  # Ascending mass.
  best[frame[order]] = order  # The heaviest blob of a frame is written last.
  keep = (labels == best[:, None, None]) & (best[:, None, None] > 0)
  keep = ndimage.binary_dilation(keep, _BLOB_STRUCTURE)
  blob = np.where(keep, alpha, 0.0)
  # The share counts blob-level coverage only, so faint noise does not
  # dilute it, but a second shape or scattered blobs do.
  solid = np.where(alpha > BLOB_ALPHA, alpha, 0.0)
  share = (np.where(keep, solid, 0.0).reshape(m, -1).sum(1)
           / np.maximum(solid.reshape(m, -1).sum(1), 1e-6))
  return blob, share


def _shape_iou(blob: np.ndarray, centroid: np.ndarray, area: np.ndarray,
               num_kinds: int) -> np.ndarray:
  """Soft IoU of each frame's blob with each kind's rendered template.

  Args:
    blob: float32 [M, H, W] coverage.
    centroid: float [M, 2] (x, y) coverage centroids, in pixels.
    area: float [M] coverage areas, in pixels.
    num_kinds: K, kinds tried (KINDS[:K]).

  Returns:
    float [M, K] IoU in [0, 1] (0 for empty frames).
  """
  m, h, w = blob.shape
  xs = np.arange(w, dtype=np.float32) + 0.5
  ys = np.arange(h, dtype=np.float32) + 0.5
  ious = np.zeros((m, num_kinds))
  for kind in range(num_kinds):
    coef, ox, oy = kind_geometry(kind)
    r = np.sqrt(np.maximum(area, 1e-6) / coef)
    cx, cy = centroid[:, 0] - ox * r, centroid[:, 1] - oy * r
    px = (xs[None, :] - cx[:, None])[:, None, :].astype(np.float32)
    py = (ys[None, :] - cy[:, None])[:, :, None].astype(np.float32)
    r = r.astype(np.float32)[:, None, None]
    template = np.clip(0.5 - synthetic._sdf(kind, px, py, r), 0.0, 1.0)
    inter = np.minimum(blob, template).reshape(m, -1).sum(1)
    union = np.maximum(blob, template).reshape(m, -1).sum(1)
    ious[:, kind] = inter / np.maximum(union, 1e-6)
  return ious


def detect(videos: np.ndarray, num_kinds: int = 3) -> dict[str, np.ndarray]:
  """Detects the one shape of each clip: kind, colour and direction.

  Args:
    videos: uint8 [N, T, H, W, 3] clips (square frames, like synthetic's).
    num_kinds: K, the shape kinds that may occur (KINDS[:K]).

  Returns:
    A dict of [N] arrays:
      'kind', 'colour', 'direction': int indices into KINDS, PALETTE /
        COLOUR_WORDS and DIRECTIONS ('direction' -1 when the centroid
        travels less than MIN_TRAVEL of the frame);
      'valid': bool, one coherent object found: a palette colour (RGB
        distance <= MAX_COLOUR_DISTANCE), one blob per frame holding >=
        MIN_BLOB_SHARE of its coverage, a plausible area on every frame and
        a mean best IoU >= MIN_IOU, and >= MIN_EXPLAINED of the pixels far
        from the background explained by the one colour;
      'colour_distance': RGB distance of the median colour to its entry;
      'kind_iou': float [N, K] soft IoU per kind, averaged over frames;
      'kind_margin': best minus second-best IoU;
      'travel': float [N, 2] (dx, dy) centroid travel over the clip, pixels;
      'centroid': float [N, T, 2] (x, y) of the main blob on each frame;
      'direction_ratio': |travel| on the chosen axis over the L1 travel;
      'blob_share': the smallest per-frame share of the main blob;
      'explained': the share of far pixels explained by the colour.
  """
  videos = np.asarray(videos)
  if videos.ndim != 5 or videos.shape[-1] != 3:
    raise ValueError(f'videos must be [N, T, H, W, 3], got {videos.shape}.')
  n, t, h, w, _ = videos.shape
  x = videos.astype(np.float32)
  palette = np.asarray(PALETTE, np.float32)
  median, colour, colour_distance = _colour(x, palette)
  # Coverage: projection onto BACKGROUND -> median colour (Porter-Duff over).
  axis = median - BACKGROUND  # [N, 3]
  norm2 = np.maximum((axis**2).sum(-1), 1.0)
  alpha = np.einsum('nthwc,nc->nthw', x - BACKGROUND, axis)
  alpha = np.clip(alpha / norm2[:, None, None, None], 0.0, 1.0)
  residual = np.linalg.norm(
      x - BACKGROUND - alpha[..., None] * axis[:, None, None, None], axis=-1)
  far = np.linalg.norm(x - BACKGROUND, axis=-1) > 0.5 * np.linalg.norm(
      palette - BACKGROUND, axis=-1).min()
  explained = ((far & (residual <= EXPLAIN_DISTANCE)).reshape(n, -1).sum(1)
               / np.maximum(far.reshape(n, -1).sum(1), 1))
  blob, share = _main_blob(alpha.reshape(n * t, h, w))
  area = blob.reshape(n * t, -1).sum(1)
  xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
  safe = np.maximum(area, 1e-6)
  centroid = np.stack([(blob.sum(1) * xs).sum(1) / safe,
                       (blob.sum(2) * ys).sum(1) / safe], -1)
  ious = _shape_iou(blob, centroid, area, num_kinds).reshape(n, t, -1)
  kind_iou = ious.mean(1)
  kind = kind_iou.argmax(1)
  ranked = np.sort(kind_iou, 1)
  margin = ranked[:, -1] - (ranked[:, -2] if num_kinds > 1 else 0.0)
  # Travel: slope of a least-squares line through the centroids, times T-1.
  centroid = centroid.reshape(n, t, 2)
  times = np.arange(t) - (t - 1) / 2
  slope = (times[None, :, None] * centroid).sum(1) / max(
      (times**2).sum(), 1e-6)
  travel = slope * max(t - 1, 1)
  major = np.abs(travel).argmax(1)
  sign = np.where(travel[np.arange(n), major] >= 0, 1, -1)
  direction = np.array([DIRECTION_OF[(int(a), int(s))]
                        for a, s in zip(major, sign)], np.int64)
  distance = np.abs(travel[np.arange(n), major])
  direction = np.where(distance >= MIN_TRAVEL * w, direction, -1)
  ratio = distance / np.maximum(np.abs(travel).sum(1), 1e-6)
  # Plausible areas: the renderer's smallest and largest shapes.
  coefs = [kind_geometry(k)[0] for k in range(num_kinds)]
  size = float(h)
  lo = AREA_SLACK[0] * min(coefs) * (synthetic.MIN_RADIUS * size)**2
  hi = AREA_SLACK[1] * max(coefs) * (synthetic.MAX_RADIUS * size)**2
  area = area.reshape(n, t)
  share = share.reshape(n, t).min(1)
  valid = ((colour_distance <= MAX_COLOUR_DISTANCE)
           & (share >= MIN_BLOB_SHARE)
           & np.all((area >= lo) & (area <= hi), axis=1)
           & (ranked[:, -1] >= MIN_IOU)
           & (explained >= MIN_EXPLAINED))
  return {'kind': kind, 'colour': colour, 'direction': direction,
          'valid': valid, 'colour_distance': colour_distance,
          'kind_iou': kind_iou, 'kind_margin': margin, 'travel': travel,
          'direction_ratio': ratio, 'blob_share': share,
          'explained': explained, 'centroid': centroid}


def chance() -> dict[str, float]:
  """Chance accuracies of uniform guessing among the 3 x 8 x 4 attributes."""
  return {'colour': 1 / len(PALETTE), 'shape': 1 / 3,
          'direction': 1 / len(synthetic.DIRECTIONS),
          'all': 1 / (3 * len(PALETTE) * len(synthetic.DIRECTIONS))}


def score(found: dict[str, np.ndarray], kind: np.ndarray, colour: np.ndarray,
          direction: np.ndarray) -> dict[str, np.ndarray]:
  """Per-sample agreement with the requested attributes.

  A clip without a valid object agrees with nothing: its video does not
  show the prompt, whatever its pixels' nearest palette colour.

  Args:
    found: the output of `detect` for N clips.
    kind, colour, direction: int [N] requested attributes.

  Returns:
    bool [N] 'valid', 'shape', 'colour', 'direction' and 'all'.
  """
  valid = found['valid']
  out = {'valid': valid,
         'shape': valid & (found['kind'] == np.asarray(kind)),
         'colour': valid & (found['colour'] == np.asarray(colour)),
         'direction': valid & (found['direction'] == np.asarray(direction))}
  out['all'] = out['shape'] & out['colour'] & out['direction']
  return out

