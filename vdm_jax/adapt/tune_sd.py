"""Tune-A-Video on Stable Diffusion: one-shot tuning (--mode=tune).

Tune-A-Video (Wu et al. 2022, arXiv 2212.11565, Sec. 4.2) as their code
does it (showlab/Tune-A-Video, train_tuneavideo.py): the SD UNet of
config.pretrained.path is inflated (models/sd_unet.py `inflated`,
adapt/inflate_sd.py), the frames of one video are encoded by the frozen
autoencoder (a posterior sample x the scaling factor, 0.18215 for SD, drawn
anew every step as their `latent_dist.sample()`), and the UNet is trained
with the plain MSE in the scheduler's prediction type at uniformly drawn
discrete training timesteps, conditioned on the caption's CLIP states.
Only tune.trainable's parameters are trained ('attention_queries': attn1 /
attn2 to_q and attn_temp; 'lora'; 'all'); the frozen parameters are an
argument of the step, never in the optimizer state or the checkpoint.
AdamW lr 3e-5, betas 0.9 / 0.999, weight decay 1e-2, eps 1e-8, grad clip
1.0, batch 1, 500 steps (configs/tune_a_video_sd.py). The loop is
`vdm_jax.training.run`: resume, progress and ETA, finite checks.

  python -m vdm_jax.main --mode=tune --config=configs/tune_a_video_sd.py \\
      --workdir=runs/tav_sd --config.pretrained.path=/models/sd-v1-4 \\
      --config.tune.video=man-skiing.mp4 \\
      --config.tune.caption="a man is skiing"
"""

import dataclasses
import functools
import itertools
import logging
import time
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdm_jax import denoiser
from vdm_jax import diffusion
from vdm_jax import sharding
from vdm_jax import training
from vdm_jax.models import attention
from vdm_jax.adapt import inflate_sd
from vdm_jax.adapt import tuned_sd
from vdm_jax.pretrained import stable_diffusion


def validate(config: ml_collections.ConfigDict) -> np.ndarray:
  """Every check of a tune before a weight is read; returns the frames.

  Raises:
    ValueError / FileNotFoundError: no SD folder (or not one), no caption,
      a video too short, unknown options.
  """
  t = config.tune
  tuned_sd.check_base(config)
  if not t.caption.strip():
    raise ValueError('tune.caption is empty: give the caption of tune.video '
                     '(what the edit prompts change).')
  training.check_optimizer(config.optimizer)
  training.LoopSettings.from_config(config.training)
  frames = tuned_sd.source_frames(config,
                                  tuned_sd.vae_factor(config.pretrained.path))
  tuned_sd.check_prompts(config.pretrained.path, [t.caption])
  return frames


def posterior(sd: stable_diffusion.StableDiffusion, frames: np.ndarray
              ) -> tuple[jax.Array, jax.Array]:
  """The scaled latent posterior of the frames: (mean, std) [1, F, h, w, c].

  A sample is mean + std * N(0, 1) = scaling_factor * (latent_dist.sample()
  - shift_factor), as their training step draws it.
  """
  codec = sd.codec
  x = jnp.asarray(frames, jnp.float32) / 127.5 - 1.0

  @jax.jit
  def moments(params, x):
    def one(frame):
      mean, logvar = codec.module.apply({'params': params}, frame[None],
                                        method='encode')
      return mean[0], logvar[0]
    return jax.lax.map(one, x)

  mean, logvar = moments(sd.vae_params, x)
  scale = float(codec.module.scaling_factor)
  shift = float(getattr(codec.module, 'shift_factor', None) or 0.0)
  return (scale * (mean - shift))[None], (scale * jnp.exp(0.5 * logvar))[None]


