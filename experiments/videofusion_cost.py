"""Train-step memory and sampling latency: VideoFusion against VDM's UNet.

  PYTHONPATH=. python experiments/videofusion_cost.py
  PYTHONPATH=. python experiments/videofusion_cost.py --paper --nolatency

The paper's anchors (Luo et al. 2023): about 21.8% less memory and 57.5%
less latency than its VDM re-implementation. Per pair of configs (VDM's,
VideoFusion's), one JSON line each (both sides train on clips alone:
VDM's data.image_frames is set to 0):

- params: parameters of each generator (VideoFusion: base, residual);
- residual_bytes_per_example: what the train loss's backward pass keeps
  from its forward pass per example (traced, no compile: the same on any
  backend; remat_memory.residual_bytes), the activation memory that grows
  with the batch;
- state_bytes: parameters + EMA + Adam's two moments (float32), the
  memory that does not;
- temp_bytes: XLA:CPU's memory_analysis() of the compiled loss gradient at
  --batch_size (skipped for the paper-sized configs);
- sample_s: wall seconds to sample --videos videos with --steps ancestral
  steps (compiled first; the configs alternate for --rounds rounds, the
  median is reported), quickstart-sized configs only.
"""

import argparse
import importlib
import json
import os
import statistics
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import remat_memory  # pylint: disable=g-import-not-at-top
from vdm_jax import denoiser  # pylint: disable=g-import-not-at-top
from vdm_jax import noise as noise_lib  # pylint: disable=g-import-not-at-top
from vdm_jax import sampling  # pylint: disable=g-import-not-at-top
from vdm_jax import schedules  # pylint: disable=g-import-not-at-top

PAIRS = {
    'quickstart': ('quickstart', 'videofusion_quickstart'),
    'ucf101_64': ('ucf101_64', 'videofusion_ucf101_64'),
}


def _config(name):
  config = importlib.import_module(f'configs.{name}').get_config()
  # Like for like: VideoFusion trains on 16-frame clips alone, so VDM's
  # UCF101 config is measured without its 8 joint-training image frames.
  config.data.image_frames = 0
  return config


def _params(config):
  model = denoiser.create_model(config)
  shapes = denoiser.abstract_params(config, model)
  if 'base' in shapes:
    return {k: denoiser.count_params(v) for k, v in shapes.items()}
  return {'unet': denoiser.count_params(shapes)}


def memory(name, batch_size, compile_):
  config = _config(name)
  params = _params(config)
  one = remat_memory.residual_bytes(config, 1)['device']
  two = remat_memory.residual_bytes(config, 2)['device']
  row = {'config': name, 'params': params,
         'residual_bytes_per_example': two - one,
         'state_bytes': 4 * 4 * sum(params.values())}
  if compile_:
    row['temp_bytes'] = remat_memory.compiled_memory(
        config, batch_size)['temp']
  return row


def sampler(name, videos, steps):
  """A compiled () -> samples of the config's (random) model."""
  config = _config(name)
  model = denoiser.create_model(config)
  params = denoiser.init_params(config, model, jax.random.key(0))
  fn = denoiser.make_denoise_fn(model, params)
  d = config.data
  shape = (videos, d.num_frames, d.image_size, d.image_size, d.channels)
  noise = noise_lib.from_config(config.diffusion, d.num_frames)
  run = jax.jit(lambda f, rng: sampling.sample(
      f, rng, shape,
      logsnr_fn=schedules.get_logsnr_fn(config.diffusion, d.image_size),
      target=config.diffusion.target,
      spec=sampling.SamplerSpec(num_steps=steps), noise=noise))
  jax.block_until_ready(run(fn, jax.random.key(1)))
  return lambda: jax.block_until_ready(run(fn, jax.random.key(2)))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--paper', action='store_true',
                      help='The UCF101 configs instead (traced memory).')
  parser.add_argument('--nolatency', action='store_true',
                      help='Skip the quickstart sampling times.')
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--videos', type=int, default=8)
  parser.add_argument('--steps', type=int, default=64)
  parser.add_argument('--rounds', type=int, default=3)
  args = parser.parse_args()
  rows = {}
  for pair, names in PAIRS.items():
    if (pair != 'quickstart') != args.paper:
      continue
    for name in names:
      rows[name] = memory(name, args.batch_size, pair == 'quickstart')
      print(json.dumps(rows[name]), file=sys.stderr, flush=True)
  runs = {} if args.nolatency else {
      name: sampler(name, args.videos, args.steps)
      for name in PAIRS['quickstart']}
  times = {name: [] for name in runs}
  for _ in range(args.rounds):
    for name, run in runs.items():
      start = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - start)
  for name in runs:
    rows[name]['sample_s'] = round(statistics.median(times[name]), 2)
    rows[name]['sample_s_all'] = [round(t, 2) for t in times[name]]
  for pair, (vdm, vf) in PAIRS.items():
    if vdm not in rows:
      continue
    ratio = {k: rows[vf][k] / rows[vdm][k] for k in (
        'residual_bytes_per_example', 'state_bytes', 'temp_bytes',
        'sample_s') if k in rows[vf]}
    print(json.dumps({'pair': pair, 'videofusion / vdm': {
        k: round(float(v), 3) for k, v in ratio.items()}}))
  for row in rows.values():
    print(json.dumps(row))


if __name__ == '__main__':
  main()
