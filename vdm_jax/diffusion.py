"""Forward process, parameterizations and the training loss (Ho et al. 2022, 2).

q(z_t | x) = N(alpha_t x, sigma_t^2 I), with alpha_t, sigma_t from the log-SNR.
The network predicts one of (VDM 2, Salimans & Ho 2022):
  'eps': the noise eps,             x = (z - sigma eps) / alpha
  'v':   v = alpha eps - sigma x,   x = alpha z - sigma v,  eps = sigma z + alpha v
  'x':   the clean data x,          eps = (z - alpha x) / sigma
This module never imports a model: the denoiser is an argument,
`denoise_fn(z, logsnr, cond) -> prediction`, where `cond` is a dict of optional
model inputs ('label': int32[B], 'frame_mask': bool[B, T]).

Noise (config.diffusion.noise): 'iid', or VideoFusion's decomposed noise
(Luo et al. 2023) eps_i = sqrt(lam_i) b + sqrt(1 - lam_i) r_i, with one base
noise b per clip and a residual r_i per frame. It turns the forward process
into q(z_t | x) = N(alpha_t x, sigma_t^2 S), where S acts across the frames
of each pixel (S_ii = 1, S_ij = sqrt(lam_i lam_j)). In the whitened
coordinates S^{-1/2} z it is the standard process, and the conversions below
use one alpha, sigma for all frames of a clip, so they commute with S^{1/2}
and hold unchanged; the samplers stay exact when their fresh noise is drawn
the same way (sampling.py).
"""

from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdm_jax import schedules

TARGETS = ('eps', 'v', 'x')
TIME_SAMPLING = ('uniform', 'low_discrepancy')
# 'iid': independent noise per element; 'decomposed': VideoFusion's base
# noise shared by the frames of a clip plus a residual per frame.
NOISE_TYPES = ('iid', 'decomposed')
# fold_in data deriving the base / salted residual keys from a noise key.
_BASE_STREAM = 0x62617365
_RESIDUAL_STREAM = 0x72657369

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


def sample_noise(rng: jax.Array, shape: tuple[int, ...]) -> jnp.ndarray:
  """Standard normal noise of `shape` ([B, T, H, W, C]), i.i.d."""
  return jax.random.normal(rng, shape, jnp.float32)


def frame_lambdas(noise_lambda: Any, num_frames: int) -> np.ndarray:
  """Checked per-frame VideoFusion lambdas from a config value.

  Args:
    noise_lambda: a scalar (every frame) or a sequence of num_frames values,
      each in [0, 1]: the share of each frame's noise variance that is the
      base noise shared by the clip.
    num_frames: T, the video frames of a clip (image frames of joint
      training are extra and get lambda 0, see `frame_mask_lambdas`).

  Returns:
    float32 scalar (a scalar applies to clips of any length) or [T].

  Raises:
    ValueError: a value outside [0, 1] or a sequence of the wrong length.
  """
  lam = np.asarray(noise_lambda, np.float64)
  if lam.ndim > 1 or (lam.ndim == 1 and lam.shape[0] != num_frames):
    raise ValueError(
        f'diffusion.noise_lambda must be a scalar or one value per frame'
        f' ({num_frames} = data.num_frames); got {noise_lambda!r}.'
    )
  if not np.all(np.isfinite(lam)) or np.any((lam < 0) | (lam > 1)):
    raise ValueError(
        f'diffusion.noise_lambda must lie in [0, 1]; got {noise_lambda!r}.'
    )
  return lam.astype(np.float32)


def frame_mask_lambdas(lam: jnp.ndarray, frame_mask: jnp.ndarray
                       ) -> jnp.ndarray:
  """Per-example lambdas for joint image-video batches.

  Image frames (frame_mask False) are independent images, so they get
  lambda 0 (i.i.d. noise, no share of the clip's base noise). The video
  frames come first (data.pipeline's layout), so frame i < T keeps lam[i].

  Args:
    lam: scalar or [T] per-frame lambdas of the video frames.
    frame_mask: bool [B, T'] with T' >= T; True = video frame.

  Returns:
    float32 [B, T'].
  """
  lam = jnp.asarray(lam, jnp.float32)
  if lam.ndim:
    pad = frame_mask.shape[1] - lam.shape[0]
    if pad < 0:
      raise ValueError(
          f'frame_mask has {frame_mask.shape[1]} frames, fewer than the'
          f' {lam.shape[0]} noise lambdas.'
      )
    lam = jnp.pad(lam, (0, pad))
  return jnp.where(frame_mask, lam, 0.0)


def decomposed_noise(
    rng: jax.Array,
    shape: tuple[int, ...],
    noise_lambda: Any,
    residual_salt: Any = None,
) -> jnp.ndarray:
  """VideoFusion noise eps_i = sqrt(lam_i) b + sqrt(1 - lam_i) r_i.

  b ([..., 1, H, W, C]) is one base noise per clip, shared by its frames;
  r_i one residual per frame; both standard normal, so every element of eps
  has unit variance and frames i != j of a clip have correlation
  sqrt(lam_i lam_j) (lam for a scalar). The residual is drawn from `rng`
  itself, exactly as `sample_noise(rng, shape)`, so lam = 0 reproduces the
  i.i.d. noise bit for bit; the base comes from fold_in(rng, _BASE_STREAM).

  Args:
    rng: PRNG key.
    shape: [B, T, H, W, C] (or [T, H, W, C] for one clip): frames are axis
      -4.
    noise_lambda: scalar, [T] or [B, T] (e.g. 0 on image frames), values in
      [0, 1] (not checked here: use `frame_lambdas` at config time).
    residual_salt: None, or an int32 scalar: the residual then comes from
      fold_in(fold_in(rng, _RESIDUAL_STREAM), salt), so calls with the same
      rng and different salts share the base noise and have independent
      residuals (VideoFusion's long videos, `sample.fixed_base_noise`).

  Returns:
    float32 `shape`.
  """
  frame_axis = len(shape) - 4
  if frame_axis < 0:
    raise ValueError(f'Noise shape must be [..., T, H, W, C]; got {shape}.')
  base_shape = shape[:frame_axis] + (1,) + shape[frame_axis + 1:]
  base = jax.random.normal(jax.random.fold_in(rng, _BASE_STREAM), base_shape,
                           jnp.float32)
  rng_r = rng
  if residual_salt is not None:
    rng_r = jax.random.fold_in(jax.random.fold_in(rng, _RESIDUAL_STREAM),
                               residual_salt)
  residual = sample_noise(rng_r, shape)
  lam = jnp.asarray(noise_lambda, jnp.float32)
  lam = lam.reshape(lam.shape + (1, 1, 1))
  return jnp.sqrt(lam) * base + jnp.sqrt(1.0 - lam) * residual


