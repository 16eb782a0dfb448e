"""Tune-A-Video on Stable Diffusion: the source clip, the checks, the model.

Shared by `--mode=tune` (adapt/tune_sd.py) and `--mode=sample` with
sample.task='edit' (adapt/edit_sd.py); imports no optimizer. A tuned
workdir holds orbax checkpoints of the tuned parameters only (the query
projections and temporal attentions, or the LoRA factors), `tune.json`
(the SD folder, the source video's SHA-256 and frames, the caption, what
was tuned, the seed of the temporal attentions' initialisation) and
`tune_source.npz` (the uint8 frames tuned on). Everything else is read from
config.pretrained.path again.

Frames as their dataset takes them (showlab/Tune-A-Video,
tuneavideo/data/dataset.py): tune.num_frames frames tune.frame_stride
apart from tune.start_frame, resized (no crop) to tune.height x tune.width
(0: the video's own size), which must be multiples of the autoencoder's
factor (rounded with a warning otherwise).
"""

import hashlib
import json
import logging
import os
from typing import Any, Optional, Sequence

import jax
import ml_collections
import numpy as np
import PIL.Image

from vdm_jax import checkpoint
from vdm_jax import fileio
from vdm_jax import video_io
from vdm_jax.adapt import inflate_sd
from vdm_jax.adapt import lora
from vdm_jax.models import sd_unet
from vdm_jax.pretrained import clip_tokenizer
from vdm_jax.pretrained import formats
from vdm_jax.pretrained import stable_diffusion

RECORD = 'tune.json'
SOURCE = 'tune_source.npz'
# The record's fields that make a tune a different one.
SAME_SOURCE = ('pretrained_path', 'video_sha256', 'caption', 'num_frames',
               'frame_stride', 'start_frame', 'height', 'width', 'trainable',
               'lora_rank', 'lora_alpha', 'frame_norm', 'seed')


def vae_factor(path: str) -> int:
  """The autoencoder's downsampling factor, from vae/config.json."""
  config = formats.model_config(os.path.join(path, 'vae'))
  return 2 ** (len(config.get('block_out_channels', (0,))) - 1)


def frame_size(config: ml_collections.ConfigDict, video_hw: tuple[int, int],
               factor: int) -> tuple[int, int]:
  """(height, width) to tune at: tune.height / tune.width, or the video's
  own size where 0, rounded to multiples of `factor` with a warning."""
  t = config.tune
  size = (int(t.height) or video_hw[0], int(t.width) or video_hw[1])
  fixed = tuple(max(factor, int(round(s / factor)) * factor) for s in size)
  if fixed != size:
    logging.warning('Frame size %dx%d is not a multiple of the '
                    "autoencoder's factor %d: resizing to %dx%d.", *size,
                    factor, *fixed)
  return fixed


def source_frames(config: ml_collections.ConfigDict, factor: int
                  ) -> np.ndarray:
  """uint8 [F, H, W, 3]: the frames tuned on (module docstring).

  Raises:
    FileNotFoundError / ValueError: no such file, undecodable, or too short
      for the frames asked for.
  """
  t = config.tune
  if not t.video:
    raise ValueError('tune.video is empty: give the video to tune on.')
  if not os.path.isfile(t.video):
    raise FileNotFoundError(f'tune.video={t.video}: no such file.')
  if t.num_frames < 1 or t.frame_stride < 1 or t.start_frame < 0:
    raise ValueError('tune.num_frames and tune.frame_stride must be >= 1, '
                     'tune.start_frame >= 0.')
  need = t.start_frame + (t.num_frames - 1) * t.frame_stride + 1
  video = video_io.read_video(t.video, max_frames=need)
  if len(video) < need:
    raise ValueError(
        f'tune.video={t.video} has {len(video)} frames; tune.num_frames='
        f'{t.num_frames} with tune.frame_stride={t.frame_stride} from '
        f'tune.start_frame={t.start_frame} needs {need}. Lower '
        'tune.frame_stride or tune.num_frames.')
  frames = video[t.start_frame:need:t.frame_stride]
  return resize(frames, *frame_size(config, frames.shape[1:3], factor))