def tune_step(state: training.TrainState, frozen: Any, batch: Any,
              rng: jax.Array, *, module: nn.Module, table: tuple[float, ...],
              logsnr_fn: Any, target: str, trainable: str, lora_scale: float,
              tx: Any, lr_fn: Any, ema_decay: float):
  """One update of the trained parameters (state.params); pure.

  Args:
    state: TrainState over the trained parameters only (donated).
    frozen: the frozen parameters (all of the inflated UNet's for LoRA).
    batch: {'mean', 'std': [B, F, h, w, c] the latent posterior,
      'text': [B, L, D] the caption's states}.
    rng: the run's key, folded with the step.
    module, table, logsnr_fn, target, trainable, lora_scale, tx, lr_fn,
      ema_decay: static (see `tune`).

  Returns:
    (new state, {'loss', 'grad_norm', 'param_norm', 'lr'}).
  """
  rng = jax.random.fold_in(rng, state.step)
  r_latent, r_loss = jax.random.split(rng)
  z0 = batch['mean'] + batch['std'] * jax.random.normal(
      r_latent, batch['mean'].shape)
  apply = denoiser.DiscreteTimeApply(module, table, frames='video')

  def loss_fn(trained):
    params = tuned_sd.full_params(trained, frozen, trainable, lora_scale)
    out = diffusion.loss(functools.partial(apply, params), z0, r_loss,
                         logsnr_fn=logsnr_fn, target=target,
                         cond={'text': batch['text']})
    return jnp.mean(out.loss)

  loss, grads = jax.value_and_grad(loss_fn)(state.params)
  new_state = state.apply_gradients(grads, tx, ema_decay)
  return new_state, {'loss': loss, **training.update_metrics(
      grads, new_state.params, lr_fn(state.step))}


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where a tune runs: its mesh and what is split over it.

  split 'batch': the clips split over every device, the state replicated
  (training.batch_size divides the devices); 'frames': Tune-A-Video's one
  clip (batch 1) split by frames over every device, and the trained state
  and the frozen parameters sharded FSDP-style (each the largest dimension
  the device count divides: sharding.state_shardings), so that a slice of
  small chips (16 GiB v5e) holds a clip no one of them could; 'none': one
  device (neither divides).
  """

  mesh: jax.sharding.Mesh
  split: str

  def params(self, tree: Any) -> Any:
    """Shardings of a parameter (or optimizer state) tree."""
    if self.split == 'frames':
      return sharding.state_shardings(tree, self.mesh, 'fsdp')
    return jax.tree.map(lambda _: sharding.replicated(self.mesh), tree)

  def latents(self) -> jax.sharding.NamedSharding:
    """Of the posterior's mean and std [B, F, h, w, c]."""
    if self.split == 'frames':
      return jax.sharding.NamedSharding(
          self.mesh, jax.sharding.PartitionSpec(None, 'fsdp'))
    return sharding.batch_sharding(self.mesh)

  def text(self) -> jax.sharding.NamedSharding:
    if self.split == 'frames':
      return sharding.replicated(self.mesh)
    return sharding.batch_sharding(self.mesh)

  def kernel_axes(self) -> tuple[str, ...]:
    """The mesh axes the attention's rows are split over (kernels_on)."""
    return ('fsdp',) if self.split == 'frames' else sharding.BATCH_AXES


def layout(config: ml_collections.ConfigDict, frames: int,
           devices: Optional[Sequence[Any]] = None) -> Layout:
  """The Layout of a tune of `frames` frames on `devices` (default: all).

  Raises:
    ValueError: several processes and neither the batch nor the frames
      divide over their devices (one device would leave the others idle
      while every process runs the same step).
  """
  devices = list(jax.devices() if devices is None else devices)
  n, b = len(devices), config.training.batch_size
  if b % n == 0:
    return Layout(sharding.make_mesh(config.mesh, devices), 'batch')
  if frames % n == 0:
    mesh = sharding.make_mesh(ml_collections.ConfigDict(
        {'data': 1, 'fsdp': n, 'param_sharding': 'fsdp'}), devices)
    return Layout(mesh, 'frames')
  if len({getattr(d, 'process_index', 0) for d in devices}) > 1:
    raise ValueError(
        f'Neither training.batch_size={b} nor tune.num_frames={frames}'
        f' divides over the {n} devices of this multi-process run; use a'
        f' multiple of {n} for either, or tune in one process.')
  logging.info('Neither training.batch_size=%d nor %d frames divide over %d'
               ' devices: tuning on one device.', b, frames, n)
  return Layout(sharding.make_mesh(config.mesh, devices[:1]), 'none')


def make_step(config: ml_collections.ConfigDict, module: nn.Module,
              schedule: Any, place: Layout, tx: Any, lr_fn: Any,
              trained: Any, frozen: Any):
  """The jitted tune step on `place`, the state donated.

  Pallas attention kernels run per device on its rows (attention.kernels_on:
  its frames, or its clips). trained, frozen: the trees (arrays or abstract)
  whose shardings the step takes and returns.
  """
  t = config.tune
  step = functools.partial(
      tune_step, module=module,
      table=tuple(float(x) for x in schedule.logsnr_table()),
      logsnr_fn=schedule.logsnr_fn(), target=schedule.target,
      trainable=t.trainable, lora_scale=tuned_sd.lora_scale(t), tx=tx,
      lr_fn=lr_fn, ema_decay=float(config.optimizer.ema_decay))
  state = jax.eval_shape(lambda x: training.TrainState.create(x, tx),
                         trained)
  state_sh = place.params(state)

  def step_fn(*args):
    with attention.kernels_on(place.mesh, place.kernel_axes()):
      return step(*args)

  latents = place.latents()
  return jax.jit(
      step_fn,
      in_shardings=(state_sh, place.params(frozen),
                    {'mean': latents, 'std': latents, 'text': place.text()},
                    sharding.replicated(place.mesh)),
      out_shardings=(state_sh, sharding.replicated(place.mesh)),
      donate_argnums=0)


