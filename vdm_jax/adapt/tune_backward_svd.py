"""--mode=tune_backward on Stable Video Diffusion (configs/svd.py:inbetween).

Generative Inbetweening's backward-motion tune (Wang et al. 2024, Sec. 3.3;
jeanne-wang/svd_keyframe_interpolation train_reverse_motion_with_attnflip.py)
of the SVD folder in config.pretrained.path on the video tune.video: clips
of tune.num_frames frames tune.frame_stride apart (theirs: 14 at stride 2),
from a random start each step, resized to svd.height x svd.width; only the
to_v / to_out_0 kernels of the controlled temporal attentions train
(adapt/inbetween_svd.py), AdamW at tune.backward_learning_rate (1e-4), batch
tune.backward_batch_size (1), no EMA. The clips' latents are posterior
samples times the scaling factor; the conditioning frames are noise
augmented (0.02) and encoded to their mode, as their script does.

The workdir gets svd_backward_<step>.npz (the tuned kernels and their
difference to the base) every training.checkpoint_every_steps and at the
end, and svd_backward.json; a rerun resumes from the last one (the
optimizer's moments restart).
"""

import functools
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vdm_jax import video_io
from vdm_jax.adapt import inbetween_svd
from vdm_jax.pretrained import stable_video_diffusion as svdp


def read_clips(config: ml_collections.ConfigDict, height: int, width: int
               ) -> np.ndarray:
  """float32 [N, height, width, 3] frames of tune.video in [-1, 1]."""
  t = config.tune
  if not t.video:
    raise ValueError('config.tune.video is empty: the backward tune needs a '
                     'video file (.mp4/.gif/...) to tune on.')
  video = video_io.read_video(t.video)
  need = (int(t.num_frames) - 1) * int(t.frame_stride) + 1
  if video.shape[0] < need:
    raise ValueError(f'{t.video} has {video.shape[0]} frames; tune.num_frames'
                     f'={t.num_frames} at tune.frame_stride={t.frame_stride} '
                     f'needs {need}.')
  x = jnp.asarray(video, jnp.float32) / 127.5 - 1.0
  if x.shape[1:3] != (height, width):
    x = jax.image.resize(x, (x.shape[0], height, width, 3), 'bilinear')
  return np.asarray(x)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _prepare(vae, image_model, mean, std, vae_params, image_params, clips,
             rng):
  """(scaled latents [B, F, h, w, c], cond_f, cond_b) of clips [B, F, H, W,
  3] in [-1, 1], forward in time; frozen encoders (no gradient)."""
  b, f = clips.shape[:2]
  r_lat, r_aug = jax.random.split(rng)
  mu, logvar = vae.apply({'params': vae_params},
                         clips.reshape((b * f,) + clips.shape[2:]),
                         method='encode')
  lat = (mu + jnp.exp(0.5 * logvar) * jax.random.normal(r_lat, mu.shape)
         ) * vae.scaling_factor
  aug = jax.random.normal(r_aug, clips[:, 0].shape)
  ids = jnp.tile(jnp.asarray([inbetween_svd.TRAIN_TIME_IDS]), (b, 1))

  def cond(frame):  # [B, H, W, 3] in [-1, 1]
    image = (frame + 1.0) / 2.0
    embed = svdp._embed(image_model, image_params, image, mean, std,  # pylint: disable=protected-access
                        int(image_model.image_size))
    latent = vae.apply({'params': vae_params}, frame + 0.02 * aug,
                       method='encode')[0]
    return {'image_latent': latent, 'image_embed': embed,
            'added_time_ids': ids}

  return (lat.reshape((b, f) + lat.shape[1:]), cond(clips[:, 0]),
          cond(clips[:, -1]))


def tune_step(tuned, opt_state, frozen, latents, cond_f, cond_b, rng, *,
              unet, tx):
  """One AdamW update of the tuned kernels; pure."""
  def loss_fn(t):
    return jnp.mean(inbetween_svd.backward_loss(unet, frozen, t, latents,
                                                cond_f, cond_b, rng))
  loss, grads = jax.value_and_grad(loss_fn)(tuned)
  updates, opt_state = tx.update(grads, opt_state, tuned)
  return optax.apply_updates(tuned, updates), opt_state, {
      'loss': loss, 'grad_norm': optax.tree.norm(grads)}


def tune_backward(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Tunes the backward model of config.pretrained.path into workdir.

  Returns:
    The final tuned kernels {'/'-joined path: array}.
  """
  s, t, p = config.svd, config.tune, config.pretrained
  svdp.check_folder(p.path)
  height, width = int(s.height), int(s.width)
  clips = read_clips(config, height, width)
  model = svdp.load(p.path, dtype=p.dtype, remat=s.remat,
                    variant=p.variant or None)
  height, width = svdp.check_size(model, height, width)
  svdp.check_frames(model, int(t.num_frames))
  frozen = model.unet_params
  base = inbetween_svd.split(frozen)
  tuned, start = dict(base), 0
  if os.path.isfile(os.path.join(workdir, inbetween_svd.RECORD)):
    _, saved, _ = inbetween_svd.restore(workdir)
    start = inbetween_svd.read_record(workdir)['step']
    tuned = {k: jnp.asarray(v) for k, v in saved.items()}
    logging.info('Resuming the backward tune at step %d.', start)
  logging.info('Tuning %d weights (%d kernels: temporal_transformer_blocks_0/'
               'attn1 to_v and to_out_0) of %d.',
               sum(v.size for v in tuned.values()), len(tuned),
               sum(v.size for v in jax.tree.leaves(frozen)))
  tx = optax.adamw(float(t.backward_learning_rate), b1=0.9, b2=0.999,
                   eps=1e-8, weight_decay=1e-2)
  opt_state = tx.init(tuned)
  # Not donated: the first step's tuned kernels are the frozen tree's.
  step_fn = jax.jit(functools.partial(tune_step, unet=model.unet, tx=tx))
  rng = jax.random.fold_in(jax.random.key(config.seed), 11)
  np_rng = np.random.RandomState(config.seed + start)
  n, stride = int(t.num_frames), int(t.frame_stride)
  span = (n - 1) * stride + 1
  every = int(config.training.checkpoint_every_steps)
  steps = int(t.backward_steps)
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  for step in range(start, steps):
    starts = np_rng.randint(0, clips.shape[0] - span + 1,
                            int(t.backward_batch_size))
    batch = np.stack([clips[i:i + span:stride] for i in starts])
    key = jax.random.fold_in(rng, step)
    latents, cond_f, cond_b = _prepare(
        model.codec.module, model.image_model, model.image_mean,
        model.image_std, model.vae_params, model.image_params, batch, key)
    tuned, opt_state, metrics = step_fn(tuned, opt_state, frozen, latents,
                                        cond_f, cond_b,
                                        jax.random.fold_in(key, 1))
    loss = float(metrics['loss'])
    if not np.isfinite(loss):
      raise FloatingPointError(f'Non-finite loss at step {step}.')
    done = step + 1
    if done % int(config.training.log_every_steps) == 0 or done == steps:
      logging.info('step %d/%d: loss %.4f grad_norm %.3g (%.2f steps/s)',
                   done, steps, loss, float(metrics['grad_norm']),
                   (done - start) / (time.time() - t0))
    if done == steps or (every and done % every == 0):
      if jax.process_index() == 0:
        inbetween_svd.save(workdir, done, tuned, base, p.path)
  return tuned
