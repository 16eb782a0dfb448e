"""Dataset sources by name: random-access collections of videos.

A source has `__len__` and `__getitem__(i) -> {'video': uint8[T, H, W, C],
'label': int}`; `data.pipeline.Pipeline` turns it into sharded batches.

`config.data.name`:
  - 'synthetic': built-in bouncing shapes (data/synthetic.py), no download;
  - 'ucf101', 'bair_robot_pushing_small', 'moving_mnist': TFDS presets, and
    'tfds': any TFDS video dataset (`config.data.tfds_name`, `video_key`,
    `label_key`); see data/tfds_sources.py and docs/data.md;
  - 'video_files': a video file or a folder of them (`config.data.path`),
    labels from sub-folder names; see data/video_files.py;
  - 'kinetics600': Kinetics-600 (Carreira et al. 2018) as video files, which
    TFDS does not serve: `config.data.path` is the folder holding one
    sub-folder per split (`train/`, `val/`, `test/`), each laid out
    `<split>/<class>/<clip>.mp4`; `config.data.split` picks the sub-folder
    (see `kinetics_split_folder` and docs/data.md).
"""

import json
import os
from typing import Any, Optional

from etils import epath
import ml_collections

from vdm_jax import fileio
from vdm_jax.data import pipeline
from vdm_jax.data import synthetic

TFDS_PRESETS = ('ucf101', 'bair_robot_pushing_small', 'moving_mnist')
KINETICS600 = 'kinetics600'
SOURCES = ('synthetic', *TFDS_PRESETS, 'tfds', 'video_files', KINETICS600)
CROPS = ('center', 'random')
LABELS_FILE = 'labels.json'


def num_source_frames(data_config: ml_collections.ConfigDict) -> int:
  """Frames a source must provide per video for one clip."""
  return (data_config.num_frames - 1) * data_config.frame_stride + 1


def num_workers(data_config: ml_collections.ConfigDict) -> int:
  """Decoding worker processes `config.data.num_workers` asks for.

  -1 (the default) picks: none for the synthetic source, whose batched
  rendering in the main process is faster than shipping batches from
  other processes, and none on hosts of 2 cores or fewer; else
  `pipeline.default_num_workers()` (the host's cores less one).
  """
  wanted = data_config.get('num_workers', -1)
  if wanted < -1:
    raise ValueError(
        f'config.data.num_workers={wanted}; use -1 (auto), 0 (decode in the '
        'training process) or a number of worker processes.')
  if wanted >= 0:
    return wanted
  if data_config.name == 'synthetic':
    return 0
  if (os.cpu_count() or 1) <= 2:
    # Measured (docs/data.md, Throughput): on 2 shared cores, workers made
    # TFDS and mp4 batches no faster than the training process (0.8-1.1x)
    # and each batch shipped from a worker costs CPU.
    return 0
  return pipeline.default_num_workers()


def pipeline_options(data_config: ml_collections.ConfigDict
                     ) -> dict[str, Any]:
  """Pipeline keyword arguments set by `config.data`.

  Returns:
    {'random_flip': bool, 'random_crop': bool, 'num_workers': int} for
    `pipeline.Pipeline`.
  """
  crop = data_config.crop
  if crop not in CROPS:
    raise ValueError(f'config.data.crop={crop!r}; choose one of {CROPS}.')
  return {
      'random_flip': bool(data_config.random_flip),
      'random_crop': crop == 'random' and data_config.name != 'synthetic',
      'num_workers': num_workers(data_config),
  }


