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
RuntimeError that names them too, instead of hanging. `close()` takes
about a second whatever the worker count (`_close_grain`).
"""

import queue
import sys
import threading
from typing import Any, Iterator

from grain._src.python.dataset.transformations import interleave
from grain._src.python.dataset.transformations import prefetch
from grain._src.python.dataset.transformations import process_prefetch
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


def _worker_iterators(iterator: Any) -> tuple[list[Any], list[Any]]:
  """The workers' iterators under `iterator`, and those not yet in use.

  grain 0.2.18's `mp_prefetch` iterator is an interleave of one
  `ThreadPrefetchDatasetIterator` a worker, each over the worker's
  `ProcessPrefetchDatasetIterator` (`multiprocess_prefetch`). The
  interleave makes them (and starts their workers) ahead, in a thread
  pool (`_prefetch_ds_iter`), and takes one in use at each of its first
  `next()`s; its `close()` closes only those in use itself (the others
  still stopped, at 25 s each, before it returned: measured, 8 workers
  closed after one batch).

  Returns:
    (every `ProcessPrefetchDatasetIterator`, the made iterators that the
    interleave has not taken in use yet).
  """
  found, pending, to_visit = [], [], [iterator]
  while to_visit:
    it = to_visit.pop()
    if isinstance(it, process_prefetch.ProcessPrefetchDatasetIterator):
      found.append(it)
      continue
    to_visit.extend(getattr(it, '_parents', ()))
    # pylint: disable=protected-access
    if isinstance(it, interleave.InterleaveDatasetIterator):
      to_visit.extend(i for i in it._iterators_in_use if i is not None)
      to_visit.append(it._prefetch_ds_iter)
    elif isinstance(it, prefetch.ThreadPrefetchDatasetIterator):
      to_visit.append(it._maybe_nonnative_parent)
    elif isinstance(it, prefetch.PrefetchDatasetIterator):
      for future in list(getattr(it, '_buffer', ())):
        if future.done() and not future.cancelled() and (
            future.exception() is None):
          pending.append(future.result())
          to_visit.append(future.result())
    # pylint: enable=protected-access
  return found, pending


def _drain_stopped(workers: list[Any], done: threading.Event) -> None:
  """Thread body: empties each stopped worker's queue until `done`."""
  # pylint: disable=protected-access
  while not done.is_set():
    for worker in workers:
      if worker._prefetch_should_stop.is_set():
        process_prefetch._clear_queue_and_maybe_unlink_shm(worker._buffer)
    done.wait(0.01)
  # pylint: enable=protected-access


def _close_grain(iterator: Any) -> None:
  """Closes a grain iterator; its workers exit at once instead of in 25 s.

  grain 0.2.18 stops the workers one after another
  (`ProcessPrefetchDatasetIterator._stop_prefetch`): it sets the worker's
  stop event, empties its queue once, then joins it for up to 25 s
  (`_PROCESS_KILL_TIMEOUT_S`) before killing it. A worker blocked in `put`
  fills the freed slot after that drain; its queue's feeder thread then
  blocks writing the batch (MBs; a pipe holds 64 KB) to a pipe no one
  reads, and the worker cannot exit (multiprocessing joins the feeder at
  exit): 25 s a worker whenever the consumer is slower than the workers.

  So a thread here keeps reading the queue of every worker whose stop
  event is set, for as long as grain's close runs: the feeder finishes its
  message, the worker exits by itself (exit code 0) and grain's join
  returns at once. The workers the interleave made ahead but has not used
  yet are closed here too, under the same thread. `Queue.get` reads whole
  messages under the queue's read lock, so this thread and grain's own
  drains never split one. Only stopped workers are read: grain stops a
  worker's thread-prefetch thread before the worker, and that thread needs
  the worker's next batch to stop. Not chosen: dropping the batch in the
  worker (`cancel_join_thread` or an exit hook) or killing the workers after
  the stop event; both can leave a half-written message in the pipe, on
  which grain's drain after the join then blocks for good (the exit hook was
  tried and did). A lower
  kill timeout (a grain module global) would still cost it a worker and kill
  them.
  """
  close = getattr(iterator, 'close', None)
  if close is None:
    return
  workers, pending = _worker_iterators(iterator)
  if not workers or sys.is_finalizing():  # No new threads at shutdown.
    close()
    return
  done = threading.Event()
  drain = threading.Thread(target=_drain_stopped, args=(workers, done),
                           name='vdm_jax-data-close', daemon=True)
  drain.start()
  try:
    close()
    for it in pending:  # Made ahead, never in use: not closed by it.
      it.close()
  finally:
    done.set()
    # Bounded: a worker grain had to kill mid-message would block a read.
    drain.join(timeout=5.0)


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
    if iterator is not None:
      _close_grain(iterator)

  def __enter__(self) -> 'BatchIterator':
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    if hasattr(self, '_thread'):
      self.close()
