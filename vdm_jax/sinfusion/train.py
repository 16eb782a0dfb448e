"""Training of the three SinFusion models on one video.

One jitted step updates the Predictor, Projector and Interpolator together
(Nikankin, Haim, Irani 2022, arXiv 2211.11743): each model draws its own
random crops and diffusion times, the loss is the sum of the three x0 (or
eps / v) regression losses, and one Adam state covers the dict of the three
parameter trees. Checkpoints go through `vdm_jax.checkpoint` (orbax, atomic
saves), and a workdir with a checkpoint resumes without being asked to.

The whole video lives on one device (a few dozen frames); the models are
small, so there is no mesh here.
"""

import functools
import json
import time
from typing import Any

from absl import logging
from clu import metric_writers
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vdm_jax import checkpoint
from vdm_jax import diffusion
from vdm_jax import schedules
from vdm_jax import train as vdm_train
from vdm_jax.models import nextnet
from vdm_jax.sinfusion import data

TrainState = vdm_train.TrainState
# Config groups that fix parameter shapes or the meaning of a prediction.
COMPATIBILITY_GROUPS = ('model',)


def create_models(
    config: ml_collections.ConfigDict, channels: int = 3
) -> dict[str, nextnet.NextNet]:
  """The Predictor, Projector and Interpolator NextNets."""
  m = config.model
  return {
      name: nextnet.NextNet(
          out_channels=channels,
          width=m.width,
          depth=m.depth,
          kernel_size=m.kernel_size,
          mult=m.mult,
          emb_dim=m.emb_dim,
          num_cond_frames=data.NUM_COND_FRAMES[name],
          max_offset=0 if name == 'projector' else m.max_offset,
      )
      for name in data.MODEL_NAMES
  }


def model_inputs(name: str, batch: int, hw: tuple[int, int], channels: int):
  """Dummy (frames, k) inputs of model `name` for initialisation."""
  n = data.NUM_COND_FRAMES[name]
  frames = jnp.zeros((batch, *hw, n * channels)) if n else None
  k = None if name == 'projector' else jnp.ones((batch,), jnp.int32)
  return frames, k


def init_params(models: dict[str, nextnet.NextNet], rng: jax.Array,
                channels: int = 3) -> dict[str, Any]:
  """{name: params}; the convolutions do not depend on the frame size."""
  params = {}
  for i, (name, model) in enumerate(models.items()):
    frames, k = model_inputs(name, 1, (8, 8), channels)
    params[name] = model.init(
        jax.random.fold_in(rng, i), jnp.zeros((1, 8, 8, channels)),
        jnp.zeros((1,)), frames, k,
    )['params']
  return params


def init_state(models, tx, rng) -> TrainState:
  params = init_params(models, rng)
  # A copy: the train step donates the state, and one buffer cannot be
  # donated twice (called outside jit, `params` would be both leaves).
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params),
                    opt_state=tx.init(params))


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

    def denoise_fn(z, logsnr, cond, name=name):
      return models[name].apply({'params': params[name]}, z, logsnr,
                                cond.get('frames'), cond.get('k'))

    out = diffusion.loss(
        denoise_fn, ex['x'], r_loss, logsnr_fn=logsnr_fn,
        target=config.diffusion.target,
        cond={c: ex[c] for c in ('frames', 'k') if c in ex},
        time_sampling=config.diffusion.time_sampling,
    )
    losses[name] = jnp.mean(out.loss)
  return losses


def train_step(state: TrainState, video: jnp.ndarray, rng: jax.Array, *,
               models, tx, lr_fn, config, hw):
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
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = config.optimizer.ema_decay
  ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p,
                     state.ema_params, params)
  metrics = {
      'loss': loss,
      **{f'loss_{k}': v for k, v in losses.items()},
      'grad_norm': optax.tree.norm(grads),
      'param_norm': optax.tree.norm(params),
      'lr': lr_fn(state.step),
  }
  return state.replace(step=state.step + 1, params=params, ema_params=ema,
                       opt_state=opt_state), metrics


