"""The sampling tasks: one class per task behind one protocol, and a registry.

A task says what it conditions on and where (Ho et al. 2022, 3.1):
  'unconditional'  p(x).
  'class'          p(x | label), classifier-free guidance weight
                   sample.guidance_weight (VDM 2).
  'predict'        the first k = sample.num_cond_frames frames of the block are
                   given; the model generates the rest (BAIR 1 -> 15,
                   Kinetics 5 -> 11 in VDM 4.2).
  'extend'         block-autoregressive extension to sample.num_frames_out
                   frames (VDM 4.3.3): each new block is conditioned on the k
                   frames of the video it touches; sample.direction
                   'forward' appends blocks, 'backward' prepends them.
  'interpolate'    temporal upsampling by m = sample.interp_factor: the given
                   frames sit at every m-th position of the block.
  'keyframes'      the first and the last frame of the block are given.
  'upsample'       spatial super-resolution of a low-resolution video with
                   the high-resolution model (VDM 3.1, the bilinear-downsample
                   variant of reconstruction guidance).
  'edit'           Tune-A-Video's inversion editing under a new prompt.
  'image_to_video' an image-to-video model (model.image_condition) moves
                   forward from a given first frame (Stable Video Diffusion's
                   conditioning, image guidance per frame).
  'inbetween'      Generative Inbetweening (Wang et al. 2024): the frames
                   between two keyframes from the image-to-video model fused
                   with its backward-motion model (--mode=tune_backward).

Every task implements the `Task` protocol: `validate` (before anything is
compiled), `num_output_frames`, `known_positions` (output frames that are
given input frames), `input_from_clips` / `input_from_file` (its input from
ground-truth clips or a user's file), `run` (given a `BlockSampler`),
`labels`, `display_reference`, `eval_conditioning_frames` and
`validate_eval`. Adding a task is one class and one line in `REGISTRY`
(plus, for each new setting, one field in configs/default.py: a task's
dataclass fields are read from config.sample by name); programs build the
task once with `from_config`.

Frame-conditioned tasks use replacement when the spec's recon_weight is 0 and
reconstruction guidance otherwise. A known part is (x_a [B, T, H, W, C],
mask [B, T] bool, True = given). Long videos are a Python loop over blocks
around the one compiled sampler: every block has the same shapes, so it is
compiled once.

Every task lives in this one file (over 500 lines) on purpose: a newcomer
adding a task reads the others side by side.
"""

import dataclasses
from typing import Any, ClassVar, Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdm_jax import conditioning
from vdm_jax import denoiser
from vdm_jax import diffusion
from vdm_jax import noise as noise_lib
from vdm_jax import sampling
from vdm_jax import schedules
from vdm_jax.data import video_files

DIRECTIONS = ('forward', 'backward')


@dataclasses.dataclass(frozen=True)
class ModelShape:
  """What a task needs to know of the model: its block and its labels."""

  num_frames: int
  image_size: int
  channels: int
  num_classes: int = 0
  image_condition: bool = False

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> 'ModelShape':
    d = config.data
    return cls(d.num_frames, d.image_size, d.channels,
               int(config.model.num_classes),
               bool(config.model.get('image_condition', False)))

  @property
  def frame_shape(self) -> tuple[int, int, int]:
    return (self.image_size, self.image_size, self.channels)


