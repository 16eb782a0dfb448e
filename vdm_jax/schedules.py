"""Log-SNR noise schedules of continuous-time diffusion (VDM, Sec. 2).

A schedule maps t in [0, 1] to the log signal-to-noise ratio
logsnr(t) = log(alpha_t^2 / sigma_t^2), decreasing in t. The process is
variance preserving: alpha_t^2 = sigmoid(logsnr), sigma_t^2 = sigmoid(-logsnr).
"""

import dataclasses
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

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


# Pretrained discrete schedules ------------------------------------------------


def discrete_timestep(logsnr: jnp.ndarray, table: Any) -> jnp.ndarray:
  """DiscreteSchedule.timestep from the log-SNR table [N] alone."""
  table = jnp.asarray(table, jnp.float32)
  steps = jnp.arange(table.shape[0], dtype=jnp.float32)
  x = jnp.exp(-0.5 * jnp.asarray(logsnr, jnp.float32))
  return jnp.interp(x, jnp.exp(-0.5 * table), steps)

BETA_SCHEDULES = ('linear', 'scaled_linear', 'squaredcos_cap_v2')
PREDICTION_TYPES = {'epsilon': 'eps', 'v_prediction': 'v', 'sample': 'x'}
TIMESTEP_SPACINGS = ('leading', 'trailing', 'linspace')
PRETRAINED_SAMPLERS = ('ddim', 'euler', 'ancestral')


def _cosine_betas(num: int, max_beta: float = 0.999) -> np.ndarray:
  """Betas of alpha_bar(t) = cos^2((t + 0.008) / 1.008 pi / 2) (Nichol &
  Dhariwal 2021, eq. 17), diffusers' `betas_for_alpha_bar`."""
  def alpha_bar(t):
    return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
  return np.array([min(1 - alpha_bar((i + 1) / num) / alpha_bar(i / num),
                       max_beta) for i in range(num)], np.float64)


