"""TensorBoard event files without TensorFlow.

The training loop's metric writer. clu's default writer goes through
`tf.summary`, and importing TensorFlow costs ~4 s per process and prints its
C++ start-up lines in the user's terminal; a run on the synthetic data or on
video files needs no TensorFlow at all. This writer uses the `tensorboard`
package's own event-file writer and protos (no TensorFlow import), with the
two calls the programs make: scalars and images. Records are framed as
TensorFlow's record files (length, masked CRC32C, data, masked CRC32C:
`tensorboard.summary.writer.record_writer`); the file goes through
`etils.epath`, so a gs:// workdir works as with orbax (that path alone
loads a gs:// backend).
"""

import io
import os
import socket
import time
from typing import Any, Mapping

from etils import epath
import numpy as np
from PIL import Image
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.summary.writer import record_writer


def _png(image: np.ndarray) -> bytes:
  """uint8 (or [0, 1] float) [H, W, C] -> PNG bytes."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    image = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG')
  return buf.getvalue()


class SummaryWriter:
  """Scalars and images to `logdir`'s event file (nothing when disabled).

  Args:
    logdir: the folder of the event file (created).
    enabled: False writes nothing: processes other than 0 of a multi-host
      run, which log through absl only.
  """

  def __init__(self, logdir: str, enabled: bool = True):
    self._writer = None
    if enabled:
      folder = epath.Path(logdir)
      folder.mkdir(parents=True, exist_ok=True)
      name = (f'events.out.tfevents.{int(time.time()):010d}.'
              f'{socket.gethostname()}.{os.getpid()}.vdm_jax')
      self._writer = record_writer.RecordWriter((folder / name).open('wb'))
      self._write(event_pb2.Event(wall_time=time.time(),
                                  file_version='brain.Event:2'))

  def _write(self, event: event_pb2.Event) -> None:
    self._writer.write(event.SerializeToString())
    self._writer.flush()

  def _add(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    if self._writer is None or not values:
      return
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                summary=summary_pb2.Summary(value=values)))

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    self._add(step, [summary_pb2.Summary.Value(tag=k, simple_value=float(v))
                     for k, v in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """images: name -> [N, H, W, C] or [H, W, C], uint8 or floats in [0, 1];
    an N-batch is written as name/0 ... name/N-1."""
    values = []
    for name, batch in images.items():
      batch = np.asarray(batch)
      batch = batch[None] if batch.ndim == 3 else batch
      for i, image in enumerate(batch):
        tag = name if len(batch) == 1 else f'{name}/{i}'
        values.append(summary_pb2.Summary.Value(
            tag=tag, image=summary_pb2.Summary.Image(
                height=image.shape[0], width=image.shape[1],
                colorspace=image.shape[2] if image.ndim == 3 else 1,
                encoded_image_string=_png(image))))
    self._add(step, values)

  def flush(self) -> None:
    if self._writer is not None:
      self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
