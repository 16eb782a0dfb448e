"""Tune-A-Video's one-shot tuning (--mode=tune): one video and its caption.

Tune-A-Video (Wu et al. 2022, arXiv 2212.11565, Sec. 4.2) inflates a
text-to-image model (adapt/inflate.py) and tunes it on the frames of one
video with that video's caption: only the query projections of the spatial
(sparse-causal) and cross-attentions and the whole temporal attentions are
trained (tune.trainable='attention_queries'; 'all' is full fine-tuning for
comparison). The frozen parameters are arguments of the step, never in the
optimizer state or the checkpoint: a checkpoint holds the tuned parameters,
their EMA and their AdamW state, and `tune.json` names the base workdir
and step the rest comes from (adapt/tuned.py).

Their code's settings (configs/tune_a_video.py): AdamW lr 3e-5, betas
0.9 / 0.999, weight decay 1e-2, grad-norm clip 1.0, batch 1, 500 steps,
the plain (unweighted) regression loss in the model's parameterization.
The loop is `vdm_jax.training.run`: resume, finite checks, preemption.

  python -m vdm_jax.main --mode=tune --config=configs/tune_a_video.py \
      --workdir=runs/tav --config.tune.base_workdir=runs/t2i \
      --config.tune.video=clip.mp4 --config.tune.caption="a red square ..."
"""

import functools
import itertools

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdm_jax import checkpoint
from vdm_jax import denoiser
from vdm_jax import diffusion
from vdm_jax import noise as noise_lib
from vdm_jax import schedules
from vdm_jax import sharding
from vdm_jax import training
from vdm_jax.adapt import inflate
from vdm_jax.adapt import tuned as tuned_lib


def validate(config: ml_collections.ConfigDict, workdir: str
             ) -> tuple[np.ndarray, int]:
  """Every check of a tune, before anything compiles.

  Returns:
    (the source clip, the base's last checkpoint step).


  Raises:
    ValueError / FileNotFoundError: a model without text, no caption, a
      base that is not this config's image model (fields named), a video
      too short, or a workdir tuned on another source.
  """
  t = config.tune
  if not denoiser.has_text(config):
    raise ValueError(
        "Tune-A-Video tunes a text model on a video and its caption, but"
        " text.encoder='none'; use a text-to-image base"
        ' (configs/t2i_quickstart.py).')
  if not t.caption.strip():
    raise ValueError('tune.caption is empty: give the caption of tune.video'
                     ' (what the edits change).')
  if not t.base_workdir:
    raise ValueError('tune.base_workdir is empty: the workdir of the'
                     ' text-to-image model to inflate.')
  inflate.is_tuned((), t.trainable)  # Checks the name.
  denoiser.validate(config)
  training.check_optimizer(config.optimizer)
  training.LoopSettings.from_config(config.training)
  tuned_lib.check_base(config, t.base_workdir)
  base_step = checkpoint.latest_step(t.base_workdir)
  if base_step is None:
    raise FileNotFoundError(f'tune.base_workdir={t.base_workdir} has no'
                            ' checkpoint; train the base model first.')
  checkpoint.check_compatible(config, workdir)
  return tuned_lib.source_clip(config), base_step


