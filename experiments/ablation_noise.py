"""VideoFusion noise ablation: i.i.d. vs decomposed noise at equal steps.

  python experiments/ablation_noise.py --workdir=/tmp/ablation_noise \
      [--steps=400] [--num_videos=40] [--lam=0.5]

Trains the same small UNet twice on the built-in synthetic dataset (bouncing
shapes, 10 frames of 16x16, the fewest frames I3D takes with room to spare),
once with diffusion.noise='iid' and once with 'decomposed' (lambda --lam),
with the same seed, data order and number of steps; samples --num_videos
videos from each run's EMA parameters with that run's noise
(noise.from_config) and sampler (sampling.SamplerSpec.from_config); and
scores both against --num_videos held-out synthetic clips (dataset seed + 1)
with I3D FVD (reference resize to 224x224, Kinetics-400 logits; one fold); a
second held-out set (seed + 2) scored the same way gives the real-vs-real
floor at this N. CPU-sized: the widths are tiny and N is far below the 400
feature dimensions, so the FVDs compare the two runs with each other, not
with any published number.
Prints one JSON line and writes workdir/results.json (docs/benchmarks.md).
"""

import json
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import default  # pylint: disable=g-import-not-at-top
from vdm_jax import denoiser
from vdm_jax import noise as noise_lib
from vdm_jax import sample as sample_lib
from vdm_jax import sampling
from vdm_jax import schedules
from vdm_jax import train
from vdm_jax import video_io
from vdm_jax.data import synthetic
from vdm_jax.evaluation import fvd

_WORKDIR = flags.DEFINE_string('workdir', '/tmp/ablation_noise', 'Output.')
_STEPS = flags.DEFINE_integer('steps', 400, 'Training steps per run.')
_NUM_VIDEOS = flags.DEFINE_integer('num_videos', 40,
                                   'Generated (and real) videos per FVD.')
_LAM = flags.DEFINE_float('lam', 0.5, 'lambda of the decomposed run.')
_SAMPLE_STEPS = flags.DEFINE_integer('sample_steps', 64, 'Sampler steps.')


def make_config(noise: str, steps: int, lam: float):
  """A tiny unconditional 10x16x16 model (CPU-sized)."""
  config = default.get_config()
  config.data.num_frames = 10
  config.data.image_size = 16
  config.data.num_classes = 0
  config.model.base_channels = 32
  config.model.channel_mults = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.head_dim = 32
  config.model.dropout = 0.0
  config.model.emb_dim = 64
  config.model.max_temporal_distance = 10
  config.diffusion.target = 'v'
  config.diffusion.noise = noise
  config.diffusion.noise_lambda = lam
  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 50
  config.optimizer.ema_decay = 0.99
  config.training.batch_size = 8
  config.training.num_train_steps = steps
  config.training.checkpoint_every_steps = steps
  config.training.log_every_steps = 50
  config.sample.sampler = 'ancestral'
  config.sample.gamma = 0.1
  return config


def run(noise: str, workdir: str) -> dict:
  """Trains, samples and returns timings and uint8 samples of one run."""
  config = make_config(noise, _STEPS.value, _LAM.value)
  out = {}
  t0 = time.time()
  train.train(config, workdir)
  out['train_s'] = time.time() - t0
  t0 = time.time()
  model, params, _ = sample_lib.restore_ema_params(config, workdir)
  denoise_fn = denoiser.make_denoise_fn(model, params)
  d, n = config.data, _NUM_VIDEOS.value
  shape = (n, d.num_frames, d.image_size, d.image_size, d.channels)
  run_noise = noise_lib.from_config(config.diffusion, d.num_frames)
  x = sampling.sample(
      denoise_fn, jax.random.key(config.seed + 7), shape,
      logsnr_fn=schedules.get_logsnr_fn(config.diffusion, d.image_size),
      target=config.diffusion.target,
      spec=sampling.SamplerSpec.from_config(config.sample).replace(
          num_steps=_SAMPLE_STEPS.value),
      noise=run_noise)
  out['videos'] = np.asarray(video_io.to_uint8(np.asarray(x)))
  out['sample_s'] = time.time() - t0
  video_io.write_png_grid(os.path.join(workdir, 'samples.png'),
                          out['videos'][:8])
  return out


def main(argv):
  del argv
  root = _WORKDIR.value
  os.makedirs(root, exist_ok=True)
  runs = {name: run(name, os.path.join(root, name))
          for name in ('iid', 'decomposed')}
  config = make_config('iid', _STEPS.value, _LAM.value)
  d = config.data

  def real_clips(seed):
    return synthetic.SyntheticVideos(
        d.num_frames, d.image_size, d.channels, num_examples=10_000,
        num_classes=3, seed=seed).render_batch(
            range(_NUM_VIDEOS.value))['video']

  def features(videos):
    return fvd.extract_features(videos, batch_size=8,
                                progress=False)['logits_mean']

  t0 = time.time()
  real_feats = features(real_clips(config.seed + 1))
  scores = {name: fvd.compute_fvd(features(r['videos']), real_feats)['fvd']
            for name, r in runs.items()}
  # Reference point: a second held-out real set against the first (the
  # floor of FVD at this N).
  scores['real_vs_real'] = fvd.compute_fvd(
      features(real_clips(config.seed + 2)), real_feats)['fvd']
  results = {
      'fvd': scores,
      'timings': {name: {k: v for k, v in r.items() if k != 'videos'}
                  for name, r in runs.items()},
      'fvd_s': time.time() - t0,
      'steps': _STEPS.value, 'num_videos': _NUM_VIDEOS.value,
      'lam': _LAM.value, 'sample_steps': _SAMPLE_STEPS.value,
      'shape': [d.num_frames, d.image_size, d.image_size, d.channels],
  }
  with open(os.path.join(root, 'results.json'), 'w') as fp:
    json.dump(results, fp, indent=2, sort_keys=True)
  logging.info('Results: %s', results)
  print(json.dumps(results, sort_keys=True))


if __name__ == '__main__':
  app.run(main)
