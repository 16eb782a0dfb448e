"""Training: TrainState, optimizer, the jitted train step and the train loop.

`train_and_evaluate(config, workdir)` trains from scratch or resumes from the
last checkpoint in `workdir/checkpoints` without being asked to.
"""

import functools
import signal
import time
from typing import Any

from absl import logging
from clu import metric_writers
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vdm_jax import checkpoint
from vdm_jax import diffusion
from vdm_jax import schedules
from vdm_jax import sharding
from vdm_jax.data import pipeline
from vdm_jax.data import sources
from vdm_jax.models import unet3d

OPTIMIZERS = ('adam', 'adamw')


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray  # int32 scalar: number of updates applied
  params: Any
  ema_params: Any
  opt_state: Any


def create_model(config: ml_collections.ConfigDict) -> unet3d.UNet3D:
  return unet3d.UNet3D(**config.model)


def learning_rate_schedule(opt: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then constant (VDM App. A)."""
  if opt.warmup_steps > 0:
    return optax.linear_schedule(0.0, opt.learning_rate, opt.warmup_steps)
  return optax.constant_schedule(opt.learning_rate)


def create_optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam or AdamW with warmup and optional global-norm gradient clipping."""
  opt = config.optimizer
  lr = learning_rate_schedule(opt)
  if opt.name == 'adam':
    tx = optax.adam(lr, b1=opt.b1, b2=opt.b2)
  elif opt.name == 'adamw':
    tx = optax.adamw(lr, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)
  else:
    raise ValueError(
        f'Unknown optimizer.name {opt.name!r}; choose one of {OPTIMIZERS}.'
    )
  if opt.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip), tx)
  return tx, lr


def validate_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Fails fast, before any compilation, on impossible settings."""
  diffusion.check_target(config.diffusion.target)
  schedules.get_logsnr_fn(config.diffusion, config.data.image_size)
  diffusion.sample_time(jax.random.key(0), 1, config.diffusion.time_sampling)
  diffusion.noise_lambda_from_config(config.diffusion, config.data.num_frames)
  unet3d.validate_model_config(
      config.data.image_size, config.data.num_frames, **config.model
  )
  if config.optimizer.name not in OPTIMIZERS:
    raise ValueError(
        f'Unknown optimizer.name {config.optimizer.name!r}; choose one of'
        f' {OPTIMIZERS}.'
    )
  k = config.training.grad_accum_steps
  if k < 1 or config.training.batch_size % k:
    raise ValueError(
        f'training.grad_accum_steps={k} must be >= 1 and divide'
        f' training.batch_size={config.training.batch_size}.'
    )
  if not 0.0 <= config.training.label_dropout < 1.0:
    raise ValueError('training.label_dropout must lie in [0, 1).')
  if config.training.label_dropout > 0 and config.model.num_classes <= 0:
    raise ValueError(
        'training.label_dropout > 0 needs a class-conditional model'
        ' (model.num_classes > 0).'
    )
  checkpoint.check_compatible(config, workdir)


def model_inputs_shape(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """[T + image_frames, H, W, C] of one training example."""
  d = config.data
  return (d.num_frames + d.image_frames, d.image_size, d.image_size, d.channels)


def init_state(
    config: ml_collections.ConfigDict,
    model: unet3d.UNet3D,
    tx: optax.GradientTransformation,
    rng: jax.Array,
) -> TrainState:
  """A fresh TrainState (call under jit with out_shardings)."""
  z = jnp.zeros((1, *model_inputs_shape(config)), jnp.float32)
  params = model.init(
      {'params': rng}, z, jnp.zeros((1,), jnp.float32),
      label=jnp.zeros((1,), jnp.int32) if config.model.num_classes else None,
  )['params']
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=params,
      opt_state=tx.init(params),
  )


def create_train_state(config, model, tx, rng, mesh):
  """Builds the sharded state without materialising it on one device.

  Returns:
    (state, state_shardings)
  """
  init_fn = functools.partial(init_state, config, model, tx)
  abstract = jax.eval_shape(init_fn, rng)
  shardings = sharding.state_shardings(
      abstract, mesh, config.mesh.get('param_sharding', 'replicated')
  )
  state = jax.jit(init_fn, out_shardings=shardings)(rng)
  return state, shardings


def to_model_range(video: jnp.ndarray) -> jnp.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1] (done on the device)."""
  return video.astype(jnp.float32) / 127.5 - 1.0


def _split_microbatches(tree, k: int):
  """[B, ...] -> [k, B / k, ...]; microbatch j holds examples j, j + k, ...

  Strided so that every microbatch takes an equal share from every device's
  slice of the batch.
  """
  def split(x):
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
    return jnp.moveaxis(x, 1, 0)

  return jax.tree.map(split, tree)


