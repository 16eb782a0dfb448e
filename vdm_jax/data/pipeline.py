"""Deterministic, resumable, per-process batches of clips from a source.

A source is any random-access collection: `len(source)` examples and
`source[i] -> {'video': uint8[T', H, W, C], 'label': int}` with T' at least
`(num_frames - 1) * frame_stride + 1`. A source may also provide
`render_batch(indices, frames) -> {'video': uint8[B, K, H, W, C],
'label': int[B]}`, frames `frames[b]` (int [B, K]) of example `indices[b]`,
when all its videos have the same length T' (the synthetic source does);
the pipeline then renders only the frames it needs, in two calls per batch.
Otherwise a source may provide `read_frames(index, select, crop=None) ->
{'video': uint8[K, H, W, C], 'label': int}`: it calls `select(length)` (int
[K] frame indices of a video of `length` frames) and decodes only those
frames; `crop` is None (centre crop) or a pair (u_y, u_x) in [0, 1) placing
a crop window. All paths give the same batches.

Batch `step` is a pure function of (seed, step, process_index):
  - global position g = step * global_batch_size + j; epoch g // len(source);
    example = permutation_of_epoch[g % len(source)], the permutation seeded by
    (seed, epoch), so every example appears exactly once per epoch;
  - process p takes the contiguous slice [p * b, (p + 1) * b) of each global
    batch, b = global_batch_size // process_count;
  - the clip start and the image frames of position g are seeded by (seed, g),
    and so are the optional left-right flip and crop window of position g
    (drawn after the others, so switching them on changes nothing else).
Resuming from a checkpoint at step k therefore only needs k.

Joint image-video training (Ho et al. 2022, Sec. 3 and 4.3.1): with
`image_frames = N > 0` each clip of T frames is followed by N independent
frames, each from a different randomly chosen other example at a random
frame. `frame_mask` is True on the T clip frames and False on the N image
frames. `label` is the clip's label and `image_label` [b, N] the label of
the video each image frame comes from: a class-conditional model must see
an image frame under its own class, not the clip's (denoiser.training_cond).
Image frames are drawn from all other examples, as in the paper, rather
than from examples of the clip's class: that keeps the image frames an
unbiased sample of the dataset (a class with few videos would otherwise
repeat its frames), needs no class index of the source (a TFDS source
would have to read every record for it), and the label each frame needs
is read with the frame anyway.
"""

import collections
import queue
import re
import threading
from typing import Any, Iterator, Optional

import numpy as np

# Stream tags keep the seeded random streams of the pipeline apart.
_PERMUTATION, _POSITION = 0, 1


_SWAP = {'left': 'right', 'right': 'left', 'Left': 'Right', 'Right': 'Left'}


def flip_caption(text: str) -> str:
  """The caption of the left-right mirrored video: 'left' <-> 'right'."""
  return re.sub(r'\b(left|right|Left|Right)\b',
                lambda m: _SWAP[m.group(0)], text)