def make_train_step(config, models, tx, lr_fn, hw):
  return jax.jit(
      functools.partial(train_step, models=models, tx=tx, lr_fn=lr_fn,
                        config=config, hw=hw),
      donate_argnums=0,
  )


def check_compatible(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises before compiling if the workdir holds differently shaped models."""
  saved = checkpoint.load_config(workdir)
  if saved is None:
    return
  requested = json.loads(config.to_json_best_effort())
  diffs = [
      f'{group}.{key}: saved {saved.get(group, {}).get(key)!r}, requested'
      f' {value!r}'
      for group in COMPATIBILITY_GROUPS
      for key, value in requested[group].items()
      if saved.get(group, {}).get(key) != value
  ]
  if saved.get('method') != 'sinfusion':
    diffs.append(f'method: saved {saved.get("method")!r}')
  if diffs:
    raise ValueError(
        f'The workdir {workdir} holds an incompatible run:\n  '
        + '\n  '.join(diffs) + '\nUse a new --workdir.'
    )


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the fields that are not about the video (before any compile)."""
  diffusion.check_target(config.diffusion.target)
  schedules.get_logsnr_fn(config.diffusion, 64)
  diffusion.sample_time(jax.random.key(0), 1, config.diffusion.time_sampling)
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
  check_compatible(config, workdir)
  return video, hw


def _log_progress(step, total, metrics, rate, writer):
  eta = (total - step) / max(rate, 1e-9)
  logging.info(
      'step %d/%d  loss %.4f (predictor %.4f, projector %.4f, interpolator'
      ' %.4f)  %.2f steps/s  ETA %s', step, total, metrics['loss'],
      metrics['loss_predictor'], metrics['loss_projector'],
      metrics['loss_interpolator'], rate,
      time.strftime('%H:%M:%S', time.gmtime(eta)),
  )
  writer.write_scalars(step, {**metrics, 'steps_per_sec': rate})


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> TrainState:
  """Trains the three models on `config.data.path`, resuming if possible.

  Returns:
    The final TrainState (params and EMA params: {name: params}).
  """
  video, hw = prepare(config, workdir)
  logging.info('Training video %s: %s frames of %sx%s, crops %dx%d.',
               config.data.path, *video.shape[:3], *hw)
  rng_init, rng_train = jax.random.split(jax.random.key(config.seed))
  models = create_models(config, video.shape[-1])
  tx, lr_fn = vdm_train.create_optimizer(config)
  state = jax.jit(functools.partial(init_state, models, tx))(rng_init)
  ckpt = checkpoint.Checkpointer(
      workdir, keep=config.training.keep_checkpoints)
  if ckpt.latest_step() is not None:
    logging.info('Resuming from checkpoint at step %d.', ckpt.latest_step())
    state = ckpt.restore(state)
  checkpoint.save_config(config, workdir)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0)
  step_fn = make_train_step(config, models, tx, lr_fn, hw)
  video = jnp.asarray(video)
  start, total = int(state.step), config.training.num_train_steps
  radius = nextnet.receptive_field_radius(config.model.depth,
                                          config.model.kernel_size)
  logging.info('%d parameters; receptive field %dx%d pixels.',
               sum(x.size for x in jax.tree.leaves(state.params)),
               2 * radius + 1, 2 * radius + 1)
  t0 = time.time()
  try:
    for step in range(start + 1, total + 1):
      state, metrics = step_fn(state, video, rng_train)
      if step % config.training.log_every_steps == 0 or step == total:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        vdm_train.check_finite(step, host)
        _log_progress(step, total, host, (step - start) / (time.time() - t0),
                      writer)
      stop = ckpt.reached_preemption(step)
      if step % config.training.checkpoint_every_steps == 0 or (
          step == total) or stop:
        vdm_train.check_finite(step, {
            k: float(v) for k, v in jax.device_get(metrics).items()})
        ckpt.save(step, state, force=True)
      if stop:
        logging.warning('Stopped for preemption after step %d.', step)
        break
  finally:
    ckpt.wait()
    ckpt.close()
    writer.flush()
  return state