def tune_step(state: training.TrainState, frozen, batch, rng, *, model, tx,
              lr_fn, config):
  """One update of the tuned parameters (state.params); pure.

  Args:
    state: TrainState over the tuned parameters only (donated).
    frozen: the frozen parameters (inflate.split's second half).
    batch: {'video': uint8 [B, T, H, W, C], 'text': [B, L, D],
      'text_mask': [B, L]}.
    rng: root key, folded with the step.
    model, tx, lr_fn, config: static.
  """
  rng = jax.random.fold_in(rng, state.step)
  r_loss, r_drop = jax.random.split(rng)
  b = batch['video'].shape[0]
  logsnr_fn = schedules.get_logsnr_fn(config.diffusion, config.data.image_size)
  noise = noise_lib.from_config(config.diffusion, config.data.num_frames)

  def loss_fn(tuned):
    params = inflate.merge(tuned, frozen)
    out = diffusion.loss(
        denoiser.training_denoise_fn(model, params, r_drop),
        batch['video'].astype(jnp.float32) / 127.5 - 1.0,
        jax.random.split(r_loss, b), logsnr_fn=logsnr_fn,
        target=config.diffusion.target,
        cond={'text': batch['text'], 'text_mask': batch['text_mask']},
        noise=noise)
    return jnp.mean(out.loss)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  new_state = state.apply_gradients(grads, tx, config.optimizer.ema_decay)
  return new_state, {'loss': loss, **training.update_metrics(
      grads, new_state.params, lr_fn(state.step))}


def batch_mesh(config: ml_collections.ConfigDict, devices=None
               ) -> jax.sharding.Mesh:
  """The mesh of config.mesh over `devices` (default: all), or one device
  for a batch that cannot split (Tune-A-Video's batch of 1: no device
  repeats another's work)."""
  devices = list(jax.devices() if devices is None else devices)
  b = config.training.batch_size
  if b % len(devices) == 0:
    return sharding.make_mesh(config.mesh)
  if jax.process_count() > 1:
    raise ValueError(
        f'training.batch_size={b} does not split over the {len(devices)}'
        ' devices of this multi-process run; use a multiple of the device'
        ' count, or tune in one process.')
  logging.info('training.batch_size=%d does not split over %d devices:'
               ' tuning on one device.', b, len(devices))
  return sharding.make_mesh(config.mesh, devices[:1])


def tune(config: ml_collections.ConfigDict, workdir: str
         ) -> training.TrainState:
  """Tunes config.tune's video into workdir (resuming); returns the state."""
  clip, base_step = validate(config, workdir)
  t = config.tune
  record = tuned_lib.make_record(config, base_step)
  tuned_lib.check_same_source(workdir, record)
  mesh = batch_mesh(config)
  repl = sharding.replicated(mesh)
  rng_init, rng_train = jax.random.split(jax.random.key(config.seed))
  model, inflated = tuned_lib.inflated_params(config, record, mesh, rng_init)
  tuned, frozen = inflate.split(inflated, t.trainable)
  del inflated
  tx, lr_fn = training.create_optimizer(config)
  state = jax.jit(lambda p: training.TrainState.create(p, tx),
                  out_shardings=repl)(tuned)
  logging.info('Tuning %d of %d parameters (%s).',
               denoiser.count_params(state.params),
               denoiser.count_params(state.params)
               + denoiser.count_params(frozen),
               t.trainable)
  step_fn = jax.jit(
      functools.partial(tune_step, model=model, tx=tx, lr_fn=lr_fn,
                        config=config),
      out_shardings=(repl, repl), donate_argnums=0)
  emb = denoiser.text_encoder(config).encode(
      [t.caption] * config.training.batch_size)
  batch = jax.device_put({
      'video': np.repeat(clip[None], config.training.batch_size, 0),
      'text': emb.tokens, 'text_mask': emb.mask},
                         sharding.batch_sharding(mesh))
  ckpt, writer = training.open_workdir(config, workdir)
  encoder = denoiser.text_encoder(config)
  checkpoint.check_text_dim(workdir, encoder.dim,
                            f'text.encoder={encoder.name!r}')
  checkpoint.save_text_encoder(workdir, encoder.name, encoder.dim,
                               encoder.max_length)
  if jax.process_index() == 0:
    tuned_lib.write_record(workdir, record, clip)
  return training.run(
      state,
      training.Step(step_fn, lambda s, b: (s, frozen, b, rng_train)),
      lambda start: itertools.repeat(batch),
      ckpt=ckpt, writer=writer,
      settings=training.LoopSettings.from_config(config.training))
