"""The pipeline's grain worker processes: the same batches as in-process,
errors and crashes named, skipped files counted, resume after a kill, a
quick close."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

from vdm_jax import video_io
from vdm_jax.data import pipeline
from vdm_jax.data import video_files

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TaggedSource:
  """Videos whose pixels name them: channel 0 = example, channel 1 = frame.

  `fail_at` raises on that example; `crash_at` ends the process reading it
  (as a decoder's segfault would).
  """

  def __init__(self, size=40, frames=12, fail_at=None, crash_at=None,
               side=4):
    self.size, self.frames, self.side = size, frames, side
    self.fail_at, self.crash_at = fail_at, crash_at

  def __len__(self):
    return self.size

  def describe(self, i):
    return f'tagged/{i}.mp4'

  def __getitem__(self, i):
    if i == self.fail_at:
      raise RuntimeError(f'broken example {i}')
    if i == self.crash_at:
      os._exit(3)  # pylint: disable=protected-access
    video = np.zeros((self.frames, self.side, self.side, 3), dtype=np.uint8)
    video[..., 0] = i
    video[..., 1] = np.arange(self.frames)[:, None, None]
    return {'video': video, 'label': i % 5}


def _assert_batches_equal(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_two_workers_give_the_in_process_batches_on_two_processes():
  kw = dict(global_batch_size=8, num_frames=4, seed=1, image_frames=2,
            random_flip=True, process_count=2)
  plain = pipeline.Pipeline(TaggedSource(), process_index=1, **kw)
  workers = pipeline.Pipeline(TaggedSource(), process_index=1,
                              num_workers=2, **kw)
  # 40 examples, 8 a step: steps 3..7 cross the epoch boundary at step 5.
  with workers.iterate(3) as it:
    for step in range(3, 8):
      _assert_batches_equal(next(it), plain.batch_for_step(step))
    assert it.get_state() == {'step': 8}


def test_a_worker_error_names_the_step_and_its_files():
  p = pipeline.Pipeline(TaggedSource(size=8, fail_at=5), global_batch_size=4,
                        num_frames=2, seed=0, num_workers=1)
  step = next(s for s in range(4) if 5 in p.examples_of_step(s))
  it = p.iterate(0)
  with pytest.raises(RuntimeError, match='broken example 5') as info:
    for _ in range(step + 1):
      next(it)
  note = ' '.join(getattr(info.value, '__notes__', []))
  assert f'step {step}' in note and 'tagged/5.mp4' in note
  with pytest.raises(StopIteration):
    next(it)


def test_a_worker_crash_stops_with_the_files_named():
  p = pipeline.Pipeline(TaggedSource(size=8, crash_at=6), global_batch_size=4,
                        num_frames=2, seed=0, num_workers=1)
  step = next(s for s in range(4) if 6 in p.examples_of_step(s))
  start = time.monotonic()
  it = p.iterate(0)
  with pytest.raises(RuntimeError, match='worker process died') as info:
    for _ in range(step + 1):
      next(it)
  assert time.monotonic() - start < 60
  assert 'tagged/6.mp4' in str(info.value) and f'step {step}' in str(
      info.value)
  it.close()


def test_files_a_worker_skips_are_counted_in_the_main_process(tmp_path):
  video = np.zeros((6, 16, 16, 3), dtype=np.uint8)
  for i in range(3):
    video_io.write_mp4(str(tmp_path / f'v{i}.mp4'), video + 50 * i)
  (tmp_path / 'v1_bad.mp4').write_bytes(b'not a video' * 50)
  source = video_files.VideoFiles(str(tmp_path), image_size=16)
  p = pipeline.Pipeline(source, global_batch_size=4, num_frames=3, seed=0,
                        num_workers=1)
  with p.iterate(0) as it:
    next(it)
  assert source.num_skipped == 1
  assert [os.path.basename(f) for f in source.skipped] == ['v1_bad.mp4']


def _workers(exclude=()):
  """This process's live grain worker processes, less `exclude`."""
  found = []
  for child in psutil.Process().children():
    try:
      if (child.status() != psutil.STATUS_ZOMBIE and child not in exclude
          and 'spawn_main' in ' '.join(child.cmdline())):
        found.append(child)
    except psutil.NoSuchProcess:
      pass
  return found


def test_close_with_a_slow_consumer_is_quick_and_ends_the_workers():
  """grain alone joins each worker for 25 s, one after another, when the
  consumer is slower than the workers (a batch stuck in its pipe)."""
  before = _workers()
  # 16 clips of 16 64x64 frames: a 3 MB batch, more than a pipe holds.
  p = pipeline.Pipeline(TaggedSource(frames=16, side=64),
                        global_batch_size=16, num_frames=16, seed=0,
                        num_workers=2)
  it = p.iterate(0)
  for _ in range(6):
    next(it)
    time.sleep(0.3)  # The train step: the workers fill their queues.
  workers = _workers(exclude=before)
  assert len(workers) == 2
  start = time.monotonic()
  it.close()
  assert time.monotonic() - start < 5
  # Exited and reaped (joined): not even zombies are left.
  assert not [w.pid for w in workers if psutil.pid_exists(w.pid)]


_RUN = """
import sys
sys.path.insert(0, {tests!r})
from test_grain_workers import TaggedSource
from vdm_jax.data import pipeline
if __name__ == '__main__':
  p = pipeline.Pipeline(TaggedSource(), global_batch_size=8, num_frames=4,
                        seed=5, image_frames=1, num_workers=2)
  for step, batch in enumerate(p.iterate(0)):
    examples = batch['video'][:, 0, 0, 0, 0].tolist()
    print(step, *examples, flush=True)
"""


def test_resume_after_a_kill_mid_epoch_repeats_and_skips_nothing():
  """A run killed (SIGKILL) at step 7, mid-epoch (5 steps an epoch), and
  resumed from its last finished step reads each example once an epoch."""
  script = _RUN.format(tests=os.path.join(_ROOT, 'tests'))
  env = dict(os.environ, PYTHONPATH=_ROOT)
  run = subprocess.Popen([sys.executable, '-c', script], env=env,
                         stdout=subprocess.PIPE, text=True)
  rows = {}
  try:
    for line in run.stdout:
      step, *examples = map(int, line.split())
      rows[step] = examples
      if step == 7:
        workers = [c for c in psutil.Process(run.pid).children()
                   if 'spawn_main' in ' '.join(c.cmdline())]
        run.send_signal(signal.SIGKILL)
        break
  finally:
    run.kill()
    run.wait(timeout=30)
  assert sorted(rows) == list(range(8))
  # The killed run's workers exit on their own (they watch their parent).
  assert len(workers) == 2
  _, alive = psutil.wait_procs(workers, timeout=20)
  for worker in alive:
    worker.kill()
  assert not alive
  resumed = pipeline.Pipeline(TaggedSource(), global_batch_size=8,
                              num_frames=4, seed=5, image_frames=1,
                              num_workers=1)
  with resumed.iterate(8) as it:  # The checkpoint's step.
    for step in (8, 9):
      rows[step] = next(it)['video'][:, 0, 0, 0, 0].tolist()
  seen = np.asarray([rows[s] for s in range(10)]).reshape(2, 40)
  for epoch in seen:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(40))
