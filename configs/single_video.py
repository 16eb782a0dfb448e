"""SinFusion: diffusion models trained on one video (arXiv 2211.11743).

  python -m vdm_jax.main --config=configs/single_video.py \
      --workdir=/tmp/sinfusion --config.data.path=clip.mp4
  python -m vdm_jax.main --config=configs/single_video.py \
      --workdir=/tmp/sinfusion --config.data.path=clip.mp4 --mode=sample
  python -m vdm_jax.main --config=configs/single_video.py:tiny ...   # tests

Trains the Predictor, Projector and Interpolator of Nikankin, Haim, Irani
(2022) on a few dozen frames of one video; --mode=sample writes diverse
videos, extrapolations and temporal upsamplings (docs/sinfusion.md);
--mode=eval scores diverse videos with patch metrics and FVD.

This config does not derive from configs/default.py: SinFusion shares the
optimizer block (default.optimizer_config) and the diffusion fields but none
of the UNet or dataset fields.
"""

import ml_collections

from configs import default


def get_config(arg=None):
  """Returns the SinFusion config; arg 'tiny' shrinks it for tests."""
  config = ml_collections.ConfigDict()
  # Dispatches vdm_jax.main to vdm_jax.sinfusion.
  config.method = 'sinfusion'
  # Root seed; split by purpose (init, train, sample, eval).
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  # The training video (.mp4/.webm/.avi/.gif/.npz); required.
  config.data.path = ''
  # Frames read from the start of the video (the paper: 2-3 dozen).
  config.data.max_frames = 32
  # Keep every n-th frame.
  config.data.frame_stride = 1
  # Frames are resized (area-preserving) so the longer side is at most
  # this; 0 keeps the native size.
  config.data.max_size = 256
  # Random training crops cover this fraction of each side (paper: ~95%).
  config.data.crop_fraction = 0.95
  # Explicit crop (height, width); overrides crop_fraction when set.
  config.data.crop_size = None

  config.model = ml_collections.ConfigDict()
  # Channels of every ConvNeXt block.
  config.model.width = 64
  # ConvNeXt blocks; with kernel_size the receptive field radius is
  # 1 + depth * ((kernel_size - 1) / 2 + 2) pixels (41 here).
  config.model.depth = 8
  # Depthwise conv size of each block.
  config.model.kernel_size = 7
  # How the convolutions run: 'auto' ('cpu' on CPU, 'xla' on GPU/TPU) |
  # 'xla' | 'cpu' (shifted multiply-adds for the depthwise convs, tap-by-tap
  # kernel gradients: XLA:CPU's own are slow; models/nextnet.py). The same
  # parameters for each.
  config.model.conv_impl = 'auto'
  # Hidden expansion of each block's 3x3 conv.
  config.model.mult = 2
  # Width of the log-SNR (+ frame offset) embedding.
  config.model.emb_dim = 256
  # Frame offsets k in +-{1..max_offset} for the Predictor and half-gaps
  # 1..max_offset for the Interpolator (paper: 3).
  config.model.max_offset = 3

  config.diffusion = ml_collections.ConfigDict()
  # Log-SNR schedule: 'cosine' | 'shifted_cosine' | 'linear'.
  config.diffusion.schedule = 'cosine'
  config.diffusion.logsnr_min = -20.0
  config.diffusion.logsnr_max = 20.0
  # Used by 'shifted_cosine' only.
  config.diffusion.shift_base = 64
  # The frame models predict the clean frame x0 (paper) -> 'x'.
  config.diffusion.target = 'x'
  config.diffusion.time_sampling = 'uniform'

  config.optimizer = default.optimizer_config()
  config.optimizer.learning_rate = 2e-4
  config.optimizer.warmup_steps = 500
  # Global gradient-norm clipping (all three models together).
  config.optimizer.grad_clip = 1.0
  # EMA of the parameters used for sampling.
  config.optimizer.ema_decay = 0.999

  config.training = ml_collections.ConfigDict()
  # Crops per model per step (each step updates all three models).
  config.training.batch_size = 8
  # Each model's batch runs as this many microbatches (lax.scan, gradients
  # averaged): the same update, with the activations of batch_size /
  # grad_accum_steps crops. The activations are SinFusion's memory (~44 KB
  # per crop pixel and example with model.conv_impl='xla', about twice that
  # with 'cpu'); the whole batch of 8 at once needs ~23 GiB at 144x176 and
  # ~33 GiB at 144x256 with 'xla' (docs/benchmarks.md). Must divide
  # batch_size.
  config.training.grad_accum_steps = 4
  # Memory the train step may use, checked once before training from XLA's
  # estimate of the compiled step (sinfusion/memory.py): 0 detects it (the
  # accelerator's free memory, or free host RAM on CPU); > 0 GiB given;
  # < 0 skips the check.
  config.training.memory_limit_gib = 0.0
  config.training.num_train_steps = 50_000
  config.training.checkpoint_every_steps = 2000
  config.training.keep_checkpoints = 2
  config.training.log_every_steps = 100

  config.sample = ml_collections.ConfigDict()
  # What --mode=sample writes: 'diverse' (new videos), 'extrapolate' (the
  # input continued), 'upsample_x2', 'upsample_x4' (Interpolator).
  config.sample.modes = ('diverse', 'extrapolate', 'upsample_x2',
                         'upsample_x4')
  # 'ancestral' | 'ddim' | 'pc'.
  config.sample.sampler = 'ancestral'
  # Diffusion steps of every frame (paper: 50).
  config.sample.num_steps = 50
  config.sample.gamma = 0.1
  config.sample.eta = 1.0
  config.sample.delta = 0.1
  # Videos per mode ('diverse' and 'extrapolate'); sampled as one batch.
  config.sample.num_videos = 4
  # Frame pairs per Interpolator call in 'upsample_x*' (its memory: ~0.13
  # GiB per 144x256 frame; all 61 pairs of x4 at once would need ~8 GiB).
  config.sample.max_batch = 8
  # 'diverse': frames per video; 'extrapolate': frames added to the input.
  config.sample.num_frames_out = 32
  # 'forward' (k > 0) or 'backward' (k < 0: generated back in time).
  config.sample.direction = 'forward'
  # 'diverse' starts from a frame generated by the Projector from noise
  # ('generated') or from input frame `start_frame` ('input').
  config.sample.start = 'generated'
  # Input frame index for start='input'; negative counts from the end.
  config.sample.start_frame = 0
  # |k| of the rollout (the Predictor's step, in input frames).
  config.sample.predict_offset = 1
  # Projector correction of every predicted frame: noise it to time t (log-
  # SNR = schedule(t)) and denoise with the Projector; 0 disables.
  config.sample.projector_t = 0.3
  # Half-gap k given to the Interpolator between consecutive frames.
  config.sample.interp_offset = 1
  config.sample.fps = 8
  # Also write <input>_sinfusion_<mode>.mp4 beside the input (if writable).
  config.sample.write_next_to_input = True

  config.plan = default.plan_config()

  config.eval = ml_collections.ConfigDict()
  # Diverse videos scored by --mode=eval (start and direction from sample).
  config.eval.num_videos = 8
  # Frames per scored video (and per real FVD clip).
  config.eval.num_frames = 16
  # Square patch side of the nearest-neighbour patch metrics.
  config.eval.patch_size = 7
  # Stride of generated (query) and input (reference) patches.
  config.eval.query_stride = 1
  config.eval.ref_stride = 1
  # FVD (I3D, Kinetics-400 logits) against clips of the input video.
  config.eval.fvd = True

  if arg == 'tiny':
    _shrink(config)
  elif arg:
    raise ValueError(f'Unknown config arg {arg!r}; use "tiny" or nothing.')
  return config


def _shrink(config: ml_collections.ConfigDict) -> None:
  """Seconds-per-run sizes for tests on CPU."""
  config.data.max_size = 16
  config.data.max_frames = 12
  config.model.width = 16
  config.model.depth = 1
  config.model.kernel_size = 3
  config.model.emb_dim = 32
  config.optimizer.learning_rate = 2e-3
  config.optimizer.warmup_steps = 0
  config.optimizer.ema_decay = 0.5
  config.training.batch_size = 4
  config.training.grad_accum_steps = 2
  config.training.num_train_steps = 6
  config.training.checkpoint_every_steps = 3
  config.training.log_every_steps = 3
  config.sample.num_steps = 4
  config.sample.num_videos = 2
  config.sample.max_batch = 3
  config.sample.num_frames_out = 5
  config.eval.num_videos = 2
  config.eval.num_frames = 6
  config.eval.patch_size = 3
  config.eval.fvd = False
