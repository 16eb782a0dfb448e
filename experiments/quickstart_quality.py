"""How good are a quickstart run's samples? Scores samples.npz files.

  PYTHONPATH=. python experiments/quickstart_quality.py \
      --config=configs/quickstart.py runs/qs_a/samples/.../samples.npz [...]

For each samples.npz (uint8 [N, T, H, W, 3]) and for N real clips of the
config's synthetic dataset (the reference row):
  - valid: the share of clips in which the renderer-built detector
    (`data.detect`) finds one coherent object: a palette colour, one blob
    per frame, a plausible area on every frame;
  - same colour / same shape: the share of clips whose every frame, read
    alone, has the clip's colour and shape (a sample that changes colour
    between frames fails);
  - path: the mean distance (pixels) of the per-frame centroids from their
    least-squares line through time (straight motion between bounces is
    close to 0; a jumping object is not);
  - FVD against the real clips (I3D needs >= 9 frames: both sets are
    repeated 2x in time, alike; N v N clips, so compare rows of one run, not
    with published FVDs).
Prints one JSON line per set.
"""

import argparse
import importlib.util
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vdm_jax import sample_inputs  # pylint: disable=g-import-not-at-top
from vdm_jax.data import detect  # pylint: disable=g-import-not-at-top
from vdm_jax.evaluation import fvd  # pylint: disable=g-import-not-at-top


def scores(videos: np.ndarray) -> dict:
  n, t = videos.shape[:2]
  clip = detect.detect(videos)
  frames = detect.detect(videos.reshape((n * t, 1) + videos.shape[2:]))
  colour = frames['colour'].reshape(n, t)
  kind = frames['kind'].reshape(n, t)
  same_colour = clip['valid'] & np.all(colour == clip['colour'][:, None], 1)
  same_kind = clip['valid'] & np.all(kind == clip['kind'][:, None], 1)
  c = clip['centroid']  # [N, T, 2]
  times = np.arange(t) - (t - 1) / 2
  slope = (times[None, :, None] * c).sum(1) / (times**2).sum()
  fit = c.mean(1, keepdims=True) + slope[:, None] * times[None, :, None]
  path = np.linalg.norm(c - fit, axis=-1).mean(1)
  return {'valid': float(clip['valid'].mean()),
          'same_colour': float(same_colour.mean()),
          'same_shape': float(same_kind.mean()),
          'path_px': float(np.median(path[clip['valid']]))
                     if clip['valid'].any() else None}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--config', default='configs/quickstart.py')
  parser.add_argument('--real_seed', type=int, default=1)
  parser.add_argument('samples', nargs='+')
  args = parser.parse_args()
  spec = importlib.util.spec_from_file_location('cfg', args.config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  sets = {path: np.load(path)['videos'] for path in args.samples}
  n = min(len(v) for v in sets.values())
  t = config.data.num_frames
  real, _ = sample_inputs.dataset_clips(config, n, t, seed=args.real_seed)
  rep = lambda v: np.repeat(v, 2, axis=1)
  real_feats = fvd.extract_features(rep(real), progress=False)['logits_mean']
  for name, videos in [('real', real)] + list(sets.items()):
    videos = videos[:n]
    row = {'set': name, 'num': int(n), **scores(videos)}
    if name != 'real':
      feats = fvd.extract_features(rep(videos), progress=False)['logits_mean']
      row['fvd'] = round(fvd.compute_fvd(feats, real_feats)['fvd'], 1)
    print(json.dumps(row), flush=True)


if __name__ == '__main__':
  main()
