"""The denoiser: model creation, parameter shapes and binding.

Every program that needs a network gets it here: training (fresh parameters
under jit), sampling and evaluation (abstract parameters to restore into),
SinFusion (its three NextNets) and the experiments. `make_denoise_fn` binds
parameters into the `denoise_fn(z, logsnr, cond) -> prediction` that
diffusion.loss and sampling.sample take; `cond` is a dict of the model's
keyword inputs ('label', 'frame_mask', 'text', 'text_mask', 'text_null',
'image', 'image_sigma', 'image_null' for the UNet; 'frames', 'k' for a
NextNet), built here for training (`training_cond`) and sampling
(`sampling_cond`): a new conditioning signal is added in these two functions
and consumed by the model.
"""

import contextlib
import dataclasses
import functools
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vdm_jax import schedules
from vdm_jax import sharding
from vdm_jax import videofusion
from vdm_jax.models import attention
from vdm_jax.models import nextnet
from vdm_jax.models import unet3d
from vdm_jax.text import encoders


def has_text(config: ml_collections.ConfigDict) -> bool:
  """Whether config's model is text-conditioned (text.encoder != 'none')."""
  return 'text' in config and config.text.encoder != 'none'


def text_encoder(config: ml_collections.ConfigDict
                 ) -> Optional[encoders.TextEncoder]:
  """The frozen text encoder of config.text (None without text)."""
  return encoders.from_config(config.text) if has_text(config) else None


def model_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """UNet3D's fields: config.model, with text_length from config.text."""
  kwargs = dict(config.model)
  kwargs['text_length'] = (int(config.text.max_length) if has_text(config)
                           else 0)
  return kwargs


def create_model(config: ml_collections.ConfigDict) -> nn.Module:
  """The space-time UNet of config.model (and config.text); with
  videofusion.enabled, VideoFusion's base (image) and residual (this UNet)
  generators as one network (vdm_jax/videofusion.py)."""
  if videofusion.enabled(config):
    return videofusion.create_model(config, model_kwargs(config))
  return unet3d.UNet3D(**model_kwargs(config))


@functools.lru_cache(maxsize=8)
def _codec_shape(path: str) -> tuple[int, int]:
  from vdm_jax.pretrained import autoencoder  # pylint: disable=g-import-not-at-top
  from vdm_jax.pretrained import formats  # pylint: disable=g-import-not-at-top
  folder = formats.component_folder(path, 'vae')
  cfg = formats.model_config(folder)
  if formats.class_name(cfg) not in autoencoder.CLASS_NAMES:
    raise ValueError(f'latent.path {path!r} holds a {formats.class_name(cfg)}'
                     f', not an autoencoder ({autoencoder.CLASS_NAMES}).')
  kw = autoencoder.module_kwargs(cfg)
  return 2 ** (len(kw['block_out_channels']) - 1), int(kw['latent_channels'])


def has_latent(config: ml_collections.ConfigDict) -> bool:
  """Whether the model runs in a pretrained autoencoder's latent space."""
  return bool(config.get('latent') and config.latent.path)


def model_space(config: ml_collections.ConfigDict
                ) -> ml_collections.ConfigDict:
  """config with data.image_size and data.channels of what the UNet sees.

  Pixel models: config itself. Latent models (latent.path): image_size /
  factor and the latent channels, read from the autoencoder's config.json
  (no weights). Data loading keeps the pixel config.
  """
  if not has_latent(config):
    return config
  factor, channels = _codec_shape(config.latent.path)
  if config.data.image_size % factor:
    raise ValueError(f'data.image_size={config.data.image_size} is not a '
                     f'multiple of the autoencoder factor {factor} '
                     f'(latent.path).')
  out = ml_collections.ConfigDict(config.to_dict())
  out.data.image_size = config.data.image_size // factor
  out.data.channels = channels
  return out