@flax.struct.dataclass
class DecomposedNoise:
  """A noise function (rng, shape) -> eps drawing `decomposed_noise`.

  A pytree: lambdas and salt are traced, so the samplers compile once for
  any values (see sampling.sample's `noise_fn`).

  Attributes:
    noise_lambda: float32 scalar, [T] or [B, T] lambdas.
    residual_salt: None or int32 scalar, see `decomposed_noise`.
  """

  noise_lambda: jnp.ndarray
  residual_salt: Any = None

  def __call__(self, rng: jax.Array, shape: tuple[int, ...]) -> jnp.ndarray:
    return decomposed_noise(rng, shape, self.noise_lambda, self.residual_salt)


def check_noise(name: str) -> None:
  if name not in NOISE_TYPES:
    raise ValueError(
        f'Unknown diffusion.noise {name!r}; choose one of {NOISE_TYPES}.'
    )


def noise_lambda_from_config(
    diffusion_config: ml_collections.ConfigDict, num_frames: int
) -> np.ndarray | None:
  """Checked lambdas (scalar or [T]) of config.diffusion; None for 'iid'."""
  name = diffusion_config.get('noise', 'iid')
  check_noise(name)
  if name == 'iid':
    return None
  return frame_lambdas(diffusion_config.get('noise_lambda', 0.5), num_frames)


def batch_noise_lambda(
    diffusion_config: ml_collections.ConfigDict,
    num_frames: int,
    frame_mask: jnp.ndarray,
) -> jnp.ndarray | None:
  """`loss`'s noise_lambda for a training batch: None for 'iid'.

  Args:
    diffusion_config: config.diffusion.
    num_frames: T (data.num_frames).
    frame_mask: bool [B, T + image_frames]; image frames get lambda 0.

  Returns:
    None or float32 [B, T + image_frames].
  """
  lam = noise_lambda_from_config(diffusion_config, num_frames)
  if lam is None:
    return None
  return frame_mask_lambdas(lam, frame_mask)


def noise_fn_from_config(
    diffusion_config: ml_collections.ConfigDict,
    num_frames: int,
    frame_mask: jnp.ndarray | None = None,
) -> Callable[[jax.Array, tuple[int, ...]], jnp.ndarray]:
  """The sampler noise function of config.diffusion (validated).

  Args:
    diffusion_config: config.diffusion ('noise', 'noise_lambda').
    num_frames: T (data.num_frames).
    frame_mask: optional bool [B, T'] (False = image frame: i.i.d. noise).

  Returns:
    `sample_noise` for 'iid', a `DecomposedNoise` for 'decomposed'.
  """
  lam = noise_lambda_from_config(diffusion_config, num_frames)
  if lam is None:
    return sample_noise
  lam = jnp.asarray(lam)
  if frame_mask is not None:
    lam = frame_mask_lambdas(lam, jnp.asarray(frame_mask, bool))
  return DecomposedNoise(noise_lambda=lam)


def _draw_noise(rng, shape, noise_lambda):
  if noise_lambda is None:
    return sample_noise(rng, shape)
  return decomposed_noise(rng, shape, noise_lambda)


def _example_draws(rng, shape, noise_lambda=None):
  rng_t, rng_eps = jax.random.split(rng)
  return jax.random.uniform(rng_t, ()), _draw_noise(rng_eps, shape,
                                                    noise_lambda)


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
    noise_lambda: jnp.ndarray | None = None,
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
    noise_lambda: None for i.i.d. noise, or VideoFusion's decomposed noise
      with these lambdas: a scalar, [T] or [B, T] (`frame_mask_lambdas`
      gives image frames lambda 0). The network still regresses the whole
      eps (one denoiser, no separate base / residual generators).

  Returns:
    LossOutput of [B] arrays; the caller reduces and weights them.
  """
  check_target(target)
  if rng.shape == (x.shape[0],):  # One key per example.
    if time_sampling != 'uniform':
      raise ValueError(
          f'time_sampling={time_sampling!r} couples the examples of a batch;'
          ' per-example keys need uniform time sampling.'
      )
    if noise_lambda is None:
      t, eps = jax.vmap(lambda k: _example_draws(k, x.shape[1:]))(rng)
    else:
      lam = jnp.broadcast_to(jnp.asarray(noise_lambda, jnp.float32),
                             x.shape[:2])
      t, eps = jax.vmap(
          lambda k, l: _example_draws(k, x.shape[1:], l))(rng, lam)
  else:
    rng_t, rng_eps = jax.random.split(rng)
    t = sample_time(rng_t, x.shape[0], time_sampling)
    eps = _draw_noise(rng_eps, x.shape, noise_lambda)
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
