"""BAIR robot pushing 16x64x64 (1 -> 15 prediction): VDM App. A hyperparameters.

  python -m vdm_jax.main --config=configs/bair_64.py --workdir=gs://BUCKET/bair_64

Unconditional training (plus joint image frames), v-prediction, AdamW
(0.9, 0.999, wd 0.01), EMA 0.999; sampling with 256 predictor-corrector
steps and reconstruction guidance w_r = 50 on the first frame, scored with
VDM's BAIR FVD protocol (Table 2): 100 samples for each of the 256 test
videos against the first 16 frames of each.
"""

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.data.name = 'bair_robot_pushing_small'
  config.data.num_frames = 16
  config.data.image_size = 64
  config.data.num_classes = 0
  config.data.image_frames = 8
  config.data.split = 'train'
  # Camera view: VDM's FVD used the main view (MAGVIT App. C); FitVid-style
  # numbers use 'image_aux1'. FVDs on different views are not comparable.
  config.data.view = 'image_main'
  config.data.random_flip = True  # Left-right flips (VDM App. A).
  config.model.base_channels = 128
  config.model.channel_mults = (1, 2, 3, 4)
  config.model.num_res_blocks = 3
  config.model.attn_resolutions = (8, 16, 32)
  config.model.head_dim = 64
  config.model.dropout = 0.1
  config.model.emb_dim = 1024
  config.model.emb_mlp_layers = 2
  config.diffusion.target = 'v'
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 2e-4
  config.optimizer.b1, config.optimizer.b2 = 0.9, 0.999
  config.optimizer.weight_decay = 0.01
  config.optimizer.ema_decay = 0.999
  config.training.batch_size = 128
  config.training.num_train_steps = 660_000
  config.sample.sampler = 'pc'
  config.sample.num_steps = 256
  config.sample.gamma = 0.0
  config.sample.delta = 0.1
  config.sample.recon_weight = 50.0
  config.sample.task = 'predict'
  config.sample.num_cond_frames = 1  # 1 -> 15 (VDM Sec. 4.2, Table 2).
  # FVD of VDM Table 2 (evaluation/protocols.py): the 256 test videos give
  # the conditioning frame and the real clips.
  config.eval.protocol = 'bair_vdm'
  config.eval.split = 'test'
  return config
