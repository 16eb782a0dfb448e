"""Latent diffusion with this library's UNet: the frozen autoencoder codec
(== diffusers' AutoencoderKL), training on its latents and sampling through
it (latent.path)."""

import os

import jax
import numpy as np
import pytest
import torch

from configs import tiny
from vdm_jax import denoiser
from vdm_jax import latent
from vdm_jax import sample
from vdm_jax import train
from vdm_jax.pretrained import autoencoder


@pytest.fixture(scope='module')
def vae_folder(tmp_path_factory):
  """A tiny random AutoencoderKL (factor 2, 4 latent channels) on disk."""
  import diffusers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  vae = diffusers.AutoencoderKL(
      block_out_channels=(16, 32), in_channels=3, out_channels=3,
      down_block_types=('DownEncoderBlock2D',) * 2,
      up_block_types=('UpDecoderBlock2D',) * 2, latent_channels=4,
      norm_num_groups=8, sample_size=16, scaling_factor=0.5)
  folder = str(tmp_path_factory.mktemp('vae'))
  vae.save_pretrained(folder)
  return vae, folder


def test_codec_matches_diffusers_and_chunks(vae_folder):
  vae, folder = vae_folder
  module, params = autoencoder.load(folder)
  x = np.random.RandomState(0).uniform(-1, 1, (2, 3, 16, 16, 3)).astype(
      np.float32)
  with torch.no_grad():
    flat = torch.from_numpy(x.reshape(6, 16, 16, 3)).permute(0, 3, 1, 2)
    mean = vae.encode(flat).latent_dist.mean
    recon = vae.decode(mean).sample
  want_z = (0.5 * mean).permute(0, 2, 3, 1).numpy().reshape(2, 3, 8, 8, 4)
  want_x = recon.permute(0, 2, 3, 1).numpy().reshape(x.shape)
  for chunk in (4, 8):  # 6 frames: a padded last chunk, and one chunk.
    codec = latent.Autoencoder(module, chunk=chunk)
    z = codec.encode(params, x)
    np.testing.assert_allclose(z, want_z, atol=1e-5)
    np.testing.assert_allclose(codec.decode(params, z), want_x, atol=1e-5)
  assert codec.latent_shape(x.shape) == (2, 3, 8, 8, 4)
  sampled = codec.encode(params, x, jax.random.key(0))
  assert 1e-3 < float(np.abs(sampled - want_z).mean()) < 1.0


def _latent_config(folder):
  config = tiny.get_config()
  config.latent.path = folder
  config.training.num_train_steps = 2
  config.training.checkpoint_every_steps = 2
  return config


def test_trains_and_samples_in_latent_space(vae_folder, tmp_path):
  config = _latent_config(vae_folder[1])
  m = denoiser.model_space(config)
  assert (m.data.image_size, m.data.channels) == (8, 4)
  assert (config.data.image_size, config.data.channels) == (16, 3)
  workdir = str(tmp_path / 'run')
  state = train.train(config, workdir)
  assert state.params['conv_in']['kernel'].shape[-2] == 4  # Latent input.
  # A frame task: the given frames are encoded, the samples decoded.
  config.sample.task = 'predict'
  config.sample.num_cond_frames = 2
  out = np.load(sample.sample_and_save(config, workdir)['npz'])
  assert out['videos'].shape == (2, 4, 16, 16, 3)  # Pixels.
  assert out['inputs'].shape[2:] == (16, 16, 3)
  config.sample.task = 'upsample'
  with pytest.raises(ValueError, match='not available for a latent model'):
    sample.prepare(config, 2, seed=0)


def test_bad_latent_folders(vae_folder, tmp_path):
  config = tiny.get_config()
  config.latent.path = str(tmp_path / 'missing')
  with pytest.raises(FileNotFoundError, match='not a folder'):
    denoiser.validate(config)
  config.latent.path = vae_folder[1]
  config.data.image_size = 15
  with pytest.raises(ValueError, match='not a multiple of the autoencoder'):
    denoiser.validate(config)
  os.makedirs(tmp_path / 'unet')
  with open(tmp_path / 'unet' / 'config.json', 'w') as f:
    f.write('{"_class_name": "UNet2DConditionModel"}')
  config.latent.path = str(tmp_path / 'unet')
  config.data.image_size = 16
  with pytest.raises(ValueError, match='not an autoencoder'):
    denoiser.validate(config)
