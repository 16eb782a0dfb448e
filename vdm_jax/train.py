"""The VDM training program: config -> a trained workdir.

`train(config, workdir)` (--mode=train) trains the space-time UNet of
Ho et al. 2022 (Video Diffusion Models, arXiv 2204.03458) from scratch or
resumes from the last checkpoint in `workdir/checkpoints` without being
asked to. This module supplies the sharded state, the pure `train_step`
and the batches; the loop (logging, checkpoints, preemption, the preview
hook) is `vdm_jax.training.run`, shared with SinFusion.
"""

import functools
from typing import Any

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vdm_jax import checkpoint
from vdm_jax import denoiser
from vdm_jax import diffusion
from vdm_jax import noise as noise_lib
from vdm_jax import schedules
from vdm_jax import sharding
from vdm_jax import tasks
from vdm_jax import training
from vdm_jax import video_io
from vdm_jax import videofusion
from vdm_jax.data import pipeline
from vdm_jax.data import sources
from vdm_jax.models import attention


def validate_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Fails fast, before any compilation, on impossible settings."""
  diffusion.check_target(config.diffusion.target)
  schedules.get_logsnr_fn(config.diffusion,
                          denoiser.model_space(config).data.image_size)
  diffusion.sample_time(jax.random.key(0), 1, config.diffusion.time_sampling)
  noise_lib.from_config(config.diffusion, config.data.num_frames)
  denoiser.validate(config)
  training.check_optimizer(config.optimizer)
  training.LoopSettings.from_config(config.training)
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
  if not 0.0 <= config.text.dropout < 1.0:
    raise ValueError('text.dropout must lie in [0, 1).')
  if (config.model.get('spatial_attention', 'self') == 'sparse_causal'
      and config.data.image_frames):
    raise ValueError(
        'Sparse-causal spatial attention (model.spatial_attention) makes'
        ' every frame attend to frame 0; joint image-video training'
        ' (data.image_frames > 0) would have its independent image frames'
        ' attend to a video frame: set data.image_frames=0.')
  if config.model.get('image_condition', False):
    if config.data.image_frames:
      raise ValueError(
          'An image-to-video model (model.image_condition) conditions every'
          ' frame on its clip\'s first frame; joint image-video training'
          ' (data.image_frames > 0) would give image frames of other videos'
          ' that frame: set data.image_frames=0.')
    if not 0.0 <= config.training.image_dropout < 1.0:
      raise ValueError('training.image_dropout must lie in [0, 1).')
    if config.training.image_noise_std < 0:
      raise ValueError('training.image_noise_std must be >= 0.')
  checkpoint.check_compatible(config, workdir)


def init_state(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
) -> training.TrainState:
  """A fresh TrainState (call under jit with out_shardings)."""
  return training.TrainState.create(
      denoiser.init_params(config, model, rng), tx)


def abstract_state(config, model, tx, mesh):
  """(abstract TrainState, its NamedShardings on `mesh`); no compute.

  The parameters are sharded as config.mesh.param_sharding says
  ('replicated' or 'fsdp'), the optimizer state like its parameters.
  """
  abstract = jax.eval_shape(
      functools.partial(init_state, config, model, tx), jax.random.key(0))
  shardings = sharding.state_shardings(abstract, mesh,
                                       config.mesh.param_sharding)
  return abstract, shardings


def create_train_state(config, model, tx, rng, mesh):
  """Builds the sharded state without materialising it on one device.

  Returns:
    (state, state_shardings)
  """
  _, shardings = abstract_state(config, model, tx, mesh)
  init_fn = functools.partial(init_state, config, model, tx)
  state = jax.jit(init_fn, out_shardings=shardings)(rng)
  return state, shardings


def to_model_range(video: jnp.ndarray) -> jnp.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1] (done on the device)."""
  return video.astype(jnp.float32) / 127.5 - 1.0


def _make_loss_fn(model, config, codec=None, codec_params=None):
  """(params, microbatch, dropout rng) -> (mean loss, mean mse_x).

  With a latent codec (latent.path) the frames are encoded by the frozen
  autoencoder first (a posterior sample per example, or its mean), so the
  loss is the latent diffusion loss of Rombach et al. 2022 (eq. 2).
  """
  num_classes = config.model.num_classes
  per_example = config.diffusion.time_sampling == 'uniform'
  logsnr_fn = schedules.get_logsnr_fn(
      config.diffusion, denoiser.model_space(config).data.image_size)
  noise = noise_lib.from_config(config.diffusion, config.data.num_frames)
  text_dropout = config.text.dropout if denoiser.has_text(config) else 0.0

  def loss_fn(params, mb, drop_rng):
    cond = denoiser.training_cond(
        mb, num_classes, config.training.label_dropout, mb['label_u'],
        mb['image_label_u'], text_dropout=text_dropout,
        text_drop_u=mb.get('text_u'), image_text_drop_u=mb.get('image_text_u'))
    x = to_model_range(mb['video'])
    if codec_params is not None:
      enc_rng = (jax.random.fold_in(mb['loss_rng'][0], 7)
                 if config.latent.sample_posterior else None)
      x = jax.lax.stop_gradient(codec.encode(codec_params, x, enc_rng))
    if 'image_rng' in mb:  # Image-to-video: the clip's own first frame.
      t = config.training
      cond.update(jax.vmap(lambda img, key: jax.tree.map(
          lambda a: a[0], denoiser.training_image_cond(
              img[None], key, dropout=t.image_dropout,
              noise_mean=t.image_noise_mean,
              noise_std=t.image_noise_std)))(x[:, 0], mb['image_rng']))
    out = diffusion.loss(
        denoiser.training_denoise_fn(model, params, drop_rng),
        x,
        mb['loss_rng'] if per_example else mb['loss_rng'][0],
        logsnr_fn=logsnr_fn, target=config.diffusion.target, cond=cond,
        time_sampling=config.diffusion.time_sampling,
        noise=noise.for_frames(mb['frame_mask']),
    )
    return jnp.mean(out.loss), jnp.mean(out.mse_x)

  return loss_fn


