"""Forward process, parameterizations and the training loss (Ho et al. 2022, 2).

q(z_t | x) = N(alpha_t x, sigma_t^2 I), with alpha_t, sigma_t from the log-SNR.
The network predicts one of (VDM 2, Salimans & Ho 2022):
  'eps': the noise eps,             x = (z - sigma eps) / alpha
  'v':   v = alpha eps - sigma x,   x = alpha z - sigma v,  eps = sigma z + alpha v
  'x':   the clean data x,          eps = (z - alpha x) / sigma
This module never imports a model: the denoiser is an argument,
`denoise_fn(z, logsnr, cond) -> prediction`, where `cond` is a dict of optional
model inputs ('label': int32[B], 'frame_mask': bool[B, T]).

Noise (noise.py, config.diffusion.noise): 'iid', or VideoFusion's decomposed
noise (Luo et al. 2023) eps_i = sqrt(lam_i) b + sqrt(1 - lam_i) r_i, with one
base noise b per clip and a residual r_i per frame. It turns the forward
process into q(z_t | x) = N(alpha_t x, sigma_t^2 S), where S acts across the
frames of each pixel (S_ii = 1, S_ij = sqrt(lam_i lam_j)). In the whitened
coordinates S^{-1/2} z it is the standard process, and the conversions below
use one alpha, sigma for all frames of a clip, so they commute with S^{1/2}
and hold unchanged; the samplers stay exact when their fresh noise is drawn
the same way (sampling.py).
"""

from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp

from vdm_jax import noise as noise_lib
from vdm_jax import schedules

TARGETS = ('eps', 'v', 'x')
TIME_SAMPLING = ('uniform', 'low_discrepancy')

DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray, Mapping[str, Any]], jnp.ndarray]


def check_target(target: str) -> None:
  if target not in TARGETS:
    raise ValueError(
        f'Unknown diffusion.target {target!r}; choose one of {TARGETS}.'
    )