@dataclasses.dataclass(frozen=True)
class BlockSampler:
  """Samples one T-frame block of B videos; the task loops over blocks.

  `block(i, x_a, mask, x_lowres)` draws block i with fold_in(rng, i), with
  the spec's guidance: classifier-free when cond holds labels (the one place
  it is switched on for tasks), replacement / reconstruction of (x_a, mask)
  and super-resolution against x_lowres, together when both are given
  (sampling.Guidance's terms compose; spec.recon_weight weighs each).

  Attributes:
    denoise_fn: (z, logsnr, cond) -> prediction (denoiser.make_denoise_fn).
    rng: PRNG key of the task run.
    shape: (B, T, H, W, C) of a block.
    spec: the sampler settings.
    logsnr_fn: the schedule.
    target: the model's parameterization.
    noise: the noise.Noise of the model.
    cond: model inputs ('label' int32 [B]).
    null_label: the model's null label (num_classes); None: no labels.
    fixed_base: VideoFusion's long videos: every block samples with the
      same key, so each draw (z_1, step i's noise) has the same base noise
      per video; the block index salts the residuals, fresh per block.
    pair_fn: the forward and backward models of in-betweening
      (adapt/inbetween.make_pair_fn); None: there is no backward model.
  """

  denoise_fn: Any
  rng: jax.Array
  shape: tuple[int, ...]
  spec: sampling.SamplerSpec
  logsnr_fn: schedules.LogSNRFn
  target: str
  noise: noise_lib.Noise
  cond: dict
  null_label: Optional[int] = None
  fixed_base: bool = False
  pair_fn: Any = None

  def __call__(self, i: int, x_a=None, mask=None, x_lowres=None,
               z_init=None, t_start: float = 1.0, *, denoise_fn=None,
               cond=None, reinject=(0, 1)) -> jnp.ndarray:
    """Block i; denoise_fn and cond replace the sampler's own (a task's
    wrapped denoiser, e.g. image guidance), reinject as sampling.sample."""
    s = self.spec
    cond = self.cond if cond is None else cond
    null_label = self.null_label if 'label' in cond else None
    guidance = sampling.make_guidance(
        cfg_weight=s.guidance_weight, null_label=null_label,
        null_text='text' in cond, x_a=x_a,
        mask=mask, x_lowres=x_lowres, recon_weight=s.recon_weight,
        remat=s.remat_guidance)
    rng, noise = jax.random.fold_in(self.rng, i), self.noise
    if self.fixed_base:
      rng, noise = jax.random.fold_in(self.rng, 0), noise.with_salt(i)
    return sampling.sample(
        self.denoise_fn if denoise_fn is None else denoise_fn, rng,
        self.shape, logsnr_fn=self.logsnr_fn, target=self.target, spec=s,
        noise=noise, cond=cond, guidance=guidance, z_init=z_init,
        t_start=t_start, reinject=reinject)

  def invert(self, x: jnp.ndarray, t_end: float = 1.0) -> jnp.ndarray:
    """DDIM inversion of x [B, T, H, W, C] to z_1 (or z at t_end) with
    the spec's steps.

    Unguided and unconditioned: the null text (text models) and the null
    label (class models), Tune-A-Video's inversion with the empty prompt
    (Wu et al. 2022, Sec. 4.3). x_hat is clipped as the sampler clips it,
    so sampling from z_1 with the empty prompt retraces the inversion.
    """
    cond = dict(self.cond)
    b = x.shape[0]
    if 'text' in cond:
      cond['text_null'] = jnp.ones((b,), bool)
    if 'label' in cond:
      cond['label'] = jnp.full((b,), self.null_label, jnp.int32)
    return sampling.ddim_invert(
        self.denoise_fn, x, logsnr_fn=self.logsnr_fn, target=self.target,
        num_steps=self.spec.num_steps, cond=cond, clip_x=self.spec.clip_x,
        t_end=t_end)


def class_labels(num_classes: int, label: int, n: int) -> np.ndarray:
  """int32 [n] labels: `label`, or cycling through all classes if < 0."""
  if label >= 0:
    if label >= num_classes:
      raise ValueError(
          f'sample.label={label} but the model has {num_classes} classes.')
    return np.full((n,), label, np.int32)
  return (np.arange(n) % max(num_classes, 1)).astype(np.int32)


def fit(videos: np.ndarray, size: int, channels: int) -> np.ndarray:
  """Short-side resize and centre crop: uint8 [N, T, S, S, channels]."""
  out = []
  for v in videos:
    if v.shape[1:] != (size, size, channels):
      v = video_files.crop(
          video_files.resize_short_side(v, size, channels), size)
    out.append(v)
  return np.stack(out)


