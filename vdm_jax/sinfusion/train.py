"""Training of the three SinFusion models on one video.

One jitted step updates the Predictor, Projector and Interpolator together
(Nikankin, Haim, Irani 2022, arXiv 2211.11743): each model draws its own
random crops and diffusion times, the loss is the sum of the three x0 (or
eps / v) regression losses, and one Adam state covers the dict of the three
parameter trees. This module supplies the state, the step and the batches
(the one video, every step) to `vdm_jax.training.run`, the loop shared with
VDM: checkpoints (orbax, atomic saves), resuming from a workdir's last
checkpoint without being asked to, and a save-and-stop on SIGTERM.

The whole video lives on one device (a few dozen frames); the models are
small, so there is no mesh here.
"""

import functools
import itertools
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vdm_jax import checkpoint
from vdm_jax import denoiser
from vdm_jax import diffusion
from vdm_jax import schedules
from vdm_jax import training
from vdm_jax.models import nextnet
from vdm_jax.sinfusion import data


def create_models(config: ml_collections.ConfigDict, channels: int = 3
                  ) -> dict[str, nextnet.NextNet]:
  """The Predictor, Projector and Interpolator NextNets (MODEL_NAMES order)."""
  return denoiser.create_nextnets(
      config.model, {n: data.NUM_COND_FRAMES[n] for n in data.MODEL_NAMES},
      channels)


def init_state(models: dict[str, nextnet.NextNet],
               tx: optax.GradientTransformation, rng: jax.Array,
               channels: int = 3) -> training.TrainState:
  """A fresh TrainState over {name: params} (call under jit)."""
  return training.TrainState.create(
      denoiser.init_nextnet_params(models, rng, channels), tx)


def model_losses(
    params: dict[str, Any],
    video: jnp.ndarray,
    rng: jax.Array,
    *,
    models: dict[str, nextnet.NextNet],
    config: ml_collections.ConfigDict,
    hw: tuple[int, int],
) -> dict[str, jnp.ndarray]:
  """Mean diffusion loss of each model on fresh random examples.

  Args:
    params: {name: params}.
    video: [T, H, W, C] frames in [-1, 1].
    rng: PRNG key (split per model into example and loss streams).
    models, config, hw: static.

  Returns:
    {name: scalar loss}.
  """
  logsnr_fn = schedules.get_logsnr_fn(config.diffusion, max(hw))
  losses = {}
  for i, name in enumerate(data.MODEL_NAMES):
    r_ex, r_loss = jax.random.split(jax.random.fold_in(rng, i))
    ex = data.make_examples(name, video, r_ex, config.training.batch_size,
                            hw, config.model.max_offset)

    # NextNets have no dropout: the sampling binding is the training one.
    out = diffusion.loss(
        denoiser.make_denoise_fn(models[name], params[name]), ex['x'],
        r_loss, logsnr_fn=logsnr_fn,
        target=config.diffusion.target,
        cond={c: ex[c] for c in ('frames', 'k') if c in ex},
        time_sampling=config.diffusion.time_sampling,
    )
    losses[name] = jnp.mean(out.loss)
  return losses


def train_step(state: training.TrainState, video: jnp.ndarray,
               rng: jax.Array, *, models, tx, lr_fn, config, hw):
  """One update of all three models; pure, jitted by `make_train_step`.

  Args:
    state: TrainState over {name: params} (donated).
    video: [T, H, W, C] training frames in [-1, 1].
    rng: the root training key; folded with the step here.

  Returns:
    (new_state, metrics): 'loss', 'loss_<name>', 'grad_norm', 'param_norm',
    'lr' scalars.
  """
  rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    losses = model_losses(params, video, rng, models=models, config=config,
                          hw=hw)
    return sum(losses.values()), losses

  (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  new_state = state.apply_gradients(grads, tx, config.optimizer.ema_decay)
  metrics = {
      'loss': loss,
      **{f'loss_{k}': v for k, v in losses.items()},
      **training.update_metrics(grads, new_state.params, lr_fn(state.step)),
  }
  return new_state, metrics


def make_train_step(config, models, tx, lr_fn, hw):
  """The jitted step(state, video, rng) -> (state, metrics); donates state."""
  return jax.jit(
      functools.partial(train_step, models=models, tx=tx, lr_fn=lr_fn,
                        config=config, hw=hw),
      donate_argnums=0,
  )


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the fields that are not about the video (before any compile)."""
  diffusion.check_target(config.diffusion.target)
  schedules.get_logsnr_fn(config.diffusion, 64)
  diffusion.sample_time(jax.random.key(0), 1, config.diffusion.time_sampling)
  training.check_optimizer(config.optimizer)
  training.LoopSettings.from_config(config.training)
  if config.model.max_offset < 1:
    raise ValueError('model.max_offset must be >= 1.')
  if config.model.kernel_size % 2 != 1:
    raise ValueError(f'model.kernel_size={config.model.kernel_size} must be'
                     ' odd.')
  if config.training.batch_size < 1:
    raise ValueError('training.batch_size must be >= 1.')


def prepare(config: ml_collections.ConfigDict, workdir: str):
  """Validates everything and loads the video; returns (video, crop hw)."""
  validate_config(config)
  video = data.load_video(config)
  hw = data.crop_size(config, video.shape[1:3])
  checkpoint.check_compatible(
      config, workdir, fields=checkpoint.SINFUSION_COMPATIBILITY_FIELDS)
  return video, hw


def train(config: ml_collections.ConfigDict,
          workdir: str) -> training.TrainState:
  """Trains the three models on `config.data.path`, resuming if possible.

  The loop (logging, checkpoints, SIGTERM and orbax preemption, resume) is
  `vdm_jax.training.run`; every step sees the whole video.

  Returns:
    The final TrainState (params and EMA params: {name: params}).
  """
  video, hw = prepare(config, workdir)
  logging.info('Training video %s: %s frames of %sx%s, crops %dx%d.',
               config.data.path, *video.shape[:3], *hw)
  rng_init, rng_train = jax.random.split(jax.random.key(config.seed))
  channels = video.shape[-1]
  models = create_models(config, channels)
  tx, lr_fn = training.create_optimizer(config)
  state = jax.jit(functools.partial(init_state, models, tx,
                                    channels=channels))(rng_init)
  step_fn = make_train_step(config, models, tx, lr_fn, hw)
  ckpt, writer = training.open_workdir(config, workdir)
  radius = nextnet.receptive_field_radius(config.model.depth,
                                          config.model.kernel_size)
  logging.info('%d parameters; receptive field %dx%d pixels.',
               sum(x.size for x in jax.tree.leaves(state.params)),
               2 * radius + 1, 2 * radius + 1)
  video = jnp.asarray(video)
  return training.run(
      state, lambda s, v: step_fn(s, v, rng_train),
      lambda start: itertools.repeat(video),
      ckpt=ckpt, writer=writer,
      settings=training.LoopSettings.from_config(config.training),
  )
