"""Random-access video sources over tensorflow-datasets (TFDS).

`TfdsVideos` reads a prepared TFDS dataset through `tfds.data_source`
(ArrayRecord files: random access by example index, no TF input pipeline).
Examples are read as raw bytes and parsed here, so that only the frames a
clip needs are decoded (TFDS would decode every frame of a 200-frame UCF101
video for one 16-frame clip); JPEG frames are decoded at a reduced DCT
scale. Frames are resized (short side, antialiased) and cropped to
`image_size` squared like every other source (`video_files.crop`).

Datasets (presets in DATASETS; `config.data.name`):
  - 'ucf101': 13,320 videos, 101 classes (labels 0..100, `label_names`).
    TFDS splits 'train' (9,537) and 'test' (3,783) of the official split 1;
    VDM trained on all videos: `config.data.split = 'train+test'`. The TFDS
    default config `ucf101_1_256` stores frames squashed to 256x256 (aspect
    not kept); `config.data.tfds_name = 'ucf101/ucf101_1'` keeps 320x240.
  - 'bair_robot_pushing_small': 30-frame 64x64 sequences (train 43,264,
    test 256), no labels. Two cameras: `config.data.view` is 'image_main'
    or 'image_aux1'. FVDs computed on one view are NOT comparable with FVDs
    on the other (MAGVIT App. C: VDM's BAIR FVD used the main view, most
    video-prediction work the aux1 view). The pipeline cuts a 16-frame clip
    (random start, or frames 0-15 with `random_start=False`) out of each
    30-frame sequence.
  - 'moving_mnist': 20-frame 64x64 grey sequences. TFDS ships only the
    10,000 sequences of the authors' 'test' split; there is no 'train'.
  - 'tfds': any TFDS dataset whose video is a sequence of encoded images
    (`tfds.features.Video` or `Sequence(Image)`), named by
    `config.data.tfds_name` with the feature keys `config.data.video_key`
    and `config.data.label_key` ('' = unlabelled).
"""

import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

from vdm_jax.data import video_files


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """Where a dataset keeps its video and label, and its usable splits."""
  tfds_name: str
  video_key: str
  label_key: str = ''
  splits: Optional[tuple[str, ...]] = None  # None: whatever TFDS has.
  note: str = ''


DATASETS = {
    'ucf101': DatasetSpec('ucf101', 'video', 'label'),
    'bair_robot_pushing_small': DatasetSpec(
        'bair_robot_pushing_small', 'image_main'),
    'moving_mnist': DatasetSpec(
        'moving_mnist', 'image_sequence', splits=('test',),
        note=('TFDS moving_mnist ships only the authors\' 10,000 test '
              'sequences (split \'test\'); there is no \'train\' split. Train '
              'on split=\'test\', or generate training sequences from MNIST '
              'with tfds.video.moving_sequence.image_as_moving_sequence.')),
}
BAIR_VIEWS = ('image_main', 'image_aux1')


def _split_names(split: str) -> list[str]:
  """'train[:10%]+test' -> ['train', 'test']."""
  return [part.split('[')[0].strip() for part in split.split('+')]


def _example_proto():
  # TF is imported only when a TFDS source is built.
  # pylint: disable-next=g-import-not-at-top
  from tensorflow.core.example import example_pb2
  return example_pb2.Example


def _not_ready_message(name: str, data_dir: Optional[str], error: Exception,
                       prepared: bool) -> str:
  where = data_dir or '~/tensorflow_datasets (the TFDS default)'
  flag = f' --data_dir={data_dir}' if data_dir else ''
  if prepared:
    what = ('it is prepared as TFRecord files, which have no random access; '
            'convert them to ArrayRecord (nothing is downloaded) with')
  elif isinstance(error, NotImplementedError):  # TFDS found no files.
    what = 'it is not prepared there; download and prepare it with'
  else:
    what = (f'{type(error).__name__}: {str(error).splitlines()[0]}; '
            'download and prepare it with')
  return (f'Cannot open TFDS dataset {name!r} in {where}: {what}\n'
          f'  python -m vdm_jax.data.prepare {name}{flag}')


