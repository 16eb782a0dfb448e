"""Frechet Video Distance under named protocols.

Matches the reference implementation (google-research
`frechet_video_distance/frechet_video_distance.py`, Unterthiner et al. 2018):

  uint8 frames in [0, 255]
    -> `tf.image.resize_bilinear` (TF1: align_corners=False,
       half_pixel_centers=False) of the whole frame to 224x224, no crop
    -> 2 * x / 255 - 1
    -> TF-Hub deepmind/i3d-kinetics-400/1, tensor `RGB/inception_i3d/Mean:0`
       (400 Kinetics logits averaged over time; `I3D` in i3d.py)
    -> `tfgan.eval.frechet_classifier_distance_from_activations` (float64,
       covariances with n - 1, trace of sqrt(sqrt(S1) S2 sqrt(S1))).

Published numbers differ mostly by protocol (compare VDM, Ho et al. 2022,
Sec. 4.2, with MAGVIT, Yu et al. 2023, Table 10 and App. C): number of
samples, real split, resolution at scoring, MAGVIT's 64x64 intermediate
resize, folds. `PROTOCOLS` names each one; `evaluate_videos` reports the
protocol name with the score. docs/fvd.md has the provenance.

Videos may come as arrays or as iterators of batches (`extract_features`):
a stream is consumed lazily and only its I3D features are kept, so a
50,000-video protocol runs in bounded memory.

The module is over 500 lines on purpose: the whole reference pipeline (resize,
features, feature cache, Frechet and kernel distances, folds) sits in one
file so it can be read step by step against frechet_video_distance.py.
"""

import collections.abc
import functools
import hashlib
import io
import logging
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from etils import epath
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import tqdm

from vdm_jax import fileio
from vdm_jax.evaluation import i3d
from vdm_jax.evaluation.protocols import FEATURES
from vdm_jax.evaluation.protocols import PROTOCOLS
from vdm_jax.evaluation.protocols import Protocol
from vdm_jax.evaluation.protocols import RESIZE_MODES

# MAGVIT `normalize_videos` resizes to this size before 224x224.
MAGVIT_INTER_SIZE = 64


def _interp_matrix(in_size: int, out_size: int, half_pixel_centers: bool):
  """TF bilinear resize along one axis as an [out_size, in_size] matrix.

  Follows `compute_interpolation_weights` of TF's resize_bilinear kernel with
  align_corners=False: source coordinate i * in / out (legacy, the TF1
  default) or (i + 0.5) * in / out - 0.5 (half-pixel centers, TF2).
  """
  scale = in_size / out_size
  coords = np.arange(out_size, dtype=np.float64)
  if half_pixel_centers:
    coords = (coords + 0.5) * scale - 0.5
  else:
    coords = coords * scale
  floor = np.floor(coords)
  lower = np.maximum(floor, 0).astype(np.int64)
  upper = np.minimum(np.ceil(coords), in_size - 1).astype(np.int64)
  lerp = coords - floor
  weights = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(weights, (rows, lower), 1.0 - lerp)
  np.add.at(weights, (rows, upper), lerp)
  return weights.astype(np.float32)


def resize_bilinear(
    frames: jax.Array, size: int, *, half_pixel_centers: bool = False
) -> jax.Array:
  """Bilinear resize of whole frames, as TF's `resize_bilinear`.

  Args:
    frames: [..., H, W, C] float frames.
    size: output height and width.
    half_pixel_centers: False reproduces the TF1 `tf.image.resize_bilinear`
      of the reference FVD; True is TF2 `tf.image.resize(method='bilinear')`
      (no antialiasing in either).

  Returns:
    [..., size, size, C] float32 frames.
  """
  h, w = frames.shape[-3], frames.shape[-2]
  if (h, w) == (size, size):
    return frames.astype(jnp.float32)
  wh = _interp_matrix(h, size, half_pixel_centers)
  ww = _interp_matrix(w, size, half_pixel_centers)
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum('oh,...hwc->...owc', wh, frames, precision=hi)
  return jnp.einsum('pw,...owc->...opc', ww, x, precision=hi)


