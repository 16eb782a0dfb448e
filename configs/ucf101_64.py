"""UCF101 16x64x64, unconditional: VDM App. A hyperparameters.

  python -m vdm_jax.main --config=configs/ucf101_64.py --workdir=gs://BUCKET/ucf101_64

VDM trained on all 13,320 UCF101 videos (train+test) for 60k steps at batch
128 on 128 TPUv4 chips; eps-prediction, 256 ancestral steps, gamma 0.1.
VDM reports no FVD for UCF101 (its Table 1 scores C3D FID and IS), and
MAGVIT's UCF-101 protocol scores 128x128 videos, so --mode=eval defaults to
StyleGAN-V's fvd2048_16f on 64x64 (2,048 samples vs 2,048 train clips).
"""

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.data.name = 'ucf101'
  config.data.num_frames = 16
  config.data.image_size = 64
  config.data.num_classes = 0
  config.data.image_frames = 8
  # VDM trained on all 13,320 videos (Ho et al. 2022, Sec. 4.1; MAGVIT Table
  # 10 marks it as train+test); 'train' is split 1's.
  config.data.split = 'train+test'
  config.data.random_flip = False  # VDM lists no augmentation for UCF101.
  config.model.base_channels = 256
  config.model.channel_mults = (1, 2, 4, 8)
  config.model.num_res_blocks = 2
  config.model.attn_resolutions = (8, 16, 32)
  config.model.head_dim = 64
  config.model.dropout = 0.1
  config.model.emb_dim = 1024
  config.model.emb_mlp_layers = 4
  config.diffusion.target = 'eps'
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 3e-4
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.99
  config.optimizer.ema_decay = 0.9999
  config.training.batch_size = 128
  config.training.num_train_steps = 60_000
  config.sample.sampler = 'ancestral'
  config.sample.num_steps = 256
  config.sample.gamma = 0.1
  # The real clips of fvd2048_16f are random train clips (protocols.py).
  config.eval.protocol = 'stylegan_v_2048'
  config.eval.split = 'train'
  return config