def train_step(
    state: training.TrainState,
    batch: dict[str, jnp.ndarray],
    rng: jax.Array,
    codec_params: Any = None,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    lr_fn: optax.Schedule,
    config: ml_collections.ConfigDict,
    codec: Any = None,
) -> tuple[training.TrainState, dict[str, jnp.ndarray]]:
  """One optimizer update on a global batch; pure, jitted by the caller.

  The loss is VDM's weighted denoising loss (diffusion.loss) with dropout
  on; labels are dropped to the null class with probability
  training.label_dropout (classifier-free guidance, Ho & Salimans 2022),
  per clip and per image frame, and each image frame of joint training is
  conditioned on its own video's label (denoiser.training_cond).

  Args:
    state: the TrainState (donated).
    batch: {'video': uint8[B, T + N, H, W, C], 'label': int32[B],
      'frame_mask': bool[B, T + N]} and, for class-conditional models with
      N = data.image_frames > 0, 'image_label': int32[B, N] (data.pipeline
      makes all four).
    rng: the root training key; folded with the step here.
    model, tx, lr_fn, config: static.
    codec_params: the frozen autoencoder's parameters (latent.path), or
      None (pixel space).
    codec: latent.Autoencoder (static), with codec_params.

  Returns:
    (new_state, metrics) with scalar metrics 'loss', 'mse_x', 'grad_norm',
    'param_norm', 'lr'.
  """
  rng = jax.random.fold_in(rng, state.step)
  rng_loss, rng_drop, rng_label = jax.random.split(rng, 3)
  batch_size, num_total = batch['video'].shape[:2]
  num_images = num_total - config.data.num_frames
  image_label = batch.get('image_label')
  if config.model.num_classes > 0 and num_images > 0 and (
      image_label is None or image_label.shape[1:] != (num_images,)):
    raise ValueError(
        f'The batch has {num_images} image frames but no image_label'
        f' [B, {num_images}]: a class-conditional model needs the label'
        " of each image frame's own video (data.pipeline gives it).")
  inputs = {
      **batch,
      'loss_rng': jax.random.split(rng_loss, batch_size),
      'label_u': jax.random.uniform(rng_label, (batch_size,)),
      # Image frames drop their labels independently of their clip's.
      'image_label_u': jax.random.uniform(
          jax.random.fold_in(rng_label, 1), (batch_size, max(num_images, 0))),
  }
  if config.model.get('image_condition', False):  # Per-example keys.
    inputs['image_rng'] = jax.random.split(jax.random.fold_in(rng_label, 4),
                                           batch_size)
  if 'text' in batch:  # Caption dropout draws, per clip and image frame.
    inputs['text_u'] = jax.random.uniform(jax.random.fold_in(rng_label, 2),
                                          (batch_size,))
    inputs['image_text_u'] = jax.random.uniform(
        jax.random.fold_in(rng_label, 3), (batch_size, max(num_images, 0)))
  grad_fn = jax.value_and_grad(
      _make_loss_fn(model, config, codec, codec_params), has_aux=True)

  def microbatch_grads(params, mb, j):
    # Dropout draws differ per microbatch (the whole batch: rng_drop).
    drop = rng_drop if j is None else jax.random.fold_in(rng_drop, j)
    return grad_fn(params, mb, drop)

  (loss, mse_x), grads = training.accumulate_gradients(
      microbatch_grads, state.params, inputs,
      config.training.grad_accum_steps)
  new_state = state.apply_gradients(grads, tx, config.optimizer.ema_decay)
  metrics = {'loss': loss, 'mse_x': mse_x,
             **training.update_metrics(grads, new_state.params,
                                       lr_fn(state.step))}
  return new_state, metrics


