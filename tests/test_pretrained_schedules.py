"""Pretrained discrete schedules as log-SNR grids == diffusers' schedulers.

A toy model (a fixed function of the noisy latent and of the model's
timestep) is sampled by diffusers' DDIMScheduler / EulerDiscreteScheduler
loop and by this library's DDIM on the schedule's grid, with the timestep
recovered from the log-SNR: the same trajectory, step for step.
"""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vdm_jax import sampling
from vdm_jax import schedules

SD15 = {'_class_name': 'PNDMScheduler', 'beta_end': 0.012,
        'beta_schedule': 'scaled_linear', 'beta_start': 0.00085,
        'num_train_timesteps': 1000, 'set_alpha_to_one': False,
        'skip_prk_steps': True, 'steps_offset': 1, 'trained_betas': None,
        'clip_sample': False}


def _toy(z, t):
  """A model output of order 1 that depends on z and on the timestep t."""
  return 0.6 * z + np.sin(t / 37.0) * 0.5 + 0.3 * np.tanh(2 * z)


def _diffusers_loop(cls, cfg, latents, num_steps):
  sched = cls.from_config(cfg)
  sched.set_timesteps(num_steps)
  x = torch.from_numpy(latents) * sched.init_noise_sigma
  for t in sched.timesteps:
    inp = sched.scale_model_input(x, t)
    out = torch.from_numpy(_toy(inp.numpy(), float(t)).astype(np.float32))
    x = sched.step(out, t, x).prev_sample
  return x.numpy(), sched


def _ours(cfg, sampler, latents, num_steps):
  sched = schedules.from_scheduler_config(cfg)
  grid = sched.grid(sampler, num_steps)

  def denoise_fn(z, logsnr, cond):
    del cond
    t = sched.timestep(logsnr)[:, None, None, None, None]
    return 0.6 * z + jnp.sin(t / 37.0) * 0.5 + 0.3 * jnp.tanh(2 * z)

  z0 = jnp.asarray(latents)[:, None] * grid['init_scale']
  x = sampling.sample(
      denoise_fn, jax.random.key(0), z0.shape, logsnr_fn=None,
      target=sched.target,
      spec=sampling.SamplerSpec(sampler='ddim', num_steps=num_steps,
                                clip_x=False),
      z_init=z0, logsnrs=grid['logsnrs'], denoise_last=grid['denoise_last'],
      logsnrs_to=grid.get('logsnrs_to'))
  return np.asarray(x[:, 0]), grid


LATENTS = np.random.RandomState(0).randn(2, 4, 4, 3).astype(np.float32)


@pytest.mark.parametrize('overrides', [
    {},  # SD-1.5's own config: leading + offset 1, final alpha_bar_0.
    {'set_alpha_to_one': True, 'timestep_spacing': 'trailing'},
    {'timestep_spacing': 'linspace', 'prediction_type': 'v_prediction'},
])
def test_ddim_matches_diffusers(overrides):
  cfg = dict(SD15, **overrides)
  # 7 steps: diffusers' DDIM steps to t - 1000 // 7, which 'trailing' and
  # 'linspace' do not list next (grid['logsnrs_to']).
  want, sched = _diffusers_loop(diffusers.DDIMScheduler, cfg, LATENTS, 7)
  got, grid = _ours(cfg, 'ddim', LATENTS, 7)
  assert ('logsnrs_to' in grid) == (cfg.get('timestep_spacing', 'leading')
                                    != 'leading')
  np.testing.assert_array_equal(grid['timesteps'], sched.timesteps.numpy())
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('overrides', [
    {},  # Unset: Euler's own default, linspace (fractional t).
    {'timestep_spacing': 'leading'},
    {'timestep_spacing': 'trailing', 'prediction_type': 'v_prediction'},
])
def test_euler_matches_diffusers(overrides):
  cfg = dict(SD15, **overrides)
  want, sched = _diffusers_loop(diffusers.EulerDiscreteScheduler, cfg,
                                LATENTS, 6)
  got, grid = _ours(cfg, 'euler', LATENTS, 6)
  np.testing.assert_allclose(grid['timesteps'], sched.timesteps.numpy(),
                             rtol=1e-6)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_timestep_inverts_the_table():
  sched = schedules.from_scheduler_config(SD15)
  table = np.asarray(sched.logsnr_table(), np.float32)
  steps = np.array([0, 1, 500, 981, 999])
  np.testing.assert_array_equal(sched.timestep(table[steps]), steps)
  acp = diffusers.DDIMScheduler.from_config(SD15).alphas_cumprod.numpy()
  np.testing.assert_allclose(sched.alphas_cumprod, acp, rtol=2e-6)
  # Uniform t in [0, 1] draws the training timesteps.
  fn = sched.logsnr_fn()
  np.testing.assert_array_equal(fn(jnp.array([0.0, 0.5, 1.0])),
                                table[[0, 500, 999]])


def test_bad_scheduler_configs():
  with pytest.raises(ValueError, match="beta_schedule 'sigmoid'"):
    schedules.from_scheduler_config(dict(SD15, beta_schedule='sigmoid'))
  with pytest.raises(ValueError, match="prediction_type 'flow'"):
    schedules.from_scheduler_config(dict(SD15, prediction_type='flow'))
  with pytest.raises(ValueError, match='rescale_betas_zero_snr'):
    schedules.from_scheduler_config(dict(SD15, rescale_betas_zero_snr=True))
  with pytest.raises(ValueError, match='must not decrease'):
    sampling.check_grid([0.0, 1.0, 0.5])
