"""Tune-A-Video on Stable Diffusion (Wu et al. 2022, arXiv 2212.11565).

  # 1. Tune the inflated SD UNet on one video and its caption:
  python -m vdm_jax.main --mode=tune --config=configs/tune_a_video_sd.py \\
      --workdir=runs/tav_sd --config.pretrained.path=/models/sd-v1-4 \\
      --config.tune.video=man-skiing.mp4 \\
      --config.tune.caption="a man is skiing"
  # 2. Edit: DDIM inversion with the empty prompt, then each edit prompt:
  python -m vdm_jax.main --mode=sample --config=configs/tune_a_video_sd.py \\
      --workdir=runs/tav_sd --config.pretrained.path=/models/sd-v1-4 \\
      --config.sample.prompt="spider man is skiing on the beach, cartoon"

Their settings (showlab/Tune-A-Video, configs/man-skiing.yaml,
train_tuneavideo.py): SD v1-4, 24 frames at 512x512 taken 2 frames apart,
AdamW lr 3e-5 constant, betas 0.9 / 0.999, weight decay 1e-2, eps 1e-8,
grad clip 1.0, batch 1, 500 steps, no EMA; DDIM 50 steps for inversion and
editing, guidance scale 12.5. Their code uses gradient checkpointing
(tune.remat='block' here), fp16 mixed precision (pretrained.dtype=
'bfloat16' here: bfloat16 compute over float32 parameters) and xformers; docs/tune_a_video.md has the
memory each option needs. ':tiny' shrinks the run for a CPU smoke test.
"""

from configs import stable_diffusion


def get_config(arg=None):
  config = stable_diffusion.get_config(None)
  config.method = 'tune_a_video_sd'
  t = config.tune
  t.num_frames = 24
  t.frame_stride = 2
  t.start_frame = 0
  # Frame size (their 512x512: resized, not cropped); 0 = the video's own.
  # Sizes that are not multiples of the autoencoder's factor (8) are
  # rounded to the nearest, with a warning.
  t.height = 512
  t.width = 512
  # 'attention_queries' (theirs: attn1.to_q, attn2.to_q, attn_temp),
  # 'lora' (rank lora_rank on every attention's q, k, v, out; alpha =
  # lora_alpha, 0 = the rank) or 'all' (full fine-tuning).
  t.trainable = 'attention_queries'
  t.lora_rank = 4
  t.lora_alpha = 0.0
  # The res blocks' GroupNorm: 'pooled' over a video's frames (theirs) or
  # 'per_frame' (SD's).
  t.frame_norm = 'pooled'
  # sd_unet.REMAT: 'none', 'block' (their gradient checkpointing), 'full',
  # 'dots_saveable'.
  t.remat = 'block'
  # Their mixed precision (fp16 autocast over float32 weights): bfloat16
  # compute over float32 parameters. float32 compute does not fit one 80 GB
  # GPU at 24 x 512^2 (80.8 GiB planned, docs/tune_a_video.md), and GPUs
  # run fused (cuDNN) attention for bfloat16 only.
  config.pretrained.dtype = 'bfloat16'
  opt = config.optimizer
  opt.name = 'adamw'
  opt.learning_rate = 3e-5
  opt.b1, opt.b2 = 0.9, 0.999
  opt.weight_decay = 1e-2
  opt.grad_clip = 1.0
  opt.warmup_steps = 0
  opt.ema_decay = 0.0
  config.training.batch_size = 1
  config.training.num_train_steps = 500
  config.training.log_every_steps = 10
  config.training.checkpoint_every_steps = 100
  s = config.sample
  s.task = 'edit'
  s.sampler = 'ddim'
  s.num_steps = 50
  s.guidance_scale = 12.5
  s.prompt = ''
  # Videos per sampler call of the edit (the reconstruction, then the
  # prompts); guidance doubles it. 24 frames at 512x512 make each call large
  # (docs/scaling.md plans one call of 2); more prompts run as more calls.
  s.batch_size = 2
  s.fps = 8
  if arg == 'tiny':
    t.num_frames, t.frame_stride, t.height, t.width = 4, 2, 32, 32
    config.training.num_train_steps = 4
    config.training.log_every_steps = 2
    config.training.checkpoint_every_steps = 4
    s.num_steps = 4
    t.remat = 'none'
    config.pretrained.dtype = 'float32'  # The tests' tolerances.
  return config
