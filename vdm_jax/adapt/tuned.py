"""A one-shot tuned workdir: its record, its source clip, its parameters.

`--mode=tune` (adapt/tune.py) writes, besides the orbax checkpoints of the
tuned parameters only:
  workdir/tune.json         the base workdir and step the frozen parameters
                            come from, the source video (path, SHA-256,
                            frames taken), the caption and which
                            parameters were tuned;
  workdir/tune_source.npz   the uint8 frames tuned on, at the model's size
                            (the default input of sample.task='edit').
This module reads them back for sampling (it imports no optimizer):
`restore` gives the whole inflated parameter tree, the base's frozen
parameters merged with the tuned ones.
"""

import hashlib
import json
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np

from vdm_jax import checkpoint
from vdm_jax import denoiser
from vdm_jax import fileio
from vdm_jax import sharding
from vdm_jax import tasks
from vdm_jax import video_io
from vdm_jax.adapt import inflate

RECORD = 'tune.json'
SOURCE = 'tune_source.npz'
# Model fields the image (base) model must share with the inflated one.
BASE_FIELDS = tuple(f for f in checkpoint.COMPATIBILITY_FIELDS
                    if f[0] != 'model' or f[1] not in inflate.INFLATED_FIELDS)


def is_tuned_workdir(workdir: str) -> bool:
  return os.path.isfile(os.path.join(workdir, RECORD))


def read_record(workdir: str) -> dict:
  path = os.path.join(workdir, RECORD)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{workdir} holds no one-shot tuned model ({RECORD} missing); run'
        ' --mode=tune on it first.')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def base_config(base_workdir: str) -> ml_collections.ConfigDict:
  """The saved config of the base (text-to-image) workdir."""
  saved = checkpoint.load_config(base_workdir)
  if saved is None:
    raise FileNotFoundError(
        f'tune.base_workdir={base_workdir} has no {checkpoint.CONFIG_FILE}:'
        ' train the text-to-image model there first (configs/t2i_quickstart.py).')
  return ml_collections.ConfigDict(saved)


def check_base(config: ml_collections.ConfigDict, base_workdir: str) -> None:
  """Raises ValueError unless base_workdir holds config's image model.

  The base must be an image model (model.temporal_attention=False, full
  spatial attention) whose other model fields equal the inflated
  config's; the differing fields are named.
  """
  base = base_config(base_workdir)
  if base.model.get('temporal_attention', True):
    raise ValueError(
        f'tune.base_workdir={base_workdir} holds a video model'
        ' (model.temporal_attention=True); Tune-A-Video inflates a'
        ' text-to-image model: train one with configs/t2i_quickstart.py.')
  if base.model.get('spatial_attention', 'self') != 'self':
    raise ValueError(f'tune.base_workdir={base_workdir} is already inflated.')
  for field, value in inflate.INFLATED_FIELDS.items():
    if config.model.get(field) != value:
      raise ValueError(
          f'A tune config needs model.{field}={value!r} (the inflated'
          f' model), got {config.model.get(field)!r}.')
  try:
    checkpoint.check_compatible(config, base_workdir, fields=BASE_FIELDS)
  except ValueError as e:
    raise ValueError(
        f'The base model in {base_workdir} is not the image model of this'
        f' tune config:\n{e}') from e


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def source_clip(config: ml_collections.ConfigDict) -> np.ndarray:
  """uint8 [T, S, S, C]: tune.num_frames frames of tune.video.

  Frames start at tune.start_frame, tune.frame_stride apart, resized on
  the short side and centre-cropped to data.image_size.

  Raises:
    FileNotFoundError / ValueError: no such file, undecodable, or too
      short for the frames asked for.
  """
  t = config.tune
  if not t.video:
    raise ValueError('tune.video is empty: give the video to tune on.')
  if not os.path.isfile(t.video):
    raise FileNotFoundError(f'tune.video={t.video}: no such file.')
  if t.num_frames < 1 or t.frame_stride < 1 or t.start_frame < 0:
    raise ValueError('tune.num_frames and tune.frame_stride must be >= 1,'
                     ' tune.start_frame >= 0.')
  if t.num_frames != config.data.num_frames:
    raise ValueError(
        f'tune.num_frames={t.num_frames} but data.num_frames='
        f'{config.data.num_frames}: the inflated model runs on the tuned'
        ' clip length; set both alike.')
  need = t.start_frame + (t.num_frames - 1) * t.frame_stride + 1
  video = video_io.read_video(t.video, max_frames=need)
  if len(video) < need:
    raise ValueError(
        f'tune.video={t.video} has {len(video)} frames; tune.num_frames='
        f'{t.num_frames} with tune.frame_stride={t.frame_stride} from'
        f' tune.start_frame={t.start_frame} needs {need}. Lower'
        ' tune.frame_stride or tune.num_frames (and data.num_frames).')
  frames = video[t.start_frame:need:t.frame_stride]
  d = config.data
  return tasks.fit(frames[None], d.image_size, d.channels)[0]


