"""Default config: every field vdm_jax reads, with its meaning.

  python -m vdm_jax.main --config=configs/default.py --workdir=/tmp/vdm_default

Other configs import this one and override a few fields (flax examples style).
Values cite VDM (Ho et al. 2022) by section or appendix; fields the paper
leaves open carry a comment saying so (docs/references.md lists the papers).
"""

import ml_collections


def get_config(arg=None):
  """Returns the default ConfigDict. `arg` is unused here."""
  del arg
  config = ml_collections.ConfigDict()
  # What to train and sample: 'vdm' (this config: the video diffusion model
  # of Ho et al. 2022) or 'sinfusion' (one-video models; configs/single_video.py
  # sets it and does not derive from this file).
  config.method = 'vdm'
  # Root seed; split by purpose (init, data, train, sample).
  config.seed = 0

  num_classes = ml_collections.FieldReference(0)

  config.data = ml_collections.ConfigDict()
  # Dataset: 'synthetic' (built in), 'ucf101', 'bair_robot_pushing_small',
  # 'moving_mnist', 'tfds', 'video_files' or 'kinetics600' (video files in
  # data.path/<split>/<class>/) (vdm_jax/data, docs/data.md).
  config.data.name = 'synthetic'
  # Frames per video clip (T).
  config.data.num_frames = 16
  # Spatial size (H = W) of the frames fed to the model.
  config.data.image_size = 64
  # Colour channels.
  config.data.channels = 3
  # Classes the dataset provides labels for (synthetic: shape kinds).
  config.data.num_classes = num_classes
  # Joint image-video training (VDM Sec. 3, 4.3.1): independent frames from
  # other clips appended to each clip, each conditioned on its own video's
  # label in class-conditional models; 0 disables.
  config.data.image_frames = 0
  # Frame stride when cutting clips out of longer videos.
  config.data.frame_stride = 1
  # Synthetic dataset: how many distinct clips form one epoch.
  config.data.num_examples = 100_000
  # Synthetic dataset: shapes per clip.
  config.data.num_objects = 1
  # Synthetic dataset: 'bounce' (shapes bounce off the borders) or
  # 'straight' (one of 4 directions, no border reached: every caption's
  # direction holds on each frame; the text-to-video configs).
  config.data.motion = 'bounce'
  # Synthetic dataset: m > 0 leaves out the (shape, colour, direction)
  # combinations with (shape + 2 colour + direction) % m == 0, to test
  # prompts that compose seen attributes (data/synthetic.py).
  config.data.caption_holdout = 0
  # Video folders: read captions (a sidecar .txt beside each video, or one
  # captions.csv / captions.json in the folder; docs/data.md). Synthetic
  # clips always have captions.
  config.data.captions = False
  # data.name='tfds': a Text feature holding each video's caption.
  config.data.caption_key = ''
  # Video folders: a missing or empty caption is the empty (null) text
  # instead of an error.
  config.data.allow_empty_captions = False
  # TFDS split: 'train', 'test', 'train+test' (VDM's UCF101), 'train[:90%]';
  # kinetics600: the split folder under data.path ('train', 'val', 'test').
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
  # data.name='video_files': a video file or a folder (searched recursively);
  # 'kinetics600': the folder holding the train/, val/, test/ folders.
  config.data.path = ''
  # data.name='video_files': decoded videos cached per process.
  config.data.cache_size = 32
  # Decoding worker processes of the grain pipeline (docs/data.md): -1
  # picks (none for 'synthetic' and on hosts of <= 2 cores, else the cores
  # less one), 0 decodes in the training process, N > 0 starts N workers.
  config.data.num_workers = -1

  config.model = ml_collections.ConfigDict()
  # Width of the first UNet level.
  config.model.base_channels = 128
  # Channel multiplier per level; spatial size halves between levels.
  config.model.channel_mults = (1, 2, 4, 8)
  # Residual blocks per level (the up path has one more, as in the DDPM UNet).
  config.model.num_res_blocks = 2
  # Spatial resolutions (in pixels) with spatial + temporal attention.
  config.model.attn_resolutions = (8, 16, 32)
  # Resolutions with temporal attention, if not attn_resolutions (None):
  # e.g. (8, 16) with attn_resolutions (8,) adds temporal attention only at
  # 16x16, where spatial attention would cost far more.
  config.model.temporal_attn_resolutions = (
      ml_collections.config_dict.placeholder(tuple))
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
  # Spatial and cross-attention implementation: 'auto' (cuDNN flash on GPU,
  # Pallas flash on TPU for >= 1024 tokens, XLA otherwise), 'xla', 'cudnn',
  # 'pallas'. Not a parameter: any checkpoint runs under any choice.
  config.model.attention = 'auto'
  # Rematerialization (docs/scaling.md, by memory): 'none' | 'block' (keep
  # each block's input) | 'full' (each level's input) | 'dots_saveable'
  # (keep matmul/conv outputs) | 'offload' (block outputs to pinned host).
  config.model.remat = 'none'
  # Text models (text.encoder != 'none'): cross-attention from every
  # spatial attention to the caption's tokens (Imagen Video), and the
  # attention-pooled caption added to the conditioning vector (VDM 4.3).
  config.model.text_cross_attention = True
  config.model.text_pooling = True
  # False: no temporal attention, frames are independent images (a
  # text-to-image model: configs/t2i_quickstart.py, the base of
  # Tune-A-Video's --mode=tune).
  config.model.temporal_attention = True
  # Each video frame's index added to its conditioning embedding (absolute
  # time; without it the network sees only relative frame distances).
  config.model.frame_positions = False
  # Spatial attention: 'self' (each frame's own pixels) or 'sparse_causal'
  # (frame i attends to frames 0 and i - 1: Tune-A-Video's inflated model).
  config.model.spatial_attention = 'self'
  # Image-to-video (Stable Video Diffusion's conditioning, Blattmann et al.
  # 2023): the clip's first frame, noise-augmented, is concatenated to the
  # noisy input (repeated over frames, with a mask channel) and its noise
  # level embedded; sample.task='image_to_video' and, with a backward
  # model (--mode=tune_backward), 'inbetween' (configs/i2v_quickstart.py).
  config.model.image_condition = False

  config.text = ml_collections.ConfigDict()
  # Frozen text encoder of captions and prompts (vdm_jax/text): 'none'
  # (no text), 'wordllama' (offline: the wordllama wheel's 256-d Llama-2
  # token embeddings) or 'files' (embeddings precomputed by
  # `python -m vdm_jax.text.hf`, e.g. with a T5 or CLIP text encoder).
  config.text.encoder = 'none'
  # L: tokens per text; longer texts are cut (with a warning).
  config.text.max_length = 16
  # text.encoder='files': the .npz of caption embeddings (written by
  # --mode=embed_captions from text.hf_model).
  config.text.path = ''
  # --mode=embed_captions: a Hugging Face text model name or folder (T5,
  # CLIP text, BERT; needs requirements-hf.txt).
  config.text.hf_model = ''
  # Caption dropout to the learned null text (classifier-free guidance);
  # image frames of joint training drop their own captions independently.
  config.text.dropout = 0.1

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
  # Noise of training and of every sampler: 'iid' or 'decomposed'
  # (VideoFusion: eps_i = sqrt(lambda_i) b + sqrt(1 - lambda_i) r_i, one base
  # noise b per clip, a residual r_i per frame; image frames stay i.i.d.).
  config.diffusion.noise = 'iid'
  # 'decomposed': lambda in [0, 1], a scalar or one value per frame
  # (VideoFusion: about 0.5 works best); frames correlate by sqrt(l_i l_j).
  config.diffusion.noise_lambda = ml_collections.FieldReference(
      0.5, field_type=object)  # Takes a float or a tuple.
  # 'decomposed': -1, or VideoFusion's key frame k (T // 2) whose whole
  # noise is the base noise (lambda_k = 1 where lambda_k > 0), the frame its
  # base generator reads (vdm_jax/videofusion.py says why).
  config.diffusion.noise_key_frame = -1

  config.optimizer = optimizer_config()

  config.training = ml_collections.ConfigDict()
  # Global batch size (across all devices and hosts).
  config.training.batch_size = 128
  config.training.num_train_steps = 60_000
  config.training.checkpoint_every_steps = 1000
  # Checkpoints kept in workdir/checkpoints.
  config.training.keep_checkpoints = 3
  config.training.log_every_steps = 50
  # None, or (start, stop): a jax.profiler trace of steps start .. stop - 1
  # is written to workdir/profile (TensorBoard's profile tab).
  config.training.profile_steps = ml_collections.config_dict.placeholder(
      tuple)
  # Write preview samples to TensorBoard every N steps; 0 disables.
  config.training.preview_every_steps = 0
  # Label dropout probability for classifier-free guidance.
  config.training.label_dropout = 0.0
  # Image-to-video models: probability of dropping the first frame
  # (classifier-free guidance on the image), and the log-normal
  # distribution of its noise-augmentation level sigma (SVD: log sigma ~
  # N(-3.0, 0.5^2)).
  config.training.image_dropout = 0.1
  config.training.image_noise_mean = -3.0
  config.training.image_noise_std = 0.5
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
  # 'unconditional' | 'class' | 'predict' | 'extend' | 'interpolate' |
  # 'keyframes' | 'upsample' | 'edit' (a --mode=tune workdir's video under
  # sample.prompt; vdm_jax/conditioning.py, docs/sampling.md).
  config.sample.task = 'unconditional'
  # Input videos of the video tasks: '' takes clips from config.data; else a
  # .mp4/.gif/.webm/.avi file (one video) or an .npz of videos [N, T, H, W, C]
  # (e.g. another run's samples.npz: the input of a cascade 'upsample').
  config.sample.input = ''
  # Frames taken from the start of each input video; 0: the model's T
  # ('upsample': all frames of a file; a multiple of T without overlap).
  config.sample.input_frames = 0
  # 'predict' / 'extend': k, the given frames of each block.
  config.sample.num_cond_frames = 1
  # 'extend': frames of the result (more than the input's).
  config.sample.num_frames_out = 32
  # 'extend': 'forward' appends blocks after the input, 'backward' before it.
  config.sample.direction = 'forward'
  # 'extend' with diffusion.noise='decomposed': every block shares the base
  # noise of each video and draws fresh residuals (VideoFusion's long videos).
  config.sample.fixed_base_noise = False
  # 'interpolate': temporal upsampling factor m (given frames every m-th).
  config.sample.interp_factor = 2
  # 'upsample': low resolution the input is resized to; 0: the input's own
  # size (must divide data.image_size; dataset clips: image_size // 2).
  config.sample.lowres_size = 0
  # 'upsample': frames each block shares with the already upsampled video
  # before it (guided by both, VDM 3.1: no seams between blocks); 0:
  # independent T-frame blocks; -1: max(1, T // 4).
  config.sample.upsample_overlap = -1
  # jax.checkpoint the denoiser inside guidance gradients (less memory).
  config.sample.remat_guidance = False
  # Clip x_hat to [-1, 1] at every sampler step.
  config.sample.clip_x = True
  # Class to generate for task='class'; -1 cycles through the classes.
  config.sample.label = -1
  # Text models: the prompt of every video ('' with a dataset input: each
  # clip's own caption; else the empty prompt, i.e. the null text).
  config.sample.prompt = ''
  # Text models: a file of prompts, one per line (one video each, cycled
  # up to sample.num_videos); overrides sample.prompt.
  config.sample.prompts_file = ''
  # task='edit': invert up to t = edit_strength, regenerate from there (1:
  # Tune-A-Video's full DDIM inversion; lower keeps more of the layout).
  config.sample.edit_strength = 1.0
  # Image-to-video models: the first frame's noise-augmentation level at
  # sampling (SVD's noise_aug_strength: 0.02).
  config.sample.image_noise = 0.02
  # Image-to-video models: classifier-free guidance on the image, per frame
  # a linear ramp of the guidance scale s = 1 + w from image_guidance_min on
  # the given frame to image_guidance_max on the last (SVD: 1 to 3); both 1
  # switch it off.
  config.sample.image_guidance_min = 1.0
  config.sample.image_guidance_max = 3.0
  # 'inbetween' (Generative Inbetweening, Wang et al. 2024): the two
  # keyframes as image files 'first.png,last.png' ('' takes a video's first
  # and last frames: sample.input, or dataset clips); the fusion weight of
  # the forward prediction, 'half' (w = 0.5) or 'ramp' (1 -> 0 over the
  # frames); each model's image guidance, in its own time: 'averaged' (the
  # ramp image_guidance_min -> max averaged with its flip: a constant 2),
  # 'own' (the ramp itself) or 'auto' (their code: 'averaged' with 'half',
  # 'own' with 'ramp'); noise re-injection: each step of the first
  # inbetween_reinject_fraction of the steps is re-noised and taken again
  # inbetween_reinject_repeats times (their code: 0.5, 5).
  config.sample.keyframes = ''
  config.sample.inbetween_weight = 'half'
  config.sample.inbetween_guidance = 'auto'
  config.sample.inbetween_reinject_fraction = 0.5
  config.sample.inbetween_reinject_repeats = 5
  # Videos per sampling batch.
  config.sample.batch_size = 8
  # Frames per second of written videos.
  config.sample.fps = 8

  config.tune = ml_collections.ConfigDict()
  # --mode=tune (Tune-A-Video, Wu et al. 2022; configs/tune_a_video.py):
  # the workdir of the text-to-image model to inflate (its last checkpoint).
  config.tune.base_workdir = ''
  # The video to tune on (.mp4/.gif/.webm/.avi) and its caption.
  config.tune.video = ''
  config.tune.caption = ''
  # Frames taken from tune.video: num_frames (= data.num_frames) frames,
  # frame_stride apart, from start_frame (their code: 24 frames, stride 2).
  config.tune.num_frames = 8
  config.tune.frame_stride = 1
  config.tune.start_frame = 0
  # What is tuned: 'attention_queries' (Tune-A-Video: the query projections
  # of spatial and cross-attention, and the temporal attentions) or 'all'.
  config.tune.trainable = 'attention_queries'
  # --mode=tune_backward (Generative Inbetweening, Wang et al. 2024, Sec.
  # 3.3): the backward-motion model of the image-to-video model in
  # tune.base_workdir, tuned on config.data's clips reversed (only the value
  # and output projections of its temporal attentions; their code: AdamW lr
  # 1e-4, batch 1, no EMA: backward_ema_decay replaces optimizer.ema_decay,
  # and sampling reads the EMA). The run's length and checkpoints follow
  # config.training.
  config.tune.backward_learning_rate = 1e-4
  config.tune.backward_ema_decay = 0.0
  config.tune.backward_batch_size = 1
  config.tune.backward_steps = 2000

  config.videofusion = ml_collections.ConfigDict()
  # VideoFusion (Luo et al. 2023; vdm_jax/videofusion.py, configs/
  # videofusion_*.py): a base generator (an image UNet on the key frame
  # T // 2) estimates the shared base noise, a residual generator (the UNet
  # of config.model, with model.frame_positions) each frame's residual;
  # needs diffusion.noise='decomposed' and target 'eps'. False: one UNet.
  config.videofusion.enabled = False
  # The base generator's UNet fields (temporal attention off: an image
  # model on one frame); num_classes 0 or model.num_classes.
  config.videofusion.base_model = ml_collections.ConfigDict(dict(
      base_channels=128, channel_mults=(1, 2, 4, 8), num_res_blocks=2,
      attn_resolutions=(8, 16, 32), head_dim=64, dropout=0.1, num_classes=0,
      temporal_attention=False))
  # What the base predicts: 'eps', 'v' or 'x' (the image model's target).
  config.videofusion.base_target = 'eps'
  # The base also takes the text (a text-to-image base of a text model).
  config.videofusion.base_text = False
  # A workdir of the pretrained image model (its last EMA parameters start
  # the base, e.g. configs/videofusion_quickstart.py:base); '': from scratch.
  config.videofusion.base_workdir = ''
  # 'joint': trained with the residual generator, the base's gradient
  # flowing through the key frame only (the paper's stop-gradient);
  # 'frozen': the pretrained base is not trained.
  config.videofusion.base_training = 'joint'

  config.eval = ml_collections.ConfigDict()
  # FVD protocol preset (vdm_jax/evaluation/protocols.py) of --mode=eval.
  config.eval.protocol = 'stylegan_v_2048'
  # Generated videos; 0: the protocol's count (fewer = a smoke run, marked
  # as deviating in the result JSON).
  config.eval.num_videos = 0
  # Real clips; 0: the protocol's count.
  config.eval.num_real = 0
  # Split of the real (and conditioning) clips; '': data.split.
  config.eval.split = ''
  # Seed of the choice of real clips (positions in the dataset).
  config.eval.seed = 0
  # Videos per I3D step (rounded up to a multiple of the devices).
  config.eval.batch_size = 16
  # Directory caching the real clips' I3D features; '': no cache.
  config.eval.cache_dir = ''
  # Also write the generated videos (npz) next to the result JSON.
  config.eval.save_samples = False

  config.mesh = ml_collections.ConfigDict()
  # Mesh axes sizes; -1 takes all remaining devices.
  config.mesh.data = -1
  config.mesh.fsdp = 1
  # 'replicated' parameters and optimizer state, or 'fsdp': each split along
  # its largest dimension divisible by mesh.fsdp.
  config.mesh.param_sharding = 'replicated'

  config.plan = plan_config()

  # A pretrained model from a local diffusers folder (docs/pretrained.md).
  config.pretrained = ml_collections.ConfigDict()
  # Pipeline folder (model_index.json, unet/, vae/, text_encoder/, ...);
  # '' = this library's own models (train from scratch).
  config.pretrained.path = ''
  # Compute dtype of the pretrained networks ('float32' | 'bfloat16');
  # parameters are read into float32.
  config.pretrained.dtype = 'float32'
  # Weight file variant to read ('fp16', 'bf16', ...; '' = the plain files,
  # else the first variant present).
  config.pretrained.variant = ''
  # Frames per autoencoder call (bounds the decoder's memory).
  config.pretrained.vae_chunk = 8

  # Latent diffusion with this library's UNet (docs/pretrained.md): a frozen
  # pretrained autoencoder's folder (an AutoencoderKL model folder, or a
  # pipeline folder whose vae/ is used); '' = pixel space. The UNet then
  # runs on data.image_size / factor latents with its latent channels;
  # frames are encoded in the train step and samples decoded before they
  # are written.
  config.latent = ml_collections.ConfigDict()
  config.latent.path = ''
  # Train on posterior samples (as SD's training scripts); False: the mean.
  config.latent.sample_posterior = True
  # Frames per autoencoder call.
  config.latent.chunk = 8
  return config