def _resize_and_scale(videos: jax.Array, resize: str) -> jax.Array:
  """[B, T, H, W, 3] values in [0, 255] -> [B, T, 224, 224, 3] in [-1, 1]."""
  x = videos.astype(jnp.float32)
  if resize == 'magvit':
    x = resize_bilinear(x, MAGVIT_INTER_SIZE)
  x = resize_bilinear(x, i3d.INPUT_SIZE)
  return 2.0 * x / 255.0 - 1.0


def to_uint8_range(
    videos: Any, input_range: Optional[tuple[float, float]] = None
) -> np.ndarray:
  """Checks videos and maps their values to [0, 255] on the host.

  Args:
    videos: [B, T, H, W, 3] uint8 in [0, 255], or float with `input_range`
      (float videos in [0, 1] are accepted without it).
    input_range: (low, high) of the values, e.g. (0, 1), (-1, 1), (0, 255).

  Returns:
    [B, T, H, W, 3] uint8 (unchanged) or float32 values in [0, 255].

  Raises:
    ValueError: wrong rank, channels, too few frames, or values outside
      (or ambiguous about) their range.
  """
  videos = np.asarray(videos)
  if videos.ndim != 5 or videos.shape[-1] != 3:
    raise ValueError(
        f'Expected videos of shape [B, T, H, W, 3] (RGB), got {videos.shape};'
        ' add the batch axis with videos[None] for one video, and drop alpha'
        ' or repeat grey channels to get 3.'
    )
  if videos.shape[1] < i3d.MIN_FRAMES:
    raise ValueError(
        f'I3D needs at least {i3d.MIN_FRAMES} frames per video, got'
        f' {videos.shape[1]}; score longer clips (FVD protocols use 16).'
    )
  lo, hi = float(videos.min()), float(videos.max())
  if input_range is None:
    if videos.dtype == np.uint8:
      return videos
    if np.issubdtype(videos.dtype, np.floating) and 0.0 <= lo and hi <= 1.0:
      input_range = (0.0, 1.0)
    else:
      raise ValueError(
          f'Cannot tell the value range of {videos.dtype} videos with values'
          f' in [{lo:.4g}, {hi:.4g}]; pass input_range=(0, 1), (-1, 1) or'
          ' (0, 255), or give uint8 videos.'
      )
  low, high = map(float, input_range)
  tol = 1e-3 * (high - low)
  if lo < low - tol or hi > high + tol:
    raise ValueError(
        f'Video values span [{lo:.4g}, {hi:.4g}], outside'
        f' input_range={input_range}; pass the range the videos are in, e.g.'
        ' (0, 1), (-1, 1) or (0, 255).'
    )
  if videos.dtype == np.uint8 and (low, high) == (0.0, 255.0):
    return videos
  scaled = (videos.astype(np.float32) - low) * (255.0 / (high - low))
  return np.clip(scaled, 0.0, 255.0)


def preprocess(
    videos: Any,
    *,
    input_range: Optional[tuple[float, float]] = None,
    resize: str = 'reference',
) -> jax.Array:
  """Videos -> I3D input, as the reference FVD (or MAGVIT) prepares them.

  Args:
    videos: [B, T, H, W, 3], uint8 in [0, 255] or float (see
      `to_uint8_range`); T >= 9.
    input_range: value range of float videos.
    resize: 'reference' (whole frame bilinear to 224x224) or 'magvit'
      (bilinear to 64x64, then to 224x224).

  Returns:
    [B, T, 224, 224, 3] float32 in [-1, 1].
  """
  _check_resize(resize)
  return _resize_and_scale(jnp.asarray(to_uint8_range(videos, input_range)),
                           resize)


def _check_resize(resize: str) -> None:
  if resize not in RESIZE_MODES:
    raise ValueError(f'resize={resize!r}; choose one of {RESIZE_MODES}.')


@functools.cache
def _variables(mesh: Mesh) -> Any:
  """The I3D variables, loaded once and replicated over the mesh."""
  return jax.device_put(i3d.load_i3d_params(), NamedSharding(mesh, P()))


