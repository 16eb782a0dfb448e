"""Stable Diffusion text-to-image == diffusers' StableDiffusionPipeline.

A tiny random pipeline saved in diffusers' layout is read by vdm_jax; from
the same initial latents, prompts and guidance scale, the library's DDIM
(and Euler) sampling on the scheduler's grid, the latent codec and the CLIP
encoder give diffusers' images.
"""

import json
import os
import shutil

import diffusers
import jax
import ml_collections
import numpy as np
import PIL.Image
import pytest
import torch

from configs import stable_diffusion as stable_diffusion_config
from vdm_jax import sample_pretrained
from vdm_jax import sampling
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


def _program_config(folder, tmp_path, **sample):
  config = stable_diffusion_config.get_config()
  config.pretrained.path = folder
  config.sample.update(dict(dict(num_videos=2, batch_size=2, num_steps=6,
                                 sampler='ddim', height=16, width=16),
                            **sample))
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('\n'.join(PROMPTS) + '\n')
  config.sample.prompts_file = str(prompts)
  return config


def test_program_writes_diffusers_images(tiny, tmp_path):
  """--mode=sample with configs/stable_diffusion.py: the PNGs and the npz
  hold diffusers' uint8 images (from the same initial latents)."""
  pipe, _ = tiny
  np.save(tmp_path / 'latents.npy', LATENTS)
  config = _program_config(pipe.folder, tmp_path,
                           init_latents=str(tmp_path / 'latents.npy'))
  paths = sample_pretrained.sample_and_save(config, str(tmp_path / 'run'))
  want = np.rint(_diffusers_images(pipe, LATENTS, 6, 7.5) * 255)
  videos = np.load(paths['npz'])['videos']
  assert videos.shape == (2, 1, 16, 16, 3)
  assert np.abs(videos[:, 0].astype(int) - want).max() <= 1
  png = np.asarray(PIL.Image.open(paths['png'][1]))
  np.testing.assert_array_equal(png, videos[1, 0])
  assert os.path.basename(paths['png'][0]).startswith('sample_000_a_photo')


@pytest.mark.parametrize('change, error, message', [
    ({'path': 'MISSING'}, FileNotFoundError, 'is not a folder'),
    ({'path': 'MODEL'}, FileNotFoundError, 'has no model_index.json'),
    ({'sampler': 'pc'}, ValueError, "sample.sampler='pc'"),
    ({'task': 'predict'}, ValueError, "sample.task='predict'"),
    ({'init_latents': 'MISSING'}, FileNotFoundError, 'does not exist'),
    ({'init_latents': 'SHORT'}, ValueError, 'needs sample.num_videos=2'),
    ({'unet_class': 'UNet3DConditionModel'}, ValueError,
     "unet class 'UNet3DConditionModel' is not supported"),
])
def test_bad_input_is_named_before_loading(tiny, tmp_path, change, error,
                                           message):
  pipe, _ = tiny
  folder = pipe.folder
  if change.get('path') == 'MISSING':
    folder = str(tmp_path / 'missing')
  elif change.get('path') == 'MODEL':
    folder = os.path.join(pipe.folder, 'unet')
  elif 'unet_class' in change:
    folder = str(tmp_path / 'copy')
    shutil.copytree(pipe.folder, folder)
    index = json.load(open(os.path.join(folder, 'model_index.json')))
    index['unet'][1] = change['unet_class']
    json.dump(index, open(os.path.join(folder, 'model_index.json'), 'w'))
  sample = {k: v for k, v in change.items() if k in ('sampler', 'task')}
  config = _program_config(folder, tmp_path, **sample)
  if change.get('init_latents') == 'MISSING':
    config.sample.init_latents = str(tmp_path / 'none.npy')
  elif change.get('init_latents') == 'SHORT':
    np.save(tmp_path / 'short.npy', LATENTS[:1])
    config.sample.init_latents = str(tmp_path / 'short.npy')
  with pytest.raises(error, match=message):
    sample_pretrained.check(config)


def test_reconstruction_guidance_runs_on_the_pretrained_unet(tiny):
  """A pretrained model is one more denoise_fn: VDM's reconstruction
  guidance (eq. 7: jax.grad through SD's UNet inside the sampler's scan)
  conditions the unknown half of a latent image on the known half
  (inpainting in latent space); the known half is x_a (replacement)."""
  _, sd = tiny
  grid = sd.schedule.grid('ddim', 6)
  shape = (2, 1, 8, 8, 4)
  x_a = jax.random.normal(jax.random.key(5), shape)
  mask = np.zeros((2, 1, 8, 8, 1), bool)
  mask[:, :, :, :4] = True
  cond = {'text': stable_diffusion.encode_prompts(sd, PROMPTS)}

  def run(weight):
    guidance = sampling.make_guidance(x_a=x_a, mask=mask, recon_weight=weight,
                                      method='reconstruction')
    return sampling.sample(
        sd.denoise_fn(), jax.random.key(1), shape, logsnr_fn=None,
        target=sd.schedule.target,
        spec=sampling.SamplerSpec(sampler='ddim', num_steps=6, clip_x=False),
        cond=cond, guidance=guidance, logsnrs=grid['logsnrs'],
        denoise_last=grid['denoise_last'])

  free, guided = np.asarray(run(0.0)), np.asarray(run(8.0))
  assert np.all(np.isfinite(guided))
  np.testing.assert_array_equal(guided[..., :4, :], x_a[..., :4, :])
  # The gradient term moves the unknown half (w_r = 0 is replacement only).
  assert np.abs(guided - free)[..., 4:, :].mean() > 1e-2
