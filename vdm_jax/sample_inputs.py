"""Inputs of the sampling tasks: videos from a file or from the dataset.

A video task (tasks.Task.needs_video) needs input videos
[N, T_in, h, w, C] in [-1, 1] at the model's size ('upsample': at the low
resolution). They come from `config.sample.input`:
  ''          ground-truth clips of `config.data` (the same source as
              training, built here without the train program), cut to the
              task's output timeline; the task input is derived from them
              (`Task.input_from_clips`), so the clip is also the
              reference shown beside the result and, in --mode=eval, the
              real video;
  a file      .mp4/.gif/.webm/.avi (one video) or .npz (videos
              [N, T, H, W, C] under 'videos', 'video' or the first array,
              uint8 or float in [-1, 1] / [0, 1]: another run's samples.npz),
              or an image file (.png/.jpg/...: a one-frame video, the
              input of 'image_to_video');
  keyframes   task 'inbetween': config.sample.keyframes = 'first.png,
              last.png', two images of one size (a single pair).
Frames are resized (short side, antialiased bilinear) and centre-cropped to
the target size. All checks raise ValueError / FileNotFoundError before any
compilation.
"""

import dataclasses
import os
from typing import Optional

import ml_collections
import numpy as np

from vdm_jax import denoiser
from vdm_jax import tasks
from vdm_jax import video_io
from vdm_jax.data import pipeline
from vdm_jax.data import sources

# Clips read from a source per pipeline call.
_CHUNK = 64


@dataclasses.dataclass
class TaskInputs:
  """What one task run conditions on.

  Attributes:
    video: uint8 [N, T_in, h, w, C] task input (None: no input).
    labels: int32 [N] dataset labels of the clips (None: not from a
      labelled dataset).
    reference: uint8 [N, T_out, H, W, C] ground truth on the output timeline
      (dataset inputs only; None for files).
    captions: the N clips' captions (dataset inputs of text models).
  """

  video: Optional[np.ndarray]
  labels: Optional[np.ndarray] = None
  reference: Optional[np.ndarray] = None
  captions: Optional[list[str]] = None