def resize(frames: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 [F, H, W, 3] -> [F, height, width, 3] (bicubic, no crop)."""
  if (height, width) == frames.shape[1:3]:
    return frames
  return np.stack([np.asarray(PIL.Image.fromarray(f).resize(
      (width, height), PIL.Image.BICUBIC)) for f in frames])


def check_prompts(path: str, prompts: Sequence[str]) -> None:
  """Tokenizes prompts once: a prompt over CLIP's limit is warned about
  (and truncated, as the pipeline does) before anything compiles."""
  clip_tokenizer.load(path)(list(prompts))


def check_base(config: ml_collections.ConfigDict) -> dict[str, str]:
  """The SD folder's classes, checked (a clear error if it is not one)."""
  p, t = config.pretrained, config.tune
  if not p.path:
    raise ValueError(
        'config.pretrained.path is empty: set it to a local Stable Diffusion '
        'folder (diffusers layout), the base Tune-A-Video inflates.')
  classes = stable_diffusion.check_folder(p.path)
  inflate_sd.check_trainable(t.trainable)
  if t.frame_norm not in sd_unet.FRAME_NORMS:
    raise ValueError(f'tune.frame_norm={t.frame_norm!r}; choose one of '
                     f'{sd_unet.FRAME_NORMS}.')
  if t.remat not in sd_unet.REMAT:
    raise ValueError(f'tune.remat={t.remat!r}; choose one of '
                     f'{sd_unet.REMAT}.')
  if t.trainable == 'lora' and t.lora_rank < 1:
    raise ValueError(f'tune.lora_rank={t.lora_rank} must be >= 1.')
  return classes


def lora_scale(t: ml_collections.ConfigDict) -> float:
  """alpha / r, alpha = r when tune.lora_alpha is 0 (scale 1)."""
  return float(t.lora_alpha or t.lora_rank) / float(t.lora_rank)


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def make_record(config: ml_collections.ConfigDict,
                frames: np.ndarray) -> dict:
  t = config.tune
  return {'pretrained_path': os.path.abspath(config.pretrained.path),
          'video': os.path.abspath(t.video),
          'video_sha256': file_sha256(t.video), 'caption': t.caption,
          'num_frames': int(t.num_frames),
          'frame_stride': int(t.frame_stride),
          'start_frame': int(t.start_frame), 'height': int(frames.shape[1]),
          'width': int(frames.shape[2]), 'trainable': t.trainable,
          'lora_rank': int(t.lora_rank), 'lora_alpha': float(t.lora_alpha),
          'frame_norm': t.frame_norm, 'seed': int(config.seed)}


def read_record(workdir: str) -> dict:
  path = os.path.join(workdir, RECORD)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{workdir} holds no Tune-A-Video tune ({RECORD} missing); run '
        '--mode=tune on it first.')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def check_same_source(workdir: str, record: dict) -> None:
  """Raises ValueError if workdir already holds a tune of another source."""
  if not os.path.isfile(os.path.join(workdir, RECORD)):
    return
  saved = read_record(workdir)
  diffs = [f'{k}: saved {saved.get(k)!r}, requested {record[k]!r}'
           for k in SAME_SOURCE if saved.get(k) != record[k]]
  if diffs:
    raise ValueError(f'{workdir} already holds a different tune:\n  '
                     + '\n  '.join(diffs) + '\nUse a new --workdir.')


def write_record(workdir: str, record: dict, frames: np.ndarray) -> None:
  fileio.write_json(os.path.join(workdir, RECORD), record)
  video_io.save_npz(os.path.join(workdir, SOURCE), frames[None])


def inflated(sd: stable_diffusion.StableDiffusion, record: dict,
             remat: str = 'none') -> tuple[sd_unet.UNet2DConditionModel,
                                           dict]:
  """(inflated module, its parameters at step 0) from a loaded SD.

  The temporal attentions are initialised from record['seed'], so a LoRA
  tune (which trains none of them) finds the same ones again at edit time.
  """
  module = inflate_sd.inflate_module(sd.unet, record['frame_norm'], remat)
  rng = jax.random.fold_in(jax.random.key(record['seed']), 44)
  return module, inflate_sd.inflate_params(sd.unet_params, module, rng)


def split_tuned(params: Any, record: dict) -> tuple[Any, Any]:
  """(trained tree at step 0, frozen tree) of the inflated parameters:
  LoRA factors and every base parameter, or `inflate_sd.split`'s halves."""
  if record['trainable'] == 'lora':
    rng = jax.random.fold_in(jax.random.key(record['seed']), 45)
    return lora.init(params, rng, int(record['lora_rank'])), params
  return inflate_sd.split(params, record['trainable'])


def full_params(trained: Any, frozen: Any, trainable: str,
                scale: float = 1.0) -> Any:
  """The inflated UNet's parameters from `split_tuned`'s halves (LoRA:
  merged with alpha / r = `scale`)."""
  if trainable == 'lora':
    return lora.apply(frozen, trained, scale)
  return inflate_sd.merge(trained, frozen)


def restore(sd: stable_diffusion.StableDiffusion, workdir: str,
            mesh: Optional[jax.sharding.Mesh] = None
            ) -> tuple[sd_unet.UNet2DConditionModel, Any, int, dict]:
  """(inflated module, tuned parameters, step, record) of a workdir."""
  record = read_record(workdir)
  module, params = inflated(sd, record)
  trained, frozen = split_tuned(params, record)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          trained)
  repl = (None if mesh is None else jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec()))
  trained, step = checkpoint.restore_ema_params(workdir, abstract,
                                                sharding=repl)
  scale = lora_scale(ml_collections.ConfigDict(
      {'lora_rank': record['lora_rank'], 'lora_alpha': record['lora_alpha']}))
  return (module, full_params(trained, frozen, record['trainable'], scale),
          step, record)
