"""VideoFusion on the synthetic shapes, CPU-sized: two stages.

  python -m vdm_jax.main --config=configs/videofusion_quickstart.py:base --workdir=runs/vf_base
  python -m vdm_jax.main --config=configs/videofusion_quickstart.py --workdir=runs/vf --config.videofusion.base_workdir=runs/vf_base
  python -m vdm_jax.main --config=configs/videofusion_quickstart.py --workdir=runs/vf --mode=sample

The first command trains the base generator's image model on single frames
of the synthetic clips (VDM's program, one frame per example, no temporal
attention); the second trains VideoFusion (Luo et al. 2023) from it: the
base generator (that image UNet) estimates the shared base noise from the
key frame T // 2, a residual generator (a video UNet with 32 channels at
both levels where configs/quickstart.py's has 32 and 64: 0.34 M parameters
against 0.82 M, told each frame's index) estimates each frame's
residual, trained jointly with the base's gradient through the key frame
only (videofusion.base_training='joint'; 'frozen' keeps the base fixed).
Without base_workdir both generators start from scratch. Ablations on the
command line: --config.diffusion.noise_lambda=0.25,
--config.videofusion.base_training=frozen, and
--config.diffusion.noise_key_frame=-1 (the key frame keeps lambda).
"""

from configs import quickstart


def base_model():
  """The base generator's image UNet (quickstart's width, no time axis)."""
  return dict(base_channels=32, channel_mults=(1, 2), num_res_blocks=1,
              attn_resolutions=(8,), head_dim=32, dropout=0.0,
              num_classes=0, temporal_attention=False,
              frame_positions=False)


def get_config(arg=None):
  config = quickstart.get_config()
  if arg == 'base':  # The image model: one frame per example.
    config.data.num_frames = 1
    config.model.update(base_model())
    config.diffusion.target = 'v'
    config.training.num_train_steps = 1500
    return config
  if arg:
    raise ValueError(f"configs/videofusion_quickstart.py takes 'base' or"
                     f' nothing, not {arg!r}.')
  # The residual generator: smaller than the quickstart UNet, frame index.
  config.model.channel_mults = (1, 1)
  config.model.frame_positions = True
  config.diffusion.target = 'eps'
  config.diffusion.noise = 'decomposed'
  config.diffusion.noise_lambda = 0.5  # The paper's best lambda.
  config.diffusion.noise_key_frame = config.data.get_ref('num_frames') // 2
  config.videofusion.enabled = True
  config.videofusion.base_model.update(base_model())
  config.videofusion.base_target = 'v'  # As the 'base' stage trains it.
  return config
