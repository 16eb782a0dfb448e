"""Log-SNR noise schedules for continuous-time diffusion (Ho et al. 2022, 2).

A schedule maps t in [0, 1] to the log signal-to-noise ratio
logsnr(t) = log(alpha_t^2 / sigma_t^2), decreasing in t. The process is
variance preserving: alpha_t^2 = sigmoid(logsnr), sigma_t^2 = sigmoid(-logsnr).
"""

from typing import Callable

import jax.numpy as jnp
import ml_collections

LogSNRFn = Callable[[jnp.ndarray], jnp.ndarray]

SCHEDULES = ('cosine', 'shifted_cosine', 'linear')


def alpha_sigma(logsnr: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Returns (alpha, sigma) with alpha^2 = sigmoid(logsnr), sigma^2 = 1 - alpha^2.

  Computed from sigmoid of +-logsnr separately so that both stay accurate at
  the ends of the [-20, 20] range.
  """
  logsnr = jnp.asarray(logsnr, jnp.float32)
  return jnp.sqrt(jax_sigmoid(logsnr)), jnp.sqrt(jax_sigmoid(-logsnr))


def jax_sigmoid(x: jnp.ndarray) -> jnp.ndarray:
  return 1.0 / (1.0 + jnp.exp(-x))


def cosine_logsnr(
    t: jnp.ndarray, logsnr_min: float = -20.0, logsnr_max: float = 20.0
) -> jnp.ndarray:
  """Cosine schedule clipped to [logsnr_min, logsnr_max].

  logsnr(t) = -2 log tan(a + t (b - a)), a = atan(exp(-logsnr_max / 2)),
  b = atan(exp(-logsnr_min / 2)); logsnr(0) = logsnr_max, logsnr(1) =
  logsnr_min. VDM App. A uses [-20, 20] for every model; the closed form is
  the usual clipped cosine (the paper does not print it).
  """
  b = jnp.arctan(jnp.exp(-0.5 * logsnr_max))
  a = jnp.arctan(jnp.exp(-0.5 * logsnr_min))
  logsnr = -2.0 * jnp.log(jnp.tan(b + jnp.asarray(t, jnp.float32) * (a - b)))
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
      signal at the same t (a resolution shift of the cosine schedule).

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
    shift = 2.0 * float(jnp.log(config.shift_base / image_size))
    return lambda t: cosine_logsnr(t, lo - shift, hi - shift) + shift
  raise ValueError(
      f'Unknown diffusion.schedule {name!r}; choose one of {SCHEDULES}.'
  )