def load_codec(config: ml_collections.ConfigDict, mesh=None):
  """(codec, params): latent.Identity() and None for pixel models, else the
  frozen autoencoder of latent.path (latent.Autoencoder) and its
  parameters."""
  from vdm_jax import latent  # pylint: disable=g-import-not-at-top
  if not has_latent(config):
    return latent.Identity(), None
  from vdm_jax.pretrained import autoencoder  # pylint: disable=g-import-not-at-top
  module, params = autoencoder.load(config.latent.path,
                                    dtype=config.model.dtype)
  return latent.Autoencoder(module, chunk=int(config.latent.chunk),
                            mesh=mesh), params


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError on a config.model the UNet cannot run (no compile)."""
  config = model_space(config)
  unet3d.validate_model_config(
      config.data.image_size, config.data.num_frames, **model_kwargs(config))
  if videofusion.enabled(config):
    videofusion.validate(config, model_kwargs(config))


def example_inputs(config: ml_collections.ConfigDict, batch: int = 1
                   ) -> tuple[jnp.ndarray, jnp.ndarray, dict[str, Any]]:
  """Zero (z, logsnr, cond) of the UNet's shapes, for initialisation.

  z is [batch, T + image_frames, H, W, C] (a training example of joint
  image-video training; the parameters do not depend on T); cond holds
  'label' int32 [batch] for class-conditional models and the empty text
  ('text' [batch, L, D], 'text_mask') for text models.
  """
  d = model_space(config).data
  z = jnp.zeros((batch, d.num_frames + d.image_frames, d.image_size,
                 d.image_size, d.channels), jnp.float32)
  cond = {}
  if config.model.num_classes:
    cond['label'] = jnp.zeros((batch,), jnp.int32)
  if has_text(config):
    length, dim = int(config.text.max_length), text_encoder(config).dim
    cond['text'] = jnp.zeros((batch, length, dim), jnp.float32)
    cond['text_mask'] = jnp.zeros((batch, length), bool)
  if config.model.get('image_condition', False):
    cond['image'] = jnp.zeros(z.shape[:1] + z.shape[2:], jnp.float32)
    cond['image_sigma'] = jnp.zeros((batch,), jnp.float32)
  return z, jnp.zeros((batch,), jnp.float32), cond


def init_params(config: ml_collections.ConfigDict, model: nn.Module,
                rng: jax.Array) -> Any:
  """Fresh UNet parameters (call under jit with out_shardings for a mesh)."""
  z, logsnr, cond = example_inputs(config)
  return model.init({'params': rng}, z, logsnr, **cond)['params']


def abstract_params(config: ml_collections.ConfigDict,
                    model: nn.Module) -> Any:
  """Parameter shapes and dtypes without computing anything (to restore)."""
  return jax.eval_shape(lambda rng: init_params(config, model, rng),
                        jax.random.key(0))


def create_nextnets(model_config: ml_collections.ConfigDict,
                    num_cond_frames: Mapping[str, int],
                    channels: int = 3) -> dict[str, nextnet.NextNet]:
  """SinFusion's NextNets, one per name of `num_cond_frames`.

  Args:
    model_config: config.model of configs/single_video.py.
    num_cond_frames: {name: clean frames the model is conditioned on};
      a model with none (the projector) takes no frame offset either.
    channels: colour channels of the video.
  """
  m = model_config
  return {
      name: nextnet.NextNet(
          out_channels=channels, width=m.width, depth=m.depth,
          kernel_size=m.kernel_size, mult=m.mult, emb_dim=m.emb_dim,
          num_cond_frames=n, max_offset=m.max_offset if n else 0,
          conv_impl=m.get('conv_impl', 'auto'))
      for name, n in num_cond_frames.items()
  }


def nextnet_example_inputs(model: nextnet.NextNet, channels: int = 3,
                           batch: int = 1, size: int = 8):
  """Zero (z, logsnr, cond) of a NextNet (fully convolutional: any size)."""
  n = model.num_cond_frames
  cond = {}
  if n:
    cond['frames'] = jnp.zeros((batch, size, size, n * channels))
  if model.max_offset:
    cond['k'] = jnp.ones((batch,), jnp.int32)
  return (jnp.zeros((batch, size, size, channels)), jnp.zeros((batch,)),
          cond)


def init_nextnet_params(models: Mapping[str, nextnet.NextNet],
                        rng: jax.Array, channels: int = 3) -> dict[str, Any]:
  """{name: params}; model i initialises from fold_in(rng, i)."""
  params = {}
  for i, (name, model) in enumerate(models.items()):
    z, logsnr, cond = nextnet_example_inputs(model, channels)
    params[name] = model.init(jax.random.fold_in(rng, i), z, logsnr,
                              cond.get('frames'), cond.get('k'))['params']
  return params


def _per_frame(clip: jnp.ndarray, images: jnp.ndarray,
               num_video: int) -> jnp.ndarray:
  """[B, ...] of the clip and [B, N, ...] of its image frames -> [B, T + N,
  ...]: the clip's value on its T frames, each image frame's own after."""
  b = clip.shape[0]
  return jnp.concatenate(
      [jnp.broadcast_to(clip[:, None], (b, num_video) + clip.shape[1:]),
       images.astype(clip.dtype)], axis=1)


# Over 60 lines with its docstring: labels and texts follow the same rule
# (per frame with image frames, dropped per clip and per image frame).
def training_cond(batch: Mapping[str, jnp.ndarray], num_classes: int,
                  label_dropout: float, drop_u: jnp.ndarray,
                  image_drop_u: Optional[jnp.ndarray] = None, *,
                  text_dropout: float = 0.0,
                  text_drop_u: Optional[jnp.ndarray] = None,
                  image_text_drop_u: Optional[jnp.ndarray] = None
                  ) -> dict[str, jnp.ndarray]:
  """The UNet's conditioning inputs of a training batch.

  In joint image-video training (VDM Sec. 3) the N image frames after the
  T clip frames come from other videos, so a class-conditional model sees
  each under its own video's label: 'label' becomes per frame, int32
  [B, T + N], the clip's label on the clip frames and `image_label` on the
  image frames. Label dropout is per example: the clip's frames drop
  together (one draw, `drop_u`), each image frame, an independent image
  example, on its own draw (`image_drop_u`). Without image frames 'label'
  stays the clip's [B]. Captions follow the same rule: 'text' [B, L, D]
  (or [B, T + N, L, D] with each image frame's own caption), 'text_mask',
  and 'text_null' [B] (or [B, T + N]) where the caption is dropped to the
  learned null text with probability `text_dropout`.

  Args:
    batch: {'frame_mask': bool [B, T + N], 'label': int32 [B] and, with
      N > 0, 'image_label': int32 [B, N] (class models); text models also
      'text' [B, L, D], 'text_mask' [B, L] and, with N > 0, 'image_text'
      [B, N, L, D], 'image_text_mask' [B, N, L]}.
    num_classes: the model's classes; label num_classes is the null label.
    label_dropout: probability of training on the null label instead
      (classifier-free guidance, VDM 2).
    drop_u: float [B] uniform draws deciding the clips' dropout.
    image_drop_u: float [B, N] uniform draws deciding the image frames'
      dropout (needed when N > 0).
    text_dropout: probability of the null text instead of the caption.
    text_drop_u, image_text_drop_u: the same draws for captions.

  Returns:
    {'frame_mask': ..., 'label': int32 [B] or [B, T + N], text models:
    'text', 'text_mask', 'text_null'} for denoise_fn's cond.
  """
  cond = {'frame_mask': batch['frame_mask']}
  num_video = batch['frame_mask'].shape[1]
  image_label = batch.get('image_label')
  num_images = 0 if image_label is None else image_label.shape[1]
  num_video -= num_images
  if num_classes > 0:
    label = jnp.where(drop_u < label_dropout, num_classes, batch['label'])
    if num_images:
      label = _per_frame(label, jnp.where(image_drop_u < label_dropout,
                                          num_classes, image_label),
                         num_video)
    cond['label'] = label
  if 'text' in batch:
    text, mask = batch['text'], batch['text_mask']
    null = text_drop_u < text_dropout
    if num_images:
      text = _per_frame(text, batch['image_text'], num_video)
      mask = _per_frame(mask, batch['image_text_mask'], num_video)
      null = _per_frame(null, image_text_drop_u < text_dropout, num_video)
    cond.update(text=text, text_mask=mask, text_null=null)
  return cond


def image_cond(image: jnp.ndarray, sigma: jnp.ndarray, noise: jnp.ndarray,
               null: Optional[jnp.ndarray] = None) -> dict[str, jnp.ndarray]:
  """The conditioning inputs of an image-to-video model.

  Stable Video Diffusion's noise augmentation (Blattmann et al. 2023,
  Sec. 4): the model sees the given frame plus sigma times standard noise,
  and sigma itself.

  Args:
    image: [B, H, W, C] the given frame in [-1, 1].
    sigma: [B] augmentation levels.
    noise: [B, H, W, C] standard normal.
    null: [B] bool, drop the image (image dropout; None: keep all).
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  cond = {'image': jnp.asarray(image, jnp.float32)
                   + sigma[:, None, None, None] * noise,
          'image_sigma': sigma}
  if null is not None:
    cond['image_null'] = jnp.asarray(null, bool)
  return cond


