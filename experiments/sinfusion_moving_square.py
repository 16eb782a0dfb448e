"""SinFusion on a synthetic moving-square video: train, sample, score.

  python experiments/sinfusion_moving_square.py --workdir=/tmp/sf_square

Writes a 24-frame 32x32 video (a red square moving right by one pixel per
frame over a colour gradient) to workdir/square.mp4, trains the three
SinFusion models on it with a CPU-sized configs/single_video.py, writes the
samples, and scores diverse videos (vdm_jax.sinfusion.metrics) next to
reference points: a copy of the input, the input shifted in time and
space, and uniform noise. Results: workdir/results.json (docs/sinfusion.md).
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import single_video  # pylint: disable=g-import-not-at-top
from vdm_jax import sinfusion
from vdm_jax import video_io
from vdm_jax.sinfusion import data as sf_data
from vdm_jax.sinfusion import metrics
from vdm_jax.sinfusion import train as sf_train

_WORKDIR = flags.DEFINE_string('workdir', '/tmp/sf_square', 'Output dir.')
_STEPS = flags.DEFINE_integer('steps', 600, 'Training steps.')


def moving_square(num_frames: int = 24, size: int = 32, side: int = 6
                  ) -> np.ndarray:
  """uint8 [T, size, size, 3]: a square moving right over a gradient."""
  y, x = np.mgrid[0:size, 0:size] / (size - 1)
  background = np.stack([x, y, 0.5 * np.ones_like(x)], -1) * 200 + 20
  frames = []
  top = size // 2 - side // 2
  for i in range(num_frames):
    frame = background.copy()
    left = (2 + i) % (size - side)
    frame[top:top + side, left:left + side] = (250, 30, 30)
    frames.append(frame)
  return np.asarray(frames).astype(np.uint8)


def make_config(path: str, steps: int):
  config = single_video.get_config()
  config.data.path = path
  config.data.max_size = 32
  config.model.width = 32
  config.model.depth = 2
  config.model.kernel_size = 5
  config.model.emb_dim = 64
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 50
  config.optimizer.ema_decay = 0.99
  config.training.batch_size = 6
  config.training.num_train_steps = steps
  config.training.checkpoint_every_steps = 200
  config.training.log_every_steps = 50
  config.sample.num_videos = 2
  config.sample.num_frames_out = 16
  config.eval.num_videos = 4
  config.eval.num_frames = 16
  config.eval.patch_size = 5
  return config


def main(argv):
  del argv
  workdir = _WORKDIR.value
  os.makedirs(workdir, exist_ok=True)
  video = moving_square()
  path = os.path.join(workdir, 'square.mp4')
  video_io.write_mp4(path, video, fps=8)
  config = make_config(path, _STEPS.value)
  timings = {}
  t0 = time.time()
  sf_train.train(config, workdir)
  timings['train_s'] = time.time() - t0
  t0 = time.time()
  sinfusion.sample_and_save(config, workdir)
  timings['sample_s'] = time.time() - t0
  t0 = time.time()
  scores = sinfusion.sample_and_evaluate(config, workdir)
  timings['eval_s'] = time.time() - t0
  # The reference points use the decoded input, as the model saw it.
  real = video_io.to_uint8(sf_data.load_video(config))  # [T, 32, 32, 3]
  f = config.eval.num_frames
  rng = np.random.default_rng(0)
  references = {
      'copy_of_input': real[None, :f],
      'time_and_space_shift': np.roll(real[None, 4:4 + f], 3, axis=3),
      'uniform_noise': rng.integers(0, 256, (2, f) + real.shape[1:],
                                    dtype=np.uint8),
  }
  ref_scores = {
      name: metrics.patch_metrics(v, real, patch=config.eval.patch_size)
      for name, v in references.items()
  }
  results = {'sinfusion': scores, 'references': ref_scores,
             'timings': timings, 'steps': _STEPS.value}
  with open(os.path.join(workdir, 'results.json'), 'w') as fp:
    json.dump(results, fp, indent=2, sort_keys=True)
  print(json.dumps(results, indent=2, sort_keys=True))


if __name__ == '__main__':
  app.run(main)