@dataclasses.dataclass(frozen=True)
class Task:
  """The protocol of a sampling task (and the behaviour most tasks share).

  Attributes:
    input_frames: frames taken from each input (sample.input_frames); 0:
      the model's T.
    label: sample.label, the class to generate (-1 cycles; dataset inputs
      keep their own labels).
  """

  name: ClassVar[str] = ''
  # Whether the task conditions on input videos.
  needs_video: ClassVar[bool] = True
  # VideoFusion's shared base noise across blocks (task 'extend' only).
  fixed_base_noise: ClassVar[bool] = False
  input_frames: int = 0
  label: int = -1

  @classmethod
  def from_config(cls, sample_config: ml_collections.ConfigDict) -> 'Task':
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: sample_config[k] for k in fields})

  def validate(self, model: ModelShape, video_shape: Optional[tuple],
               spec: sampling.SamplerSpec) -> None:
    """Raises ValueError for impossible requests, before any compilation."""
    del spec
    if self.needs_video:
      conditioning.check_video(video_shape, self.min_input_frames(model),
                     model.frame_shape, self.name)

  def min_input_frames(self, model: ModelShape) -> int:
    del model
    return 1

  def num_input_frames(self, model: ModelShape) -> int:
    """T_in of dataset inputs: input_frames, or the model's T."""
    return self.input_frames or model.num_frames

  def num_output_frames(self, model: ModelShape, num_in: int) -> int:
    del num_in
    return model.num_frames

  def known_positions(self, model: ModelShape, num_in: int,
                      num_out: int) -> np.ndarray:
    """bool [T_out]: output frames that are given input frames."""
    del model, num_in
    return np.zeros(num_out, bool)

  def input_from_clips(self, model: ModelShape,
                       clips: np.ndarray) -> Optional[np.ndarray]:
    """The input derived from uint8 clips [N, T_out, H, W, C]."""
    del model
    return clips if self.needs_video else None

  def input_from_file(self, model: ModelShape,
                      videos: np.ndarray) -> np.ndarray:
    """A file's uint8 videos [N, T, h, w, C] cut and fitted to the task."""
    videos = videos[:, :max(self.num_input_frames(model), 1)]
    return fit(videos, model.image_size, model.channels)

  def display_reference(self, video: np.ndarray, known: np.ndarray,
                        num_out: int) -> np.ndarray:
    """A file input [N, T_in, h, w, C] placed at its output frames."""
    out = np.zeros((video.shape[0], num_out) + video.shape[2:], np.uint8)
    out[:, known] = video
    return out

  def labels(self, num_classes: int, dataset_labels: Optional[np.ndarray],
             n: int) -> Optional[np.ndarray]:
    """int32 [n] labels of a class-conditional model (None: null label).

    Video tasks keep the dataset clips' labels when there are (and no
    sample.label is asked for), else as 'class'.
    """
    if not num_classes:
      return None
    if dataset_labels is not None and self.label < 0:
      return dataset_labels.astype(np.int32)
    return class_labels(num_classes, self.label, n)

  def eval_conditioning_frames(self) -> Optional[int]:
    """Given frames in the sense of an FVD protocol; None: not comparable."""
    return None

  def validate_eval(self, has_file_input: bool) -> None:
    del has_file_input

  def run(self, sample_block: BlockSampler, video: Optional[jnp.ndarray],
          model: ModelShape) -> jnp.ndarray:
    """[B, T_out, H, W, C] float32 samples."""
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class Unconditional(Task):
  name: ClassVar[str] = 'unconditional'
  needs_video: ClassVar[bool] = False

  def labels(self, num_classes, dataset_labels, n):
    return None

  def eval_conditioning_frames(self):
    return 0

  def run(self, sample_block, video, model):
    return sample_block(0)


@dataclasses.dataclass(frozen=True)
class Class(Unconditional):
  name: ClassVar[str] = 'class'

  def validate(self, model, video_shape, spec):
    if not model.num_classes:
      raise ValueError("Task 'class' needs a model with num_classes > 0.")
    class_labels(model.num_classes, self.label, 1)

  def labels(self, num_classes, dataset_labels, n):
    return class_labels(num_classes, self.label, n)


@dataclasses.dataclass(frozen=True)
class Predict(Task):
  name: ClassVar[str] = 'predict'
  num_cond_frames: int = 1

  def validate(self, model, video_shape, spec):
    conditioning.check_k(self.num_cond_frames, model.num_frames)
    super().validate(model, video_shape, spec)

  def min_input_frames(self, model):
    return self.num_cond_frames

  def known_positions(self, model, num_in, num_out):
    known = np.zeros(num_out, bool)
    known[:self.num_cond_frames] = True
    return known

  def display_reference(self, video, known, num_out):
    out = np.zeros((video.shape[0], num_out) + video.shape[2:], np.uint8)
    n = min(video.shape[1], num_out)
    out[:, :n] = video[:, :n]
    return out

  def eval_conditioning_frames(self):
    return self.num_cond_frames

  def run(self, sample_block, video, model):
    return sample_block(0, *conditioning.predict_condition(
        video, model.num_frames, self.num_cond_frames))


