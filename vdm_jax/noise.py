"""The noise of training and of every sampler, as one object.

`config.diffusion.noise` picks it:
  'iid'         independent standard normal noise per element (VDM 2);
  'decomposed'  VideoFusion's decomposed noise (Luo et al. 2023, eq. 4):
                eps_i = sqrt(lam_i) b + sqrt(1 - lam_i) r_i, one base noise
                b per clip shared by its frames and a residual r_i per frame.
Both have unit variance per element; frames i != j of a clip correlate by
sqrt(lam_i lam_j) under 'decomposed'. The forward process becomes
q(z_t | x) = N(alpha_t x, sigma_t^2 S) with S_ij = sqrt(lam_i lam_j)
(S_ii = 1) across the frames of each pixel; diffusion.py and sampling.py
explain why the conversions and samplers stay exact for it.

`from_config(config.diffusion, num_frames)` builds a `Noise`; its one
method `draw(rng, shape)` (also `noise(rng, shape)`) is used by the loss, by
every sampler (z_1, step noise, Langevin noise, forward samples of
replacement) and by DDIM inversion's callers. A `Noise` is a pytree whose
lambdas and salt are traced, so the samplers compile once for any values.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

NOISE_TYPES = ('iid', 'decomposed')
# fold_in data deriving the base / salted residual keys from a noise key.
_BASE_STREAM = 0x62617365
_RESIDUAL_STREAM = 0x72657369


def with_key_frame(lam: np.ndarray, key_frame: int) -> np.ndarray:
  """Lambdas with VideoFusion's key frame whose whole noise is the base.

  Args:
    lam: float32 [T] lambdas (frame_lambdas broadcast to the frames).
    key_frame: -1 (lam unchanged) or the frame k whose lambda becomes 1
      where it is > 0 (lambda 0 stays i.i.d. noise): the base generator of
      vdm_jax/videofusion.py then reads b alone on that frame.

  Returns:
    float32 [T].
  """
  lam = np.array(lam, np.float32)
  if key_frame < 0:
    return lam
  if lam.ndim != 1 or key_frame >= lam.shape[0]:
    raise ValueError(f'diffusion.noise_key_frame={key_frame} is not a frame'
                     f' of the {lam.shape} lambdas.')
  if lam[key_frame] > 0:
    lam[key_frame] = 1.0
  return lam


def frame_lambdas(noise_lambda: Any, num_frames: int) -> np.ndarray:
  """Checked per-frame VideoFusion lambdas from a config value.

  Args:
    noise_lambda: a scalar (every frame) or a sequence of num_frames values,
      each in [0, 1]: the share of each frame's noise variance that is the
      base noise shared by the clip.
    num_frames: T, the video frames of a clip (image frames of joint
      training are extra and get lambda 0, see `Noise.for_frames`).

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


