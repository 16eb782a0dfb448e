"""Input-pipeline throughput (videos/s) on this machine's CPU, by workers.

  python experiments/benchmark_data.py [--videos=12] [--frames=186]
      [--steps=6] [--workers=0,1,2,0,1,2] [--sources=synthetic,tfds,mp4]

Three sources, all 16x64x64 clips with flips at batch 16:
  - the built-in synthetic source (batched rendering);
  - TFDS, UCF101-shaped: an ArrayRecord dataset prepared here (no download)
    in the layout of TFDS `ucf101/ucf101_1_256`: 256x256 JPEG frames,
    `--frames` per video (UCF101 averages 186), smooth moving content;
  - a folder of 320x240 H.264 mp4 files (UCF101's frame size), decoded with
    ffmpeg, once with no reuse of decoded videos (cache_size=1: only the
    frames read are resized), once like that but resizing every frame of
    each video (`resize_all`, what a cache that pays does) and once from the
    LRU cache (every video decoded before; 0 workers only).
Each rate is `Pipeline.iterate` with `num_workers` grain worker processes
(0: the iterator's thread decodes, as the pipeline did before grain),
timed over `--steps` batches after the workers have started and made a
first round of batches (buffers of one batch), the clock stopped before the
iterator closes (mp4: 2/3 of `--steps`, at least 2; synthetic: 4x).
`--sources` picks the sources to run. The last line printed is a
JSON object with the numbers: a list of rates per worker count (and of
the CPU seconds the process tree spent a video meanwhile), in the
order run (the default interleaves them, 0,1,2,0,1,2), and the 1-minute
load average before each.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from vdm_jax import video_io
from vdm_jax.data import pipeline
from vdm_jax.data import synthetic
from vdm_jax.data import video_files

BATCH, NUM_FRAMES, SIZE = 16, 16, 64


def _content(num_videos: int, frames: int, height: int, width: int):
  """Yields uint8 [frames, height, width, 3] smooth videos (moving shapes)."""
  side = max(height, width)
  shapes = synthetic.SyntheticVideos(frames, side, num_examples=num_videos)
  for i in range(num_videos):
    video = shapes[i]['video'][:, :height, :width]
    yield np.ascontiguousarray(video)


def _prepare(data_dir: str, num_videos: int, frames: int) -> None:
  """Prepares the UCF101-shaped TFDS dataset (registered only here)."""
  import tensorflow_datasets as tfds

  class BenchUcfShaped(tfds.core.GeneratorBasedBuilder):
    """UCF101-shaped videos (ucf101_1_256 layout) for the benchmark."""

    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self,
          features=tfds.features.FeaturesDict({
              'video': tfds.features.Video((None, 256, 256, 3),
                                           encoding_format='jpeg'),
              'label': tfds.features.ClassLabel(num_classes=101),
          }))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      for i, video in enumerate(_content(num_videos, frames, 256, 256)):
        yield i, {'video': video, 'label': i % 101}

  BenchUcfShaped(data_dir=data_dir,
                 file_format='array_record').download_and_prepare()


def _cpu_seconds() -> float:
  """CPU seconds of this process, its workers and their reaped ffmpegs."""
  total = 0.0
  for proc in [psutil.Process()] + psutil.Process().children(recursive=True):
    try:
      t = proc.cpu_times()
    except psutil.NoSuchProcess:
      continue
    total += t.user + t.system + t.children_user + t.children_system
  return total


def _rate(source, steps: int, workers: int) -> tuple[float, float]:
  """(videos/s, CPU s a video) of `iterate` over `steps` steps, after a
  warm-up round; the CPU is that of the whole process tree meanwhile."""
  p = pipeline.Pipeline(source, global_batch_size=BATCH,
                        num_frames=NUM_FRAMES, seed=0, random_flip=True,
                        num_workers=workers, worker_buffer_size=1)
  with p.iterate(0, prefetch=1) as it:
    for _ in range(2 * workers + 1):  # Start-up, then full buffers.
      next(it)
    start, cpu = time.perf_counter(), _cpu_seconds()
    for _ in range(steps):
      batch = next(it)
    # Stopped before the iterator closes: closing waits up to 25 s a worker
    # (grain's join timeout; docs/data.md), which is no part of the rate.
    elapsed = time.perf_counter() - start
    cpu = _cpu_seconds() - cpu
  assert batch['video'].shape == (BATCH, NUM_FRAMES, SIZE, SIZE, 3)
  return steps * BATCH / elapsed, cpu / (steps * BATCH)


def _rates(results: dict, name: str, source, steps: int,
           workers: list[int]) -> None:
  """Rates in the order of `workers`; a repeated count (ABAB) adds a rate."""
  for w in workers:
    load = round(os.getloadavg()[0], 2)
    rate, cpu = _rate(source, steps, w)
    rate, cpu = round(rate, 1), round(cpu, 4)
    key = f'{name}_videos_per_s_{w}_workers'
    results[key] = results.get(key, []) + [rate]
    key = f'{name}_cpu_s_per_video_{w}_workers'
    results[key] = results.get(key, []) + [cpu]
    results.setdefault(f'{name}_load_avg_1min', []).append(load)
    print(f'{name}, {w} workers: {rate} videos/s, {cpu} CPU s a video '
          f'(load {load})', flush=True)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--videos', type=int, default=12)
  parser.add_argument('--frames', type=int, default=186)
  parser.add_argument('--steps', type=int, default=6)
  parser.add_argument('--workers', default='0,1,2,0,1,2')
  parser.add_argument('--sources', default='synthetic,tfds,mp4',
                      help='comma-separated subset of synthetic,tfds,mp4')
  parser.add_argument('--prepare', default='',
                      help='only prepare the TFDS data in this directory')
  args = parser.parse_args()
  if args.prepare:
    _prepare(args.prepare, args.videos, args.frames)
    return
  workers = [int(w) for w in args.workers.split(',')]
  sources = set(args.sources.split(','))
  if not sources or sources - {'synthetic', 'tfds', 'mp4'}:
    parser.error(f'--sources={args.sources!r}: name some of synthetic, '
                 'tfds, mp4, comma-separated')
  results = {'batch': BATCH, 'clip': [NUM_FRAMES, SIZE, SIZE],
             'frames_per_video': args.frames, 'videos': args.videos,
             'cpu_count': os.cpu_count(),
             'load_avg_1min_start': round(os.getloadavg()[0], 2)}
  if 'synthetic' in sources:
    _rates(results, 'synthetic',
           synthetic.SyntheticVideos(NUM_FRAMES, SIZE), 4 * args.steps,
           workers)
  with tempfile.TemporaryDirectory() as tmp:
    if 'tfds' in sources:
      _tfds_rates(results, tmp, args, workers)
    if 'mp4' in sources:
      _mp4_rates(results, tmp, args, workers)
  results['load_avg_1min_end'] = round(os.getloadavg()[0], 2)
  for key, value in results.items():
    print(f'{key}: {value}')
  print(json.dumps(results))


def _tfds_rates(results: dict, tmp: str, args, workers: list[int]) -> None:
  """The UCF101-shaped ArrayRecord source, prepared in `tmp`."""
  t = time.perf_counter()
  # Prepared in another process: here (and in the workers) the dataset is
  # then read from its files, not through a builder class of __main__,
  # which the workers would unpickle as a second registration.
  subprocess.run([sys.executable, __file__, f'--prepare={tmp}',
                  f'--videos={args.videos}', f'--frames={args.frames}'],
                 check=True)
  print(f'prepared TFDS data in {time.perf_counter() - t:.1f} s')
  # TFDS loads here, after the synthetic runs: their workers (which
  # re-import this script) then do not import TF.
  from vdm_jax.data import tfds_sources
  source = tfds_sources.TfdsVideos(
      'bench_ucf_shaped', split='train', video_key='video',
      label_key='label', image_size=SIZE, data_dir=tmp)
  _rates(results, 'tfds_ucf101_shaped', source, 2 * args.steps, workers)


def _mp4_rates(results: dict, tmp: str, args, workers: list[int]) -> None:
  """A folder of mp4 files written in `tmp`: decoded anew, then cached."""
  folder = os.path.join(tmp, 'mp4')
  os.makedirs(folder)
  for i, video in enumerate(_content(args.videos, args.frames, 240, 320)):
    video_io.write_mp4(os.path.join(folder, f'v{i:03d}.mp4'), video, fps=25)
  uncached = video_files.VideoFiles(folder, image_size=SIZE, cache_size=1)
  _rates(results, 'mp4_folder_uncached', uncached,
         max(2, args.steps * 2 // 3), workers)
  # The same, resizing every frame of each decoded video as the source did
  # before it resized only the frames a read picks (same pixels).
  whole = video_files.VideoFiles(folder, image_size=SIZE, cache_size=1)
  whole.resize_all = True
  _rates(results, 'mp4_folder_uncached_resize_all', whole,
         max(2, args.steps * 2 // 3), workers)
  cached = video_files.VideoFiles(folder, image_size=SIZE,
                                  cache_size=args.videos)
  for i in range(len(cached)):
    cached[i]  # pylint: disable=pointless-statement
  _rates(results, 'mp4_folder_cached', cached, args.steps, [0])


if __name__ == '__main__':
  main()