def make_record(config: ml_collections.ConfigDict, base_step: int) -> dict:
  t = config.tune
  return {
      'base_workdir': os.path.abspath(t.base_workdir),
      'base_step': int(base_step),
      'video': os.path.abspath(t.video),
      'video_sha256': file_sha256(t.video),
      'caption': t.caption,
      'num_frames': int(t.num_frames),
      'frame_stride': int(t.frame_stride),
      'start_frame': int(t.start_frame),
      'trainable': t.trainable,
  }


# The fields that make a tune a different one (the rest may change).
_SAME_SOURCE = ('video_sha256', 'caption', 'num_frames', 'frame_stride',
                'start_frame', 'trainable', 'base_workdir', 'base_step')


def check_same_source(workdir: str, record: dict) -> None:
  """Raises ValueError if workdir already holds a tune of another source."""
  if not is_tuned_workdir(workdir):
    return
  saved = read_record(workdir)
  diffs = [f'{k}: saved {saved.get(k)!r}, requested {record[k]!r}'
           for k in _SAME_SOURCE if saved.get(k) != record[k]]
  if diffs:
    raise ValueError(
        f'{workdir} already holds a tune of a different source:\n  '
        + '\n  '.join(diffs) + '\nUse a new --workdir.')


def write_record(workdir: str, record: dict, clip: np.ndarray) -> None:
  fileio.write_json(os.path.join(workdir, RECORD), record)
  video_io.save_npz(os.path.join(workdir, SOURCE), clip[None])


def inflated_params(config: ml_collections.ConfigDict, record: dict,
                    mesh=None, rng: Optional[jax.Array] = None
                    ) -> tuple[Any, Any]:
  """(video model, inflated parameters) from the base of `record`.

  The base's EMA parameters at record['base_step'] fill every parameter
  but the temporal attentions, which are a fresh initialisation from `rng`
  (zero output projections), or abstract (shapes only) when rng is None:
  a tuned checkpoint supplies them. Arrays are replicated on mesh.
  """
  base = base_config(record['base_workdir'])
  image_model = denoiser.create_model(base)
  model = denoiser.create_model(config)
  repl = sharding.replicated(mesh) if mesh is not None else None
  image_params, _ = checkpoint.restore_ema_params(
      record['base_workdir'], denoiser.abstract_params(base, image_model),
      record['base_step'], sharding=repl)
  if rng is None:
    template = denoiser.abstract_params(config, model)
  else:
    template = jax.jit(lambda r: denoiser.init_params(config, model, r),
                       out_shardings=repl)(rng)
  return model, inflate.inflate_params(image_params, template)


def restore(config: ml_collections.ConfigDict, workdir: str, mesh=None
            ) -> tuple[Any, Any, int]:
  """(video model, whole EMA params, step) of a tuned workdir."""
  record = read_record(workdir)
  check_base(config, record['base_workdir'])
  model, inflated = inflated_params(config, record, mesh)
  abstract_tuned, frozen = inflate.split(inflated, record['trainable'])
  tuned, step = checkpoint.restore_ema_params(
      workdir, abstract_tuned,
      sharding=sharding.replicated(mesh) if mesh is not None else None)
  return model, inflate.merge(tuned, frozen), step


def edit_prompts(config: ml_collections.ConfigDict) -> list[str]:
  """The edit prompts of sample.task='edit' (sample.prompts_file or
  sample.prompt), each a non-empty text."""
  from vdm_jax.text import encoders  # pylint: disable=g-import-not-at-top
  s = config.sample
  prompts = (encoders.read_prompts(s.prompts_file) if s.prompts_file
             else [s.prompt] if s.prompt else [])
  if not prompts:
    raise ValueError(
        "sample.task='edit' needs the edited caption: sample.prompt (or a"
        ' sample.prompts_file of several).')
  return prompts


def edit_config(config: ml_collections.ConfigDict, workdir: str,
                ) -> ml_collections.ConfigDict:
  """config for sample.task='edit' on a tuned workdir.

  The input is the tuned source clip unless sample.input names another
  video; one video per edit prompt plus a first one with the empty prompt
  (the inversion's reconstruction).

  Raises:
    ValueError: a model without text, or no edit prompt.
  """
  if not denoiser.has_text(config):
    raise ValueError(
        "sample.task='edit' edits by a changed prompt, but this model has no"
        " text conditioning (text.encoder='none').")
  prompts = edit_prompts(config)
  out = ml_collections.ConfigDict(config.to_dict())
  if not out.sample.input:
    read_record(workdir)  # A clear error if the workdir was never tuned.
    out.sample.input = os.path.join(workdir, SOURCE)
  out.sample.num_videos = 1 + len(prompts)
  out.sample.batch_size = max(out.sample.batch_size, 1 + len(prompts))
  return out
