"""Deterministic, resumable, per-process batches of clips, on grain.

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

The graph is a grain `MapDataset` indexed by step (`Pipeline.dataset`):
  range of global positions -> batch(b): blocks of b positions, P blocks a
  global batch -> [p::P] (`grain.sharding.ShardOptions(p, P)`): this
  process's block of each step -> map(_Sample): epoch permutations and the
  per-position draws -> map(_Read): decoding, crops, flips.
`dataset[step]` is random access, so the iterator state is the step: a
resumed run builds `dataset[k:]` and needs nothing beside the train state's
step in the checkpoint (`BatchIterator.get_state` is `{'step': k}`). With
`num_workers > 0`, `mp_prefetch` decodes in that many worker processes
(each takes every num_workers-th step; grain interleaves them back in
order), and a main-process thread adds what needs the main process (text
embeddings, the count of skipped files) and keeps `prefetch` batches ready.
Every worker count gives the same batches.

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

import functools
import os
import re
import threading
import time
from typing import Any, Optional

from absl import flags
import grain
import numpy as np

from vdm_jax.data import grain_ops
from vdm_jax.data import loader

BatchIterator = loader.BatchIterator

# Steps the dataset spans: far more than any run takes.
_MAX_STEPS = 2**40

_SWAP = {'left': 'right', 'right': 'left', 'Left': 'Right', 'Right': 'Left'}


def flip_caption(text: str) -> str:
  """The caption of the left-right mirrored video: 'left' <-> 'right'."""
  return re.sub(r'\b(left|right|Left|Right)\b',
                lambda m: _SWAP[m.group(0)], text)


def default_num_workers() -> int:
  """Decoding processes for this host: its cores less one, at least one."""
  try:
    cores = len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    cores = os.cpu_count() or 1
  return max(1, cores - 1)


def _exit_with_parent(parent: int, index: int, count: int) -> None:
  """Worker start: exit once the training process `parent` is gone.

  A killed trainer (SIGKILL, OOM) cannot stop its workers; this keeps them
  from living on, orphaned, with their memory.
  """
  del index, count

  def watch():
    while os.getppid() == parent:
      time.sleep(1.0)
    os._exit(0)  # pylint: disable=protected-access

  threading.Thread(target=watch, name='vdm_jax-parent-watch',
                   daemon=True).start()


class Pipeline:
  """Host-local batches `{'video', 'label', 'image_label', 'frame_mask'}`."""

  # Over 60 lines with its docstring: every argument is checked here, before
  # any example is read.
  def __init__(self, source: Any, *, global_batch_size: int, num_frames: int,
               seed: int, frame_stride: int = 1, image_frames: int = 0,
               process_index: int = 0, process_count: int = 1,
               random_start: bool = True, random_flip: bool = False,
               random_crop: bool = False, text_encoder: Any = None,
               num_workers: int = 0, worker_buffer_size: int = 2):
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
      num_workers: worker processes that make the batches of `iterate`
        (0: its thread makes them; `default_num_workers()` for this host).
      worker_buffer_size: batches each worker may hold ready.

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
    if num_workers < 0 or worker_buffer_size < 1:
      raise ValueError(
          f'num_workers={num_workers} must be >= 0 and worker_buffer_size='
          f'{worker_buffer_size} >= 1.')
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
    self.frame_stride = frame_stride
    self.image_frames = image_frames
    self.process_index = process_index
    self.process_count = process_count
    self.random_start = random_start
    self.random_flip = random_flip
    self.random_crop = random_crop
    self.num_workers = num_workers
    self.worker_buffer_size = worker_buffer_size
    self.shard_options = grain.sharding.ShardOptions(
        shard_index=process_index, shard_count=process_count,
        drop_remainder=True)
    item = source[0]
    first = np.asarray(item['video'])
    self._sample = grain_ops.Sample(
        size, seed, image_frames, random_flip, random_crop)
    # Video length of sources with `render_batch` (one length for all).
    self._read = grain_ops.Read(
        source, num_frames=num_frames, frame_stride=frame_stride,
        random_start=random_start, random_crop=random_crop,
        source_frames=first.shape[0])
    self._read.check_length(first, 0)
    if text_encoder is not None and 'caption' not in item:
      raise ValueError(
          f'Text conditioning (text.encoder={text_encoder.name!r}) needs'
          f' captions, but the source {type(source).__name__} gives none:'
          ' use the synthetic data, or video files with data.captions=True'
          ' (docs/data.md).')
    self.text_encoder = text_encoder
    self.dataset = self._dataset()

  @property
  def num_frames_total(self) -> int:
    """T + N: clip frames plus image frames."""
    return self.num_frames + self.image_frames

  @property
  def clip_span(self) -> int:
    """Source frames one clip covers: (T - 1) * stride + 1."""
    return (self.num_frames - 1) * self.frame_stride + 1

  def _permutation(self, epoch: int) -> np.ndarray:
    """The example order of `epoch`."""
    return self._sample.permutation(epoch)

  def _dataset(self) -> grain.MapDataset:
    """Step -> this process's decoded batch (see the module docstring)."""
    positions = grain.MapDataset.range(_MAX_STEPS * self.global_batch_size)
    blocks = positions.batch(self.batch_size, batch_fn=np.asarray)
    shard = self.shard_options
    self._blocks = blocks[shard.shard_index::shard.shard_count]
    return self._blocks.map(self._sample).map(self._read)

  def examples_of_step(self, step: int) -> list[int]:
    """The examples batch `step` reads (clips first, then image frames)."""
    sampled = self._sample.map(self._blocks[step])
    return [int(i) for i in sampled['examples']] + [
        int(i) for i in sampled['others'].ravel()]

  def describe_step(self, step: int) -> str:
    """What batch `step` reads: its files (or example indices)."""
    describe = getattr(self.source, 'describe', lambda i: f'example {i}')
    return ', '.join(dict.fromkeys(
        describe(i) for i in self.examples_of_step(step)))

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

  def finish(self, element: dict[str, Any],
             captions: bool = False) -> dict[str, np.ndarray]:
    """The main-process part of a batch: an element of `dataset` -> batch.

    Counts the files a worker skipped on the source (`merge_skipped`), adds
    the frame mask, the text embeddings and (`captions`) the captions.
    """
    skipped = element['skipped']
    if skipped and hasattr(self.source, 'merge_skipped'):
      self.source.merge_skipped(skipped)
    b = len(element['label'])
    frame_mask = np.zeros((b, self.num_frames_total), dtype=bool)
    frame_mask[:, :self.num_frames] = True
    batch = {
        'video': element['video'],
        'label': element['label'],
        'image_label': element['image_label'],
        'frame_mask': frame_mask,
    }
    flips, rows = element['flips'], element['captions']
    if self.text_encoder is not None:
      batch.update(self._text(rows, flips))
    if captions:
      if any(row[0] is None for row in rows):
        raise ValueError(f'The source {type(self.source).__name__} has no'
                         ' captions.')
      batch['caption'] = np.asarray(
          [flip_caption(row[0]) if flips[j] else row[0]
           for j, row in enumerate(rows)], dtype=str)
    return batch

  def batch_for_step(self, step: int,
                     captions: bool = False) -> dict[str, np.ndarray]:
    """The host-local batch of `step`; a pure function of (seed, step, p).

    Made in this process and thread (`iterate` uses the workers).

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
    return self.finish(self.dataset[step], captions)

  def grain_iterator(self, start_step: int = 0) -> grain.DatasetIterator:
    """Elements of `dataset` from `start_step` on, made by the workers.

    Each worker reads in its own thread, holding `worker_buffer_size`
    batches; with `num_workers=0` the caller's thread reads.
    """
    if self.num_workers and not flags.FLAGS.is_parsed():
      # grain reads its absl flags when it starts workers; a program that
      # is not an absl app (a test, a notebook) has not parsed them.
      flags.FLAGS.mark_as_parsed()
    ds = self.dataset[start_step:].to_iter_dataset(
        grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    # Batches come back through the workers' queues, not shared memory:
    # a few MB a step cost milliseconds to copy, and nothing is left to
    # unlink when an iterator stops with batches in flight.
    ds = grain.experimental.WithOptionsIterDataset(
        ds, grain.experimental.DatasetOptions(min_shm_size=2**62))
    if self.num_workers:
      ds = ds.mp_prefetch(
          grain.MultiprocessingOptions(
              num_workers=self.num_workers,
              per_worker_buffer_size=self.worker_buffer_size),
          worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))
    return iter(ds)

  def iterate(self, start_step: int = 0, prefetch: int = 3) -> BatchIterator:
    """Batches for start_step, start_step + 1, ..., made ahead.

    Args:
      start_step: the first step (e.g. the step of the restored checkpoint).
      prefetch: finished batches the main-process thread may hold ready.

    Returns:
      An iterator; `close()` it (or use it as a context manager, or drop
      it) to stop its thread and worker processes.
    """
    if start_step < 0:
      raise ValueError(f'start_step={start_step} must be >= 0.')
    return BatchIterator(self, start_step, prefetch)
