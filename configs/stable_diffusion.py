"""Stable Diffusion text-to-image from a local diffusers folder.

  python -m vdm_jax.main --config=configs/stable_diffusion.py \\
      --workdir=runs/sd --mode=sample \\
      --config.pretrained.path=/path/to/stable-diffusion-v1-5 \\
      --config.sample.prompt='a photo of an astronaut riding a horse'

Reads the folder's UNet, autoencoder, CLIP text encoder, tokenizer and
scheduler (docs/pretrained.md); samples with this library's DDIM / Euler /
ancestral sampler on the scheduler's timesteps, classifier-free guidance in
diffusers' convention (sample.guidance_scale), and writes PNGs to
workdir/samples/pretrained/text_to_image/. `sample.init_latents=file.npy`
starts from given initial latents (diffusers' [B, 4, h, w] accepted), to
reproduce a diffusers result exactly.
"""

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.method = 'pretrained'
  config.sample.task = 'text_to_image'
  # 'auto': the folder's scheduler class decides ('euler' for
  # EulerDiscreteScheduler, 'ancestral' for DDPM, else 'ddim'); or 'ddim',
  # 'euler', 'ancestral'.
  config.sample.sampler = 'auto'
  config.sample.num_steps = 50
  # diffusers' guidance scale g: eps_u + g (eps_c - eps_u), i.e. this
  # library's guidance_weight w = g - 1; <= 1 turns guidance off.
  config.sample.guidance_scale = 7.5
  config.sample.negative_prompt = ''
  # Image size; 0 = the UNet's sample_size x the autoencoder's factor.
  config.sample.height = 0
  config.sample.width = 0
  # .npy of initial latents ([B, 4, h, w] as diffusers' `latents`, or
  # [B, h, w, 4]); '' draws them from the seed.
  config.sample.init_latents = ''
  config.sample.num_videos = 4
  config.sample.batch_size = 4
  config.sample.prompt = 'a photo of an astronaut riding a horse on mars'
  config.sample.clip_x = False  # Latents are not bounded; SD never clips.
  return config