def training_image_cond(image: jnp.ndarray, rng: jax.Array, *,
                        dropout: float, noise_mean: float,
                        noise_std: float) -> dict[str, jnp.ndarray]:
  """`image_cond` of a training batch: log sigma ~ N(noise_mean,
  noise_std^2) per example (SVD: N(-3.0, 0.5^2)), the image dropped with
  probability `dropout` (classifier-free guidance on the image)."""
  b = image.shape[0]
  k_sigma, k_noise, k_drop = jax.random.split(rng, 3)
  sigma = jnp.exp(noise_mean + noise_std * jax.random.normal(k_sigma, (b,)))
  return image_cond(image, sigma, jax.random.normal(k_noise, image.shape),
                    jax.random.uniform(k_drop, (b,)) < dropout)


def sampling_cond(num_classes: int, labels: Optional[jnp.ndarray],
                  text: Optional[Mapping[str, jnp.ndarray]] = None
                  ) -> dict[str, jnp.ndarray]:
  """The UNet's conditioning inputs when sampling.

  Args:
    num_classes: the model's classes.
    labels: int32 [B] (class models).
    text: {'text': [B, L, D], 'text_mask': [B, L]} of the prompts (text
      models; an empty prompt has no tokens: the null text).
  """
  cond = {}
  if num_classes and labels is not None:
    cond['label'] = jnp.asarray(labels, jnp.int32)
  if text is not None:
    cond['text'] = jnp.asarray(text['text'], jnp.float32)
    cond['text_mask'] = jnp.asarray(text['text_mask'], bool)
  return cond


