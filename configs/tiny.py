"""Test-sized config: seconds per step on one CPU core.

  python -m vdm_jax.main --config=configs/tiny.py --workdir=/tmp/vdm_tiny

Used by the test suite; the model has a few thousand parameters.
"""

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.data.num_frames = 4
  config.data.image_size = 16
  config.data.num_classes = 3
  config.data.num_examples = 64
  config.model.base_channels = 8
  config.model.channel_mults = (1, 2)
  config.model.num_res_blocks = 1
  config.model.attn_resolutions = (8,)
  config.model.head_dim = 8
  config.model.dropout = 0.0
  config.model.emb_dim = 32
  config.model.max_temporal_distance = 8
  config.optimizer.learning_rate = 1e-3
  config.optimizer.warmup_steps = 2
  config.optimizer.ema_decay = 0.9
  config.training.batch_size = 8
  config.training.num_train_steps = 4
  config.training.checkpoint_every_steps = 2
  config.training.log_every_steps = 2
  config.training.label_dropout = 0.1
  config.sample.num_steps = 4
  config.sample.num_videos = 2
  config.sample.batch_size = 2
  return config
