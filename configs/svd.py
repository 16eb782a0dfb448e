"""Stable Video Diffusion from a local diffusers folder: image-to-video and
Generative Inbetweening.

  # Image-to-video (SVD-img2vid: 14 frames; -xt: 25):
  python -m vdm_jax.main --config=configs/svd.py --workdir=runs/svd \\
      --mode=sample --config.pretrained.path=/models/svd-img2vid-xt \\
      --config.sample.input=first_frame.png
  # The backward-motion tune of Generative Inbetweening (on SVD-img2vid):
  python -m vdm_jax.main --config=configs/svd.py:inbetween \\
      --workdir=runs/svd_backward --mode=tune_backward \\
      --config.pretrained.path=/models/svd-img2vid --config.tune.video=v.mp4
  # In-betweening (their script adds the tuned difference onto -xt):
  python -m vdm_jax.main --config=configs/svd.py:inbetween \\
      --workdir=runs/svd_backward --mode=sample \\
      --config.pretrained.path=/models/svd-img2vid \\
      --config.svd.xt_path=/models/svd-img2vid-xt \\
      --config.sample.keyframes=frame1.png,frame2.png

docs/inbetween.md ("SVD") has the memory each needs. Defaults are the
pipeline's (StableVideoDiffusionPipeline: 1024x576, fps 7 passed as 6,
motion bucket 127, noise augmentation 0.02, guidance 1 -> 3, 25 Euler steps)
and, for in-betweening, their scripts' (14 frames at stride 2, AdamW 1e-4,
batch 1; 50 steps, w = 0.5, re-injection over half the steps, 5 times).
"""

from configs import default


def get_config(arg=None):
  mode = arg or 'image_to_video'
  if mode not in ('image_to_video', 'inbetween'):
    raise ValueError(f"configs/svd.py takes 'image_to_video' or "
                     f"'inbetween', not {arg!r}.")
  config = default.get_config()
  config.method = 'svd'
  config.sample.task = mode
  # Image-to-video: the first frame's image file.
  config.sample.input = ''
  config.sample.num_steps = 25 if mode == 'image_to_video' else 50
  config.sample.num_videos = 1
  config.sample.batch_size = 1
  config.sample.clip_x = False  # Latents are not bounded.
  # SVD's noise_aug_strength and per-frame guidance ramp.
  config.sample.image_noise = 0.02
  config.sample.image_guidance_min = 1.0
  config.sample.image_guidance_max = 3.0
  # Frames per second of the written videos and of SVD's conditioning (the
  # UNet sees fps - 1, as the pipeline passes).
  config.sample.fps = 7

  config.svd = default.ml_collections.ConfigDict()
  config.svd.motion_bucket_id = 127
  # 0: the UNet config's num_frames (img2vid 14, -xt 25); others warned.
  config.svd.num_frames = 0
  # Frame size (multiples of 64; others are rounded with a warning).
  config.svd.height = 576
  config.svd.width = 1024
  # Frames per temporal-decoder call; 0: all frames of a video at once.
  config.svd.decode_chunk_size = 0
  # .npy of initial latents ([B, F, 4, h, w] as diffusers' `latents`, or
  # [B, F, h, w, 4]); '' draws them from the seed.
  config.svd.init_latents = ''
  # In-betweening: the folder whose UNet the forward and backward models
  # use (their script: SVD-img2vid-xt, the tuned difference added);
  # '' = pretrained.path itself.
  config.svd.xt_path = ''
  # The UNet's remat policy in the backward tune (svd_unet.REMAT).
  config.svd.remat = 'block'

  config.tune.num_frames = 14
  config.tune.frame_stride = 2
  config.tune.backward_learning_rate = 1e-4
  config.tune.backward_batch_size = 1
  config.tune.backward_steps = 2000
  config.training.checkpoint_every_steps = 500
  config.training.log_every_steps = 10
  return config
