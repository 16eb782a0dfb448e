"""Stable Diffusion text-to-image == diffusers' StableDiffusionPipeline.

A tiny random pipeline saved in diffusers' layout is read by vdm_jax; from
the same initial latents, prompts and guidance scale, the library's DDIM
(and Euler) sampling on the scheduler's grid, the latent codec and the CLIP
encoder give diffusers' images.
"""

import diffusers
import jax
import ml_collections
import numpy as np
import pytest
import torch

from vdm_jax import sharding
from vdm_jax.pretrained import stable_diffusion
import sd_fixtures

PROMPTS = ['a photo of a cat riding a horse', 'an astronaut on the moon']


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('sd'))
  pipe = sd_fixtures.tiny_sd_pipeline(folder)
  pipe.folder = folder
  return pipe, stable_diffusion.load(folder)


def _diffusers_images(pipe, latents, steps, scale, scheduler=None):
  if scheduler is not None:
    pipe = diffusers.StableDiffusionPipeline(**dict(pipe.components,
                                                    scheduler=scheduler))
    pipe.set_progress_bar_config(disable=True)
  with torch.no_grad():
    return pipe(PROMPTS, latents=torch.from_numpy(latents), height=16,
                width=16, num_inference_steps=steps, guidance_scale=scale,
                output_type='np').images


LATENTS = np.random.RandomState(1).randn(2, 4, 8, 8).astype(np.float32)


@pytest.mark.parametrize('scale', [7.5, 1.0])
def test_ddim_images_match_diffusers(tiny, scale):
  pipe, sd = tiny
  want = _diffusers_images(pipe, LATENTS, 6, scale)
  got, _ = stable_diffusion.text_to_image(
      sd, PROMPTS, jax.random.key(0), sampler='ddim', num_steps=6,
      guidance_scale=scale, init_latents=LATENTS)
  assert want.shape == got.shape == (2, 16, 16, 3)
  assert np.std(want) > 0.05  # A real picture, not a constant.
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_euler_images_match_diffusers(tiny):
  pipe, sd = tiny
  # As a user would swap it in: from the folder's scheduler config.
  euler = diffusers.EulerDiscreteScheduler.from_pretrained(
      pipe.folder, subfolder='scheduler')
  want = _diffusers_images(pipe, LATENTS, 5, 4.0, scheduler=euler)
  got, _ = stable_diffusion.text_to_image(
      sd, PROMPTS, jax.random.key(0), sampler='euler', num_steps=5,
      guidance_scale=4.0, init_latents=LATENTS)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_fsdp_placement_gives_the_same_images(tiny):
  pipe, sd = tiny
  mesh = sharding.make_mesh(ml_collections.ConfigDict({'data': -1, 'fsdp': 4}))
  sharded = stable_diffusion.load(pipe.folder, mesh=mesh,
                                  param_sharding='fsdp')
  kernel = sharded.unet_params['conv_out']['kernel']
  assert 'fsdp' in str(kernel.sharding.spec)
  assert len({s.device for s in kernel.addressable_shards}) == 8
  want, _ = stable_diffusion.text_to_image(
      sd, PROMPTS, jax.random.key(0), num_steps=3, init_latents=LATENTS)
  got, _ = stable_diffusion.text_to_image(
      sharded, PROMPTS, jax.random.key(0), num_steps=3, init_latents=LATENTS,
      mesh=mesh)
  np.testing.assert_allclose(got, want, atol=1e-5)
