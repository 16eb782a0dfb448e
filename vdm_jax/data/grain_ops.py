"""The per-batch grain operations of `data.pipeline`: sample, then read.

Both are `grain.transforms.Map`s over one process's block of b global
positions (int [b]) of a step. They are pickled into grain's worker
processes, so they hold only what they need (the source and a few
settings, not the pipeline or its text encoder) and drop their caches and
locks when pickled.
"""

import collections
import threading
from typing import Any, Optional

import grain
import numpy as np

# Stream tags keep the seeded random streams of the pipeline apart.
_PERMUTATION, _POSITION = 0, 1


class Sample(grain.transforms.Map):
  """Positions int [b] -> the examples and random choices of a batch.

  Example of position g: permutation of epoch g // n at g % n, seeded by
  (seed, epoch); the other draws are seeded by (seed, g) (see `pipeline`).
  """

  def __init__(self, size: int, seed: int, image_frames: int,
               random_flip: bool, random_crop: bool):
    self.size = size
    self.seed_key = seed % 2**64  # SeedSequence needs entropy >= 0.
    self.image_frames = image_frames
    self.random_flip = random_flip
    self.random_crop = random_crop
    self._permutations = collections.OrderedDict()
    self._lock = threading.Lock()

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    del state['_lock']
    state['_permutations'] = collections.OrderedDict()
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def permutation(self, epoch: int) -> np.ndarray:
    """The example order of `epoch` (cached for the two latest epochs)."""
    with self._lock:
      perm = self._permutations.get(epoch)
      if perm is None:
        rng = np.random.default_rng([self.seed_key, _PERMUTATION, epoch])
        perm = rng.permutation(self.size)
        self._permutations[epoch] = perm
        while len(self._permutations) > 2:
          self._permutations.popitem(last=False)
      return perm

  def map(self, element: np.ndarray) -> dict[str, np.ndarray]:
    """Positions int [b] -> the batch's choices.

    Returns:
      examples: int [b], the clip of each position;
      others: int [b, N] distinct examples other than the clip's;
      u_start: float [b] in [0, 1), picks the clip start;
      u_images: float [b, N] in [0, 1), picks the frame of each image;
      flips: bool [b], True where the example is flipped left-right;
      u_crop: float [b, 2] in [0, 1), places the crop window (y, x).
    """
    positions = np.asarray(element, dtype=np.int64)
    n, b, num_images = self.size, len(positions), self.image_frames
    examples = np.empty(b, dtype=np.int64)
    for epoch in np.unique(positions // n):
      here = positions // n == epoch
      examples[here] = self.permutation(int(epoch))[positions[here] % n]
    others = np.zeros((b, num_images), dtype=np.int64)
    u_start = np.zeros(b)
    u_images = np.zeros((b, num_images))
    flips = np.zeros(b, dtype=bool)
    u_crop = np.full((b, 2), 0.5)
    for j, g in enumerate(positions):
      rng = np.random.default_rng([self.seed_key, _POSITION, g])
      if num_images:
        pick = rng.choice(n - 1, size=num_images, replace=False)
        others[j] = pick + (pick >= examples[j])
      u_start[j] = rng.random()
      u_images[j] = rng.random(num_images)
      if self.random_flip:
        flips[j] = rng.random() < 0.5
      if self.random_crop:
        u_crop[j] = rng.random(2)
    return {'examples': examples, 'others': others, 'u_start': u_start,
            'u_images': u_images, 'flips': flips, 'u_crop': u_crop}


class Read(grain.transforms.Map):
  """A batch's choices -> its frames, labels and captions, flips applied.

  The output element: 'video' uint8 [b, T + N, H, W, C], 'label' int32 [b],
  'image_label' int32 [b, N], 'flips' bool [b], 'captions' (b lists of
  1 + N: the clip's, then its images'; None where the source has none) and
  'skipped' (the source's `skipped` files, path -> why, or None), which
  the main process adds to its own source's count.
  """

  def __init__(self, source: Any, *, num_frames: int, frame_stride: int,
               random_start: bool, random_crop: bool, source_frames: int):
    self.source = source
    self.num_frames = num_frames
    self.frame_stride = frame_stride
    self.random_start = random_start
    self.random_crop = random_crop
    self.source_frames = source_frames
    self.clip_span = (num_frames - 1) * frame_stride + 1

  def check_length(self, video: np.ndarray, index: int) -> None:
    """Raises ValueError unless `video` is [T', H, W, C], T' >= the span."""
    if video.ndim != 4 or video.shape[0] < self.clip_span:
      raise ValueError(
          f'Source example {index} has video shape {video.shape}; need '
          f'[T\', H, W, C] with T\' >= (num_frames - 1) * frame_stride + 1 = '
          f'{self.clip_span} (num_frames={self.num_frames}, frame_stride='
          f'{self.frame_stride}).')

  def _clip_frames(self, length: np.ndarray, u_start: np.ndarray
                   ) -> np.ndarray:
    """int [b, T] clip frame indices in videos of `length` [b] frames."""
    starts = np.zeros(len(u_start), dtype=np.int64)
    if self.random_start:
      starts = (u_start * (length - self.clip_span + 1)).astype(np.int64)
    return starts[:, None] + self.frame_stride * np.arange(self.num_frames)

  def _read(self, example: int, u_start: float, u_images: np.ndarray,
            others: np.ndarray, u_crop: Optional[np.ndarray]
            ) -> tuple[np.ndarray, int, list[int], list[Optional[str]]]:
    """One example through `source.read_frames`.

    Returns:
      (uint8 [T + N, H, W, C], the clip's label, the N image labels, the
      1 + N captions of the clip and its image frames).
    """

    def clip_frames(length: int) -> np.ndarray:
      if length < self.clip_span:
        raise ValueError(
            f'Source example {example} has {length} frames; need at least '
            f'(num_frames - 1) * frame_stride + 1 = {self.clip_span}.')
      return self._clip_frames(np.array([length]), np.array([u_start]))[0]

    crop = None if u_crop is None else tuple(u_crop)
    item = self.source.read_frames(example, clip_frames, crop=crop)
    parts, image_labels = [np.asarray(item['video'])], []
    captions = [item.get('caption')]
    for other, u in zip(others, u_images):
      image = self.source.read_frames(
          int(other), lambda length, u=u: np.array([int(u * length)]),
          crop=crop)
      parts.append(np.asarray(image['video']))
      image_labels.append(int(image['label']))
      captions.append(image.get('caption'))
    return (np.concatenate(parts), int(item['label']), image_labels,
            captions)

  def _render(self, examples: np.ndarray, others: np.ndarray,
              u_start: np.ndarray, u_images: np.ndarray
              ) -> tuple[np.ndarray, ...]:
    """The `render_batch` path: one video length, only needed frames."""
    b, num_images = others.shape
    image_labels = np.zeros((b, num_images), dtype=np.int64)
    length = np.full(b, self.source_frames)
    clips = self.source.render_batch(
        examples, frames=self._clip_frames(length, u_start))
    video, labels = clips['video'], clips['label']
    captions = [[c] for c in clips.get('caption', [None] * b)]
    if num_images:
      image_frames = (u_images * self.source_frames).astype(np.int64)
      rendered = self.source.render_batch(
          others.reshape(-1), frames=image_frames.reshape(-1, 1))
      images = rendered['video']
      video = np.concatenate(
          [video, images.reshape((b, num_images) + images.shape[2:])],
          axis=1)
      image_labels = np.asarray(rendered['label']).reshape(b, num_images)
      image_captions = rendered.get('caption', [None] * b * num_images)
      for j in range(b):
        captions[j] += image_captions[j * num_images:(j + 1) * num_images]
    return video, labels, image_labels, captions

  def _index(self, examples: np.ndarray, others: np.ndarray,
             u_start: np.ndarray, u_images: np.ndarray
             ) -> tuple[np.ndarray, ...]:
    """The generic path: whole videos by `source[i]`."""
    b, num_images = others.shape
    image_labels = np.zeros((b, num_images), dtype=np.int64)
    examples_out, labels, captions = [], [], []
    for j in range(b):
      item = self.source[int(examples[j])]
      clip = np.asarray(item['video'])
      self.check_length(clip, examples[j])
      frames = self._clip_frames(np.array([clip.shape[0]]), u_start[j:j + 1])
      parts = [clip[frames[0]]]
      captions.append([item.get('caption')])
      for k in range(num_images):
        other = self.source[int(others[j, k])]
        image = np.asarray(other['video'])
        parts.append(image[int(u_images[j, k] * image.shape[0])][None])
        image_labels[j, k] = int(other['label'])
        captions[j].append(other.get('caption'))
      examples_out.append(np.concatenate(parts))
      labels.append(int(item['label']))
    return (np.stack(examples_out), np.asarray(labels), image_labels,
            captions)

  def _gather(self, s: dict[str, np.ndarray]) -> tuple[np.ndarray, ...]:
    """Frames uint8 [b, T + N, H, W, C], labels [b], image labels [b, N]
    and the captions (b lists of 1 + N: the clip's, then its images')."""
    examples, others = s['examples'], s['others']
    if hasattr(self.source, 'render_batch'):
      return self._render(examples, others, s['u_start'], s['u_images'])
    if not hasattr(self.source, 'read_frames'):
      return self._index(examples, others, s['u_start'], s['u_images'])
    b, num_images = others.shape
    items = [
        self._read(int(examples[j]), s['u_start'][j], s['u_images'][j],
                   others[j], s['u_crop'][j] if self.random_crop else None)
        for j in range(b)]
    image_labels = np.zeros((b, num_images), dtype=np.int64)
    if num_images:
      image_labels = np.asarray([item[2] for item in items])
    return (np.stack([item[0] for item in items]),
            np.asarray([item[1] for item in items]), image_labels,
            [item[3] for item in items])

  def map(self, element: dict[str, np.ndarray]) -> dict[str, Any]:
    """The choices of `Sample.map` -> the decoded batch (see the class)."""
    video, labels, image_labels, captions = self._gather(element)
    flips = element['flips']
    if flips.any():
      video[flips] = video[flips][:, :, :, ::-1]
    skipped = getattr(self.source, 'skipped', None)
    return {
        'video': video.astype(np.uint8, copy=False),
        'label': np.asarray(labels).astype(np.int32),
        'image_label': image_labels.astype(np.int32),
        'flips': flips,
        'captions': captions,
        'skipped': dict(skipped) if skipped else None,
    }
