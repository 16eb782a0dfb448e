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
from vdm_jax.sinfusion import memory


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


def _examples(name: str, video: jnp.ndarray, rng: jax.Array, *, config,
              hw) -> dict[str, jnp.ndarray]:
  """One model's batch: make_examples plus 'loss_rng' [B] keys.

  The crops (a few MB) are cut for the whole batch at once; only the
  network's activations scale with the microbatch.
  """
  r_ex, r_loss = jax.random.split(rng)
  batch_size = config.training.batch_size
  ex = data.make_examples(name, video, r_ex, batch_size, hw,
                          config.model.max_offset)
  return {**ex, 'loss_rng': jax.random.split(r_loss, batch_size)}


def _make_loss_fn(model: nextnet.NextNet, config: ml_collections.ConfigDict,
                  hw: tuple[int, int]):
  """(params, examples) -> mean diffusion loss of one model.

  Each example draws its diffusion time and noise from its own key (with
  uniform time sampling), so the loss of a batch does not depend on how
  it is split into microbatches (as in vdm_jax/train.py).
  """
  logsnr_fn = schedules.get_logsnr_fn(config.diffusion, max(hw))
  per_example = config.diffusion.time_sampling == 'uniform'

  def loss_fn(params, ex):
    # NextNets have no dropout: the sampling binding is the training one.
    out = diffusion.loss(
        denoiser.make_denoise_fn(model, params), ex['x'],
        ex['loss_rng'] if per_example else ex['loss_rng'][0],
        logsnr_fn=logsnr_fn, target=config.diffusion.target,
        cond={c: ex[c] for c in ('frames', 'k') if c in ex},
        time_sampling=config.diffusion.time_sampling,
    )
    return jnp.mean(out.loss)

  return loss_fn


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

  The examples and draws of the train step's; no gradients.

  Args:
    params: {name: params}.
    video: [T, H, W, C] frames in [-1, 1].
    rng: PRNG key; model i uses fold_in(rng, i).
    models, config, hw: static.

  Returns:
    {name: scalar loss}.
  """
  return {
      name: _make_loss_fn(models[name], config, hw)(
          params[name], _examples(name, video, jax.random.fold_in(rng, i),
                                  config=config, hw=hw))
      for i, name in enumerate(data.MODEL_NAMES)
  }


def model_loss_and_grads(params: Any, ex: dict[str, jnp.ndarray], *,
                         model: nextnet.NextNet,
                         config: ml_collections.ConfigDict,
                         hw: tuple[int, int]) -> tuple[jnp.ndarray, Any]:
  """(mean loss, its gradient) of one model over a batch of examples.

  With training.grad_accum_steps = k > 1 the batch runs as k microbatches
  of B / k examples in a lax.scan, the gradients averaged: the same loss
  and gradient as the whole batch (up to float rounding), with the
  activations of B / k examples. The activations are SinFusion's memory:
  every example is a ~95% crop of a whole frame and a NextNet never
  down-samples, about 1 GiB per 137x167 crop (docs/sinfusion.md, 'Memory').

  Args:
    params: the model's parameters.
    ex: _examples of the model ([B, ...] arrays).
    model, config, hw: static.
  """
  grad_fn = jax.value_and_grad(_make_loss_fn(model, config, hw))
  return training.accumulate_gradients(
      lambda p, mb, j: grad_fn(p, mb), params, ex,
      config.training.grad_accum_steps)


def train_step(state: training.TrainState, video: jnp.ndarray,
               rng: jax.Array, *, models, tx, lr_fn, config, hw):
  """One update of all three models; pure, jitted by `make_train_step`.

  The loss is the sum of the three models' losses and one Adam update (with
  one global gradient clip) covers the three parameter trees, as in
  SinFusion (Nikankin, Haim, Irani 2022). The models share no parameters,
  so the gradient of the sum with respect to model i is the gradient of
  loss i alone, computed here model by model.

  Args:
    state: TrainState over {name: params} (donated).
    video: [T, H, W, C] training frames in [-1, 1].
    rng: the root training key; folded with the step here.

  Returns:
    (new_state, metrics): 'loss', 'loss_<name>', 'grad_norm', 'param_norm',
    'lr' scalars.
  """
  rng = jax.random.fold_in(rng, state.step)
  losses, grads = {}, {}
  for i, name in enumerate(data.MODEL_NAMES):
    ex = _examples(name, video, jax.random.fold_in(rng, i), config=config,
                   hw=hw)
    losses[name], grads[name] = model_loss_and_grads(
        state.params[name], ex, model=models[name], config=config, hw=hw)
  loss = sum(losses.values())
  new_state = state.apply_gradients(grads, tx, config.optimizer.ema_decay)
  metrics = {
      'loss': loss,
      **{f'loss_{k}': v for k, v in losses.items()},
      **training.update_metrics(grads, new_state.params, lr_fn(state.step)),
  }
  return new_state, metrics


def make_train_step(config, models, tx, lr_fn, hw):
  """The jitted step(state, video, rng) -> (state, metrics); donates state."""
  return _jit_train_step(config, models, tx, lr_fn, hw)


def _jit_train_step(config, models, tx, lr_fn, hw):
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
  impl = config.model.get('conv_impl', 'auto')
  if impl not in nextnet.CONV_IMPLEMENTATIONS:
    raise ValueError(f'model.conv_impl={impl!r} must be one of'
                     f' {nextnet.CONV_IMPLEMENTATIONS}.')
  if config.training.batch_size < 1:
    raise ValueError('training.batch_size must be >= 1.')
  k = config.training.grad_accum_steps
  if k < 1 or config.training.batch_size % k:
    raise ValueError(
        f'training.grad_accum_steps={k} must be >= 1 and divide'
        f' training.batch_size={config.training.batch_size}.'
    )


def prepare(config: ml_collections.ConfigDict, workdir: str):
  """Validates everything and loads the video; returns (video, crop hw)."""
  validate_config(config)
  video = data.load_video(config)
  hw = data.crop_size(config, video.shape[1:3])
  checkpoint.check_compatible(
      config, workdir, fields=checkpoint.SINFUSION_COMPATIBILITY_FIELDS)
  return video, hw


def check_memory(config: ml_collections.ConfigDict, step_fn, models, tx,
                 lr_fn, video_shape: tuple[int, ...], hw: tuple[int, int],
                 rng: jax.Array) -> memory.MemoryEstimate:
  """Compiles the step on abstract inputs and checks that it fits.

  Nothing is allocated: the state is jax.eval_shape's and the video a
  ShapeDtypeStruct. The compilation is the one training runs (jit's cache
  serves the first call of `step_fn` with it).

  Args:
    config: the training config.
    step_fn: make_train_step's jitted step (or any step function; one
      without `.lower` is replaced by a fresh jit of train_step here).
    models, tx, lr_fn: as given to make_train_step.
    video_shape: [T, H, W, C] of the training frames.
    hw: the crop (h, w).
    rng: the training key.

  Returns:
    The MemoryEstimate (logged).

  Raises:
    memory.InsufficientMemoryError: it does not fit in
      memory.available_memory(config); raised before any buffer exists.
  """
  if not hasattr(step_fn, 'lower'):
    step_fn = _jit_train_step(config, models, tx, lr_fn, hw)
  abstract = jax.eval_shape(
      functools.partial(init_state, models, tx, channels=video_shape[-1]),
      jax.random.key(0))
  compiled = step_fn.lower(
      abstract, jax.ShapeDtypeStruct(video_shape, jnp.float32), rng
  ).compile()
  estimate = memory.estimate_step(compiled, abstract, video_shape)
  memory.check(estimate, memory.available_memory(config), config,
               video_shape[1:3], hw)
  return estimate


def train(config: ml_collections.ConfigDict,
          workdir: str) -> training.TrainState:
  """Trains the three models on `config.data.path`, resuming if possible.

  The loop (logging, checkpoints, SIGTERM and orbax preemption, resume) is
  `vdm_jax.training.run`; every step sees the whole video. The step is
  compiled and its memory checked (check_memory) before the state exists.

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
  step_fn = make_train_step(config, models, tx, lr_fn, hw)
  check_memory(config, step_fn, models, tx, lr_fn, video.shape, hw,
               rng_train)
  state = jax.jit(functools.partial(init_state, models, tx,
                                    channels=channels))(rng_init)
  ckpt, writer = training.open_workdir(config, workdir)
  radius = nextnet.receptive_field_radius(config.model.depth,
                                          config.model.kernel_size)
  logging.info('%d parameters; receptive field %dx%d pixels.',
               sum(x.size for x in jax.tree.leaves(state.params)),
               2 * radius + 1, 2 * radius + 1)
  video = jnp.asarray(video)
  return training.run(
      state, training.Step(step_fn, lambda s, v: (s, v, rng_train)),
      lambda start: itertools.repeat(video),
      ckpt=ckpt, writer=writer,
      settings=training.LoopSettings.from_config(config.training),
  )
