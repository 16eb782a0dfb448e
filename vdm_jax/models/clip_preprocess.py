"""Stable Video Diffusion's CLIP image preprocessing as a pure JAX function.

diffusers' StableVideoDiffusionPipeline (diffusers/pipelines/
stable_video_diffusion/pipeline_stable_video_diffusion.py, `_encode_image`)
resizes the conditioning image to CLIP's 224x224 without a crop, with its
own antialiasing (`_resize_with_antialiasing`: a gaussian blur whose sigma
follows the scale factor, as skimage's `resize`, then bicubic interpolation
with align_corners=True), and normalises it with the feature extractor's
mean and std. Both separable steps are linear, so each axis is one matrix,
built on the host from the static sizes.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys' cubic convolution weights of the taps at -1, 0, 1, 2 ([.., 4]).

  torch's bicubic interpolation uses a = -0.75
  (aten/src/ATen/native/UpSample.h, `cubic_convolution1/2`).
  """
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] torch `interpolate(mode='bicubic', align_corners=True)`.

  Source coordinate i * (n_in - 1) / (n_out - 1); taps beyond the edge read
  the edge pixel (torch's `upsample_get_value_bounded`).
  """
  # Coordinates and weights in float32, as torch computes them (float64
  # here would differ from torch by up to ~1e-5 of the pixel values).
  f32 = np.float32
  scale = f32(n_in - 1) / f32(n_out - 1) if n_out > 1 else f32(0)
  x = np.arange(n_out, dtype=f32) * scale
  x0 = np.floor(x)
  w = _cubic_weights(x - x0, f32(-0.75)).astype(np.float64)
  x0 = x0.astype(np.int64)
  m = np.zeros((n_out, n_in))
  for k in range(4):
    np.add.at(m, (np.arange(n_out), np.clip(x0 - 1 + k, 0, n_in - 1)),
              w[:, k])
  return m


def _gaussian_blur_matrix(n: int, sigma: float, size: int) -> np.ndarray:
  """[n, n] a 1-D gaussian blur with reflect padding, as diffusers' SVD.

  `_gaussian` and `_filter2d` of diffusers/pipelines/stable_video_diffusion/
  pipeline_stable_video_diffusion.py: an odd `size`-tap kernel
  exp(-x^2 / (2 sigma^2)) normalised to sum 1, 'reflect' padding (the edge
  pixel not repeated).
  """
  x = np.arange(size) - size // 2
  kernel = np.exp(-x.astype(np.float64)**2 / (2 * sigma**2))
  kernel /= kernel.sum()
  m = np.zeros((n, n))
  for i in range(n):
    src = i + x
    src = np.where(src < 0, -src, src)
    src = np.where(src > n - 1, 2 * (n - 1) - src, src)
    np.add.at(m[i], src, kernel)
  return m


def resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] diffusers' `_resize_with_antialiasing` along one axis.

  A gaussian blur with sigma max((n_in / n_out - 1) / 2, 0.001) and
  int(max(4 sigma, 3)) taps (made odd), then bicubic interpolation with
  align_corners=True (diffusers/pipelines/stable_video_diffusion/
  pipeline_stable_video_diffusion.py, after skimage's `resize`).
  """
  sigma = max((n_in / n_out - 1.0) / 2.0, 0.001)
  size = int(max(2.0 * 2 * sigma, 3))
  size += 1 - size % 2
  if size // 2 >= n_in:
    raise ValueError(f'Cannot resize {n_in} pixels to {n_out}: the blur of '
                     f'{size} taps needs more than {size // 2} pixels.')
  return _bicubic_matrix(n_in, n_out) @ _gaussian_blur_matrix(n_in, sigma,
                                                               size)


def svd_image_preprocess(images: Array, image_mean: Sequence[float],
                         image_std: Sequence[float], size: int = 224
                         ) -> Array:
  """Stable Video Diffusion's image-encoder input from [-1, 1] images.

  diffusers' StableVideoDiffusionPipeline `_encode_image`: resize to
  size x size without a crop, antialiased (`_resize_with_antialiasing`),
  then to [0, 1] and CLIP's normalisation (the feature extractor's
  image_mean / image_std; no further resize, crop or rescale). The resize is
  one matrix per axis (blur and interpolation composed, float64 on the
  host), so it is exact up to float32 rounding and jit-friendly.

  Args:
    images: [B, H, W, C] in [-1, 1].
    image_mean: C means of the feature extractor (preprocessor_config.json).
    image_std: C standard deviations.
    size: the CLIP input side (the vision model's image_size, 224).

  Returns:
    [B, size, size, C] float32 pixel values for CLIPVisionModel.
  """
  _, h, w, _ = images.shape
  mh = jnp.asarray(resize_matrix(h, size), jnp.float32)
  mw = jnp.asarray(resize_matrix(w, size), jnp.float32)
  x = jnp.einsum('ph,bhwc,qw->bpqc', mh, images.astype(jnp.float32), mw,
                 precision=jax.lax.Precision.HIGHEST)
  x = (x + 1.0) / 2.0
  mean = jnp.asarray(image_mean, jnp.float32)
  std = jnp.asarray(image_std, jnp.float32)
  return (x - mean) / std
