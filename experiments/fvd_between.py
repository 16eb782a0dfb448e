"""FVD (and KVD) between two sets of videos; prints one JSON object.

  python experiments/fvd_between.py GEN REAL [--protocol=stylegan_v_2048]
      [--num_frames=16] [--batch_size=16] [--resize=reference]

GEN and REAL are folders of mp4/webm/gif/npz files (one video each) or npz
files holding a batch under 'videos' ([N, T, H, W, 3], uint8 or float in
[0, 1] / [-1, 1]). Each video is cut to its first --num_frames frames (the
protocol's by default). With --protocol, its resize mode and folds apply and
the output says how the inputs deviate from the protocol; without it, one
fold of 'reference' FVD.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vdm_jax import video_io  # pylint: disable=g-import-not-at-top
from vdm_jax.evaluation import fvd  # pylint: disable=g-import-not-at-top

_EXTENSIONS = ('.mp4', '.webm', '.avi', '.gif', '.npz')


def load_videos(path: str, num_frames: int) -> np.ndarray:
  """[N, num_frames, H, W, 3] in [0, 255] (uint8 or float32)."""
  if os.path.isdir(path):
    names = sorted(n for n in os.listdir(path)
                   if n.lower().endswith(_EXTENSIONS))
    if not names:
      raise ValueError(f'{path} holds no {_EXTENSIONS} files.')
    videos = [video_io.read_video(os.path.join(path, n), num_frames)
              for n in names]
  else:
    with np.load(path, allow_pickle=False) as data:
      key = 'videos' if 'videos' in data.files else data.files[0]
      batch = data[key]
    if batch.ndim == 4:
      batch = batch[None]
    if np.issubdtype(batch.dtype, np.floating):
      lo = -1.0 if batch.min() < 0 else 0.0
      batch = fvd.to_uint8_range(batch, (lo, 1.0))
    videos = list(batch[:, :num_frames])
  short = [i for i, v in enumerate(videos) if len(v) < num_frames]
  if short:
    raise ValueError(f'{len(short)} videos in {path} have fewer than'
                     f' {num_frames} frames (first: #{short[0]}).')
  return np.stack(videos)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('gen')
  parser.add_argument('real')
  parser.add_argument('--protocol', default=None, choices=list(fvd.PROTOCOLS))
  parser.add_argument('--num_frames', type=int, default=None)
  parser.add_argument('--resize', default=None, choices=fvd.RESIZE_MODES)
  parser.add_argument('--batch_size', type=int, default=16)
  args = parser.parse_args()
  proto = fvd.PROTOCOLS.get(args.protocol)
  num_frames = args.num_frames or (proto.num_frames if proto else 16)
  resize = args.resize or (proto.resize if proto else 'reference')
  folds = proto.folds if proto else 1
  gen = load_videos(args.gen, num_frames)
  real = load_videos(args.real, num_frames)
  feature = proto.feature if proto else 'logits_mean'
  kwargs = dict(resize=resize, batch_size=args.batch_size,
                input_range=(0, 255))
  scores = fvd.compute_fvd(fvd.extract_features(gen, **kwargs)[feature],
                           fvd.extract_features(real, **kwargs)[feature],
                           folds=folds)
  result = {
      'protocol': args.protocol or 'reference',
      **scores,
      'num_generated': len(gen),
      'num_real': len(real),
      'num_frames': num_frames,
      'resolution': list(gen.shape[2:4]),
      'resize': resize,
      'folds': folds,
      'feature': feature,
  }
  if proto:
    deviations = []
    if len(gen) != proto.num_generated:
      deviations.append(f'{len(gen)} generated != {proto.num_generated}')
    if len(real) != proto.num_real:
      deviations.append(f'{len(real)} real != {proto.num_real}')
    if proto.resolution and gen.shape[2:4] != (proto.resolution,) * 2:
      deviations.append(f'resolution {gen.shape[2:4]} != {proto.resolution}')
    if num_frames != proto.num_frames:
      deviations.append(f'{num_frames} frames != {proto.num_frames}')
    result['protocol_compliant'] = not deviations
    result['deviations'] = deviations
  print(json.dumps(result))


if __name__ == '__main__':
  main()