@dataclasses.dataclass(frozen=True)
class _Apply:
  """(params, z, logsnr, cond) -> prediction; hashable, so jit caches it.

  With a mesh, z is constrained to the batch sharding, so the denoiser runs
  split over the batch whatever the sampler's inputs are.
  """

  model: nn.Module
  mesh: Optional[jax.sharding.Mesh] = None

  def __call__(self, params, z, logsnr, cond):
    if self.mesh is not None and z.shape[0] % self.mesh.size == 0:
      z = jax.lax.with_sharding_constraint(
          z, sharding.batch_sharding(self.mesh))
    with _kernels_on(self.mesh):
      return self.model.apply({'params': params}, z, logsnr, train=False,
                              **cond)


def _kernels_on(mesh: Optional[jax.sharding.Mesh]):
  """Pallas attention kernels per device of the mesh (a program jitted
  over it; attention.kernels_on), or nothing to do without one."""
  if mesh is None:
    return contextlib.nullcontext()
  return attention.kernels_on(mesh, sharding.BATCH_AXES)


def make_denoise_fn(model: nn.Module, params: Any,
                    mesh: Optional[jax.sharding.Mesh] = None):
  """(z, logsnr, cond) -> prediction with `params` bound, for sampling.

  A `jax.tree_util.Partial`, so the parameters stay traced arguments of
  the sampler (not constants) and new batches reuse its compilation.
  """
  return jax.tree_util.Partial(_Apply(model, mesh), params)


