"""Fixed-seed outputs that a refactor must not change (tests/test_golden.py).

Each case returns a dict of float arrays: the parameters after two tiny
train steps (plain, VideoFusion noise, gradient accumulation), every
sampler's samples (i.i.d. and decomposed noise), every task's samples
(replacement and reconstruction guidance), DDIM inversion, the training
preview, and two SinFusion train steps. `record(path)` writes them all.
"""

import os
import tempfile

# Every case; the default suite runs a cheaper subset of each group.
FULL = bool(os.environ.get('GOLDEN_FULL') or os.environ.get('GOLDEN_RECORD'))

import jax
import jax.numpy as jnp
import numpy as np

from configs import single_video
from configs import tiny
from vdm_jax import video_io


class _Api:
  """The library calls the cases make (written against the pre-refactor API)."""

  @staticmethod
  def train(config, workdir):
    from vdm_jax import train
    return train.train(config, workdir)

  @staticmethod
  def sf_train(config, workdir):
    from vdm_jax.sinfusion import train as sf_train
    return sf_train.train(config, workdir)

  @staticmethod
  def model_and_params(config, rng):
    from vdm_jax import denoiser
    model = denoiser.create_model(config)
    params = denoiser.init_params(config, model, rng)
    return model, params

  @staticmethod
  def denoise_fn(model, params):
    from vdm_jax import denoiser
    return denoiser.make_denoise_fn(model, params)

  @staticmethod
  def sample(config, fn, rng, shape):
    from vdm_jax import tasks
    from vdm_jax import sampling
    setup = tasks.Setup.from_config(config)
    return sampling.sample(fn, rng, shape, logsnr_fn=setup.logsnr_fn,
                           target=setup.target, spec=setup.spec,
                           noise=setup.noise)

  @staticmethod
  def invert(config, fn, x):
    from vdm_jax import sampling
    from vdm_jax import schedules
    return sampling.ddim_invert(
        fn, x, logsnr_fn=schedules.get_logsnr_fn(config.diffusion,
                                                 config.data.image_size),
        target=config.diffusion.target, num_steps=config.sample.num_steps)

  @staticmethod
  def run_task(config, fn, rng, video, num_videos, labels):
    from vdm_jax import tasks
    return tasks.run(tasks.from_config(config.sample), fn, rng,
                     tasks.Setup.from_config(config), video=video,
                     num_videos=num_videos, labels=labels)

  @staticmethod
  def preview(config, model, params, rng, num_videos, num_steps):
    from vdm_jax import train
    return train.preview_videos(config, model, params, rng,
                                num_videos=num_videos, num_steps=num_steps)


api = _Api


def _flat(prefix, tree):
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {prefix + '/' + jax.tree_util.keystr(k): np.asarray(v)
          for k, v in leaves}


def _config(**overrides):
  config = tiny.get_config()
  config.training.num_train_steps = 2
  config.training.checkpoint_every_steps = 2
  for key, value in overrides.items():
    group, field = key.split('.')
    config[group][field] = value
  return config


def train_cases():
  out = {}
  variants = {
      'plain': {},
      'decomposed': {'diffusion.noise': 'decomposed'},
      'accum': {'training.grad_accum_steps': 2, 'training.batch_size': 16,
                'data.image_frames': 2},
  }
  for name, overrides in variants.items():
    if not FULL and name != 'accum':
      continue
    with tempfile.TemporaryDirectory() as workdir:
      state = api.train(_config(**overrides), workdir)
      out.update(_flat(f'train/{name}', state.params))
  return out


def _model_and_params(config):
  return api.model_and_params(config, jax.random.key(1))


def sampler_cases():
  out = {}
  for noise in ('iid', 'decomposed') if FULL else ('decomposed',):
    config = _config(**{'diffusion.noise': noise})
    model, params = _model_and_params(config)
    fn = api.denoise_fn(model, params)
    d = config.data
    shape = (2, d.num_frames, d.image_size, d.image_size, d.channels)
    for sampler in ('ancestral', 'ddim', 'pc'):
      config.sample.sampler = sampler
      config.sample.eta = 0.5 if sampler == 'ddim' else 0.0
      x = api.sample(config, fn, jax.random.key(2), shape)
      out[f'sampler/{noise}/{sampler}'] = np.asarray(x)
    out[f'invert/{noise}'] = np.asarray(api.invert(config, fn, x))
  return out