def train_step(
    state: TrainState,
    batch: dict[str, jnp.ndarray],
    rng: jax.Array,
    *,
    model: unet3d.UNet3D,
    tx: optax.GradientTransformation,
    lr_fn: optax.Schedule,
    config: ml_collections.ConfigDict,
) -> tuple[TrainState, dict[str, jnp.ndarray]]:
  """One optimizer update on a global batch; pure, jitted by the caller.

  Args:
    state: the TrainState (donated).
    batch: {'video': uint8[B, T, H, W, C], 'label': int32[B],
      'frame_mask': bool[B, T]}.
    rng: the root training key; folded with the step here.
    model, tx, lr_fn, config: static.

  Returns:
    (new_state, metrics) with scalar metrics.
  """
  rng = jax.random.fold_in(rng, state.step)
  rng_loss, rng_drop, rng_label = jax.random.split(rng, 3)
  batch_size = batch['video'].shape[0]
  per_example = config.diffusion.time_sampling == 'uniform'
  inputs = {
      **batch,
      'loss_rng': jax.random.split(rng_loss, batch_size),
      'label_u': jax.random.uniform(rng_label, (batch_size,)),
  }
  num_classes = config.model.num_classes
  logsnr_fn = schedules.get_logsnr_fn(config.diffusion, config.data.image_size)

  def loss_fn(params, mb, drop_rng):
    cond = {'frame_mask': mb['frame_mask']}
    if num_classes > 0:
      drop = mb['label_u'] < config.training.label_dropout
      cond['label'] = jnp.where(drop, num_classes, mb['label'])

    def denoise_fn(z, logsnr, c):
      return model.apply(
          {'params': params}, z, logsnr, train=True,
          rngs={'dropout': drop_rng}, **c,
      )

    out = diffusion.loss(
        denoise_fn, to_model_range(mb['video']),
        mb['loss_rng'] if per_example else mb['loss_rng'][0],
        logsnr_fn=logsnr_fn, target=config.diffusion.target, cond=cond,
        time_sampling=config.diffusion.time_sampling,
        noise_lambda=diffusion.batch_noise_lambda(
            config.diffusion, config.data.num_frames, mb['frame_mask']),
    )
    return jnp.mean(out.loss), jnp.mean(out.mse_x)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  k = config.training.grad_accum_steps
  if k == 1:
    (loss, mse_x), grads = grad_fn(state.params, inputs, rng_drop)
  else:
    def accumulate(carry, xs):
      j, mb = xs
      (l, m), g = grad_fn(state.params, mb, jax.random.fold_in(rng_drop, j))
      return jax.tree.map(jnp.add, carry, (l, m, g)), None

    zeros = (0.0, 0.0, jax.tree.map(jnp.zeros_like, state.params))
    total, _ = jax.lax.scan(
        accumulate, zeros, (jnp.arange(k), _split_microbatches(inputs, k))
    )
    loss, mse_x, grads = jax.tree.map(lambda a: a / k, total)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  decay = config.optimizer.ema_decay
  ema_params = jax.tree.map(
      lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params
  )
  metrics = {
      'loss': loss,
      'mse_x': mse_x,
      'grad_norm': optax.tree.norm(grads),
      'param_norm': optax.tree.norm(params),
      'lr': lr_fn(state.step),
  }
  new_state = state.replace(
      step=state.step + 1, params=params, ema_params=ema_params,
      opt_state=opt_state,
  )
  return new_state, metrics


def make_train_step(config, model, tx, lr_fn, mesh, state_shardings):
  """The jitted train step with shardings and donated state."""
  step_fn = functools.partial(
      train_step, model=model, tx=tx, lr_fn=lr_fn, config=config
  )
  return jax.jit(
      step_fn,
      in_shardings=(
          state_shardings, sharding.batch_sharding(mesh),
          sharding.replicated(mesh),
      ),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0,
  )


def create_pipeline(config: ml_collections.ConfigDict,
                    workdir: str | None = None) -> pipeline.Pipeline:
  """This process's share of the training batches of `config.data`.

  Args:
    config: the full config.
    workdir: if given, process 0 saves the source's class names there
      (`labels.json`, see `sources.save_label_names`).

  Returns:
    The Pipeline (augmentation from config.data: flips, random crops).
  """
  source = sources.get_source(config.data, seed=config.seed)
  if workdir is not None and jax.process_index() == 0:
    sources.save_label_names(source, workdir)
  return pipeline.Pipeline(
      source,
      global_batch_size=config.training.batch_size,
      num_frames=config.data.num_frames,
      seed=config.seed,
      frame_stride=config.data.frame_stride,
      image_frames=config.data.image_frames,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      **sources.pipeline_options(config.data),
  )