@dataclasses.dataclass(frozen=True)
class DiscreteSchedule:
  """The discrete-time schedule of a pretrained model, as log-SNRs.

  A model trained on timesteps n = 0..N-1 with alpha_bar_n = prod_{m<=n}
  (1 - beta_m) (Ho et al. 2020) sees z_n = sqrt(alpha_bar_n) x + sqrt(1 -
  alpha_bar_n) eps, which is this library's variance-preserving z at
  logsnr_n = log(alpha_bar_n / (1 - alpha_bar_n)). The model's time input
  is n, recovered from a log-SNR by `timestep` (so the library's samplers,
  which speak log-SNR, drive it unchanged), and the samplers' grids of
  log-SNRs are the pretrained schedulers' timesteps (`grid`).

  Attributes:
    alphas_cumprod: float64 [N] alpha_bar_n.
    target: the model's parameterization ('eps', 'v' or 'x').
    timestep_spacing: diffusers' spacing of inference timesteps, or None
      for the default of the scheduler class that runs the sampler ('leading'
      for DDIM and DDPM, 'linspace' for Euler), as diffusers does when the
      folder's config leaves it unset.
    steps_offset: added to 'leading' timesteps (SD-1.x: 1).
    final_logsnr: log-SNR after the last DDIM step: +inf with
      `set_alpha_to_one` (the last step returns x_hat), else that of
      alpha_bar_0 (diffusers' DDIMScheduler `final_alpha_cumprod`).
  """

  alphas_cumprod: np.ndarray
  target: str = 'eps'
  timestep_spacing: str | None = None
  steps_offset: int = 0
  final_logsnr: float = math.inf

  @property
  def num_train_timesteps(self) -> int:
    return int(self.alphas_cumprod.shape[0])

  def logsnr_table(self) -> np.ndarray:
    """float64 [N] log-SNR of each training timestep (decreasing)."""
    a = self.alphas_cumprod
    return np.log(a) - np.log1p(-a)

  def timestep(self, logsnr: jnp.ndarray) -> jnp.ndarray:
    """The model's (fractional) timestep of a log-SNR, any shape.

    Linear in sigma = exp(-logsnr / 2) between training timesteps, which is
    how diffusers' EulerDiscreteScheduler interpolates its sigmas, and
    exact at the training timesteps themselves (their log-SNRs, rounded to
    float32, are the table the search runs on). Clipped to [0, N - 1].
    """
    return discrete_timestep(logsnr, self.logsnr_table())

  def timesteps(self, num_steps: int, spacing: str | None = None
                ) -> np.ndarray:
    """diffusers' inference timesteps (DDIMScheduler.set_timesteps).

    Returns:
      int64 [num_steps], decreasing.
    """
    n, big = int(num_steps), self.num_train_timesteps
    spacing = spacing or self.timestep_spacing or 'leading'
    if not 1 <= n <= big:
      raise ValueError(f'num_steps must lie in [1, {big}], got {n}.')
    if spacing == 'leading':
      t = (np.arange(0, n) * (big // n)).round()[::-1] + self.steps_offset
    elif spacing == 'trailing':
      t = np.round(np.arange(big, 0, -big / n)) - 1
    elif spacing == 'linspace':
      t = np.linspace(0, big - 1, n).round()[::-1]
    else:
      raise ValueError(f'Unknown timestep_spacing {spacing!r}; choose one of '
                       f'{TIMESTEP_SPACINGS}.')
    return t.astype(np.int64)

  def grid(self, sampler: str, num_steps: int) -> dict[str, Any]:
    """The sampler's log-SNR grid and start, as a diffusers scheduler has it.

    'ddim' (and 'ancestral', DDPM's posterior on the same timesteps): the
    DDIM timesteps, then `final_logsnr`. 'euler': EulerDiscreteScheduler
    (Karras et al. 2022, Alg. 2 without churn) on sigmas interpolated at its
    (fractional) timesteps, then sigma = 0; Euler's step on sigma is DDIM's
    step on log-SNR (eta = 0), so the library's DDIM runs it.

    Returns:
      {'logsnrs': float32 [num_steps + 1] increasing (the last may be inf),
       'timesteps': float64 [num_steps], 'denoise_last': whether the last
       step returns x_hat (the grid ends at t = 0), 'logsnrs_to' (DDIM,
       only where it differs from logsnrs[1:]): where each step goes,
       'init_scale': the factor
       from diffusers' initial latents (unit normal) to this library's z at
       the first log-SNR (Euler multiplies them by its init_noise_sigma).}
    """
    if sampler not in PRETRAINED_SAMPLERS:
      raise ValueError(f'Unknown sampler {sampler!r} for a pretrained '
                       f'model; choose one of {PRETRAINED_SAMPLERS}.')
    table = self.logsnr_table()
    if sampler in ('ddim', 'ancestral'):
      t = self.timesteps(num_steps)
      logsnrs = np.append(table[t], self.final_logsnr)
      out = {'logsnrs': np.asarray(logsnrs, np.float32),
             'timesteps': t.astype(np.float64),
             'denoise_last': bool(np.isinf(self.final_logsnr)),
             'init_scale': 1.0}
      if sampler == 'ddim':  # DDIMScheduler.step: t -> t - N_train // N.
        prev = t - self.num_train_timesteps // int(num_steps)
        to = np.where(prev >= 0, table[np.maximum(prev, 0)],
                      self.final_logsnr)
        if not np.array_equal(to, logsnrs[1:]):
          out['logsnrs_to'] = np.asarray(to, np.float32)
          out['denoise_last'] = bool(np.isinf(to[-1]))
      return out
    spacing = self.timestep_spacing or 'linspace'
    big = self.num_train_timesteps
    if spacing == 'linspace':
      t = np.linspace(0, big - 1, num_steps, dtype=np.float64)[::-1].copy()
    elif spacing == 'leading':
      t = (np.arange(0, num_steps) * (big // num_steps)).round()[::-1]
      t = t.astype(np.float64) + self.steps_offset
    else:
      t = np.arange(big, 0, -big / num_steps).round().astype(np.float64) - 1
    all_sigmas = np.exp(-0.5 * table)
    sigmas = np.interp(t, np.arange(big), all_sigmas)
    init = (sigmas.max() if spacing in ('linspace', 'trailing')
            else math.sqrt(sigmas.max() ** 2 + 1))
    logsnrs = np.append(-2.0 * np.log(sigmas), math.inf)
    return {'logsnrs': np.asarray(logsnrs, np.float32), 'timesteps': t,
            'denoise_last': True,
            'init_scale': float(init / math.sqrt(sigmas[0] ** 2 + 1))}

  def logsnr_fn(self) -> LogSNRFn:
    """t in [0, 1] -> the log-SNR of training timestep floor(t N) (clipped
    to N - 1): uniform t draws the model's discrete training timesteps."""
    table = jnp.asarray(self.logsnr_table(), jnp.float32)
    big = self.num_train_timesteps

    def fn(t):
      n = jnp.clip(jnp.floor(jnp.asarray(t, jnp.float32) * big), 0, big - 1)
      return table[n.astype(jnp.int32)]

    return fn


def from_scheduler_config(config: Mapping[str, Any]) -> DiscreteSchedule:
  """The schedule of a diffusers scheduler_config.json (any scheduler class).

  Reads num_train_timesteps, the betas (beta_schedule and beta_start /
  beta_end, or trained_betas), prediction_type, timestep_spacing,
  steps_offset and set_alpha_to_one (DDIM's final step). The sampler is
  chosen separately (config.sample.sampler).

  Raises:
    ValueError: a beta schedule, prediction type or option not supported,
      named with the supported ones.
  """
  cfg = dict(config)
  if cfg.get('rescale_betas_zero_snr'):
    raise ValueError('scheduler option rescale_betas_zero_snr=True is not '
                     'supported (its last timestep has infinite noise).')
  num = int(cfg.get('num_train_timesteps', 1000))
  if cfg.get('trained_betas') is not None:
    betas = np.asarray(cfg['trained_betas'], np.float64)
  else:
    name = cfg.get('beta_schedule', 'linear')
    start = float(cfg.get('beta_start', 0.0001))
    end = float(cfg.get('beta_end', 0.02))
    if name == 'linear':
      betas = np.linspace(start, end, num, dtype=np.float32)
    elif name == 'scaled_linear':
      betas = np.linspace(start ** 0.5, end ** 0.5, num, dtype=np.float32) ** 2
    elif name == 'squaredcos_cap_v2':
      betas = _cosine_betas(num)
    else:
      raise ValueError(f'Unknown beta_schedule {name!r}; supported: '
                       f'{BETA_SCHEDULES} or trained_betas.')
  # diffusers computes alphas_cumprod in float32 (torch.cumprod of float32
  # betas): rounding it the same way keeps the timesteps' log-SNRs exact.
  betas = np.asarray(betas, np.float32)
  alphas_cumprod = np.cumprod(1.0 - betas, dtype=np.float32).astype(
      np.float64)
  pred = cfg.get('prediction_type', 'epsilon')
  if pred not in PREDICTION_TYPES:
    raise ValueError(f'Unknown prediction_type {pred!r}; supported: '
                     f'{sorted(PREDICTION_TYPES)}.')
  # Unset (or marked by diffusers as a default it filled in): each sampler's
  # scheduler class uses its own default.
  spacing = cfg.get('timestep_spacing')
  if 'timestep_spacing' in cfg.get('_use_default_values', ()):
    spacing = None
  if spacing is not None and spacing not in TIMESTEP_SPACINGS:
    raise ValueError(f'Unknown timestep_spacing {spacing!r}; supported: '
                     f'{TIMESTEP_SPACINGS}.')
  final = (math.inf if cfg.get('set_alpha_to_one', True)
           else float(np.log(alphas_cumprod[0]) - np.log1p(-alphas_cumprod[0])))
  return DiscreteSchedule(alphas_cumprod=alphas_cumprod,
                          target=PREDICTION_TYPES[pred],
                          timestep_spacing=spacing,
                          steps_offset=int(cfg.get('steps_offset', 0)),
                          final_logsnr=final)


# Karras et al. 2022 (EDM) sigmas of a variance-exploding model ---------------


def karras_sigmas(num_steps: int, sigma_min: float, sigma_max: float,
                  rho: float = 7.0) -> np.ndarray:
  """float64 [num_steps] decreasing sigmas (Karras et al. 2022, Eq. 5):
  (max^(1/rho) + i / (N - 1) (min^(1/rho) - max^(1/rho)))^rho, as
  diffusers' EulerDiscreteScheduler._convert_to_karras."""
  ramp = np.linspace(0, 1, int(num_steps))
  lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
  return (hi + ramp * (lo - hi)) ** rho


def karras_grid(config: Mapping[str, Any], num_steps: int) -> dict[str, Any]:
  """The log-SNR grid of diffusers' EulerDiscreteScheduler with Karras sigmas.

  Stable Video Diffusion's scheduler (use_karras_sigmas, timestep_type
  'continuous', v-prediction): sigma_min / sigma_max from the config (else
  the ends of its betas' sigmas at its spaced timesteps), rho 7, then sigma
  = 0 (final_sigmas_type 'zero') or the first training sigma ('sigma_min').
  A variance-exploding x_VE at sigma is this library's variance-preserving
  z = x_VE / sqrt(sigma^2 + 1) at logsnr = -2 ln sigma, and Euler's step on
  sigma is DDIM's on log-SNR (eta = 0), so the library's DDIM runs it.

  Args:
    config: a scheduler_config.json (its use_karras_sigmas must be true).
    num_steps: sampler steps.

  Returns:
    {'logsnrs': float32 [num_steps + 1] increasing (the last may be inf),
     'sigmas': float32 [num_steps + 1], 'timesteps': float32 [num_steps]
     (the pipeline's c_noise = ln(sigma) / 4), 'denoise_last',
     'init_scale': diffusers' initial latents (unit normal) times this are
     this library's z at the first log-SNR (the scheduler's
     init_noise_sigma over sqrt(sigma_0^2 + 1)).}
  """
  cfg = dict(config)
  if not cfg.get('use_karras_sigmas'):
    raise ValueError('karras_grid needs a scheduler config with '
                     'use_karras_sigmas=true (Stable Video Diffusion\'s).')
  lo, hi = cfg.get('sigma_min'), cfg.get('sigma_max')
  schedule = from_scheduler_config(cfg)
  table_sigmas = np.exp(-0.5 * schedule.logsnr_table())
  if lo is None or hi is None:
    t = schedule.timesteps(num_steps, cfg.get('timestep_spacing',
                                              'linspace'))
    ends = np.interp(t.astype(np.float64), np.arange(table_sigmas.shape[0]),
                     table_sigmas)
    lo = ends[-1] if lo is None else lo
    hi = ends[0] if hi is None else hi
  final = cfg.get('final_sigmas_type', 'zero')
  if final not in ('zero', 'sigma_min'):
    raise ValueError(f'Unknown final_sigmas_type {final!r}; supported: '
                     "'zero', 'sigma_min'.")
  last = 0.0 if final == 'zero' else table_sigmas[0]
  sigmas = np.append(karras_sigmas(num_steps, float(lo), float(hi)),
                     last).astype(np.float32)
  init = sigmas.max()
  if cfg.get('timestep_spacing', 'linspace') not in ('linspace', 'trailing'):
    init = math.sqrt(float(init) ** 2 + 1)
  with np.errstate(divide='ignore'):
    logsnrs = -2.0 * np.log(sigmas.astype(np.float64))
  return {'logsnrs': logsnrs.astype(np.float32), 'sigmas': sigmas,
          'timesteps': (0.25 * np.log(sigmas[:-1])).astype(np.float32),
          'denoise_last': final == 'zero',
          'init_scale': float(init / math.sqrt(float(sigmas[0]) ** 2 + 1))}
