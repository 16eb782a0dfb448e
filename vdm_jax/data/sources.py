"""Dataset sources by name: random-access collections of videos.

A source has `__len__` and `__getitem__(i) -> {'video': uint8[T, H, W, C],
'label': int}`; `data.pipeline.Pipeline` turns it into sharded batches.
"""

from typing import Any

import ml_collections

from vdm_jax.data import synthetic

SOURCES = ('synthetic',)


def num_source_frames(data_config: ml_collections.ConfigDict) -> int:
  """Frames a source must provide per video for one clip."""
  return (data_config.num_frames - 1) * data_config.get('frame_stride', 1) + 1


def get_source(data_config: ml_collections.ConfigDict, seed: int) -> Any:
  """Builds the source named by `data_config.name`.

  Args:
    data_config: `config.data`.
    seed: the dataset seed (synthetic data is generated from it).

  Returns:
    A random-access source.
  """
  name = data_config.name
  if name == 'synthetic':
    num_classes = data_config.num_classes
    return synthetic.SyntheticVideos(
        num_frames=num_source_frames(data_config),
        image_size=data_config.image_size,
        channels=data_config.channels,
        num_examples=data_config.num_examples,
        num_objects=data_config.get('num_objects', 1),
        num_classes=num_classes if num_classes > 0 else 3,
        seed=seed,
    )
  raise ValueError(
      f'Unknown data.name {name!r}; available sources: {SOURCES}.'
  )