def training_denoise_fn(model: nn.Module, params: Any,
                        dropout_rng: jax.Array):
  """(z, logsnr, cond) -> prediction in training mode (dropout on)."""

  def denoise_fn(z, logsnr, cond):
    return model.apply({'params': params}, z, logsnr, train=True,
                       rngs={'dropout': dropout_rng}, **cond)

  return denoise_fn


count_params = unet3d.count_params


@dataclasses.dataclass(frozen=True)
class DiscreteTimeApply:
  """A pretrained discrete-time UNet as (params, z, logsnr, cond) -> pred.

  Stable Diffusion's UNet2DConditionModel (and its Tune-A-Video inflation)
  takes the training timestep n of alpha_bar_n, not a log-SNR: the log-SNR
  the samplers pass is mapped to n by the schedule's table
  (schedules.discrete_timestep), and the model sees z itself (a DDPM-trained
  model's input is sqrt(alpha_bar) x + sqrt(1 - alpha_bar) eps, this
  library's variance-preserving z). Its prediction is in the scheduler's
  prediction type (schedules.DiscreteSchedule.target). Hashable, so jit
  caches on it.

  cond: 'text' [B, L, D] (or [B, T, L, D] per frame) the text encoder's
  hidden states; 'text_null' [B] bool selects 'text_uncond' [B, L, D] (the
  negative prompt's states) instead, which is how
  sampling.classifier_free's unconditional branch reaches the model; an
  optional 'text_mask' [B, L] bool is passed as the attention mask.

  Attributes:
    model: the Flax UNet, applied as model(x [N, h, w, c], timesteps [N],
      context [N, L, D], context_mask) -> [N, h, w, c'].
    logsnr_table: the log-SNR of each training timestep, as a tuple.
    frames: 'batch' applies the image model to every frame on its own
      (frames folded into the batch); 'video' passes [B, T, ...] through
      (a video model's own frame handling).
    mesh: constrain the batch to the mesh's batch sharding, or None.
  """

  model: nn.Module
  logsnr_table: tuple[float, ...]
  frames: str = 'batch'
  mesh: Optional[jax.sharding.Mesh] = None

  def __call__(self, params, z, logsnr, cond):
    b, t = z.shape[:2]
    if self.mesh is not None and b % self.mesh.size == 0:
      z = jax.lax.with_sharding_constraint(
          z, sharding.batch_sharding(self.mesh))
    logsnr = jnp.broadcast_to(
        jnp.asarray(logsnr, jnp.float32).reshape((b, -1)), (b, t))
    steps = schedules.discrete_timestep(logsnr, self.logsnr_table)
    text = cond['text']
    if 'text_null' in cond:
      null = jnp.asarray(cond['text_null'], bool)
      null = null.reshape(null.shape + (1,) * (text.ndim - null.ndim))
      text = jnp.where(null, cond['text_uncond'], text)
    mask = cond.get('text_mask')
    if self.frames == 'video':
      with _kernels_on(self.mesh):
        return self.model.apply({'params': params}, z, steps[:, 0], text,
                                mask)
    if text.ndim == 3:
      text = jnp.repeat(text, t, axis=0)
      mask = None if mask is None else jnp.repeat(mask, t, axis=0)
    else:
      text = text.reshape((b * t,) + text.shape[2:])
    x = z.reshape((b * t,) + z.shape[2:])
    with _kernels_on(self.mesh):
      out = self.model.apply({'params': params}, x, steps.reshape(-1), text,
                             mask)
    return out.reshape((b, t) + out.shape[1:])


def make_pretrained_denoise_fn(model: nn.Module, params: Any,
                               schedule: schedules.DiscreteSchedule,
                               frames: str = 'batch',
                               mesh: Optional[jax.sharding.Mesh] = None):
  """(z, logsnr, cond) -> prediction of a pretrained discrete-time UNet
  (`DiscreteTimeApply`), parameters bound as a traced Partial."""
  table = tuple(float(x) for x in schedule.logsnr_table())
  return jax.tree_util.Partial(
      DiscreteTimeApply(model, table, frames, mesh), params)