def check_finite(step: int, metrics: dict[str, float]) -> None:
  """Host-side guard: stop with the step named when training diverges."""
  bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f'Non-finite training metrics at step {step}: {bad}. The last good'
        ' checkpoint is kept; lower optimizer.learning_rate, raise'
        ' optimizer.warmup_steps or set optimizer.grad_clip.'
    )


class _Preemption:
  """Turns SIGTERM (preemption notice) into a save-and-exit at a step end."""

  def __init__(self):
    self.requested = False
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not in the main thread.
      self._old = None

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and stopping.')
    self.requested = True

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _log_progress(step, total, metrics, rate, writer):
  eta = (total - step) / max(rate, 1e-9)
  logging.info(
      'step %d/%d  loss %.4f  grad_norm %.3f  %.2f steps/s  ETA %s',
      step, total, metrics['loss'], metrics['grad_norm'], rate,
      time.strftime('%H:%M:%S', time.gmtime(eta)),
  )
  writer.write_scalars(step, {**metrics, 'steps_per_sec': rate})


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str
) -> TrainState:
  """Trains `config` in `workdir`, resuming from its last checkpoint.

  Returns:
    The final TrainState.
  """
  validate_config(config, workdir)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch_size(config.training.batch_size, mesh)
  sharding.check_batch_size(
      config.training.batch_size // config.training.grad_accum_steps, mesh,
      what='training.batch_size / training.grad_accum_steps',
  )
  rng_init, _, rng_train, _ = jax.random.split(jax.random.key(config.seed), 4)
  model = create_model(config)
  tx, lr_fn = create_optimizer(config)
  state, state_shardings = create_train_state(
      config, model, tx, rng_init, mesh
  )
  ckpt = checkpoint.Checkpointer(
      workdir, keep=config.training.keep_checkpoints
  )
  if ckpt.latest_step() is not None:
    logging.info('Resuming from checkpoint at step %d.', ckpt.latest_step())
    state = ckpt.restore(state)
  checkpoint.save_config(config, workdir)
  writer = metric_writers.create_default_writer(
      workdir, just_logging=jax.process_index() > 0
  )
  train_step_fn = make_train_step(
      config, model, tx, lr_fn, mesh, state_shardings
  )
  start = int(state.step)
  total = config.training.num_train_steps
  if start == 0:
    logging.info(
        'Model has %d parameters.', unet3d.count_params(state.params)
    )
  preemption = _Preemption()
  batches = create_pipeline(config, workdir).iterate(start)
  pending = None  # (step, device metrics) checked one step late
  t0, s0 = time.time(), start
  try:
    for step in range(start + 1, total + 1):
      batch = sharding.host_to_global(next(batches), mesh)
      state, metrics = train_step_fn(state, batch, rng_train)
      if pending is not None:
        check_finite(pending[0], jax.device_get(pending[1]))
      pending = (step, metrics)
      if step % config.training.log_every_steps == 0 or step == total:
        host = {k: float(v) for k, v in jax.device_get(metrics).items()}
        check_finite(step, host)
        rate = (step - s0) / (time.time() - t0)
        _log_progress(step, total, host, rate, writer)
      preview_every = config.training.preview_every_steps
      if preview_every and step % preview_every == 0:
        write_preview(config, model, state.ema_params, step, writer)
      stop = preemption.requested or ckpt.reached_preemption(step)
      if step % config.training.checkpoint_every_steps == 0 or stop:
        check_finite(pending[0], jax.device_get(pending[1]))
        ckpt.save(step, state, force=True)
      if stop:
        logging.warning('Stopped for preemption after step %d.', step)
        break
    else:
      if total > start and total % config.training.checkpoint_every_steps:
        check_finite(pending[0], jax.device_get(pending[1]))
        ckpt.save(total, state, force=True)
  finally:
    preemption.restore()
    batches.close()
    ckpt.wait()
    writer.flush()
  return state


def write_preview(config, model, params, step, writer) -> None:
  """A few EMA samples as TensorBoard images (frames left to right)."""
  from vdm_jax import sample as sample_lib  # pylint: disable=g-import-not-at-top

  videos = sample_lib.generate(
      config, model, params, jax.random.key(step),
      num_videos=min(4, config.sample.batch_size),
      num_steps=config.training.get('preview_num_steps', 64),
  )
  n, t, h, w, c = videos.shape
  strip = videos.transpose(0, 2, 1, 3, 4).reshape(n, h, t * w, c)
  writer.write_images(step, {'preview': strip})