def get_source(data_config: ml_collections.ConfigDict, seed: int) -> Any:
  """Builds the source named by `data_config.name`.

  Args:
    data_config: `config.data`.
    seed: the dataset seed (synthetic data is generated from it).

  Returns:
    A random-access source.

  Raises:
    ValueError: unknown name, or a source that cannot be built (the message
      says what to do).
  """
  name = data_config.name
  if name == 'synthetic':
    num_classes = data_config.num_classes
    return synthetic.SyntheticVideos(
        num_frames=num_source_frames(data_config),
        image_size=data_config.image_size,
        channels=data_config.channels,
        num_examples=data_config.num_examples,
        num_objects=data_config.num_objects,
        num_classes=num_classes if num_classes > 0 else 3,
        seed=seed,
        motion=data_config.motion,
        caption_holdout=data_config.caption_holdout,
    )
  pipeline_options(data_config)  # Checks data.crop early.
  if name in TFDS_PRESETS or name == 'tfds':
    # TFDS (and TF) load only when a TFDS source is asked for.
    from vdm_jax.data import tfds_sources  # pylint: disable=g-import-not-at-top
    source = tfds_sources.from_config(data_config)
  elif name in ('video_files', KINETICS600):
    from vdm_jax.data import video_files  # pylint: disable=g-import-not-at-top
    if name == KINETICS600:
      path = kinetics_split_folder(data_config)
    elif not data_config.path:
      raise ValueError(
          "data.name='video_files' needs config.data.path (a video file or "
          'a folder of videos).')
    else:
      path = data_config.path
    source = video_files.VideoFiles(
        path, image_size=data_config.image_size,
        channels=data_config.channels,
        min_frames=num_source_frames(data_config),
        cache_size=data_config.cache_size,
        captions=data_config.captions,
        allow_empty_captions=data_config.allow_empty_captions)
  else:
    raise ValueError(
        f'Unknown data.name {name!r}; available sources: {SOURCES}.'
    )
  _check_num_classes(data_config, source)
  return source


def kinetics_split_folder(data_config: ml_collections.ConfigDict) -> str:
  """The folder of Kinetics-600 videos of `data_config.split`.

  TFDS 4.9 registers no Kinetics dataset, so Kinetics-600 is read from the
  video files of the official release (CVDF's `kinetics-dataset` downloads,
  arranged by class with the annotation CSVs):
  `data.path/<split>/<class>/<clip>.mp4`, split 'train', 'val' or 'test'.
  A split folder without class folders is read unlabelled, which the
  unconditional VDM model does not mind.

  Args:
    data_config: `config.data` with path and split.

  Returns:
    `data.path/<split>`.

  Raises:
    ValueError: no data.path, a split expression, or a missing split folder
      (the message lists the folders found).
  """
  path, split = data_config.path, data_config.split
  layout = ('the folder holding the Kinetics-600 split folders train/, '
            'val/, test/, each laid out <split>/<class>/<clip>.mp4 '
            '(docs/data.md)')
  if not path:
    raise ValueError(
        "data.name='kinetics600' reads video files (TFDS has no Kinetics); "
        f'set config.data.path to {layout}.')
  if not split or any(c in split for c in '+[]:/'):
    raise ValueError(
        f"data.name='kinetics600' takes one split folder name as "
        f"config.data.split ('train', 'val' or 'test'), got {split!r}.")
  folder = os.path.join(path, split)
  if not os.path.isdir(folder):
    found = sorted(f for f in os.listdir(path)
                   if os.path.isdir(os.path.join(path, f))
                   ) if os.path.isdir(path) else []
    raise ValueError(
        f'config.data.split={split!r}: no folder {folder!r}; '
        f'config.data.path must be {layout}. Sub-folders found: {found}.')
  return folder


def _check_num_classes(data_config: ml_collections.ConfigDict,
                       source: Any) -> None:
  names = getattr(source, 'label_names', None)
  wanted = data_config.num_classes
  if wanted > 0 and names is None:
    raise ValueError(
        f'config.data.num_classes={wanted} but data.name='
        f'{data_config.name!r} gives no labels; set num_classes=0.')
  if wanted > 0 and wanted != len(names):
    raise ValueError(
        f'config.data.num_classes={wanted} but the source has {len(names)} '
        f'classes ({", ".join(names[:5])}, ...); set num_classes='
        f'{len(names)} (and model.num_classes) or 0 for unconditional.')


def save_label_names(source: Any, workdir: str) -> Optional[str]:
  """Writes the source's class names to `workdir/labels.json`.

  Call on process 0 after building the source; sampling maps class indices
  back to names with it. `labels.json` holds a JSON list, index = label.

  Args:
    source: a source; sources without `label_names` write nothing.
    workdir: the run's directory (local or gs://).

  Returns:
    The path written, or None.
  """
  names = getattr(source, 'label_names', None)
  if not names:
    return None
  path = epath.Path(workdir) / LABELS_FILE
  fileio.write_json(path, list(names), indent=1)
  return str(path)


def load_label_names(workdir: str) -> Optional[list[str]]:
  """The class names saved by `save_label_names`, or None."""
  path = epath.Path(workdir) / LABELS_FILE
  if not path.exists():
    return None
  return json.loads(path.read_text())
