"""Quickstart: a small model on the built-in synthetic dataset, on CPU.

  python -m vdm_jax.main --config=configs/quickstart.py --workdir=runs/quickstart
  python -m vdm_jax.main --config=configs/quickstart.py --workdir=runs/quickstart --mode=sample

Sized to show the dataset's motion (a shape moving and bouncing) after a few
minutes of training on 2 CPU cores; see README "Quickstart".
"""

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.data.num_frames = 8
  config.data.image_size = 16
  config.data.num_classes = 0
  config.model.base_channels = 32
  config.model.channel_mults = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.head_dim = 32
  config.model.dropout = 0.0
  config.model.max_temporal_distance = 8
  config.diffusion.target = 'v'
  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 100
  config.optimizer.ema_decay = 0.995
  config.training.batch_size = 8
  config.training.num_train_steps = 1500
  config.training.checkpoint_every_steps = 500
  config.training.log_every_steps = 25
  config.training.preview_every_steps = 0
  config.sample.num_steps = 128
  config.sample.gamma = 0.1
  config.sample.num_videos = 8
  config.sample.batch_size = 8
  return config