def make_train_step(config, model, tx, lr_fn, mesh, state_shardings,
                    codec=None):
  """The jitted train step with shardings and donated state.

  Returns:
    step(state, batch, rng[, codec_params]) -> (state, metrics)
    (train_step; codec_params replicated).
  """
  def step_fn(*args):
    # Pallas attention kernels run per device of the mesh (attention.py).
    with attention.kernels_on(mesh, sharding.BATCH_AXES):
      return train_step(*args, model=model, tx=tx, lr_fn=lr_fn,
                        config=config, codec=codec)

  return jax.jit(
      step_fn,
      in_shardings=(
          state_shardings, sharding.batch_sharding(mesh),
          sharding.replicated(mesh),
      ) + ((sharding.replicated(mesh),) if codec is not None else ()),
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
      text_encoder=denoiser.text_encoder(config),
      **sources.pipeline_options(config.data),
  )


def global_batches(pipe: pipeline.Pipeline, mesh):
  """start -> this process's batches of steps start, ... as global arrays."""

  def batches(start):
    host_batches = pipe.iterate(start)
    try:
      for batch in host_batches:
        yield sharding.host_to_global(batch, mesh)
    finally:
      host_batches.close()

  return batches


def train(config: ml_collections.ConfigDict,
          workdir: str) -> training.TrainState:
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
  model = denoiser.create_model(config)
  tx, lr_fn = training.create_optimizer(config)
  state, state_shardings = create_train_state(
      config, model, tx, rng_init, mesh
  )
  codec, codec_params = denoiser.load_codec(config, mesh)
  train_step_fn = make_train_step(
      config, model, tx, lr_fn, mesh, state_shardings,
      codec if codec_params is not None else None
  )
  ckpt, writer = training.open_workdir(config, workdir)
  if ckpt.latest_step() is None:
    logging.info('Model has %d parameters.',
                 denoiser.count_params(state.params))
    state = videofusion.init_base_from_workdir(config, state)
  encoder = denoiser.text_encoder(config)
  if encoder is not None:
    checkpoint.check_text_dim(workdir, encoder.dim, f'text.encoder='
                              f'{encoder.name!r}')
    checkpoint.save_text_encoder(workdir, encoder.name, encoder.dim,
                                 encoder.max_length)

  def preview(step, current, tb_writer):
    write_preview(config, model, current.ema_params, step, tb_writer,
                  codec, codec_params)

  return training.run(
      state,
      training.Step(train_step_fn, lambda s, b: (s, b, rng_train) + (
          (codec_params,) if codec_params is not None else ())),
      global_batches(create_pipeline(config, workdir), mesh),
      ckpt=ckpt, writer=writer,
      settings=training.LoopSettings.from_config(config.training),
      hooks=[(config.training.preview_every_steps, preview)],
  )


def preview_videos(config: ml_collections.ConfigDict, model: nn.Module,
                   params, rng: jax.Array, *, num_videos: int,
                   num_steps: int, codec: Any = None,
                   codec_params: Any = None) -> np.ndarray:
  """uint8 [N, T, H, W, C] EMA samples, drawn as --mode=sample draws them.

  The task is 'class' (labels sample.label, or cycling through the
  classes, with sample.guidance_weight) for a class-conditional model and
  'unconditional' otherwise; every other setting is config.sample's
  (sampler, clip_x, ...) with `num_steps` steps. A text model is prompted
  with sample.prompt, or else the captions of the first training examples.
  A latent model's samples are decoded by its codec.
  """
  setup = tasks.Setup.from_config(denoiser.model_space(config),
                                  num_steps=num_steps)
  m = setup.model
  task = (tasks.Class(label=config.sample.label) if m.num_classes
          else tasks.Unconditional())
  text = None
  if denoiser.has_text(config):
    prompts = preview_prompts(config, num_videos)
    emb = denoiser.text_encoder(config).encode(prompts)
    text = {'text': emb.tokens, 'text_mask': emb.mask}
  x = tasks.run(task, denoiser.make_denoise_fn(model, params), rng, setup,
                num_videos=num_videos,
                labels=task.labels(m.num_classes, None, num_videos),
                text=text)
  if codec_params is not None:
    x = codec.decode(codec_params, x)
  return video_io.to_uint8(np.asarray(x))


def preview_prompts(config: ml_collections.ConfigDict,
                    num_videos: int) -> list[str]:
  """sample.prompt, or the captions of the first training examples."""
  if config.sample.prompt:
    return [config.sample.prompt] * num_videos
  source = sources.get_source(config.data, seed=config.seed)
  return [str(source[i]['caption']) for i in range(num_videos)]


def write_preview(config, model, params, step, writer, codec=None,
                  codec_params=None) -> None:
  """A few EMA samples as TensorBoard images (frames left to right)."""
  videos = preview_videos(config, model, params, jax.random.key(step),
                          num_videos=min(4, config.sample.batch_size),
                          num_steps=config.training.preview_num_steps,
                          codec=codec, codec_params=codec_params)
  n, t, h, w, c = videos.shape
  strip = videos.transpose(0, 2, 1, 3, 4).reshape(n, h, t * w, c)
  writer.write_images(step, {'preview': strip})
