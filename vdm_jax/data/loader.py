"""`BatchIterator`: a pipeline's batches from a step on, made ahead.

One main-process thread pulls the decoded elements from the pipeline's
grain iterator (its worker processes, or this thread itself with
`num_workers=0`), finishes them in the main process (`Pipeline.finish`:
text embeddings, skipped-file counts) and holds up to `prefetch` batches
in a bounded queue. The thread holds the pipeline, the grain iterator, the
queue and a stop event but not this object, so dropping the iterator lets
`__del__` stop the thread and the workers.

An exception raised while making a batch re-raises from `next()` with a
note naming the step and the files (or examples) of its batch; a worker
process that dies (grain reports its exit code) stops the iterator with a
RuntimeError that names them too, instead of hanging.
"""

import queue
import threading
from typing import Any, Iterator

import numpy as np

_WORKER_DIED = 'terminated unexpectedly'


def _explain(pipeline: Any, error: BaseException,
             step: int) -> BaseException:
  """`error` with the step and the files of its batch named."""
  try:
    what = pipeline.describe_step(step)
  except Exception:  # pylint: disable=broad-except
    what = 'its examples (could not be listed)'
  where = (f'making the batch of step {step} (process '
           f'{pipeline.process_index}) from {what}')
  if isinstance(error, RuntimeError) and _WORKER_DIED in str(error):
    crash = RuntimeError(
        f'A data worker process died while {where}: {error} Read one of '
        'these files on its own (or set data.num_workers=0) to find the '
        'one that crashes the decoder.')
    crash.__cause__ = error
    return crash
  error.add_note(f'vdm_jax input pipeline: raised while {where}.')
  return error


def _produce(pipeline: Any, iterator: Any, step: int, out: queue.Queue,
             stop: threading.Event) -> None:
  """Thread body: puts ('batch', b) items, or one ('error', e) and returns."""
  while not stop.is_set():
    try:
      item = ('batch', pipeline.finish(next(iterator)))
    except BaseException as e:  # pylint: disable=broad-except
      if stop.is_set():  # Closing: the workers were stopped under us.
        return
      item = ('error', _explain(pipeline, e, step))
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
  """Iterator over prefetched batches; stops its thread on close/GC."""

  def __init__(self, pipeline: Any, start_step: int, prefetch: int):
    self.step = start_step  # Step of the next batch returned.
    self._iterator = pipeline.grain_iterator(start_step)
    self._queue = queue.Queue(maxsize=max(1, prefetch))
    self._stop = threading.Event()
    self._closed = False
    self._thread = threading.Thread(
        target=_produce,
        args=(pipeline, self._iterator, start_step, self._queue, self._stop),
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

  def get_state(self) -> dict[str, int]:
    """The iterator's position: the step of the next batch returned.

    The batches are a pure function of the step, so this is all a resume
    needs (`Pipeline.iterate(state['step'])`), and a checkpoint's train
    state step is it.
    """
    return {'step': self.step}

  def close(self) -> None:
    """Stops the thread and the workers; later `next()` stops."""
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
    iterator, self._iterator = self._iterator, None
    close = getattr(iterator, 'close', None)
    if close is not None:
      close()

  def __enter__(self) -> 'BatchIterator':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    if hasattr(self, '_thread'):
      self.close()