@dataclasses.dataclass(frozen=True)
class EDMApply:
  """An EDM-preconditioned image-to-video model (SVD) as (params, z, logsnr,
  cond) -> v.

  Stable Video Diffusion (Blattmann et al. 2023, App. D) preconditions a
  variance-exploding x_VE = x + sigma eps as EDM does (Karras et al. 2022,
  Table 1) with v-prediction: D(x_VE) = c_skip x_VE + c_out F(c_in x_VE,
  c_noise), c_in = 1 / sqrt(sigma^2 + 1), c_skip = 1 / (sigma^2 + 1),
  c_out = -sigma / sqrt(sigma^2 + 1), c_noise = ln(sigma) / 4. Seen as this
  library's variance-preserving z = x_VE / sqrt(sigma^2 + 1) at logsnr =
  -2 ln sigma (alpha = c_in, sigma_VP = sigma c_in): the network's input
  c_in x_VE is z itself, and D = alpha z - sigma_VP F, so F is exactly this
  library's v (diffusion.py, target 'v'). Hashable, so jit caches on it.

  cond: 'image_latent' [B, h, w, c] the conditioning frame's latent
  (the autoencoder's mode, not scaled: SVD's pipeline), concatenated on
  channels to every frame; 'image_embed' [B, L, D] its CLIP image embedding
  (the cross-attention context); 'added_time_ids' [B, n] (fps - 1, motion
  bucket, noise augmentation strength); 'image_null' [B] bool (optional)
  zeroes both the latent and the embedding, SVD's unconditional branch
  (sampling.image_guided sets it).

  Attributes:
    model: models.svd_unet.UNetSpatioTemporalConditionModel.
    mesh: constrain the batch to the mesh's batch sharding, or None.
  """

  model: nn.Module
  mesh: Optional[jax.sharding.Mesh] = None

  def inputs(self, z: jax.Array, logsnr: jax.Array,
             cond: Mapping[str, Any]) -> tuple[jax.Array, ...]:
    """The network's arguments (x, c_noise, context, added_time_ids).

    Args:
      z: [B, F, h, w, c] noisy latents at logsnr.
      logsnr: [B] (or [B, F], equal over frames).
      cond: as the class says.

    Returns:
      (x [B, F, h, w, 2c], c_noise [B], context [B, L, D], ids [B, n]).
    """
    b, f = z.shape[:2]
    if self.mesh is not None and b % self.mesh.size == 0:
      z = jax.lax.with_sharding_constraint(
          z, sharding.batch_sharding(self.mesh))
    logsnr = jnp.asarray(logsnr, jnp.float32).reshape((b, -1))[:, 0]
    image = jnp.asarray(cond['image_latent'], jnp.float32)
    embed = jnp.asarray(cond['image_embed'], jnp.float32)
    if 'image_null' in cond:
      keep = 1.0 - jnp.asarray(cond['image_null'], jnp.float32)
      image = image * keep[:, None, None, None]
      embed = embed * keep[:, None, None]
    x = jnp.concatenate(
        [z, jnp.broadcast_to(image[:, None], (b, f) + image.shape[1:])],
        axis=-1)
    return x, -logsnr / 8.0, embed, jnp.asarray(cond['added_time_ids'],
                                                jnp.float32)

  def __call__(self, params, z, logsnr, cond):
    inputs = self.inputs(z, logsnr, cond)
    with _kernels_on(self.mesh):
      return self.model.apply({'params': params}, *inputs)


def make_edm_denoise_fn(model: nn.Module, params: Any,
                        mesh: Optional[jax.sharding.Mesh] = None):
  """(z, logsnr, cond) -> v of an SVD-style UNet (`EDMApply`), parameters
  bound as a traced Partial; sample with target 'v'."""
  return jax.tree_util.Partial(EDMApply(model, mesh), params)