@flax.struct.dataclass
class Noise:
  """A noise distribution: i.i.d. (noise_lambda None) or decomposed.

  Attributes:
    noise_lambda: None (i.i.d.), or float32 scalar, [T] or [B, T] lambdas
      of VideoFusion's decomposed noise.
    residual_salt: None, or an int32 scalar: the residual then comes from
      fold_in(fold_in(rng, _RESIDUAL_STREAM), salt), so draws with the same
      rng and different salts share the base noise and have independent
      residuals (VideoFusion's long videos, `sample.fixed_base_noise`).
  """

  noise_lambda: Any = None
  residual_salt: Any = None

  @property
  def decomposed(self) -> bool:
    return self.noise_lambda is not None

  def draw(self, rng: jax.Array, shape: tuple[int, ...]) -> jnp.ndarray:
    """Noise of `shape` ([B, T, H, W, C], or [T, H, W, C] for one clip).

    I.i.d.: jax.random.normal(rng, shape). Decomposed: the residual is drawn
    from `rng` itself exactly as the i.i.d. noise (so lambda = 0 reproduces
    it bit for bit) and the base ([..., 1, H, W, C]) from
    fold_in(rng, _BASE_STREAM).

    Returns:
      float32 `shape`.
    """
    if self.noise_lambda is None:
      return jax.random.normal(rng, shape, jnp.float32)
    frame_axis = len(shape) - 4
    if frame_axis < 0:
      raise ValueError(f'Noise shape must be [..., T, H, W, C]; got {shape}.')
    base_shape = shape[:frame_axis] + (1,) + shape[frame_axis + 1:]
    base = jax.random.normal(jax.random.fold_in(rng, _BASE_STREAM),
                             base_shape, jnp.float32)
    rng_r = rng
    if self.residual_salt is not None:
      rng_r = jax.random.fold_in(
          jax.random.fold_in(rng, _RESIDUAL_STREAM), self.residual_salt)
    residual = jax.random.normal(rng_r, shape, jnp.float32)
    lam = jnp.asarray(self.noise_lambda, jnp.float32)
    lam = lam.reshape(lam.shape + (1, 1, 1))
    return jnp.sqrt(lam) * base + jnp.sqrt(1.0 - lam) * residual

  __call__ = draw

  def for_frames(self, frame_mask: jnp.ndarray) -> 'Noise':
    """The noise of a joint image-video batch.

    Image frames (frame_mask False) are independent images, so they get
    lambda 0 (i.i.d., no share of the clip's base noise). The video frames
    come first (data.pipeline's layout), so frame i < T keeps lambda_i.

    Args:
      frame_mask: bool [B, T'] with T' >= T; True = video frame.

    Returns:
      self for i.i.d. noise, else a Noise with float32 [B, T'] lambdas.
    """
    if self.noise_lambda is None:
      return self
    lam = jnp.asarray(self.noise_lambda, jnp.float32)
    frame_mask = jnp.asarray(frame_mask, bool)
    if lam.ndim:
      pad = frame_mask.shape[1] - lam.shape[-1]
      if pad < 0:
        raise ValueError(
            f'frame_mask has {frame_mask.shape[1]} frames, fewer than the'
            f' {lam.shape[-1]} noise lambdas.'
        )
      lam = jnp.pad(lam, (0, pad))
    return self.replace(noise_lambda=jnp.where(frame_mask, lam, 0.0))

  def with_salt(self, salt: Any) -> 'Noise':
    """The same base noise with residuals salted by `salt` (int32)."""
    return self.replace(residual_salt=jnp.int32(salt))

  def per_example(self, batch: int, num_frames: int) -> 'Noise':
    """Lambdas broadcast to [B, T], so the Noise can be vmapped over B."""
    if self.noise_lambda is None:
      return self
    return self.replace(noise_lambda=jnp.broadcast_to(
        jnp.asarray(self.noise_lambda, jnp.float32), (batch, num_frames)))

  def check_frames(self, num_frames: int) -> None:
    """Raises if per-frame lambdas do not match samples of num_frames."""
    lam = self.noise_lambda
    if lam is not None and np.ndim(lam) == 1 and np.shape(lam)[0] != (
        num_frames):
      raise ValueError(
          f'diffusion.noise_lambda has {np.shape(lam)[0]} per-frame values'
          f' but the samples have {num_frames} frames.'
      )


def from_config(diffusion_config: ml_collections.ConfigDict,
                num_frames: int) -> Noise:
  """The checked Noise of config.diffusion ('noise', 'noise_lambda').

  Args:
    diffusion_config: config.diffusion.
    num_frames: T (data.num_frames), the length of per-frame lambdas.

  Raises:
    ValueError: an unknown noise type or bad lambdas.
  """
  name = diffusion_config.noise
  if name not in NOISE_TYPES:
    raise ValueError(
        f'Unknown diffusion.noise {name!r}; choose one of {NOISE_TYPES}.'
    )
  if name == 'iid':
    return Noise()
  lam = frame_lambdas(diffusion_config.noise_lambda, num_frames)
  key = diffusion_config.get('noise_key_frame', -1)
  if key >= 0:  # VideoFusion's key frame (vdm_jax/videofusion.py).
    lam = with_key_frame(np.broadcast_to(lam, (num_frames,)), key)
  return Noise(noise_lambda=jnp.asarray(lam))
