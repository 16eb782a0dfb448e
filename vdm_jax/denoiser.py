"""The denoiser: model creation, parameter shapes and binding.

Every program that needs a network gets it here: training (fresh parameters
under jit), sampling and evaluation (abstract parameters to restore into),
SinFusion (its three NextNets) and the experiments. `make_denoise_fn` binds
parameters into the `denoise_fn(z, logsnr, cond) -> prediction` that
diffusion.loss and sampling.sample take; `cond` is a dict of the model's
keyword inputs ('label', 'frame_mask' for the UNet; 'frames', 'k' for a
NextNet), built here for training (`training_cond`) and sampling
(`sampling_cond`): a new conditioning signal is added in these two functions
and consumed by the model.
"""

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from vdm_jax import sharding
from vdm_jax.models import nextnet
from vdm_jax.models import unet3d


def create_model(config: ml_collections.ConfigDict) -> unet3d.UNet3D:
  """The space-time UNet of config.model."""
  return unet3d.UNet3D(**config.model)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError on a config.model the UNet cannot run (no compile)."""
  unet3d.validate_model_config(
      config.data.image_size, config.data.num_frames, **config.model)


def example_inputs(config: ml_collections.ConfigDict, batch: int = 1
                   ) -> tuple[jnp.ndarray, jnp.ndarray, dict[str, Any]]:
  """Zero (z, logsnr, cond) of the UNet's shapes, for initialisation.

  z is [batch, T + image_frames, H, W, C] (a training example of joint
  image-video training; the parameters do not depend on T); cond holds
  'label' int32 [batch] for class-conditional models.
  """
  d = config.data
  z = jnp.zeros((batch, d.num_frames + d.image_frames, d.image_size,
                 d.image_size, d.channels), jnp.float32)
  cond = {}
  if config.model.num_classes:
    cond['label'] = jnp.zeros((batch,), jnp.int32)
  return z, jnp.zeros((batch,), jnp.float32), cond


def init_params(config: ml_collections.ConfigDict, model: nn.Module,
                rng: jax.Array) -> Any:
  """Fresh UNet parameters (call under jit with out_shardings for a mesh)."""
  z, logsnr, cond = example_inputs(config)
  return model.init({'params': rng}, z, logsnr,
                    label=cond.get('label'))['params']


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
          num_cond_frames=n, max_offset=m.max_offset if n else 0)
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


def training_cond(batch: Mapping[str, jnp.ndarray], num_classes: int,
                  label_dropout: float, drop_u: jnp.ndarray,
                  image_drop_u: Optional[jnp.ndarray] = None
                  ) -> dict[str, jnp.ndarray]:
  """The UNet's conditioning inputs of a training batch.

  In joint image-video training (VDM Sec. 3) the N image frames after the
  T clip frames come from other videos, so a class-conditional model sees
  each under its own video's label: 'label' becomes per frame, int32
  [B, T + N], the clip's label on the clip frames and `image_label` on the
  image frames. Label dropout is per example: the clip's frames drop
  together (one draw, `drop_u`), each image frame, an independent image
  example, on its own draw (`image_drop_u`). Without image frames 'label'
  stays the clip's [B].

  Args:
    batch: {'frame_mask': bool [B, T + N], 'label': int32 [B] and, with
      N > 0, 'image_label': int32 [B, N] (class models)}.
    num_classes: the model's classes; label num_classes is the null label.
    label_dropout: probability of training on the null label instead
      (classifier-free guidance, VDM 2).
    drop_u: float [B] uniform draws deciding the clips' dropout.
    image_drop_u: float [B, N] uniform draws deciding the image frames'
      dropout (needed when N > 0).

  Returns:
    {'frame_mask': ..., 'label': int32 [B] or [B, T + N]} for denoise_fn's
    cond.
  """
  cond = {'frame_mask': batch['frame_mask']}
  if num_classes <= 0:
    return cond
  label = jnp.where(drop_u < label_dropout, num_classes, batch['label'])
  image_label = batch.get('image_label')
  if image_label is not None and image_label.shape[1]:
    image_label = jnp.where(image_drop_u < label_dropout, num_classes,
                            image_label)
    num_video = batch['frame_mask'].shape[1] - image_label.shape[1]
    label = jnp.concatenate(
        [jnp.broadcast_to(label[:, None], (label.shape[0], num_video)),
         image_label.astype(label.dtype)], axis=1)
  cond['label'] = label
  return cond


def sampling_cond(num_classes: int, labels: Optional[jnp.ndarray]
                  ) -> dict[str, jnp.ndarray]:
  """The UNet's conditioning inputs when sampling (labels: int32 [B])."""
  if num_classes and labels is not None:
    return {'label': jnp.asarray(labels, jnp.int32)}
  return {}


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
    return self.model.apply({'params': params}, z, logsnr, train=False,
                            **cond)


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