class TfdsVideos:
  """A TFDS video dataset as a random-access source (see module docstring).

  `source[i]` is `{'video': uint8[T, S, S, C], 'label': int}` (all frames,
  centre crop); `read_frames(i, select, crop)` decodes only the frames
  `select(T)` picks.
  """

  def __init__(self, tfds_name: str, *, split: str, video_key: str,
               label_key: str = '', image_size: int, channels: int = 3,
               data_dir: Optional[str] = None, caption_key: str = ''):
    """Opens the prepared dataset (nothing is downloaded).

    Args:
      tfds_name: TFDS name, optionally 'name/config:version'.
      split: TFDS split expression, e.g. 'train', 'test', 'train+test'.
      video_key: feature holding the frames (encoded images), '/'-joined
        for nested features.
      label_key: integer (ClassLabel) feature; '' for unlabelled data.
      image_size: S, the side of the square output frames.
      channels: 1 (luminance) or 3 (RGB).
      data_dir: TFDS data directory (None: the TFDS default).
      caption_key: a Text feature holding each video's caption ('' none);
        items then hold 'caption'.

    Raises:
      ValueError: unknown keys, or the dataset is not prepared for random
        access (with the command that prepares it).
    """
    raw = tfds.decode.DeserializeMethod.RAW_BYTES
    try:
      builder = tfds.builder(tfds_name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
      raise ValueError(
          f'Unknown TFDS dataset {tfds_name!r} (config.data.tfds_name or '
          f'data.name): {str(e).splitlines()[0]}') from e
    try:
      self._data = builder.as_data_source(split=split, deserialize_method=raw)
    except (AssertionError, FileNotFoundError, NotImplementedError,
            ValueError, KeyError) as e:
      prepared = isinstance(e, NotImplementedError) and builder.is_prepared()
      raise ValueError(
          _not_ready_message(tfds_name, data_dir, e, prepared)) from e
    features = builder.info.features
    serialized = _flatten(features.get_serialized_info())
    for what, key in (('video_key', video_key), ('label_key', label_key),
                      ('caption_key', caption_key)):
      if key and key not in serialized:
        raise ValueError(
            f'config.data.{what}={key!r} is not a feature of {tfds_name}; '
            f'features: {sorted(serialized)}.')
    info = serialized[video_key]
    if info.np_dtype != np.object_:  # Encoded images are strings.
      raise ValueError(
          f'Feature {video_key!r} of {tfds_name} is not a sequence of '
          f'encoded images ({info}); only tfds.features.Video and '
          'Sequence(Image) features are supported.')
    self.tfds_name = tfds_name
    self.split = split
    self.video_key = video_key
    self.label_key = label_key
    self.caption_key = caption_key
    self.image_size = image_size
    self.channels = channels
    self.label_names = None
    if label_key:
      label_feature = _get_feature(features, label_key)
      self.label_names = list(getattr(label_feature, 'names', None) or []) \
          or None
    self._example = _example_proto()

  def __len__(self) -> int:
    return len(self._data)

  def describe(self, index: int) -> str:
    """Which record example `index` is (for error messages)."""
    return f'{self.tfds_name} {self.split!r} record {int(index)}'

  def read_frames(self, index: int, select: Callable[[int], np.ndarray],
                  crop: Optional[Sequence[float]] = None) -> dict:
    """Frames `select(T)` of example `index` (see `data.pipeline`).

    Args:
      index: example index in [0, len(self)).
      select: maps the video length T to int [K] frame indices.
      crop: None (centre) or (u_y, u_x) in [0, 1) placing the window.

    Returns:
      {'video': uint8[K, S, S, C], 'label': int}.
    """
    if not 0 <= index < len(self):
      raise IndexError(f'Index {index} out of range for {len(self)} videos.')
    feature = self._example.FromString(self._data[int(index)]).features.feature
    encoded = feature[self.video_key].bytes_list.value
    frames = np.asarray(select(len(encoded)))
    video = np.stack([
        video_files.crop(
            video_files.decode_image(encoded[int(t)], self.image_size,
                                     self.channels), self.image_size, crop)
        for t in frames])
    label = 0
    if self.label_key:
      label = int(feature[self.label_key].int64_list.value[0])
    item = {'video': video, 'label': label}
    if self.caption_key:
      text = feature[self.caption_key].bytes_list.value
      item['caption'] = ' '.join(text[0].decode('utf-8').split()) if text \
          else ''
    return item

  def __getitem__(self, index: int) -> dict:
    """All frames of example `index`: {'video': uint8[T, S, S, C], ...}."""
    return self.read_frames(int(index), np.arange)


def _flatten(tree, prefix: str = '') -> dict:
  """Nested feature-info dicts -> {'a/b': info}."""
  if not isinstance(tree, dict):
    return {prefix: tree}
  flat = {}
  for key, value in tree.items():
    flat.update(_flatten(value, f'{prefix}/{key}' if prefix else key))
  return flat


def _get_feature(features, key: str):
  """The feature object at a '/'-joined key (None if not reachable)."""
  for part in key.split('/'):
    try:
      features = features[part]
    except (KeyError, TypeError):
      return None
  return features


def from_config(data_config) -> TfdsVideos:
  """The TFDS source `config.data` describes (a DATASETS preset or 'tfds').

  Args:
    data_config: `config.data` with name, split, image_size, channels,
      data_dir, tfds_name, video_key, label_key and (BAIR) view.

  Returns:
    A TfdsVideos source.

  Raises:
    ValueError: unknown view, a split the dataset lacks, or the dataset is
      not prepared.
  """
  d = data_config
  name = d.name
  if name == 'tfds':
    if not d.tfds_name:
      raise ValueError(
          "data.name='tfds' needs config.data.tfds_name (a TFDS dataset "
          'name) and config.data.video_key.')
    spec = DatasetSpec(d.tfds_name, d.video_key, d.label_key)
  else:
    spec = DATASETS[name]
    if d.tfds_name:
      spec = dataclasses.replace(spec, tfds_name=d.tfds_name)
  video_key = spec.video_key
  if name == 'bair_robot_pushing_small':
    video_key = d.view
    if video_key not in BAIR_VIEWS:
      raise ValueError(
          f'config.data.view={video_key!r}; choose one of {BAIR_VIEWS} (FVDs '
          'on different views are not comparable).')
  split = d.split
  if spec.splits is not None:
    missing = [s for s in _split_names(split) if s not in spec.splits]
    if missing:
      raise ValueError(
          f'config.data.split={split!r}: {name} has no split {missing[0]!r}. '
          f'{spec.note}')
  return TfdsVideos(
      spec.tfds_name, split=split, video_key=video_key,
      label_key=spec.label_key, image_size=d.image_size,
      channels=d.channels, data_dir=d.data_dir or None,
      caption_key=d.caption_key if name == 'tfds' else '')
