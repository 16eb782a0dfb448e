"""Top-5 Kinetics-400 classes of a video with the FVD network (I3D).

  python experiments/i3d_classify.py tests/data/v_CricketShot_g04_c01_rgb.gif

Reads mp4/webm/gif/npz (uint8 or float [0, 1] / [-1, 1]), prepares the
frames exactly as FVD does (bilinear resize of the whole frame to 224x224,
scaled to [-1, 1]) and prints one line per class: probability and label.
A check of the weights and the preprocessing: the Kinetics test clip above is
"playing cricket".
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vdm_jax import video_io  # pylint: disable=g-import-not-at-top
from vdm_jax.evaluation import fvd  # pylint: disable=g-import-not-at-top
from vdm_jax.evaluation import i3d  # pylint: disable=g-import-not-at-top


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('video', help='mp4, webm, gif or npz file')
  parser.add_argument('--resize', default='reference',
                      choices=fvd.RESIZE_MODES)
  parser.add_argument('--max_frames', type=int, default=None,
                      help='classify only the first frames')
  parser.add_argument('--top', type=int, default=5)
  args = parser.parse_args()
  video = video_io.read_video(args.video, max_frames=args.max_frames)
  feats = fvd.extract_features(video[None], resize=args.resize, batch_size=1,
                               progress=False)
  logits = feats['logits_mean'][0].astype(np.float64)
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  labels = i3d.kinetics400_labels()
  print(f'{args.video}: {video.shape[0]} frames of {video.shape[1:3]}')
  for i in np.argsort(-probs)[: args.top]:
    print(f'{probs[i]:.4f}  {logits[i]:7.3f}  {labels[i]}')


if __name__ == '__main__':
  main()