@dataclasses.dataclass(frozen=True)
class Keyframes(Task):
  name: ClassVar[str] = 'keyframes'

  def validate(self, model, video_shape, spec):
    if model.num_frames < 2:
      raise ValueError('Task keyframes needs a model with at least 2 frames.')
    super().validate(model, video_shape, spec)

  def min_input_frames(self, model):
    return 2

  def known_positions(self, model, num_in, num_out):
    known = np.zeros(num_out, bool)
    known[[0, model.num_frames - 1]] = True
    return known

  def display_reference(self, video, known, num_out):
    out = np.zeros((video.shape[0], num_out) + video.shape[2:], np.uint8)
    out[:, [0, -1]] = video[:, [0, -1]]
    return out

  def run(self, sample_block, video, model):
    return sample_block(
        0, *conditioning.keyframes_condition(video, model.num_frames))


@dataclasses.dataclass(frozen=True)
class Extend(Task):
  """Block-autoregressive extension; the input is optional (None: sampled)."""

  name: ClassVar[str] = 'extend'
  num_cond_frames: int = 1
  num_frames_out: int = 0
  direction: str = 'forward'
  fixed_base_noise: bool = False

  def frames_out(self, model: ModelShape) -> int:
    """num_frames_out; 0 means 2 T."""
    return self.num_frames_out or 2 * model.num_frames

  def validate(self, model, video_shape, spec):
    conditioning.check_k(self.num_cond_frames, model.num_frames)
    if self.direction not in DIRECTIONS:
      raise ValueError(f'Unknown sample.direction {self.direction!r};'
                       f' choose one of {DIRECTIONS}.')
    have = video_shape[1] if video_shape else model.num_frames
    if self.frames_out(model) <= have:
      raise ValueError(
          f'sample.num_frames_out={self.frames_out(model)} must exceed the'
          f' {have} frames there are already.')
    if video_shape is not None:
      super().validate(model, video_shape, spec)

  def min_input_frames(self, model):
    return self.num_cond_frames

  def num_output_frames(self, model, num_in):
    return self.frames_out(model)

  def known_positions(self, model, num_in, num_out):
    known = np.zeros(num_out, bool)
    if self.direction == 'backward':
      known[num_out - num_in:] = True
    else:
      known[:num_in] = True
    return known

  def input_from_clips(self, model, clips):
    num_in = self.num_input_frames(model)
    if self.direction == 'backward':
      return clips[:, -num_in:]
    return clips[:, :num_in]

  def run(self, sample_block, video, model):
    if video is None:
      video = sample_block(0)
    return conditioning.extend(
        lambda i, x_a, m: sample_block(i + 1, x_a, m), video,
        num_frames=model.num_frames, num_cond_frames=self.num_cond_frames,
        num_frames_out=self.frames_out(model), direction=self.direction)


@dataclasses.dataclass(frozen=True)
class Interpolate(Task):
  name: ClassVar[str] = 'interpolate'
  interp_factor: int = 2

  def validate(self, model, video_shape, spec):
    num_in = max(video_shape[1], 2) if video_shape else 2
    conditioning.interpolation_plan(num_in, model.num_frames,
                                    self.interp_factor)
    super().validate(model, video_shape, spec)

  def min_input_frames(self, model):
    return 2

  def num_output_frames(self, model, num_in):
    return (num_in - 1) * self.interp_factor + 1

  def known_positions(self, model, num_in, num_out):
    known = np.zeros(num_out, bool)
    known[::self.interp_factor] = True
    return known

  def input_from_clips(self, model, clips):
    return clips[:, ::self.interp_factor]

  def run(self, sample_block, video, model):
    t, m = model.num_frames, self.interp_factor
    b = video.shape[0]
    out = jnp.zeros((b, (video.shape[1] - 1) * m + 1) + video.shape[2:])
    plan = conditioning.interpolation_plan(video.shape[1], t, m)
    for i, (idx, pos, first) in enumerate(plan):
      block = sample_block(i, *conditioning.known_frames(video[:, idx], pos, t))
      n = pos[-1] + 1
      out = out.at[:, first:first + n].set(block[:, :n])
    return out