class Pipeline:
  """Host-local batches `{'video', 'label', 'image_label', 'frame_mask'}`."""

  # Over 60 lines with its docstring: every argument is checked here, before
  # any example is read.
  def __init__(self, source: Any, *, global_batch_size: int, num_frames: int,
               seed: int, frame_stride: int = 1, image_frames: int = 0,
               process_index: int = 0, process_count: int = 1,
               random_start: bool = True, random_flip: bool = False,
               random_crop: bool = False, text_encoder: Any = None):
    """Checks the arguments against the source.

    Args:
      source: random-access source (see the module docstring).
      global_batch_size: examples per step over all processes.
      num_frames: T, clip frames.
      seed: data seed.
      frame_stride: frames of the source between consecutive clip frames.
      image_frames: N, independent image frames appended to each clip.
      process_index: this process, in [0, process_count).
      process_count: processes sharing the global batch.
      random_start: random clip start if True, else the first frame.
      random_flip: flip each example left-right with probability 1/2.
      random_crop: pass a random crop window to `source.read_frames` (which
        the source must have); else the source crops its centre.
      text_encoder: a `text.encoders.TextEncoder`: batches then carry the
        embeddings of each clip's caption and of each image frame's own
        video's caption (the source's items must hold 'caption').

    Raises:
      ValueError: on inconsistent arguments or a source too small for them.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(
          f'process_index={process_index} must lie in [0, process_count='
          f'{process_count}).')
    if global_batch_size < 1 or global_batch_size % process_count:
      raise ValueError(
          f'global_batch_size={global_batch_size} must be a positive '
          f'multiple of process_count={process_count}.')
    if num_frames < 1 or frame_stride < 1:
      raise ValueError(
          f'num_frames={num_frames} and frame_stride={frame_stride} must be '
          '>= 1.')
    if image_frames < 0:
      raise ValueError(f'image_frames={image_frames} must be >= 0.')
    size = len(source)
    if size == 0:
      raise ValueError('The source is empty: it has no examples.')
    if random_crop and not hasattr(source, 'read_frames'):
      raise ValueError(
          'random_crop needs a source with read_frames (a resizing source '
          f'such as the TFDS or video-file ones); got {type(source).__name__}.')
    if image_frames > size - 1:
      raise ValueError(
          f'image_frames={image_frames} needs as many other examples, but '
          f'the source has {size} example(s).')
    self.source = source
    self.global_batch_size = global_batch_size
    self.batch_size = global_batch_size // process_count
    self.num_frames = num_frames
    self.seed = seed
    self._seed_key = seed % 2**64  # SeedSequence needs entropy >= 0.
    self.frame_stride = frame_stride
    self.image_frames = image_frames
    self.process_index = process_index
    self.process_count = process_count
    self.random_start = random_start
    self.random_flip = random_flip
    self.random_crop = random_crop
    self._permutations = collections.OrderedDict()
    self._lock = threading.Lock()
    item = source[0]
    first = np.asarray(item['video'])
    self._check_length(first, 0)
    if text_encoder is not None and 'caption' not in item:
      raise ValueError(
          f'Text conditioning (text.encoder={text_encoder.name!r}) needs'
          f' captions, but the source {type(source).__name__} gives none:'
          ' use the synthetic data, or video files with data.captions=True'
          ' (docs/data.md).')
    self.text_encoder = text_encoder
    # Video length of sources with `render_batch` (one length for all).
    self._source_frames = first.shape[0]

  @property
  def num_frames_total(self) -> int:
    """T + N: clip frames plus image frames."""
    return self.num_frames + self.image_frames

  @property
  def clip_span(self) -> int:
    """Source frames one clip covers: (T - 1) * stride + 1."""
    return (self.num_frames - 1) * self.frame_stride + 1

  def _check_length(self, video: np.ndarray, index: int) -> None:
    if video.ndim != 4 or video.shape[0] < self.clip_span:
      raise ValueError(
          f'Source example {index} has video shape {video.shape}; need '
          f'[T\', H, W, C] with T\' >= (num_frames - 1) * frame_stride + 1 = '
          f'{self.clip_span} (num_frames={self.num_frames}, frame_stride='
          f'{self.frame_stride}).')

  def _permutation(self, epoch: int) -> np.ndarray:
    """The example order of `epoch` (cached for the two latest epochs)."""
    with self._lock:
      perm = self._permutations.get(epoch)
      if perm is None:
        rng = np.random.default_rng([self._seed_key, _PERMUTATION, epoch])
        perm = rng.permutation(len(self.source))
        self._permutations[epoch] = perm
        while len(self._permutations) > 2:
          self._permutations.popitem(last=False)
      return perm

  def _draw(self, positions: np.ndarray, examples: np.ndarray
            ) -> tuple[np.ndarray, ...]:
    """Random choices of each global position, seeded by (seed, position).

    Returns:
      others: int [b, N] distinct examples other than the clip's;
      u_start: float [b] in [0, 1), picks the clip start;
      u_images: float [b, N] in [0, 1), picks the frame of each image;
      flips: bool [b], True where the example is flipped left-right;
      u_crop: float [b, 2] in [0, 1), places the crop window (y, x).
    """
    n, b, num_images = len(self.source), len(positions), self.image_frames
    others = np.zeros((b, num_images), dtype=np.int64)
    u_start = np.zeros(b)
    u_images = np.zeros((b, num_images))
    flips = np.zeros(b, dtype=bool)
    u_crop = np.full((b, 2), 0.5)
    for j, g in enumerate(positions):
      rng = np.random.default_rng([self._seed_key, _POSITION, g])
      if num_images:
        pick = rng.choice(n - 1, size=num_images, replace=False)
        others[j] = pick + (pick >= examples[j])
      u_start[j] = rng.random()
      u_images[j] = rng.random(num_images)
      if self.random_flip:
        flips[j] = rng.random() < 0.5
      if self.random_crop:
        u_crop[j] = rng.random(2)
    return others, u_start, u_images, flips, u_crop

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

  def _gather(self, examples: np.ndarray, others: np.ndarray,
              u_start: np.ndarray, u_images: np.ndarray,
              u_crop: np.ndarray) -> tuple[np.ndarray, ...]:
    """Frames uint8 [b, T + N, H, W, C], labels [b], image labels [b, N]
    and the captions (b lists of 1 + N: the clip's, then its images')."""
    b, num_images = others.shape
    image_labels = np.zeros((b, num_images), dtype=np.int64)
    if hasattr(self.source, 'render_batch'):
      # Batched source with one video length: render only needed frames.
      length = np.full(b, self._source_frames)
      clips = self.source.render_batch(
          examples, frames=self._clip_frames(length, u_start))
      video, labels = clips['video'], clips['label']
      captions = [[c] for c in clips.get('caption', [None] * b)]
      if num_images:
        image_frames = (u_images * self._source_frames).astype(np.int64)
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
    if hasattr(self.source, 'read_frames'):
      items = [
          self._read(int(examples[j]), u_start[j], u_images[j], others[j],
                     u_crop[j] if self.random_crop else None)
          for j in range(b)]
      if num_images:
        image_labels = np.asarray([item[2] for item in items])
      return (np.stack([item[0] for item in items]),
              np.asarray([item[1] for item in items]), image_labels,
              [item[3] for item in items])
    examples_out, labels, captions = [], [], []
    for j in range(b):
      item = self.source[int(examples[j])]
      clip = np.asarray(item['video'])
      self._check_length(clip, examples[j])
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

  def _text(self, captions: list[list[Optional[str]]], flips: np.ndarray
            ) -> dict[str, np.ndarray]:
    """The caption embeddings of a batch (text_encoder given).

    A left-right flipped example's caption has 'left' and 'right' swapped
    (`flip_caption`): the flip reverses horizontal motion.
    """
    b, n = len(captions), self.image_frames
    texts = []
    for j, row in enumerate(captions):
      if any(c is None for c in row):
        raise ValueError('An example of the batch has no caption.')
      texts += [flip_caption(c) if flips[j] else c for c in row]
    emb = self.text_encoder.encode(texts)
    tokens = emb.tokens.reshape((b, 1 + n) + emb.tokens.shape[1:])
    mask = emb.mask.reshape((b, 1 + n) + emb.mask.shape[1:])
    return {'text': tokens[:, 0], 'text_mask': mask[:, 0],
            'image_text': tokens[:, 1:], 'image_text_mask': mask[:, 1:]}

  def batch_for_step(self, step: int,
                     captions: bool = False) -> dict[str, np.ndarray]:
    """The host-local batch of `step`; a pure function of (seed, step, p).

    Args:
      step: training step, >= 0.
      captions: also return 'caption', str [b]: each clip's caption (as
        flipped; for sampling and evaluation, not for the train step).

    Returns:
      {'video': uint8[b, T + N, H, W, C], 'label': int32[b] (the clip's),
       'image_label': int32[b, N] (the label of each image frame's video),
       'frame_mask': bool[b, T + N]} with b = global_batch_size //
      process_count; with a text encoder also 'text' float32 [b, L, D] and
      'text_mask' bool [b, L] (the clip's caption), 'image_text' [b, N, L,
      D] and 'image_text_mask' [b, N, L] (each image frame's own video's).
    """
    if step < 0:
      raise ValueError(f'step={step} must be >= 0.')
    captions_out = captions
    n, b = len(self.source), self.batch_size
    first = step * self.global_batch_size + self.process_index * b
    positions = np.arange(first, first + b, dtype=np.int64)
    examples = np.empty(b, dtype=np.int64)
    for epoch in np.unique(positions // n):
      here = positions // n == epoch
      examples[here] = self._permutation(int(epoch))[positions[here] % n]
    others, u_start, u_images, flips, u_crop = self._draw(positions, examples)
    video, labels, image_labels, captions = self._gather(
        examples, others, u_start, u_images, u_crop)
    if flips.any():
      video[flips] = video[flips][:, :, :, ::-1]
    frame_mask = np.zeros((b, self.num_frames_total), dtype=bool)
    frame_mask[:, :self.num_frames] = True
    batch = {
        'video': video.astype(np.uint8, copy=False),
        'label': labels.astype(np.int32),
        'image_label': image_labels.astype(np.int32),
        'frame_mask': frame_mask,
    }
    if self.text_encoder is not None:
      batch.update(self._text(captions, flips))
    if captions_out:
      if any(row[0] is None for row in captions):
        raise ValueError(f'The source {type(self.source).__name__} has no'
                         ' captions.')
      batch['caption'] = np.asarray(
          [flip_caption(row[0]) if flips[j] else row[0]
           for j, row in enumerate(captions)], dtype=str)
    return batch

  def iterate(self, start_step: int = 0,
              prefetch: int = 3) -> 'BatchIterator':
    """Batches for start_step, start_step + 1, ..., made ahead in a thread.

    Args:
      start_step: the first step (e.g. the step of the restored checkpoint).
      prefetch: batches the background thread may hold ready.

    Returns:
      An iterator; `close()` it (or use it as a context manager, or drop
      it) to stop the thread.
    """
    return BatchIterator(self, start_step, prefetch)


def _produce(pipeline: Pipeline, step: int, out: queue.Queue,
             stop: threading.Event) -> None:
  """Thread body: puts ('batch', b) items, or one ('error', e) and returns."""
  while not stop.is_set():
    try:
      item = ('batch', pipeline.batch_for_step(step))
    except BaseException as e:  # pylint: disable=broad-except
      item = ('error', e)
    while not stop.is_set():
      try:
        out.put(item, timeout=0.1)
        break
      except queue.Full:
        continue
    if item[0] == 'error':
      return
    step += 1


class BatchIterator:
  """Iterator over prefetched batches; stops its thread on close/GC.

  The thread holds the pipeline, the queue and a stop event but not this
  object, so dropping the iterator lets `__del__` stop the thread.
  An exception raised while making a batch re-raises from `next()`.
  """

  def __init__(self, pipeline: Pipeline, start_step: int, prefetch: int):
    self.step = start_step  # Step of the next batch returned.
    self._queue = queue.Queue(maxsize=max(1, prefetch))
    self._stop = threading.Event()
    self._closed = False
    self._thread = threading.Thread(
        target=_produce, args=(pipeline, start_step, self._queue, self._stop),
        name='vdm_jax-data', daemon=True)
    self._thread.start()

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._closed:
      raise StopIteration
    kind, value = self._queue.get()
    if kind == 'error':
      self.close()
      raise value
    self.step += 1
    return value

  def close(self) -> None:
    """Stops and joins the prefetch thread; later `next()` stops."""
    if self._closed:
      return
    self._closed = True
    self._stop.set()
    while True:  # Unblock a pending put.
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    if threading.current_thread() is not self._thread:
      self._thread.join()

  def __enter__(self) -> 'BatchIterator':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    if hasattr(self, '_thread'):
      self.close()
