"""A tiny random Stable Video Diffusion folder in diffusers' layout, for tests.

Built with diffusers and transformers (PyTorch) from configs and saved with
`save_pretrained`, so vdm_jax reads it exactly as it reads the released
checkpoints; nothing is downloaded. The scheduler is SVD's own config.
"""

import numpy as np

# stabilityai/stable-video-diffusion-img2vid(-xt)'s scheduler_config.json.
SVD_SCHEDULER = {
    'beta_end': 0.012, 'beta_schedule': 'scaled_linear',
    'beta_start': 0.00085, 'clip_sample': False,
    'interpolation_type': 'linear', 'num_train_timesteps': 1000,
    'prediction_type': 'v_prediction', 'set_alpha_to_one': False,
    'sigma_max': 700.0, 'sigma_min': 0.002, 'skip_prk_steps': True,
    'steps_offset': 1, 'timestep_spacing': 'leading',
    'timestep_type': 'continuous', 'trained_betas': None,
    'use_karras_sigmas': True}
# Latents 4x4 (16x16 frames, autoencoder factor 2, two UNet levels).
SIZE, FRAMES = 16, 3


def tiny_svd_pipeline(folder: str, seed: int = 0):
  """A tiny random StableVideoDiffusionPipeline saved in `folder`.

  The UNet has an attention level and a plain one (num_frames 3), the
  temporal autoencoder a factor of 2, the CLIP vision tower 2 layers on
  224x224 (the pipeline always resizes to 224) with 32-pixel patches;
  weights scaled to give outputs of order 1.

  Returns:
    The pipeline (progress bar off).
  """
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  unet = diffusers.UNetSpatioTemporalConditionModel(
      sample_size=8, in_channels=8, out_channels=4,
      block_out_channels=(32, 64), layers_per_block=1,
      num_attention_heads=(2, 4), cross_attention_dim=16,
      addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
      num_frames=FRAMES,
      down_block_types=('CrossAttnDownBlockSpatioTemporal',
                        'DownBlockSpatioTemporal'),
      up_block_types=('UpBlockSpatioTemporal',
                      'CrossAttnUpBlockSpatioTemporal'))
  vae = diffusers.AutoencoderKLTemporalDecoder(
      block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
      down_block_types=('DownEncoderBlock2D',) * 2)
  image_encoder = transformers.CLIPVisionModelWithProjection(
      transformers.CLIPVisionConfig(
          hidden_size=32, intermediate_size=48, num_hidden_layers=2,
          num_attention_heads=4, image_size=224, patch_size=32,
          projection_dim=16, hidden_act='gelu'))
  with torch.no_grad():
    for model in (unet, vae, image_encoder):
      for name, p in model.named_parameters():
        if name.endswith('bias') or name.endswith('mix_factor'):
          p.copy_(0.1 * torch.randn_like(p))
        elif p.ndim > 1 and 'embedding' not in name:
          p.copy_(torch.randn_like(p) / np.prod(p.shape[1:]) ** 0.5)
  pipe = diffusers.StableVideoDiffusionPipeline(
      vae=vae.eval(), image_encoder=image_encoder.eval(), unet=unet.eval(),
      scheduler=diffusers.EulerDiscreteScheduler.from_config(SVD_SCHEDULER),
      feature_extractor=transformers.CLIPImageProcessor())
  pipe.set_progress_bar_config(disable=True)
  pipe.save_pretrained(folder)
  return pipe


def first_frame(seed: int = 0, size: int = SIZE) -> np.ndarray:
  """A smooth uint8 [size, size, 3] test image."""
  rng = np.random.RandomState(seed)
  y, x = np.mgrid[0:size, 0:size] / size
  img = np.stack([np.sin(6 * x + rng.rand()), np.cos(5 * y + rng.rand()),
                  np.sin(4 * (x + y))], -1)
  return np.round(127.5 + 120 * img).astype(np.uint8)
