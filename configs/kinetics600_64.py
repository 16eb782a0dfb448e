"""Kinetics-600 16x64x64 (5 -> 11 prediction): VDM App. A hyperparameters.

  python -m vdm_jax.main --config=configs/kinetics600_64.py \
      --workdir=gs://BUCKET/k600_64 --config.data.path=/data/k600
  python -m vdm_jax.main --config=configs/kinetics600_64.py \
      --workdir=gs://BUCKET/k600_64 --config.data.path=/data/k600 --mode=eval

TFDS has no Kinetics: `data.path` is the folder holding the release's split
folders `train/`, `val/`, `test/`, each `<split>/<class>/<clip>.mp4`
(docs/data.md). Unconditional training (plus joint image frames),
v-prediction, Adam (0.9, 0.99), lr 2e-4, batch 256, EMA 0.9999, 220k steps;
sampling with 128 predictor-corrector steps and reconstruction guidance
w_r = 9 on the first 5 of 16 frames (Ho et al. 2022, Sec. 4.2 and App. A),
scored with VDM's Kinetics-600 FVD protocol: 50k random 16-frame test
subsequences, the same for samples and ground truth (Table 3).
"""

from configs import default


def get_config(arg=None):
  config = default.get_config(arg)
  config.data.name = 'kinetics600'
  config.data.split = 'train'  # The folder data.path/train.
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
  config.sample.num_cond_frames = 5  # 5 -> 11 (VDM Sec. 4.2, Table 3).
  # FVD of VDM Table 3 (evaluation/protocols.py): real clips and the given
  # frames from the test videos (data.path/test).
  config.eval.protocol = 'kinetics600_vdm'
  config.eval.split = 'test'
  return config