@functools.cache
def _feature_fn(resize: str, mesh: Mesh) -> Callable[..., Any]:
  """Jitted [B, T, H, W, 3] in [0, 255] -> {'logits_mean', 'pool'}."""
  model = i3d.I3D()

  def fn(variables, videos):
    return model.apply(variables, _resize_and_scale(videos, resize))

  return jax.jit(
      fn,
      in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P('data'))),
      out_shardings=NamedSharding(mesh, P()),
  )


def default_mesh() -> Mesh:
  """A 1-D 'data' mesh over all devices."""
  return Mesh(np.asarray(jax.devices()), ('data',))


def _is_stream(videos: Any) -> bool:
  """An iterator (e.g. a generator) of batches, not an array of videos."""
  return isinstance(videos, collections.abc.Iterator)


def _uint8_batches(
    videos: Any, input_range: Optional[tuple[float, float]], size: int
) -> Iterator[np.ndarray]:
  """Checked [b, T, H, W, 3] batches in [0, 255] of an array or a stream."""
  if not _is_stream(videos):
    videos = to_uint8_range(videos, input_range)
    for start in range(0, len(videos), size):
      yield videos[start : start + size]
    return
  for batch in videos:
    yield to_uint8_range(batch, input_range)


def rebatch(batches: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
  """Regroups batches of any sizes into batches of `size` (the last: less).

  Every video lands in the batch it would have in one array cut into
  `size`-video slices, so streamed features equal whole-array ones
  bitwise; at most `size` videos are held back between inputs.

  Args:
    batches: [b_i, ...] arrays.
    size: videos per output batch.

  Yields:
    [size, ...] arrays, then the rest [<= size, ...].
  """
  pending, count = [], 0
  for batch in batches:
    while len(batch):
      take = batch[: size - count]
      batch = batch[len(take) :]
      pending.append(take)
      count += len(take)
      if count == size:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending)
        pending, count = [], 0
  if count:
    yield np.concatenate(pending)