@dataclasses.dataclass(frozen=True)
class Upsample(Task):
  """Super-resolution of [B, T_in, h, w, C], T_in >= T.

  Long videos are upsampled block after block: each block is guided by its
  low-resolution frames and, with `upsample_overlap` = k > 0, by the k
  frames it shares with the already upsampled video before it (both terms
  in one guided step, VDM 3.1), so that consecutive blocks agree at their
  boundary instead of meeting at a seam. k = 0 samples T-frame blocks
  independently (T must divide T_in); -1 picks max(1, T // 4).
  """

  name: ClassVar[str] = 'upsample'
  lowres_size: int = 0
  upsample_overlap: int = -1

  def lowres(self, model: ModelShape, input_size: Optional[int] = None
             ) -> int:
    """The low resolution: lowres_size, else the input's own size if
    square, else half the model's."""
    size = model.image_size
    low = self.lowres_size or (input_size if input_size else size // 2)
    if low < 1 or size % low:
      raise ValueError(
          f'The low resolution {low} of task upsample must divide'
          f' data.image_size={size}; set sample.lowres_size to a divisor.')
    return low

  def overlap(self, model: ModelShape) -> int:
    """k, the frames each block shares with the video before it."""
    k = self.upsample_overlap
    if k < 0:
      k = max(1, model.num_frames // 4)
    if k >= model.num_frames:
      raise ValueError(
          f'sample.upsample_overlap={k} must be < data.num_frames='
          f'{model.num_frames} (0: independent blocks; -1: T // 4).')
    return k

  def validate(self, model, video_shape, spec):
    if not spec.recon_weight:
      raise ValueError("Task 'upsample' needs sample.recon_weight > 0.")
    if video_shape is None:
      raise ValueError("Task 'upsample' needs a low-resolution input video.")
    conditioning.check_video(video_shape, model.num_frames, None, self.name)
    _, tin, h, w, c = video_shape
    t, size = model.num_frames, model.image_size
    k = self.overlap(model)
    if (k == 0 and tin % t) or size % h or size % w or c != model.channels:
      raise ValueError(
          f'Cannot upsample {tuple(video_shape[1:])} with a {t}x{size}x'
          f'{size}x{model.channels} model: sizes must divide the image'
          ' size' + (', and without overlap (sample.upsample_overlap=0)'
                     ' frames must be a multiple of T.' if k == 0 else '.'))

  def num_output_frames(self, model, num_in):
    return num_in

  def input_from_clips(self, model, clips):
    return fit(clips, self.lowres(model), model.channels)

  def input_from_file(self, model, videos):
    t = model.num_frames
    whole = t if self.overlap(model) == 0 else 1
    num_in = self.input_frames or videos.shape[1] // whole * whole
    _, _, h, w, _ = videos.shape
    size = self.lowres(model, h if h == w else None)
    return fit(videos[:, :max(num_in, 1)], size, model.channels)

  def display_reference(self, video, known, num_out):
    return video

  def validate_eval(self, has_file_input):
    if has_file_input:
      raise ValueError("--mode=eval of task 'upsample' takes its"
                       " low-resolution inputs from the dataset; set"
                       " sample.input=''.")

  def run(self, sample_block, video, model):
    t = model.num_frames
    out = None
    for i, (start, known) in enumerate(conditioning.overlapping_blocks(
        video.shape[1], t, self.overlap(model))):
      lowres = video[:, start:start + t]
      if not known:
        block = sample_block(i, x_lowres=lowres)
        out = block if out is None else jnp.concatenate([out, block], 1)
        continue
      x_a, mask = conditioning.known_frames(
          out[:, start:start + known], np.arange(known), t)
      block = sample_block(i, x_a=x_a, mask=mask, x_lowres=lowres)
      out = jnp.concatenate([out, block[:, known:]], axis=1)
    return out


@dataclasses.dataclass(frozen=True)
class Edit(Task):
  """Tune-A-Video's editing (Wu et al. 2022, Sec. 4.3): a video redrawn
  under another prompt.

  The input video (sample.input; by default the clip a --mode=tune workdir
  was tuned on) is DDIM-inverted with the empty prompt and no guidance
  (BlockSampler.invert), then every video's prompt is sampled with DDIM
  (eta = 0) from that latent, with the spec's classifier-free guidance. A
  video whose prompt is empty retraces the inversion: its reconstruction.

  Attributes:
    edit_strength: invert up to t = edit_strength and regenerate from there
      (1: Tune-A-Video's full inversion; lower keeps more of the source's
      layout, as in SDEdit, Meng et al. 2022).
  """

  name: ClassVar[str] = 'edit'
  edit_strength: float = 1.0

  def validate(self, model, video_shape, spec):
    super().validate(model, video_shape, spec)
    if spec.sampler != 'ddim' or spec.eta != 0:
      raise ValueError(
          "sample.task='edit' samples from a DDIM inversion: set"
          " sample.sampler='ddim' and sample.eta=0 (got"
          f' {spec.sampler!r}, eta={spec.eta}).')
    if not 0.0 < self.edit_strength <= 1.0:
      raise ValueError('sample.edit_strength must lie in (0, 1], got'
                       f' {self.edit_strength}.')

  def min_input_frames(self, model):
    return model.num_frames

  def display_reference(self, video, known, num_out):
    return video[:, :num_out]

  def run(self, sample_block, video, model):
    video = video[:, :model.num_frames]
    t = self.edit_strength
    return sample_block(0, z_init=sample_block.invert(video, t_end=t),
                        t_start=t)


def check_image_file_size(model: ModelShape, videos: np.ndarray,
                          task: str) -> None:
  """Logs a warning when a file's frames are resized to the model's."""
  if videos.shape[2:] != model.frame_shape:
    logging.warning(
        'Task %r: the input frames are %dx%d; the model makes %dx%d, so they'
        ' are resized (short side) and centre-cropped.', task,
        videos.shape[2], videos.shape[3], model.image_size, model.image_size)


@dataclasses.dataclass(frozen=True)
class ImageToVideo(Task):
  """A video moving forward from a given first frame (image-to-video).

  Stable Video Diffusion's recipe (Blattmann et al. 2023): the first frame
  plus image_noise times standard noise conditions the model, which is
  guided on it per frame, the scale linear from image_guidance_min on the
  given frame to image_guidance_max on the last (sampling.image_guided);
  the given frame is kept as the output's first. The input is an image
  file (or a video's first frame) or the dataset clips' first frames.
  """

  name: ClassVar[str] = 'image_to_video'
  image_noise: float = 0.02
  image_guidance_min: float = 1.0
  image_guidance_max: float = 3.0

  def validate(self, model, video_shape, spec):
    super().validate(model, video_shape, spec)
    if not model.image_condition:
      raise ValueError(
          f'sample.task={self.name!r} needs an image-to-video model'
          ' (model.image_condition=True, e.g. configs/i2v_quickstart.py);'
          ' this one has no image input.')
    if self.image_noise < 0:
      raise ValueError(f'sample.image_noise must be >= 0, got'
                       f' {self.image_noise}.')

  def num_input_frames(self, model):
    return 1

  def known_positions(self, model, num_in, num_out):
    known = np.zeros(num_out, bool)
    known[0] = True
    return known

  def input_from_file(self, model, videos):
    check_image_file_size(model, videos, self.name)
    return fit(videos[:, :1], model.image_size, model.channels)

  def display_reference(self, video, known, num_out):
    if video.shape[1] == num_out:
      return video
    return super().display_reference(video[:, :1], known, num_out)

  def image_scales(self, model: ModelShape) -> Optional[jnp.ndarray]:
    """float32 [T] per-frame guidance scales (None: no guidance)."""
    if self.image_guidance_min == self.image_guidance_max == 1.0:
      return None
    return sampling.guidance_ramp(self.image_guidance_min,
                                  self.image_guidance_max, model.num_frames)

  def image_cond(self, sample_block: BlockSampler, image: jnp.ndarray
                 ) -> dict:
    """The model's image inputs for the given frames [B, H, W, C]."""
    b = image.shape[0]
    noise = jax.random.normal(jax.random.fold_in(sample_block.rng, 1 << 20),
                              image.shape)
    return denoiser.image_cond(image, jnp.full((b,), self.image_noise),
                               noise)

  def run(self, sample_block, video, model):
    image = video[:, 0]
    scales = self.image_scales(model)
    fn = sample_block.denoise_fn
    if scales is not None:
      fn = sampling.image_guided(fn, scales)
    x = sample_block(0, denoise_fn=fn, cond={
        **sample_block.cond, **self.image_cond(sample_block, image)})
    return x.at[:, 0].set(image)


# How each in-betweening model is image-guided: 'averaged' (the ramp
# averaged with its flip), 'own' (the ramp in the model's own time), 'auto'
# (Wang et al. 2024's code: 'averaged' with w = 0.5, 'own' with the ramp).
INBETWEEN_GUIDANCE = ('auto', 'averaged', 'own')


@dataclasses.dataclass(frozen=True)
class Inbetween(ImageToVideo):
  """The frames between two keyframes: Generative Inbetweening.

  Wang et al. 2024 (arXiv 2408.15239, Sec. 3.4): at every step the forward
  image-to-video model's prediction from the first keyframe and the
  backward-motion model's (adapt/inbetween.py) from the last keyframe on
  the time-flipped latent are fused, w pred_fwd + (1 - w) flip(pred_bwd),
  w = 0.5 ('half') or 1 -> 0 over the frames ('ramp'); each of the first
  inbetween_reinject_fraction of the steps is taken, re-noised and taken
  again inbetween_reinject_repeats times (their code: half of the steps, 5
  re-noisings). Each model is guided on its keyframe per frame in its own
  time (`image_scales`): inbetween_guidance 'auto' does as their code does,
  the ramp averaged with its flip with 'half' (a constant 2 for 1 -> 3:
  'averaged') and the ramp itself with 'ramp' ('own': 1 on the model's
  keyframe, 3 on the other). The two keyframes are kept as the output's
  first and last frames. Inputs: two image files (sample.keyframes), or the
  first and last of the first sample.input_frames (default T) frames of a
  video or of the dataset clips.
  """

  name: ClassVar[str] = 'inbetween'
  inbetween_weight: str = 'half'
  inbetween_guidance: str = 'auto'
  inbetween_reinject_fraction: float = 0.5
  inbetween_reinject_repeats: int = 5

  def validate(self, model, video_shape, spec):
    if model.num_frames < 3:
      raise ValueError(
          f'Task {self.name!r} makes the frames between two keyframes: it'
          f' needs a model of at least 3 frames, this one has'
          f' {model.num_frames}.')
    super().validate(model, video_shape, spec)
    if video_shape is not None and video_shape[1] < 2:
      raise ValueError(f'Task {self.name!r} needs two keyframes; the input'
                       f' has {video_shape[1]} frame.')
    sampling.fusion_weights(self.inbetween_weight, model.num_frames)
    if self.inbetween_guidance not in INBETWEEN_GUIDANCE:
      raise ValueError(
          f'Unknown sample.inbetween_guidance {self.inbetween_guidance!r};'
          f' choose one of {INBETWEEN_GUIDANCE}.')
    if not 0.0 <= self.inbetween_reinject_fraction <= 1.0 or (
        self.inbetween_reinject_repeats < 0):
      raise ValueError(
          'sample.inbetween_reinject_fraction must lie in [0, 1] and'
          ' sample.inbetween_reinject_repeats be >= 0.')
    if spec.guidance_weight and model.num_classes:
      raise ValueError(
          f'Task {self.name!r} is guided on its keyframes'
          ' (sample.image_guidance_min/max), not on labels: set'
          ' sample.guidance_weight=0.')

  def num_input_frames(self, model):
    return self.input_frames or model.num_frames

  def min_input_frames(self, model):
    return 2

  def image_scales(self, model: ModelShape) -> Optional[jnp.ndarray]:
    """float32 [T] scales each model is guided with in its own time."""
    scales = super().image_scales(model)
    mode = self.inbetween_guidance
    if mode == 'auto':
      mode = 'averaged' if self.inbetween_weight == 'half' else 'own'
    if scales is None or mode == 'own':
      return scales
    return sampling.averaged_ramp(scales)

  def known_positions(self, model, num_in, num_out):
    known = np.zeros(num_out, bool)
    known[[0, -1]] = True
    return known

  def input_from_file(self, model, videos):
    check_image_file_size(model, videos, self.name)
    n = min(self.num_input_frames(model), videos.shape[1])
    return fit(videos[:, [0, n - 1]], model.image_size, model.channels)

  def display_reference(self, video, known, num_out):
    if video.shape[1] == num_out:
      return video
    return Task.display_reference(self, video[:, [0, -1]], known, num_out)

  def run(self, sample_block, video, model):
    if sample_block.pair_fn is None:
      raise ValueError(
          f'Task {self.name!r} needs the backward-motion model: sample a'
          ' --mode=tune_backward workdir (adapt/tune_backward.py).')
    first, last = video[:, 0], video[:, -1]
    cond_f = {**sample_block.cond, **self.image_cond(sample_block, first)}
    # The same augmentation noise on both keyframes.
    cond_b = dict(cond_f, image=cond_f['image'] - first + last)
    fused = sampling.fused_bidirectional(
        sample_block.pair_fn,
        sampling.fusion_weights(self.inbetween_weight, model.num_frames),
        self.image_scales(model))
    steps = int(self.inbetween_reinject_fraction
                * sample_block.spec.num_steps)
    x = sample_block(0, denoise_fn=fused,
                     cond={'forward': cond_f, 'backward': cond_b},
                     reinject=(steps, self.inbetween_reinject_repeats))
    return x.at[:, 0].set(first).at[:, -1].set(last)


REGISTRY: dict[str, type[Task]] = {
    cls.name: cls for cls in (Unconditional, Class, Predict, Extend,
                              Interpolate, Keyframes, Upsample, Edit,
                              ImageToVideo, Inbetween)
}
TASKS = tuple(REGISTRY)


def get(name: str) -> type[Task]:
  if name not in REGISTRY:
    raise ValueError(f'Unknown sample.task {name!r}; choose one of'
                     f' {tuple(REGISTRY)}.')
  return REGISTRY[name]


def from_config(sample_config: ml_collections.ConfigDict) -> Task:
  """The task of config.sample, with its settings."""
  task = get(sample_config.task).from_config(sample_config)
  if sample_config.fixed_base_noise and not isinstance(task, Extend):
    raise ValueError("sample.fixed_base_noise applies to task 'extend'.")
  return task


def check_noise(task: Task, noise: noise_lib.Noise) -> None:
  if task.fixed_base_noise and not noise.decomposed:
    raise ValueError(
        "sample.fixed_base_noise needs diffusion.noise='decomposed' (the"
        ' base noise it holds fixed).')


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything a task run needs besides its inputs; built once by a program.

  Attributes:
    model: the model's block shape and classes.
    spec: the sampler settings.
    logsnr_fn: the schedule.
    target: the model's parameterization.
    noise: the model's noise.Noise.
  """

  model: ModelShape
  spec: sampling.SamplerSpec
  logsnr_fn: schedules.LogSNRFn
  target: str
  noise: noise_lib.Noise

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict,
                  num_steps: Optional[int] = None) -> 'Setup':
    """The setup of config (num_steps overrides sample.num_steps)."""
    d = config.data
    spec = sampling.SamplerSpec.from_config(config.sample)
    if num_steps:
      spec = spec.replace(num_steps=num_steps)
    return cls(ModelShape.from_config(config), spec,
               schedules.get_logsnr_fn(config.diffusion, d.image_size),
               config.diffusion.target,
               noise_lib.from_config(config.diffusion, d.num_frames))


def run(
    task: Task,
    denoise_fn: diffusion.DenoiseFn,
    rng: jax.Array,
    setup: Setup,
    *,
    video: Optional[jnp.ndarray] = None,
    num_videos: Optional[int] = None,
    labels: Optional[jnp.ndarray] = None,
    text: Optional[dict] = None,
    pair_fn: Any = None,
) -> jnp.ndarray:
  """Runs `task` end to end.

  Args:
    task: the task (from `from_config`).
    denoise_fn: (z, logsnr, cond) -> prediction (denoiser.make_denoise_fn).
    rng: PRNG key; block i samples with fold_in(rng, i).
    setup: model shape, sampler spec, schedule, target and noise.
    video: [B, T_in, H, W, C] input in [-1, 1] for the video tasks
      ('upsample': the low-resolution video [B, T_in, h, w, C]); optional for
      'extend' (None: the first block is sampled without frames).
    num_videos: B when there is no input video.
    labels: int32 [B] class labels of a class-conditional model; with
      spec.guidance_weight != 0 classifier-free guidance is applied.
    text: {'text': [B, L, D], 'text_mask': [B, L]} prompt embeddings of a
      text model (every block of every task is conditioned on them; with
      spec.guidance_weight != 0 guided against the null text).
    pair_fn: task 'inbetween': the forward and backward models
      (adapt/inbetween.make_pair_fn).

  Returns:
    x: [B, T_out, H, W, C] float32, T_out = task.num_output_frames.
  """
  model = setup.model
  if video is not None:
    video = jnp.asarray(video, jnp.float32)
  task.validate(model, None if video is None else video.shape, setup.spec)
  check_noise(task, setup.noise)
  b = video.shape[0] if video is not None else num_videos
  if b is None:
    raise ValueError(f'Task {task.name!r} without an input video needs'
                     ' num_videos.')
  setup.noise.check_frames(model.num_frames)
  cond = denoiser.sampling_cond(model.num_classes, labels, text)
  if isinstance(task, Class) and 'label' not in cond:
    raise ValueError("Task 'class' needs labels.")
  block = BlockSampler(
      denoise_fn, rng, (b, model.num_frames) + model.frame_shape, setup.spec,
      setup.logsnr_fn, setup.target, setup.noise, cond,
      null_label=model.num_classes or None,
      fixed_base=task.fixed_base_noise, pair_fn=pair_fn)
  return task.run(block, video, model)
