"""Generative Inbetweening's backward-motion tune (--mode=tune_backward).

Wang et al. 2024 (arXiv 2408.15239, Sec. 3.3): from the image-to-video model
in config.tune.base_workdir, fine-tune only the value and output projections
of its temporal attentions (adapt/inbetween.py) on config.data's clips
reversed in time, conditioned on their last frame, with the forward model's
temporal attention rotated by 180 degrees and injected. Their code's
settings: AdamW lr 1e-4 (tune.backward_learning_rate), batch 1
(tune.backward_batch_size), no EMA (tune.backward_ema_decay = 0), the plain
regression loss in the model's parameterization. The forward parameters are
an argument of the step, never in the optimizer state; a checkpoint holds
only the tuned parameters, and `backward.json` names the forward workdir
and step. The loop is `vdm_jax.training.run`: resume, finite checks,
preemption.

  python -m vdm_jax.main --mode=tune_backward --config=configs/i2v_quickstart.py \
      --workdir=runs/i2v_backward --config.tune.base_workdir=runs/i2v
  python -m vdm_jax.main --mode=sample --config=configs/i2v_quickstart.py \
      --workdir=runs/i2v_backward --config.sample.task=inbetween
"""

import functools
import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from vdm_jax import checkpoint
from vdm_jax import denoiser
from vdm_jax import noise as noise_lib
from vdm_jax import schedules
from vdm_jax import sharding
from vdm_jax import train as train_lib
from vdm_jax import training
from vdm_jax.adapt import inbetween
from vdm_jax.adapt import tune as tune_lib


def backward_config(config: ml_collections.ConfigDict
                    ) -> ml_collections.ConfigDict:
  """config with the backward tune's optimizer, EMA, batch and length.

  Their code keeps no EMA (tune.backward_ema_decay = 0: the "EMA" that
  sampling restores is the tuned weights themselves; the forward model's
  0.9999 would leave a 2,000-step tune ~82% untuned).
  """
  out = ml_collections.ConfigDict(config.to_dict())
  t = config.tune
  out.optimizer.name = 'adamw'
  out.optimizer.learning_rate = float(t.backward_learning_rate)
  out.optimizer.warmup_steps = 0
  out.optimizer.ema_decay = float(t.backward_ema_decay)
  out.training.batch_size = int(t.backward_batch_size)
  out.training.grad_accum_steps = 1
  out.training.num_train_steps = int(t.backward_steps)
  return out


def validate(config: ml_collections.ConfigDict, workdir: str) -> int:
  """Every check before anything compiles; returns the base's last step."""
  t = config.tune
  if not t.base_workdir:
    raise ValueError('tune.base_workdir is empty: the workdir of the'
                     ' image-to-video model whose backward model to tune.')
  if os.path.abspath(t.base_workdir) == os.path.abspath(workdir):
    raise ValueError('--workdir must differ from tune.base_workdir: the'
                     ' backward model is stored beside the forward one.')
  if t.backward_batch_size < 1 or t.backward_steps < 1:
    raise ValueError('tune.backward_batch_size and tune.backward_steps must'
                     ' be >= 1.')
  if not t.backward_learning_rate > 0:
    raise ValueError('tune.backward_learning_rate must be > 0.')
  if not 0.0 <= t.backward_ema_decay < 1.0:
    raise ValueError('tune.backward_ema_decay must lie in [0, 1) (0: no'
                     ' EMA, as their code).')
  if config.data.num_frames < 3:
    raise ValueError(
        f'data.num_frames={config.data.num_frames}: in-betweening needs at'
        ' least 3 frames (two keyframes and one between).')
  inbetween.check_base(config, t.base_workdir)
  train_lib.validate_config(config, workdir)
  step = checkpoint.latest_step(t.base_workdir)
  if step is None:
    raise FileNotFoundError(f'tune.base_workdir={t.base_workdir} has no'
                            ' checkpoint; train the image-to-video model'
                            ' first.')
  if inbetween.is_backward_workdir(workdir):
    saved = inbetween.read_record(workdir)
    if saved['base_workdir'] != os.path.abspath(t.base_workdir):
      raise ValueError(
          f'{workdir} holds the backward model of {saved["base_workdir"]},'
          f' not of {t.base_workdir}; use a new --workdir.')
  return step


def tune_backward_step(state, forward_params, batch, rng, *, model, tx,
                       lr_fn, config):
  """One update of the backward model's tuned parameters; pure.

  Args:
    state: TrainState over the tuned parameters only (donated).
    forward_params: the frozen forward model's parameters.
    batch: {'video': uint8 [B, T, H, W, C], ...} clips, forward in time.
    rng: root key, folded with the step.
    model, tx, lr_fn, config: static.
  """
  rng = jax.random.fold_in(rng, state.step)
  r_loss, r_drop = jax.random.split(rng)
  t = config.training
  image_kwargs = dict(dropout=t.image_dropout, noise_mean=t.image_noise_mean,
                      noise_std=t.image_noise_std)
  logsnr_fn = schedules.get_logsnr_fn(config.diffusion, config.data.image_size)
  noise = noise_lib.from_config(config.diffusion, config.data.num_frames)
  x = train_lib.to_model_range(batch['video'])

  def loss_fn(tuned):
    out = inbetween.backward_loss(
        model, forward_params, tuned, x, r_loss, logsnr_fn=logsnr_fn,
        target=config.diffusion.target, noise=noise,
        image_kwargs=image_kwargs, dropout_rng=r_drop)
    return jnp.mean(out.loss), jnp.mean(out.mse_x)

  (loss, mse_x), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  new_state = state.apply_gradients(grads, tx, config.optimizer.ema_decay)
  return new_state, {'loss': loss, 'mse_x': mse_x, **training.update_metrics(
      grads, new_state.params, lr_fn(state.step))}


def tune_backward(config: ml_collections.ConfigDict, workdir: str
                  ) -> training.TrainState:
  """Tunes the backward model of tune.base_workdir into workdir (resuming).

  Returns:
    The final TrainState (over the tuned parameters).
  """
  config = backward_config(config)
  base_step = validate(config, workdir)
  base = config.tune.base_workdir
  mesh = tune_lib.batch_mesh(config)
  repl = sharding.replicated(mesh)
  model, forward, _ = inbetween.forward_params(config, base, base_step, mesh)
  tx, lr_fn = training.create_optimizer(config)
  state = jax.jit(lambda p: training.TrainState.create(
      inbetween.split_backward(p), tx), out_shardings=repl)(forward)
  logging.info('Tuning %d of %d parameters (the value and output projections'
               ' of %d temporal attentions).',
               denoiser.count_params(state.params),
               denoiser.count_params(forward),
               len(inbetween.temporal_attention_paths(forward)))
  step_fn = jax.jit(
      functools.partial(tune_backward_step, model=model, tx=tx, lr_fn=lr_fn,
                        config=config),
      out_shardings=(repl, repl), donate_argnums=0)
  rng_train = jax.random.fold_in(jax.random.key(config.seed), 7)
  ckpt, writer = training.open_workdir(config, workdir)
  if jax.process_index() == 0:
    inbetween.write_record(workdir, {
        'base_workdir': os.path.abspath(base), 'base_step': int(base_step),
        'tuned': 'temporal attention value and output projections'})
  return training.run(
      state,
      training.Step(step_fn, lambda s, b: (s, forward, b, rng_train)),
      train_lib.global_batches(train_lib.create_pipeline(config), mesh),
      ckpt=ckpt, writer=writer,
      settings=training.LoopSettings.from_config(config.training))