def extract_features(
    videos: Any,
    *,
    input_range: Optional[tuple[float, float]] = None,
    resize: str = 'reference',
    batch_size: int = 16,
    mesh: Optional[Mesh] = None,
    progress: bool = True,
    keys: Sequence[str] = FEATURES,
    num_videos: Optional[int] = None,
) -> dict[str, np.ndarray]:
  """I3D features of videos, in fixed-size batches sharded over the mesh.

  `videos` is an array or a stream (an iterator of batches of any sizes,
  e.g. a generator that samples them): a stream is consumed lazily, each
  batch dropped once its features are out, so only the features grow with
  the number of videos. Every process passes the same videos; batches are
  split over the 'data' axis and the outputs replicated back. The last
  batch is padded with black videos whose features are dropped.

  Args:
    videos: [N, T, H, W, 3] (see `to_uint8_range`), or an iterator of
      [b, T, H, W, 3] batches.
    input_range: value range of float videos.
    resize: 'reference' or 'magvit'.
    batch_size: videos per step, rounded up to a multiple of the devices.
    mesh: a mesh with a 'data' axis; default: all devices.
    progress: show a tqdm bar (process 0 only).
    keys: the features to keep, of `FEATURES`.
    num_videos: N of a stream, for the progress bar (None: unknown).

  Returns:
    'logits_mean': [N, 400] and 'pool': [N, 1024] float32 (those of
    `keys`).
  """
  _check_resize(resize)
  mesh = default_mesh() if mesh is None else mesh
  n_dev = mesh.shape['data']
  batch_size = -(-batch_size // n_dev) * n_dev
  fn, variables = _feature_fn(resize, mesh), _variables(mesh)
  sharding = NamedSharding(mesh, P('data'))
  if not _is_stream(videos):
    num_videos = len(videos)
  outputs = []
  show = progress and jax.process_index() == 0
  with tqdm.tqdm(total=num_videos, desc='I3D features', unit='video',
                 disable=not show) as bar:
    for batch in rebatch(_uint8_batches(videos, input_range, batch_size),
                         batch_size):
      n = len(batch)
      if n < batch_size:
        pad = np.zeros((batch_size - n,) + batch.shape[1:], batch.dtype)
        batch = np.concatenate([batch, pad])
      batch = jax.make_array_from_callback(
          batch.shape, sharding, lambda idx, b=batch: b[idx]
      )
      out = fn(variables, batch)
      del batch
      # Replicated outputs: the local copy is the whole array on every host.
      outputs.append(
          {k: np.asarray(out[k].addressable_data(0))[:n] for k in keys}
      )
      bar.update(n)
  if not outputs:
    raise ValueError('No videos to extract features from.')
  return {k: np.concatenate([o[k] for o in outputs]) for k in keys}


def feature_stats(feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and covariance [D, D] (n - 1 normalised) in float64."""
  feats = np.asarray(feats, np.float64)
  return feats.mean(axis=0), np.cov(feats, rowvar=False)


def _sqrtm_psd(mat: np.ndarray) -> np.ndarray:
  """Symmetric PSD square root; negative round-off eigenvalues become 0."""
  eigvals, eigvecs = np.linalg.eigh((mat + mat.T) / 2)
  return (eigvecs * np.sqrt(np.clip(eigvals, 0.0, None))) @ eigvecs.T


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), float64.

  |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr sqrt(A S2 A) with A = sqrt(S1),
  the symmetric form tfgan uses: tr sqrt(S1 S2) = tr sqrt(A S2 A), and
  A S2 A is symmetric PSD, so both roots come from eigendecompositions and
  stay real even for singular covariances (fewer videos than dimensions).

  Args:
    mu1: [D] mean. sigma1: [D, D] covariance. mu2, sigma2: the same.

  Returns:
    The distance (>= 0 up to round-off).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1 = np.asarray(sigma1, np.float64)
  sigma2 = np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(
        f'Shapes differ: mu {mu1.shape} vs {mu2.shape}, sigma'
        f' {sigma1.shape} vs {sigma2.shape}.'
    )
  root = _sqrtm_psd(sigma1)
  inner = root @ sigma2 @ root
  eigvals = np.linalg.eigvalsh((inner + inner.T) / 2)
  trace_sqrt = np.sqrt(np.clip(eigvals, 0.0, None)).sum()
  mean_term = np.square(mu1 - mu2).sum()
  return float(
      mean_term + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
  )


def kernel_distance(
    feats1: np.ndarray, feats2: np.ndarray, max_block_size: int = 1024
) -> tuple[float, float]:
  """Kernel video distance (KVD): unbiased polynomial-kernel MMD^2.

  As `tfgan.eval.kernel_classifier_distance_and_std_from_activations`:
  k(x, y) = (x.y / d + 1)^3, the samples split into ceil(max(n1, n2) /
  max_block_size) contiguous blocks of near-equal size, an unbiased MMD^2
  per block, then the mean and its standard error over blocks.

  Args:
    feats1: [N1, D] features (real in tfgan's argument order).
    feats2: [N2, D] features.
    max_block_size: largest block.

  Returns:
    (kvd, standard error); the error is NaN with a single block.
  """
  f1 = np.asarray(feats1, np.float64)
  f2 = np.asarray(feats2, np.float64)
  n_blocks = -(-max(len(f1), len(f2)) // max_block_size)
  dim = f1.shape[1]

  def block_bounds(n):
    sizes = np.full(n_blocks, n // n_blocks)
    sizes[n_blocks - n % n_blocks :] += 1
    return np.concatenate([[0], np.cumsum(sizes)])

  b1, b2 = block_bounds(len(f1)), block_bounds(len(f2))
  ests = []
  for i in range(n_blocks):
    x, y = f1[b1[i] : b1[i + 1]], f2[b2[i] : b2[i + 1]]
    m, n = len(x), len(y)
    k_xx = (x @ x.T / dim + 1) ** 3
    k_yy = (y @ y.T / dim + 1) ** 3
    k_xy = (x @ y.T / dim + 1) ** 3
    ests.append(
        (k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
        + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1))
        - 2 * k_xy.mean()
    )
  ests = np.asarray(ests)
  if n_blocks <= 1:
    return float(ests.mean()), float('nan')
  return float(ests.mean()), float(ests.std(ddof=1) / np.sqrt(n_blocks))


def compute_fvd(
    gen_feats: np.ndarray, real_feats: np.ndarray, folds: int = 1
) -> dict[str, float]:
  """FVD (mean and std over folds) and KVD from features.

  Args:
    gen_feats: [N, D] features of generated videos.
    real_feats: [M, D] features of real videos.
    folds: split both sets into this many contiguous groups (MAGVIT's
      `reshape(num_repeats, -1)`); the std is over groups (ddof 0).

  Returns:
    'fvd', 'fvd_std' (0 for one fold), 'kvd', 'kvd_std' (standard error
    of the tfgan block estimator over all features).
  """
  if len(gen_feats) < 2 * folds or len(real_feats) < 2 * folds:
    raise ValueError(
        f'Need at least 2 videos per fold on each side, got {len(gen_feats)}'
        f' generated and {len(real_feats)} real for {folds} folds.'
    )
  scores = []
  for g, r in zip(
      np.array_split(gen_feats, folds), np.array_split(real_feats, folds)
  ):
    scores.append(frechet_distance(*feature_stats(g), *feature_stats(r)))
  kvd, kvd_std = kernel_distance(real_feats, gen_feats)
  return {
      'fvd': float(np.mean(scores)),
      'fvd_std': float(np.std(scores)),
      'kvd': kvd,
      'kvd_std': kvd_std,
  }


def _cache_path(
    cache_dir: str, protocol: Protocol, fingerprint: str
) -> epath.Path:
  digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
  return epath.Path(cache_dir) / f'fvd_real_{protocol.name}_{digest}.npz'


def real_features(
    real_videos: Optional[Any],
    protocol: Protocol,
    *,
    cache_dir: Optional[str] = None,
    fingerprint: Optional[str] = None,
    num_real: Optional[int] = None,
    **extract_kwargs,
) -> np.ndarray:
  """Features of the real clips, read from / written to an npz cache.

  Args:
    real_videos: [M, T, H, W, 3] real clips, or an iterator of batches
      (only consumed on a cache miss); may be None on a cache hit.
    protocol: the protocol (its name keys the cache).
    cache_dir: directory of the cache (local or gs://); None: no cache.
    fingerprint: a string that identifies the real clips (dataset, split,
      view, seed, count, ...); the caller's responsibility.
    num_real: M of an iterator (checked against a cache entry).
    **extract_kwargs: passed to `extract_features`.

  Returns:
    [M, D] features of `protocol.feature`.
  """
  if real_videos is not None and not _is_stream(real_videos):
    num_real = len(real_videos)
  path = None
  if cache_dir is not None:
    if not fingerprint:
      raise ValueError('cache_dir needs a fingerprint of the real data.')
    path = _cache_path(cache_dir, protocol, fingerprint)
    if path.exists():
      with io.BytesIO(path.read_bytes()) as f, np.load(f) as data:
        if str(data['fingerprint']) == fingerprint and (
            num_real is None or len(data['features']) == num_real
        ):
          logging.info('Real FVD features from %s', path)
          return data['features']
      logging.warning('Stale FVD cache %s; recomputing.', path)
  if real_videos is None:
    raise ValueError(
        'real_videos is None and no cache entry matches; pass the videos.'
    )
  feats = extract_features(real_videos, resize=protocol.resize,
                           keys=(protocol.feature,), num_videos=num_real,
                           **extract_kwargs)[protocol.feature]
  if path is not None and jax.process_index() == 0:
    with fileio.atomic_path(path) as tmp:
      with open(tmp, 'wb') as f:
        np.savez(f, features=feats, fingerprint=fingerprint,
                 protocol=protocol.name)
  return feats


def _check_protocol_shape(
    protocol: Protocol, shape: Sequence[int], what: str
) -> None:
  """Frames and resolution are part of the protocol: mismatches raise."""
  if len(shape) != 5 or shape[1] != protocol.num_frames:
    raise ValueError(
        f'Protocol {protocol.name} scores [N, {protocol.num_frames}, H, W, 3]'
        f' videos, got {what} videos of shape {tuple(shape)}.'
    )
  size = protocol.resolution
  if size and tuple(shape[2:4]) != (size, size):
    raise ValueError(
        f'Protocol {protocol.name} scores at {size}x{size}, got {what} frames'
        f' of {tuple(shape[2:4])}; resize the videos first (the resolution at'
        ' scoring changes FVD).'
    )


def _checked(
    videos: Any, protocol: Protocol, what: str
) -> Any:
  """`videos` with the protocol's frames and resolution checked.

  Arrays are checked at once; an iterator batch by batch, as it is read.
  """
  if not _is_stream(videos):
    videos = np.asarray(videos)
    _check_protocol_shape(protocol, videos.shape, what)
    return videos

  def stream():
    for batch in videos:
      batch = np.asarray(batch)
      _check_protocol_shape(protocol, batch.shape, what)
      yield batch

  return stream()


def _protocol_mismatches(
    protocol: Protocol, num_generated: int, num_real: int
) -> list[str]:
  """Differences between the inputs and the protocol, for the report."""
  notes = []
  if num_generated != protocol.num_generated:
    notes.append(f'{num_generated} generated != {protocol.num_generated}')
  if num_real != protocol.num_real:
    notes.append(f'{num_real} real != {protocol.num_real}')
  return notes


def evaluate_videos(
    gen_videos: Any,
    real_videos: Optional[Any],
    protocol: str,
    cache_dir: Optional[str] = None,
    fingerprint: Optional[str] = None,
    *,
    batch_size: int = 16,
    mesh: Optional[Mesh] = None,
    num_generated: Optional[int] = None,
    num_real: Optional[int] = None,
) -> dict[str, Any]:
  """Scores generated against real videos under a named protocol.

  Either set may be an iterator of batches instead of an array (see
  `extract_features`): the real clips are streamed first, then the
  generated ones, and only their I3D features are kept, so memory does not
  grow with the number of videos beyond the features ([N, 400] float32).

  Args:
    gen_videos: [N, T, H, W, 3] uint8 generated videos, conditioning frames
      included as the protocol says, or an iterator of [b, T, H, W, 3].
    real_videos: [M, T, H, W, 3] uint8 real clips or an iterator of
      batches (None if cached).
    protocol: a key of `PROTOCOLS`.
    cache_dir: where real-feature caches live (None: no cache).
    fingerprint: identifies the real clips for the cache.
    batch_size: videos per I3D step.
    mesh: a mesh with a 'data' axis (default: all devices).
    num_generated: N of an iterator (progress bar only).
    num_real: M of an iterator (progress bar, cache check).

  Returns:
    {'protocol', 'fvd', 'fvd_std', 'kvd', 'kvd_std', 'num_generated',
    'num_real', 'folds', 'feature', 'resize', 'protocol_compliant',
    'deviations'}; a score with deviations is not comparable with the
    published numbers of the protocol. The counts are those of the
    features.
  """
  if protocol not in PROTOCOLS:
    raise ValueError(
        f'Unknown FVD protocol {protocol!r}; choose one of {list(PROTOCOLS)}.'
    )
  proto = PROTOCOLS[protocol]
  gen_videos = _checked(gen_videos, proto, 'generated')
  if real_videos is not None:
    real_videos = _checked(real_videos, proto, 'real')
  kwargs = dict(batch_size=batch_size, mesh=mesh)
  real = real_features(real_videos, proto, cache_dir=cache_dir,
                       fingerprint=fingerprint, num_real=num_real, **kwargs)
  gen = extract_features(gen_videos, resize=proto.resize,
                         keys=(proto.feature,), num_videos=num_generated,
                         **kwargs)[proto.feature]
  scores = compute_fvd(gen, real, folds=proto.folds)
  deviations = _protocol_mismatches(proto, len(gen), len(real))
  if deviations:
    logging.warning('FVD deviates from protocol %s: %s', protocol,
                    '; '.join(deviations))
  return {
      'protocol': protocol,
      **scores,
      'num_generated': int(len(gen)),
      'num_real': int(len(real)),
      'folds': proto.folds,
      'feature': proto.feature,
      'resize': proto.resize,
      'protocol_compliant': not deviations,
      'deviations': deviations,
  }