def broadcast_to_video(a: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
  """Reshapes per-example [B] or per-frame [B, T] values to broadcast on x.

  Args:
    a: [B] or [B, T] values.
    x: [B, T, H, W, C] (or any rank >= a.ndim) array.

  Returns:
    `a` with trailing singleton axes up to x.ndim.
  """
  a = jnp.asarray(a)
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def q_sample(
    x: jnp.ndarray, logsnr: jnp.ndarray, eps: jnp.ndarray
) -> jnp.ndarray:
  """Samples z_t ~ q(z_t | x) given the noise.

  Args:
    x: [B, T, H, W, C] clean video in [-1, 1].
    logsnr: [B] or [B, T] log-SNR.
    eps: [B, T, H, W, C] standard normal noise.

  Returns:
    z: [B, T, H, W, C] = alpha x + sigma eps.
  """
  alpha, sigma = schedules.alpha_sigma(broadcast_to_video(logsnr, x))
  return alpha * x + sigma * eps


def prediction_to_x_eps(
    pred: jnp.ndarray, z: jnp.ndarray, logsnr: jnp.ndarray, target: str
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Converts a network prediction to (x_hat, eps_hat).

  Args:
    pred: [B, T, H, W, C] network output in `target` parameterization.
    z: [B, T, H, W, C] noisy input.
    logsnr: [B] or [B, T] log-SNR of z.
    target: 'eps', 'v' or 'x'.

  Returns:
    (x_hat, eps_hat), each [B, T, H, W, C], float32.
  """
  check_target(target)
  pred = pred.astype(jnp.float32)
  alpha, sigma = schedules.alpha_sigma(broadcast_to_video(logsnr, z))
  if target == 'eps':
    return (z - sigma * pred) / alpha, pred
  if target == 'v':
    return alpha * z - sigma * pred, sigma * z + alpha * pred
  return pred, (z - alpha * pred) / sigma


def x_eps_to_target(
    x: jnp.ndarray, eps: jnp.ndarray, logsnr: jnp.ndarray, target: str
) -> jnp.ndarray:
  """The regression target for `target` given clean data and noise."""
  check_target(target)
  if target == 'eps':
    return eps
  if target == 'x':
    return x
  alpha, sigma = schedules.alpha_sigma(broadcast_to_video(logsnr, x))
  return alpha * eps - sigma * x


def x_to_eps(x, z, logsnr):
  """eps implied by a clean estimate x at z: (z - alpha x) / sigma."""
  alpha, sigma = schedules.alpha_sigma(broadcast_to_video(logsnr, z))
  return (z - alpha * x) / sigma


def eps_to_x(eps, z, logsnr):
  """x implied by a noise estimate eps at z: (z - sigma eps) / alpha."""
  alpha, sigma = schedules.alpha_sigma(broadcast_to_video(logsnr, z))
  return (z - sigma * eps) / alpha


def sample_time(rng: jax.Array, batch: int, method: str) -> jnp.ndarray:
  """Draws t in [0, 1) for each example.

  Args:
    rng: PRNG key.
    batch: number of examples B.
    method: 'uniform' (i.i.d.) or 'low_discrepancy' (one uniform offset,
      then evenly spaced across the batch mod 1, as in Kingma et al. 2021;
      lowers the variance of the batch loss).

  Returns:
    t: [B] float32.
  """
  if method == 'uniform':
    return jax.random.uniform(rng, (batch,))
  if method == 'low_discrepancy':
    t0 = jax.random.uniform(rng, ())
    return jnp.mod(t0 + jnp.arange(batch, dtype=jnp.float32) / batch, 1.0)
  raise ValueError(
      f'Unknown diffusion.time_sampling {method!r}; choose one of'
      f' {TIME_SAMPLING}.'
  )


def _example_draws(rng, shape, noise):
  rng_t, rng_eps = jax.random.split(rng)
  return jax.random.uniform(rng_t, ()), noise.draw(rng_eps, shape)


@flax.struct.dataclass
class LossOutput:
  """Per-example terms of the diffusion loss; every field is [B]."""

  loss: jnp.ndarray  # mean squared error in target space
  mse_x: jnp.ndarray  # mean squared error of x_hat (for monitoring)
  logsnr: jnp.ndarray  # the log-SNR each example was trained at
  t: jnp.ndarray


def loss(
    denoise_fn: DenoiseFn,
    x: jnp.ndarray,
    rng: jax.Array,
    *,
    logsnr_fn: schedules.LogSNRFn,
    target: str,
    cond: Mapping[str, Any] | None = None,
    time_sampling: str = 'uniform',
    noise: noise_lib.Noise | None = None,
) -> LossOutput:
  """Per-example diffusion loss (VDM 2: MSE in `target` space, t ~ U[0, 1]).

  Args:
    denoise_fn: (z, logsnr, cond) -> prediction, all [B, T, H, W, C].
    x: [B, T, H, W, C] clean videos in [-1, 1].
    rng: a PRNG key (split here into time and noise streams), or one key
      per example ([B] keys), which makes each example's t and noise
      independent of how the batch is split into microbatches.
    logsnr_fn: the schedule t -> logsnr.
    target: the network's parameterization ('eps', 'v' or 'x').
    cond: optional model inputs passed through to denoise_fn.
    time_sampling: 'uniform' or 'low_discrepancy'.
    noise: the noise.Noise of the forward process (default i.i.d.); for
      joint image-video batches `noise.for_frames(frame_mask)` gives image
      frames i.i.d. noise. With VideoFusion's decomposed noise the network
      still regresses the whole eps (one denoiser, no separate base /
      residual generators).

  Returns:
    LossOutput of [B] arrays; the caller reduces and weights them.
  """
  check_target(target)
  noise = noise_lib.Noise() if noise is None else noise
  if rng.shape == (x.shape[0],):  # One key per example.
    if time_sampling != 'uniform':
      raise ValueError(
          f'time_sampling={time_sampling!r} couples the examples of a batch;'
          ' per-example keys need uniform time sampling.'
      )
    t, eps = jax.vmap(lambda k, n: _example_draws(k, x.shape[1:], n))(
        rng, noise.per_example(*x.shape[:2]))
  else:
    rng_t, rng_eps = jax.random.split(rng)
    t = sample_time(rng_t, x.shape[0], time_sampling)
    eps = noise.draw(rng_eps, x.shape)
  logsnr = logsnr_fn(t)
  z = q_sample(x, logsnr, eps)
  pred = denoise_fn(z, logsnr, cond or {}).astype(jnp.float32)
  tgt = x_eps_to_target(x, eps, logsnr, target)
  reduce_axes = tuple(range(1, x.ndim))
  x_hat, _ = prediction_to_x_eps(pred, z, logsnr, target)
  return LossOutput(
      loss=jnp.mean(jnp.square(pred - tgt), axis=reduce_axes),
      mse_x=jnp.mean(jnp.square(jnp.clip(x_hat, -1, 1) - x), axis=reduce_axes),
      logsnr=logsnr,
      t=t,
  )
