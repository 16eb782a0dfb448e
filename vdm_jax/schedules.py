"""Log-SNR noise schedules of continuous-time diffusion (VDM, Sec. 2).

A schedule maps t in [0, 1] to the log signal-to-noise ratio
logsnr(t) = log(alpha_t^2 / sigma_t^2), decreasing in t. The process is
variance preserving: alpha_t^2 = sigmoid(logsnr), sigma_t^2 = sigmoid(-logsnr).
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections

LogSNRFn = Callable[[jnp.ndarray], jnp.ndarray]

SCHEDULES = ('cosine', 'shifted_cosine', 'linear')


def alpha_sigma(logsnr: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Signal and noise scales of a log-SNR.

  Computed from the sigmoid of +logsnr and of -logsnr separately (not as
  1 - alpha^2), so that both stay accurate at the ends of [-20, 20].

  Args:
    logsnr: log-SNR values, any shape.

  Returns:
    (alpha, sigma), float32 of the shape of `logsnr`, with
    alpha^2 = sigmoid(logsnr) and sigma^2 = sigmoid(-logsnr).
  """
  logsnr = jnp.asarray(logsnr, jnp.float32)
  return jnp.sqrt(jax.nn.sigmoid(logsnr)), jnp.sqrt(jax.nn.sigmoid(-logsnr))


# Deprecated: use jax.nn.sigmoid. Kept only until sampling.py stops calling
# it; same values bit for bit (float32, CPU).
jax_sigmoid = jax.nn.sigmoid


def cosine_logsnr(
    t: jnp.ndarray, logsnr_min: float = -20.0, logsnr_max: float = 20.0
) -> jnp.ndarray:
  """Cosine schedule clipped to [logsnr_min, logsnr_max].

  logsnr(t) = -2 log tan(a + t (b - a)), a = atan(exp(-logsnr_max / 2)),
  b = atan(exp(-logsnr_min / 2)); logsnr(0) = logsnr_max, logsnr(1) =
  logsnr_min. Equivalently alpha_t = cos(a + t (b - a)) and sigma_t =
  sin(a + t (b - a)). VDM (Ho et al. 2022, App. A) uses the cosine schedule
  with log-SNR in [-20, 20] for every model but does not print its formula;
  this is our reconstruction: the cosine schedule of Nichol & Dhariwal
  (2021, Sec. 3.2) in log-SNR form, clipped as in Salimans & Ho (2022),
  google-research/google-research
  diffusion_distillation/diffusion_distillation/schedules.py (see
  docs/references.md).

  Args:
    t: times in [0, 1], any shape.
    logsnr_min: log-SNR at t = 1.
    logsnr_max: log-SNR at t = 0.

  Returns:
    float32 log-SNR of the shape of `t`.
  """
  a = jnp.arctan(jnp.exp(-0.5 * logsnr_max))
  b = jnp.arctan(jnp.exp(-0.5 * logsnr_min))
  logsnr = -2.0 * jnp.log(jnp.tan(a + jnp.asarray(t, jnp.float32) * (b - a)))
  return jnp.clip(logsnr, logsnr_min, logsnr_max)


def linear_logsnr(
    t: jnp.ndarray, logsnr_min: float = -20.0, logsnr_max: float = 20.0
) -> jnp.ndarray:
  """Log-SNR linear in t, from logsnr_max at t=0 to logsnr_min at t=1."""
  t = jnp.asarray(t, jnp.float32)
  return logsnr_max + t * (logsnr_min - logsnr_max)


def get_logsnr_fn(
    config: ml_collections.ConfigDict, image_size: int | None = None
) -> LogSNRFn:
  """Builds logsnr(t) from `config.diffusion`.

  Args:
    config: the diffusion sub-config (schedule, logsnr_min, logsnr_max,
      shift_base).
    image_size: the model's frame size; needed by 'shifted_cosine', which
      adds 2 log(shift_base / image_size) so that larger frames get less
      signal at the same t (the shifted cosine schedule of Hoogeboom et
      al. 2023, simple diffusion, Sec. 3.1).

  Returns:
    A function t -> logsnr of the same shape.
  """
  name = config.schedule
  lo, hi = float(config.logsnr_min), float(config.logsnr_max)
  if lo >= hi:
    raise ValueError(
        f'diffusion.logsnr_min ({lo}) must be below diffusion.logsnr_max'
        f' ({hi}).'
    )
  if name == 'cosine':
    return lambda t: cosine_logsnr(t, lo, hi)
  if name == 'linear':
    return lambda t: linear_logsnr(t, lo, hi)
  if name == 'shifted_cosine':
    if image_size is None:
      raise ValueError("schedule 'shifted_cosine' needs the image size.")
    # math, not jnp: the schedule is built inside jitted train steps.
    shift = 2.0 * math.log(config.shift_base / image_size)
    return lambda t: cosine_logsnr(t, lo - shift, hi - shift) + shift
  raise ValueError(
      f'Unknown diffusion.schedule {name!r}; choose one of {SCHEDULES}.'
  )
