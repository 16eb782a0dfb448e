"""Tune-A-Video (Wu et al. 2022): one-shot tuning and editing of a video.

  # 1. A text-to-image base model (configs/t2i_quickstart.py):
  python -m vdm_jax.main --config=configs/t2i_quickstart.py --workdir=runs/t2i
  # 2. Inflate it and tune on one video with its caption:
  python -m vdm_jax.main --mode=tune --config=configs/tune_a_video.py \
      --workdir=runs/tav --config.tune.base_workdir=runs/t2i \
      --config.tune.video=clip.mp4 \
      --config.tune.caption="a red square moving left"
  # 3. Edit: DDIM inversion with the empty prompt, then the new prompt:
  python -m vdm_jax.main --mode=sample --config=configs/tune_a_video.py \
      --workdir=runs/tav --config.sample.task=edit \
      --config.sample.prompt="a blue square moving left"

The model is the base's with sparse-causal spatial attention and a
temporal attention after each spatial block (adapt/inflate.py); only the
attention queries and the temporal attentions are tuned (adapt/tune.py).
Optimizer and steps are the public code's (AdamW 3e-5, betas 0.9/0.999,
weight decay 1e-2, clip 1.0, batch 1, 500 steps; no EMA); editing uses
their 50 DDIM steps and guidance 12.5 in their convention
eps_u + s (eps_c - eps_u), i.e. sample.guidance_weight = s - 1 = 11.5 here.
"""

from configs import t2i_quickstart


def get_config(arg=None):
  config = t2i_quickstart.get_config(arg)
  config.data.num_frames = 8
  config.model.temporal_attention = True
  config.model.spatial_attention = 'sparse_causal'
  config.tune.num_frames = 8
  config.plan.mode = 'tune'
  config.tune.frame_stride = 1
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 3e-5
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.weight_decay = 1e-2
  config.optimizer.grad_clip = 1.0
  config.optimizer.warmup_steps = 0
  config.optimizer.ema_decay = 0.0
  config.training.batch_size = 1
  config.training.num_train_steps = 500
  config.training.log_every_steps = 50
  config.training.checkpoint_every_steps = 500
  config.text.dropout = 0.0
  config.sample.task = 'edit'
  config.sample.sampler = 'ddim'
  config.sample.eta = 0.0
  config.sample.num_steps = 50
  config.sample.guidance_weight = 11.5
  config.sample.prompt = 'a blue square moving left'
  return config
