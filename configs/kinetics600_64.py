"""Kinetics-600 16x64x64 (5 -> 11 prediction): VDM App. A hyperparameters.

  python -m vdm_jax.main --config=configs/kinetics600_64.py --workdir=gs://BUCKET/k600_64

v-prediction, Adam (0.9, 0.99), lr 2e-4, batch 256, EMA 0.9999, 220k steps;
sampling with 128 predictor-corrector steps and reconstruction guidance
w_r = 9 on the first 5 frames.
"""

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.data.name = 'kinetics600'
  config.data.num_frames = 16
  config.data.image_size = 64
  config.data.num_classes = 0
  config.data.image_frames = 8
  config.model.base_channels = 256
  config.model.channel_mults = (1, 2, 4, 8)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (8, 16, 32)
  config.model.head_dim = 64
  config.model.dropout = 0.1
  config.model.emb_dim = 1024
  config.model.emb_mlp_layers = 2
  config.diffusion.target = 'v'
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 2e-4
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.99
  config.optimizer.ema_decay = 0.9999
  config.training.batch_size = 256
  config.training.num_train_steps = 220_000
  config.sample.sampler = 'pc'
  config.sample.num_steps = 128
  config.sample.gamma = 0.0
  config.sample.delta = 0.1
  config.sample.recon_weight = 9.0
  config.sample.task = 'predict'
  return config