def _video(shape, seed=3):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32)


TASK_RUNS = {
    'unconditional': {},
    'class': {'sample.guidance_weight': 1.5},
    'predict': {'sample.num_cond_frames': 2},
    'predict_recon': {'sample.task': 'predict', 'sample.num_cond_frames': 2,
                      'sample.recon_weight': 2.0},
    'extend': {'sample.num_cond_frames': 1, 'sample.num_frames_out': 10},
    'extend_back_recon': {'sample.task': 'extend',
                          'sample.direction': 'backward',
                          'sample.num_frames_out': 9,
                          'sample.recon_weight': 1.0},
    'extend_fixed_base': {'sample.task': 'extend',
                          'diffusion.noise': 'decomposed',
                          'sample.fixed_base_noise': True,
                          'sample.num_frames_out': 9},
    'interpolate': {'sample.interp_factor': 3, 'sample.recon_weight': 1.0},
    'keyframes': {'sample.recon_weight': 1.0},
    # Independent blocks, as recorded (the default overlaps blocks).
    'upsample': {'sample.recon_weight': 4.0, 'sample.upsample_overlap': 0},
    'pc_predict': {'sample.task': 'predict', 'sample.sampler': 'pc'},
}


# The cases the default test suite runs (GOLDEN_FULL=1: all of them).
QUICK_TASKS = ('class', 'extend_back_recon', 'extend_fixed_base',
               'interpolate', 'upsample', 'pc_predict')


def task_cases():
  out = {}
  for name, overrides in TASK_RUNS.items():
    if not FULL and name not in QUICK_TASKS:
      continue
    overrides = dict(overrides)
    overrides.setdefault('sample.task', name)
    config = _config(**overrides)
    model, params = _model_and_params(config)
    fn = api.denoise_fn(model, params)
    task = overrides['sample.task']
    video = None
    if task in ('predict', 'extend', 'keyframes'):
      video = _video((2, 4, 16, 16, 3))
    elif task == 'interpolate':
      video = _video((2, 3, 16, 16, 3))
    elif task == 'upsample':
      video = _video((2, 8, 8, 8, 3))
    labels = jnp.asarray([0, 2], jnp.int32)
    x = api.run_task(config, fn, jax.random.key(4), video, 2, labels)
    out[f'task/{name}'] = np.asarray(x)
  return out


def preview_cases():
  config = _config(**{'model.num_classes': 3, 'sample.guidance_weight': 1.0})
  model, params = _model_and_params(config)
  return {'preview': np.asarray(api.preview(
      config, model, params, jax.random.key(5), 2, 3))}


def _square_video(num_frames=12, size=16):
  y, x = np.mgrid[0:size, 0:size] / (size - 1)
  frames = np.repeat(
      (np.stack([x, y, 0.5 * np.ones_like(x)], -1) * 200 + 20)[None],
      num_frames, axis=0)
  for i in range(num_frames):
    left = (1 + i) % (size - 4)
    frames[i, 6:10, left:left + 4] = (250, 30, 30)
  return frames.astype(np.uint8)


def sinfusion_cases():
  with tempfile.TemporaryDirectory() as workdir:
    path = os.path.join(workdir, 'clip.npz')
    video_io.save_npz(path, _square_video()[None])
    config = single_video.get_config('tiny')
    config.data.path = path
    config.training.num_train_steps = 2
    config.training.checkpoint_every_steps = 2
    state = api.sf_train(config, os.path.join(workdir, 'run'))
    return _flat('sinfusion', state.params)


CASES = (train_cases, sampler_cases, task_cases, preview_cases,
         sinfusion_cases)


def record(path: str) -> dict:
  out = {}
  for case in CASES:
    out.update(case())
  np.savez(path, **out)
  return out