def read_input(path: str) -> np.ndarray:
  """The videos of sample.input as uint8 [N, T, H, W, C].

  Raises:
    FileNotFoundError: no such file.
    ValueError: unsupported or undecodable file.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'sample.input={path}: no such file.')
  if path.lower().endswith(video_io.IMAGE_EXTENSIONS):
    try:
      return video_io.read_image(path)[None, None]
    except ValueError as e:
      raise ValueError(f'sample.input={path}: {e}') from e
  if path.lower().endswith('.npz'):
    try:
      return video_io.read_npz_videos(path)
    except ValueError as e:
      raise ValueError(f'sample.input={path}: {e}') from e
  try:
    return video_io.read_video(path)[None]
  except ValueError as e:
    raise ValueError(f'sample.input={path}: {e}') from e


def read_keyframes(spec: str) -> np.ndarray:
  """sample.keyframes 'first.png,last.png' as uint8 [1, 2, H, W, C].

  Raises:
    ValueError: not two files, or images of different sizes (a keyframe
      pair is two frames of one video: resize them alike yourself).
    FileNotFoundError: a file is missing.
  """
  paths = [p.strip() for p in spec.split(',') if p.strip()]
  if len(paths) != 2:
    raise ValueError(f'sample.keyframes={spec!r}: give two image files,'
                     " 'first.png,last.png'.")
  images = []
  for path in paths:
    try:
      images.append(video_io.read_image(path))
    except (ValueError, FileNotFoundError) as e:
      raise type(e)(f'sample.keyframes: {e}') from e
  if images[0].shape != images[1].shape:
    raise ValueError(
        f'sample.keyframes: {paths[0]} is {images[0].shape[1]}x'
        f'{images[0].shape[0]} but {paths[1]} is {images[1].shape[1]}x'
        f'{images[1].shape[0]}; the two keyframes must have one size (two'
        ' frames of one video).')
  return np.stack(images)[None]


def dataset_clips(
    config: ml_collections.ConfigDict,
    num: int,
    num_frames: int,
    *,
    seed: int,
    frame_stride: Optional[int] = None,
    split: str = '',
    random_start: bool = True,
    with_captions: bool = False,
) -> tuple[np.ndarray, ...]:
  """`num` clips of config.data, the same on every process.

  Clip j is the pipeline's position j: distinct examples while num does not
  exceed the dataset size (an epoch is a permutation seeded by `seed`).

  Args:
    config: the full config (data, seed).
    num: N, clips wanted.
    num_frames: frames per clip.
    seed: pipeline seed (choice of examples, clip starts).
    frame_stride: source frames between clip frames; None: data's.
    split: TFDS split; '': data.split.
    random_start: random clip starts; False: each clip is the first
      num_frames frames of its video (e.g. the BAIR FVD protocol).
    with_captions: also return the N captions (str [N]).

  Returns:
    uint8 [N, num_frames, S, S, C] clips and int32 [N] labels (and the
    captions).
  """
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.num_frames = num_frames
  data.frame_stride = frame_stride or config.data.frame_stride
  data.image_frames = 0
  if split:
    data.split = split
  source = sources.get_source(data, seed=config.seed)
  chunk = min(num, _CHUNK)
  pipe = pipeline.Pipeline(
      source, global_batch_size=chunk, num_frames=num_frames, seed=seed,
      frame_stride=data.frame_stride, random_start=random_start,
      random_flip=False, random_crop=False)
  batches = [pipe.batch_for_step(i, captions=with_captions)
             for i in range(-(-num // chunk))]
  videos = np.concatenate([b['video'] for b in batches])[:num]
  labels = np.concatenate([b['label'] for b in batches])[:num]
  if with_captions:
    return videos, labels, np.concatenate([b['caption'] for b in batches])[
        :num]
  return videos, labels


def from_dataset(config: ml_collections.ConfigDict, task: tasks.Task,
                 model: tasks.ModelShape, num: int, *, seed: int,
                 split: str = '', random_start: bool = True) -> TaskInputs:
  """Ground-truth clips on the task's output timeline, and their input."""
  num_out = task.num_output_frames(model, task.num_input_frames(model))
  text = denoiser.has_text(config)
  out = dataset_clips(config, num, num_out, seed=seed, split=split,
                      random_start=random_start, with_captions=text)
  clips, labels = out[:2]
  return TaskInputs(task.input_from_clips(model, clips), labels, clips,
                    [str(c) for c in out[2]] if text else None)


def load(config: ml_collections.ConfigDict, task: tasks.Task,
         model: tasks.ModelShape, num: int, *, seed: int, split: str = '',
         random_start: bool = True) -> TaskInputs:
  """Inputs of `task` for `num` videos (cycled to num).

  Args:
    config: the full config (sample.input, data).
    task: the task.
    model: the model's block shape.
    num: videos to generate.
    seed: pipeline seed of dataset inputs.
    split: TFDS split of dataset inputs ('': data.split).
    random_start: random clip starts in dataset videos (False: first
      frames).

  Returns:
    TaskInputs with N = num (inputs cycled when a file holds fewer).
  """
  if not task.needs_video:
    return TaskInputs(None)
  keyframes = config.sample.get('keyframes', '')
  if keyframes:
    if not isinstance(task, tasks.Inbetween):
      raise ValueError(f'sample.keyframes is the input of task'
                       f" 'inbetween', not of {task.name!r}.")
    if config.sample.input:
      raise ValueError('Give sample.keyframes or sample.input, not both.')
    video = task.input_from_file(model, read_keyframes(keyframes))
    return TaskInputs(video[np.arange(num) % len(video)])
  if not config.sample.input:
    return from_dataset(config, task, model, num, seed=seed, split=split,
                        random_start=random_start)
  video = task.input_from_file(model, read_input(config.sample.input))
  return TaskInputs(video[np.arange(num) % len(video)])
