"""Default config: every field vdm_jax reads, with its meaning.

  python -m vdm_jax.main --config=configs/default.py --workdir=/tmp/vdm_default

Other configs import this one and override a few fields (flax examples style).
Fields the paper leaves open (REFERENCE.md 1.2) carry a comment saying so.
"""

import ml_collections


def get_config(arg=None):
  """Returns the default ConfigDict. `arg` is unused here."""
  del arg
  config = ml_collections.ConfigDict()
  # Root seed; split by purpose (init, data, train, sample).
  config.seed = 0

  num_classes = ml_collections.FieldReference(0)

  config.data = ml_collections.ConfigDict()
  # Dataset: 'synthetic' (built in), 'ucf101', 'bair_robot_pushing_small',
  # 'moving_mnist', 'tfds' or 'video_files' (vdm_jax/data, docs/data.md).
  config.data.name = 'synthetic'
  # Frames per video clip (T).
  config.data.num_frames = 16
  # Spatial size (H = W) of the frames fed to the model.
  config.data.image_size = 64
  # Colour channels.
  config.data.channels = 3
  # Classes the dataset provides labels for (synthetic: shape kinds).
  config.data.num_classes = num_classes
  # Joint image-video training (VDM 3, REFERENCE 1.6): independent frames from
  # other clips appended to each clip; 0 disables.
  config.data.image_frames = 0
  # Frame stride when cutting clips out of longer videos.
  config.data.frame_stride = 1
  # Synthetic dataset: how many distinct clips form one epoch.
  config.data.num_examples = 100_000
  # Synthetic dataset: shapes per clip.
  config.data.num_objects = 1
  # TFDS split: 'train', 'test', 'train+test' (VDM's UCF101), 'train[:90%]'.
  config.data.split = 'train'
  # TFDS data directory; '': the TFDS default (~/tensorflow_datasets).
  config.data.data_dir = ''
  # data.name='tfds': the TFDS name ('name/config:version'); for the presets
  # (ucf101, ...) a non-empty value replaces their default TFDS name.
  config.data.tfds_name = ''
  # data.name='tfds': feature holding the video frames (encoded images).
  config.data.video_key = 'video'
  # data.name='tfds': integer class feature; '' = unlabelled.
  config.data.label_key = ''
  # BAIR camera view: 'image_main' or 'image_aux1' (FVDs not comparable).
  config.data.view = 'image_main'
  # Left-right flip of each example with probability 1/2 (seeded by the data
  # position, so resuming stays exact).
  config.data.random_flip = False
  # Crop after the short-side resize: 'center' or 'random' (real sources).
  config.data.crop = 'center'
  # data.name='video_files': a video file or a folder (searched recursively).
  config.data.path = ''
  # data.name='video_files': decoded videos cached per process.
  config.data.cache_size = 32

  config.model = ml_collections.ConfigDict()
  # Width of the first UNet level.
  config.model.base_channels = 128
  # Channel multiplier per level; spatial size halves between levels.
  config.model.channel_mults = (1, 2, 4, 8)
  # Residual blocks per level (the up path has one more, as in the DDPM UNet).
  config.model.num_res_blocks = 2
  # Spatial resolutions (in pixels) with spatial + temporal attention.
  config.model.attn_resolutions = (8, 16, 32)
  # Attention head dimension (VDM: 64; 128 for the 9x128^2 model).
  config.model.head_dim = 64
  # Dropout inside residual blocks.
  config.model.dropout = 0.1
  # Classes for label conditioning; 0 = unconditional. Index num_classes is
  # the null label used by classifier-free guidance.
  config.model.num_classes = num_classes
  # Width of the conditioning embedding (VDM App. A: 1024). None: 4 * base.
  config.model.emb_dim = None
  # Layers of the conditioning MLP (VDM: 2 or 4).
  config.model.emb_mlp_layers = 2
  # Relative position bias range of temporal attention (not in the paper).
  config.model.max_temporal_distance = 32
  # Compute dtype of activations: 'float32' or 'bfloat16' (params stay f32).
  config.model.dtype = 'float32'
  # Rematerialization: 'none' | 'block' | 'full'.
  config.model.remat = 'none'

  config.diffusion = ml_collections.ConfigDict()
  # Log-SNR schedule: 'cosine' | 'shifted_cosine' | 'linear'.
  config.diffusion.schedule = 'cosine'
  # Log-SNR range (VDM App. A: [-20, 20] for every model).
  config.diffusion.logsnr_min = -20.0
  config.diffusion.logsnr_max = 20.0
  # shifted_cosine: the log-SNR is shifted by 2 log(shift_base / image_size).
  config.diffusion.shift_base = 64
  # What the network predicts: 'eps' | 'v' | 'x'.
  config.diffusion.target = 'eps'
  # t sampling across the batch: 'uniform' or 'low_discrepancy'.
  config.diffusion.time_sampling = 'uniform'

  config.optimizer = ml_collections.ConfigDict()
  # 'adam' or 'adamw'.
  config.optimizer.name = 'adam'
  config.optimizer.learning_rate = 3e-4
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.99
  config.optimizer.weight_decay = 0.0
  # Linear warmup steps of the learning rate.
  config.optimizer.warmup_steps = 1000
  # Global gradient-norm clipping; 0 disables.
  config.optimizer.grad_clip = 1.0
  # EMA decay of the parameters used for sampling.
  config.optimizer.ema_decay = 0.9999

  config.training = ml_collections.ConfigDict()
  # Global batch size (across all devices and hosts).
  config.training.batch_size = 128
  config.training.num_train_steps = 60_000
  config.training.checkpoint_every_steps = 1000
  # Checkpoints kept in workdir/checkpoints.
  config.training.keep_checkpoints = 3
  config.training.log_every_steps = 50
  # Write preview samples to TensorBoard every N steps; 0 disables.
  config.training.preview_every_steps = 0
  # Label dropout probability for classifier-free guidance.
  config.training.label_dropout = 0.0
  # Gradient accumulation: the global batch is processed in this many
  # microbatches per update (same update as the full batch, less memory).
  config.training.grad_accum_steps = 1
  # Sampler steps of the preview samples.
  config.training.preview_num_steps = 64

  config.sample = ml_collections.ConfigDict()
  # 'ancestral' | 'ddim' | 'pc' (predictor-corrector).
  config.sample.sampler = 'ancestral'
  config.sample.num_steps = 256
  # Videos written by --mode=sample.
  config.sample.num_videos = 8
  # Ancestral: log-variance interpolation gamma (VDM 2).
  config.sample.gamma = 0.1
  # DDIM: eta (0 = deterministic).
  config.sample.eta = 0.0
  # Langevin corrector step size (VDM: 0.1).
  config.sample.delta = 0.1
  # Classifier-free guidance weight w.
  config.sample.guidance_weight = 0.0
  # Reconstruction guidance weight w_r.
  config.sample.recon_weight = 0.0
  # 'unconditional' | 'class' | 'predict' | 'extend' | ...
  config.sample.task = 'unconditional'
  # Class to generate for task='class'; -1 cycles through the classes.
  config.sample.label = -1
  # Videos per sampling batch.
  config.sample.batch_size = 8
  # Frames per second of written videos.
  config.sample.fps = 8

  config.mesh = ml_collections.ConfigDict()
  # Mesh axes sizes; -1 takes all remaining devices.
  config.mesh.data = -1
  config.mesh.fsdp = 1
  # 'replicated' parameters and optimizer state, or 'fsdp': each split along
  # its largest dimension divisible by mesh.fsdp.
  config.mesh.param_sharding = 'replicated'
  return config