def abstract_program(config: ml_collections.ConfigDict, unet: nn.Module,
                     schedule: Any, frames: int, height: int, width: int,
                     devices: Optional[Sequence[Any]] = None):
  """The tune step of --mode=tune and its abstract arguments, on `devices`.

  For --mode=plan: nothing is read or allocated. unet: the SD UNet module
  (unet2d.build of the folder's config.json); schedule: its
  DiscreteSchedule; height, width: the latents'. Returns (jitted step,
  (state, frozen, batch, rng) as ShapeDtypeStructs with shardings, Layout,
  trained parameter count, frozen parameter count).
  """
  t = config.tune
  place = layout(config, frames, devices)
  module = inflate_sd.inflate_module(unet, t.frame_norm, t.remat)
  params = inflate_sd.abstract_params(module)
  record = {'trainable': t.trainable, 'lora_rank': t.lora_rank, 'seed': 0}
  trained, frozen = jax.eval_shape(
      lambda p: tuned_sd.split_tuned(p, record), params)
  tx, lr_fn = training.create_optimizer(config)
  step = make_step(config, module, schedule, place, tx, lr_fn, trained,
                   frozen)
  state = jax.eval_shape(lambda x: training.TrainState.create(x, tx),
                         trained)
  b = config.training.batch_size
  latents = jax.ShapeDtypeStruct(
      (b, frames, height, width, unet.in_channels), jnp.float32,
      sharding=place.latents())
  text = jax.ShapeDtypeStruct(
      (b, 77, unet.cross_attention_dim), jnp.float32,  # CLIP's 77 tokens.
      sharding=place.text())
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                             sharding=sharding.replicated(place.mesh))
  args = (sharding.abstract(state, place.params(state)),
          sharding.abstract(frozen, place.params(frozen)),
          {'mean': latents, 'std': latents, 'text': text}, rng)
  return (step, args, place, inflate_sd.count(trained),
          inflate_sd.count(frozen))


def tune(config: ml_collections.ConfigDict, workdir: str
         ) -> training.TrainState:
  """Tunes config.tune.video into workdir (resuming); returns the state."""
  frames = validate(config)
  t, p = config.tune, config.pretrained
  record = tuned_sd.make_record(config, frames)
  tuned_sd.check_same_source(workdir, record)
  place = layout(config, len(frames))
  mesh = place.mesh
  start = time.time()
  # Split by frames, every parameter is read sharded as the step takes it.
  sd = stable_diffusion.load(
      p.path, dtype=p.dtype, chunk=p.vae_chunk, mesh=mesh,
      variant=p.variant or None,
      param_sharding='fsdp' if place.split == 'frames' else 'replicated')
  module, params = tuned_sd.inflated(sd, record, remat=t.remat)
  trained, frozen = tuned_sd.split_tuned(params, record)
  del params
  logging.info('Loaded and inflated %s in %.1f s: training %d parameters '
               '(%s), %d frozen; %d frames of %dx%d on %d device(s), split'
               ' by %s.', p.path, time.time() - start,
               inflate_sd.count(trained), t.trainable,
               inflate_sd.count(frozen), *frames.shape[:3], mesh.size,
               place.split)
  tx, lr_fn = training.create_optimizer(config)
  step_fn = make_step(config, module, sd.schedule, place, tx, lr_fn,
                      trained, frozen)
  abstract = jax.eval_shape(lambda x: training.TrainState.create(x, tx),
                            trained)
  state = jax.jit(lambda x: training.TrainState.create(x, tx),
                  out_shardings=place.params(abstract))(trained)
  mean, std = posterior(sd, frames)
  b = config.training.batch_size
  text = stable_diffusion.encode_prompts(sd, [t.caption] * b)
  batch = {'mean': jax.device_put(jnp.repeat(mean, b, 0), place.latents()),
           'std': jax.device_put(jnp.repeat(std, b, 0), place.latents()),
           'text': jax.device_put(text, place.text())}
  frozen = jax.device_put(frozen, place.params(frozen))
  del sd, trained  # The step holds its own copies.
  ckpt, writer = training.open_workdir(config, workdir)
  if jax.process_index() == 0:
    tuned_sd.write_record(workdir, record, frames)
  rng = jax.random.fold_in(jax.random.key(config.seed), 46)
  return training.run(
      state, training.Step(step_fn, lambda s, x: (s, frozen, x, rng)),
      lambda first: itertools.repeat(batch), ckpt=ckpt, writer=writer,
      settings=training.LoopSettings.from_config(config.training))