def plan_config() -> ml_collections.ConfigDict:
  """--mode=plan (vdm_jax/plan.py): compile for TPU / GPU targets on a CPU
  host; every method's config holds these (one home)."""
  plan = ml_collections.ConfigDict()
  # Comma-separated targets, e.g. 'tpu:v5p:4x4x4,tpu:v5e:8x8,gpu:h100:8'.
  plan.targets = ''
  # What a method-'vdm' config runs: 'train' (--mode=train: the train step)
  # or 'tune' (--mode=tune: Tune-A-Video's step on the inflated base,
  # configs/tune_a_video.py). Other methods plan their own programs.
  plan.mode = 'train'
  # Comma-separated programs to compile (e.g. 'sample'); '' = every program
  # of the method (--mode=plan prints their names: train, sample, tune).
  plan.programs = ''
  # Also compile the sampler's step (one denoiser call, guided where the
  # method guides), where the method has a train or tune program beside it.
  plan.sample = True
  # Also find the largest global batch that fits, and the cheapest
  # (model.dtype, model.remat) that fits training.batch_size.
  plan.search = False
  # Fraction of each device's memory left free by a plan that fits.
  plan.headroom = 0.05
  # Share of a GPU's memory that JAX may use (its default preallocation,
  # XLA_PYTHON_CLIENT_MEM_FRACTION=0.75).
  plan.gpu_memory_fraction = 0.75
  return plan


def optimizer_config() -> ml_collections.ConfigDict:
  """The optimizer fields, shared by every method's config (one home)."""
  opt = ml_collections.ConfigDict()
  # 'adam' or 'adamw'.
  opt.name = 'adam'
  opt.learning_rate = 3e-4
  opt.b1 = 0.9
  opt.b2 = 0.99
  opt.weight_decay = 0.0
  # Linear warmup steps of the learning rate.
  opt.warmup_steps = 1000
  # After the warmup: 'constant' (VDM App. A) or 'cosine' (a half cosine
  # down to decay_to * learning_rate at training.num_train_steps).
  opt.decay = 'constant'
  opt.decay_to = 0.0
  # Global gradient-norm clipping; 0 disables.
  opt.grad_clip = 1.0
  # EMA decay of the parameters used for sampling.
  opt.ema_decay = 0.9999
  return opt
