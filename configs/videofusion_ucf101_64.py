"""VideoFusion on UCF101 16x64x64, unconditional (Luo et al. 2023, Sec. 4).

  python -m vdm_jax.main --config=configs/videofusion_ucf101_64.py:base --workdir=gs://BUCKET/vf_ucf_base
  python -m vdm_jax.main --config=configs/videofusion_ucf101_64.py --workdir=gs://BUCKET/vf_ucf101_64 --config.videofusion.base_workdir=gs://BUCKET/vf_ucf_base

The paper reports FVD 139 (IS 71.67) for unconditional UCF101 at 16x64x64.
Its base generator is a pretrained image diffusion model; with no public
weights of a pixel model at 64x64, the ':base' stage trains one here on
UCF101 frames with VDM's UNet (configs/ucf101_64.py) minus its temporal
attention, and the second stage trains the two generators jointly on the
clips, lambda 0.5 (the paper's best), the key frame T // 2. The residual
generator is VDM's UNet at half its width, told each frame's index: the
paper builds it smaller than its VDM re-implementation, but the sizes here
are ours, not the paper's. Training, sampling and evaluation follow
configs/ucf101_64.py (batch 128, 256 ancestral steps, StyleGAN-V's FVD
protocol) except that VideoFusion trains on clips alone (no image frames).
"""

from configs import ucf101_64


def base_model():
  """The base generator: VDM's UCF101 UNet without temporal attention."""
  return dict(base_channels=256, channel_mults=(1, 2, 4, 8),
              num_res_blocks=2, attn_resolutions=(8, 16, 32), head_dim=64,
              dropout=0.1, num_classes=0, emb_dim=1024, emb_mlp_layers=4,
              temporal_attention=False, frame_positions=False)


def get_config(arg=None):
  config = ucf101_64.get_config()
  config.data.image_frames = 0
  if arg == 'base':  # The image model: one UCF101 frame per example.
    config.data.num_frames = 1
    config.model.update(base_model())
    return config
  if arg:
    raise ValueError(f"configs/videofusion_ucf101_64.py takes 'base' or"
                     f' nothing, not {arg!r}.')
  config.model.base_channels = 128  # Half of VDM's 256 (ours).
  config.model.emb_dim = 512
  config.model.frame_positions = True
  config.diffusion.target = 'eps'
  config.diffusion.noise = 'decomposed'
  config.diffusion.noise_lambda = 0.5
  config.diffusion.noise_key_frame = config.data.get_ref('num_frames') // 2
  config.videofusion.enabled = True
  config.videofusion.base_model.update(base_model())
  config.videofusion.base_target = 'eps'
  return config
