"""Input-pipeline throughput (videos/s) on this machine's CPU.

  python experiments/benchmark_data.py [--videos=12] [--frames=186] [--steps=6]

Two sources, both 16x64x64 clips at batch 16 on one producer thread:
  - TFDS, UCF101-shaped: an ArrayRecord dataset prepared here (no download)
    in the layout of TFDS `ucf101/ucf101_1_256`: 256x256 JPEG frames,
    `--frames` per video (UCF101 averages 186), smooth moving content;
  - a folder of 320x240 H.264 mp4 files (UCF101's frame size), decoded with
    ffmpeg, once with no reuse of decoded videos (cache_size=1) and once
    from the LRU cache (every video decoded before).
The last line printed is a JSON object with the numbers.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow_datasets as tfds

from vdm_jax import video_io
from vdm_jax.data import pipeline
from vdm_jax.data import synthetic
from vdm_jax.data import tfds_sources
from vdm_jax.data import video_files

BATCH, NUM_FRAMES, SIZE = 16, 16, 64


def _content(num_videos: int, frames: int, height: int, width: int):
  """Yields uint8 [frames, height, width, 3] smooth videos (moving shapes)."""
  side = max(height, width)
  shapes = synthetic.SyntheticVideos(frames, side, num_examples=num_videos)
  for i in range(num_videos):
    video = shapes[i]['video'][:, :height, :width]
    yield np.ascontiguousarray(video)


class BenchUcfShaped(tfds.core.GeneratorBasedBuilder):
  """UCF101-shaped videos (ucf101_1_256 layout) for the benchmark."""

  VERSION = tfds.core.Version('1.0.0')
  num_videos, frames = 12, 186

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
    for i, video in enumerate(_content(self.num_videos, self.frames, 256,
                                       256)):
      yield i, {'video': video, 'label': i % 101}


def _rate(source, steps: int) -> float:
  """Videos/s of Pipeline.batch_for_step over `steps` steps (after one)."""
  p = pipeline.Pipeline(source, global_batch_size=BATCH,
                        num_frames=NUM_FRAMES, seed=0, random_flip=True)
  p.batch_for_step(0)
  start = time.perf_counter()
  for step in range(1, steps + 1):
    batch = p.batch_for_step(step)
  assert batch['video'].shape == (BATCH, NUM_FRAMES, SIZE, SIZE, 3)
  return steps * BATCH / (time.perf_counter() - start)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--videos', type=int, default=12)
  parser.add_argument('--frames', type=int, default=186)
  parser.add_argument('--steps', type=int, default=6)
  args = parser.parse_args()
  results = {'batch': BATCH, 'clip': [NUM_FRAMES, SIZE, SIZE],
             'frames_per_video': args.frames, 'videos': args.videos,
             'cpu_count': os.cpu_count(),
             'load_avg_1min': round(os.getloadavg()[0], 2)}
  results['synthetic_videos_per_s'] = round(
      _rate(synthetic.SyntheticVideos(NUM_FRAMES, SIZE), args.steps), 1)
  with tempfile.TemporaryDirectory() as tmp:
    BenchUcfShaped.num_videos, BenchUcfShaped.frames = args.videos, args.frames
    t = time.perf_counter()
    builder = BenchUcfShaped(data_dir=tmp, file_format='array_record')
    builder.download_and_prepare()
    print(f'prepared TFDS data in {time.perf_counter() - t:.1f} s')
    source = tfds_sources.TfdsVideos(
        'bench_ucf_shaped', split='train', video_key='video',
        label_key='label', image_size=SIZE, data_dir=tmp)
    results['tfds_ucf101_shaped_videos_per_s'] = round(
        _rate(source, args.steps), 1)
    folder = os.path.join(tmp, 'mp4')
    os.makedirs(folder)
    for i, video in enumerate(_content(args.videos, args.frames, 240, 320)):
      video_io.write_mp4(os.path.join(folder, f'v{i:03d}.mp4'), video,
                         fps=25)
    uncached = video_files.VideoFiles(folder, image_size=SIZE, cache_size=1)
    results['mp4_folder_uncached_videos_per_s'] = round(
        _rate(uncached, max(1, args.steps // 2)), 1)
    cached = video_files.VideoFiles(folder, image_size=SIZE,
                                    cache_size=args.videos)
    for i in range(len(cached)):
      cached[i]  # pylint: disable=pointless-statement
    results['mp4_folder_cached_videos_per_s'] = round(
        _rate(cached, args.steps), 1)
  for key, value in results.items():
    print(f'{key}: {value}')
  print(json.dumps(results))


if __name__ == '__main__':
  main()
