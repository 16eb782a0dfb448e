"""Samplers and guidance for video diffusion (Ho et al. 2022, 2 and 3.1).

Every sampler is one jitted `lax.scan` over timesteps t_i = 1 - i / N
(i = 0..N-1, s_i = t_{i+1}), so the denoiser is traced once however many steps
are taken; step i draws its noise from `fold_in(rng, i)`. The log-SNR of the
N + 1 grid points is computed outside the compiled program and passed in as an
array, so the program depends on N only through that array's length.

Samplers (VDM 2; DDIM: Song et al. 2021, eq. 12; predictor-corrector: Song
et al. 2021b, Alg. 2, as VDM 3.1 uses it):
  'ancestral': z_s = mu~_{s|t}(z_t, x_hat)
      + sqrt((sigma~^2_{s|t})^{1-gamma} (sigma^2_{t|s})^gamma) eps.
  'ddim': z_s = alpha_s x_hat + sqrt(sigma_s^2 - c^2) eps_hat + c eps,
      c = eta sigma~_{s|t} (eta = 0: deterministic; eta = 1: ancestral with
      gamma = 0).
  'pc': an ancestral step, then a Langevin corrector at s:
      z_s <- z_s - 1/2 delta sigma_s eps_hat(z_s) + sqrt(delta) sigma_s eps'.
The last step returns x_hat (clipped), with no noise.

Noise: every random draw (z_1, the step noise, Langevin's eps', the forward
samples of replacement) comes from `noise.draw(rng, shape)` with `shape` the
sample shape (noise.py): i.i.d. by default, VideoFusion's decomposed noise
with config.diffusion.noise = 'decomposed'.
With decomposed noise the forward process is q(z_t | x) = N(alpha_t x,
sigma_t^2 S), S the frame covariance of the noise (diffusion.py). The
samplers stay exact for a denoiser that is exact for *that* process: with
W = S^{-1/2} (acting across frames), W z_t is the standard process of the
data W x, the posterior q(z_s | z_t, x) = N(mu~, sigma~^2 S) has the same
mean formula, and W maps each update above (ancestral, DDIM with any eta,
the Langevin corrector, which becomes Langevin preconditioned by S) onto the
standard update with i.i.d. noise. A denoiser trained with i.i.d. noise and
sampled with correlated noise (or the reverse) is a mismatch, not exact.

Image-to-video models are guided on their given frame per frame
(`image_guided`), and Generative Inbetweening's fused bidirectional sampling
(Wang et al. 2024) is a denoiser too (`fused_bidirectional`: the forward
model's prediction fused with the time-flipped backward model's), sampled by
the same scan with noise re-injection (`sample(reinject=...)`).

Guidance turns `denoise_fn` into the (x_hat, eps_hat) the sampler consumes:
classifier-free guidance (VDM 2), replacement (imputation) of the known part
x^a, reconstruction guidance (VDM 3.1, eq. 7) and its spatial super-resolution
variant, composable in one step; see `Guidance`.

Over 500 lines on purpose: guidance and the sampler scan that applies it
are read together (which noise each guidance term draws, where the
corrector re-applies it), so they share one file.
"""

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vdm_jax import diffusion
from vdm_jax import noise as noise_lib
from vdm_jax import schedules

SAMPLERS = ('ancestral', 'ddim', 'pc')
GUIDANCE_METHODS = ('none', 'replacement', 'reconstruction', 'super_resolution')

# (z, logsnr) -> (x_hat, eps_hat), all [B, T, H, W, C]; logsnr [B].
XEpsFn = Callable[[jnp.ndarray, jnp.ndarray], tuple[jnp.ndarray, jnp.ndarray]]


def check_sampler(sampler: str) -> None:
  if sampler not in SAMPLERS:
    raise ValueError(
        f'Unknown sample.sampler {sampler!r}; choose one of {SAMPLERS}.'
    )


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """How to sample: built once from config.sample by the program.

  Attributes:
    sampler: 'ancestral', 'ddim' or 'pc'.
    num_steps: N >= 1.
    gamma: ancestral / pc log-variance interpolation (VDM 2).
    eta: DDIM noise scale (0: deterministic).
    delta: Langevin step size of the pc corrector (VDM: 0.1).
    clip_x: clip x_hat to [-1, 1] at every step.
    guidance_weight: classifier-free guidance weight w (VDM 2); applied by
      `make_guidance` when the model is class-conditional.
    recon_weight: reconstruction guidance weight w_r (VDM 3.1, eq. 7);
      0 conditions frame tasks by replacement.
    remat_guidance: `jax.checkpoint` the denoiser inside guidance gradients.
  """

  sampler: str = 'ancestral'
  num_steps: int = 256
  gamma: float = 0.1
  eta: float = 0.0
  delta: float = 0.1
  clip_x: bool = True
  guidance_weight: float = 0.0
  recon_weight: float = 0.0
  remat_guidance: bool = False

  def __post_init__(self):
    check_sampler(self.sampler)
    if self.num_steps < 1:
      raise ValueError(f'num_steps must be >= 1, got {self.num_steps}.')

  @classmethod
  def from_config(cls, sample_config: ml_collections.ConfigDict
                  ) -> 'SamplerSpec':
    """The spec of config.sample."""
    s = sample_config
    return cls(sampler=s.sampler, num_steps=int(s.num_steps),
               gamma=float(s.gamma), eta=float(s.eta), delta=float(s.delta),
               clip_x=bool(s.clip_x),
               guidance_weight=float(s.guidance_weight),
               recon_weight=float(s.recon_weight),
               remat_guidance=bool(s.remat_guidance))

  def replace(self, **changes) -> 'SamplerSpec':
    return dataclasses.replace(self, **changes)


@flax.struct.dataclass
class Guidance:
  """What to condition on besides `cond`; a pytree (weights are traced).

  Its terms compose (VDM 3.1): known frames x^a (replacement of z^a, and
  with `terms` holding 'frames' the reconstruction-guidance gradient of
  eq. 7) and a low-resolution video (the gradient of the error of a
  bilinear downsample of x_hat, 'lowres') can act in the same step, e.g.
  to upsample a long video block after block conditioned on the overlap
  already upsampled. Both gradients come from one backward pass.

  Attributes:
    terms: the reconstruction terms, a sub-tuple of ('frames', 'lowres').
    replace: z^a is replaced by forward samples alpha x^a + sigma eps
      (imputation) at every step and x^a is returned on the known part.
    cfg_weight: classifier-free guidance weight w (scalar); used when
      `null_label` is not None or `null_text`.
    null_label: label of the unconditional branch (= num_classes); None:
      the labels are not guided.
    null_text: the unconditional branch takes the null text (cond['text']
      is guided; Ho & Salimans 2022 with captions).
    x_a: [B, T, H, W, C] known values (only where `mask` is True matter).
    mask: bool, broadcastable to x_a ([B, T, 1, 1, 1] for frames); True =
      known (the `a` part).
    recon_weight: w_r (scalar) of the frames term.
    x_lowres: [B, T, h, w, C] low-resolution video of the 'lowres' term.
    lowres_weight: w_r (scalar) of the 'lowres' term.
    remat: wrap the denoiser in `jax.checkpoint` under the gradient (bounds
      the memory of guided steps by recomputing activations).
  """

  terms: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())
  replace: bool = flax.struct.field(pytree_node=False, default=False)
  cfg_weight: Any = 0.0
  null_label: int | None = flax.struct.field(pytree_node=False, default=None)
  null_text: bool = flax.struct.field(pytree_node=False, default=False)
  x_a: Any = None
  mask: Any = None
  recon_weight: Any = 0.0
  x_lowres: Any = None
  lowres_weight: Any = 0.0
  remat: bool = flax.struct.field(pytree_node=False, default=False)


# Over 60 lines with its docstring: one check per guidance term, so that a
# bad combination fails here, before the sampler compiles.
def make_guidance(
    *,
    cfg_weight: float = 0.0,
    null_label: int | None = None,
    null_text: bool = False,
    x_a: jnp.ndarray | None = None,
    mask: jnp.ndarray | None = None,
    recon_weight: float = 0.0,
    x_lowres: jnp.ndarray | None = None,
    lowres_weight: float | None = None,
    method: str | None = None,
    remat: bool = False,
) -> Guidance:
  """Builds a checked `Guidance`: the one place guidance is switched on.

  Classifier-free guidance is on when cfg_weight != 0 and null_label is
  given (a class-conditional model sampled with labels) or null_text (a
  text model sampled with prompts); its unconditional branch has the null
  label and the null text. Otherwise the conditional model is used as it
  is. Known frames (x_a, mask) and a
  low-resolution video (x_lowres) may be given together: both terms then
  guide every step.

  Args:
    cfg_weight: classifier-free guidance weight w.
    null_label: the null (unconditional) label, = num_classes; None: the
      model has no labels.
    null_text: cond holds a text to guide (the model's null text is the
      unconditional branch's). With neither, cfg_weight is ignored.
    x_a: [B, T, H, W, C] known video values.
    mask: [B, T] or anything broadcastable to x_a, True where known.
    recon_weight: w_r of the frames; with x_a and method None, w_r > 0
      selects reconstruction guidance and w_r = 0 replacement.
    x_lowres: [B, T, h, w, C] low-resolution video (super-resolution).
    lowres_weight: w_r of the low-resolution term; None: recon_weight.
    method: how known frames condition, forced: 'none', 'replacement',
      'reconstruction' (e.g. with w_r = 0 for tests), or
      'super_resolution' (x_lowres only).
    remat: `jax.checkpoint` the denoiser inside the guidance gradient.

  Returns:
    A Guidance with mask as bool [B, T, 1, 1, 1] (or x_a's rank).
  """
  if method is not None and method not in GUIDANCE_METHODS:
    raise ValueError(
        f'Unknown guidance method {method!r}; choose one of'
        f' {GUIDANCE_METHODS}.'
    )
  if method is None:
    if x_a is None:
      frames = 'none'
    else:
      frames = 'reconstruction' if recon_weight else 'replacement'
  else:
    frames = 'none' if method == 'super_resolution' else method
  if method == 'super_resolution' and x_lowres is None:
    raise ValueError("Guidance 'super_resolution' needs x_lowres.")
  terms = []
  if frames in ('replacement', 'reconstruction'):
    if x_a is None or mask is None:
      raise ValueError(f'Guidance {frames!r} needs x_a and mask.')
    x_a = jnp.asarray(x_a, jnp.float32)
    mask = jnp.asarray(mask, bool)
    mask = mask.reshape(mask.shape + (1,) * (x_a.ndim - mask.ndim))
    if frames == 'reconstruction':
      terms.append('frames')
  else:
    x_a = mask = None
  if x_lowres is not None:
    x_lowres = jnp.asarray(x_lowres, jnp.float32)
    if x_a is not None and (x_lowres.shape[:2] != x_a.shape[:2]
                            or x_lowres.shape[-1] != x_a.shape[-1]):
      raise ValueError(
          f'x_lowres {x_lowres.shape} and x_a {x_a.shape} must have the'
          ' same batch, frames and channels.')
    terms.append('lowres')
  if not cfg_weight:
    null_label, null_text = None, False
  cfg_on = null_label is not None or null_text
  return Guidance(
      terms=tuple(terms),
      replace=x_a is not None,
      cfg_weight=jnp.asarray(cfg_weight if cfg_on else 0.0, jnp.float32),
      null_label=None if null_label is None else int(null_label),
      null_text=bool(null_text),
      x_a=x_a,
      mask=mask,
      recon_weight=jnp.asarray(recon_weight, jnp.float32),
      x_lowres=x_lowres,
      lowres_weight=jnp.asarray(
          recon_weight if lowres_weight is None else lowres_weight,
          jnp.float32),
      remat=remat,
  )


def model_x_eps(
    denoise_fn: diffusion.DenoiseFn, target: str, cond: Mapping[str, Any]
) -> XEpsFn:
  """The plain model as (z, logsnr) -> (x_hat, eps_hat)."""

  def fn(z, logsnr):
    pred = denoise_fn(z, logsnr, cond)
    return diffusion.prediction_to_x_eps(pred, z, logsnr, target)

  return fn


def classifier_free(
    denoise_fn: diffusion.DenoiseFn,
    target: str,
    cond: Mapping[str, Any],
    weight: jnp.ndarray,
    null_label: int | None,
    batched: bool = True,
) -> XEpsFn:
  """Classifier-free guidance, eps~ = (1 + w) eps(z, c) - w eps(z) (VDM 2).

  x~ = (1 + w) x_hat(z, c) - w x_hat(z) is the same combination (x is affine
  in eps at fixed z), taken directly so that v/x models keep their precision;
  w = 0 returns the conditional prediction. The unconditional branch is the
  model with cond['label'] set to `null_label` (when given) and, when cond
  holds a 'text', with 'text_null' set (the model's learned null text).

  Args:
    denoise_fn: (z, logsnr, cond) -> prediction.
    target: the model's parameterization.
    cond: 'label' int32[B] (with null_label) and/or 'text'; other entries
      go to both branches.
    weight: scalar w.
    null_label: the null label (num_classes); None: labels stay.
    batched: evaluate both branches as one call on a batch of 2B.

  Returns:
    (z, logsnr) -> (x~, eps~), each [B, T, H, W, C].
  """
  cond, uncond = dict(cond), dict(cond)
  if null_label is not None:
    if 'label' not in cond:
      raise ValueError("Classifier-free guidance needs cond['label'].")
    label = jnp.asarray(cond['label'], jnp.int32)
    uncond['label'] = jnp.full_like(label, null_label)
  if 'text' in cond:
    b = cond['text'].shape[0]
    cond.setdefault('text_null', jnp.zeros((b,), bool))
    uncond['text_null'] = jnp.ones_like(cond['text_null'])
  elif null_label is None:
    raise ValueError('Classifier-free guidance needs a label or a text.')

  def fn(z, logsnr):
    if batched:
      both = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), dict(cond),
                          uncond)
      pred = denoise_fn(jnp.concatenate([z, z]),
                        jnp.concatenate([logsnr, logsnr]), both)
      pred_c, pred_u = jnp.split(pred, 2)
    else:
      pred_c = denoise_fn(z, logsnr, cond)
      pred_u = denoise_fn(z, logsnr, uncond)
    x_c, eps_c = diffusion.prediction_to_x_eps(pred_c, z, logsnr, target)
    x_u, eps_u = diffusion.prediction_to_x_eps(pred_u, z, logsnr, target)
    return (1 + weight) * x_c - weight * x_u, (1 + weight) * eps_c - (
        weight * eps_u)

  return fn


def guidance_ramp(scale_first: float, scale_last: float,
                  num_frames: int) -> jnp.ndarray:
  """float32 [T]: per-frame guidance scales s = 1 + w, linear from the
  given frame to the last (Stable Video Diffusion's image guidance)."""
  return jnp.linspace(scale_first, scale_last, num_frames, dtype=jnp.float32)


def _image_branches(denoise_fn, z, logsnr, cond):
  """(pred with the image, pred with the null image), one batch of 2B."""
  b = z.shape[0]
  cond = dict(cond)
  cond.setdefault('image_null', jnp.zeros((b,), bool))
  uncond = dict(cond, image_null=jnp.ones((b,), bool))
  both = jax.tree.map(lambda a, c: jnp.concatenate([a, c]), cond, uncond)
  pred = denoise_fn(jnp.concatenate([z, z]), jnp.concatenate([logsnr, logsnr]),
                    both)
  return jnp.split(pred, 2)


def _per_frame_cfg(pred_c, pred_u, scale):
  """pred_u + s_f (pred_c - pred_u) with s [T] a scale per frame."""
  s = scale.reshape((1, -1) + (1,) * (pred_c.ndim - 2))
  return pred_u + s * (pred_c - pred_u)


def _image_guided_apply(denoise_fn, scale, z, logsnr, cond):
  return _per_frame_cfg(*_image_branches(denoise_fn, z, logsnr, cond), scale)


def image_guided(denoise_fn: diffusion.DenoiseFn, scale: jnp.ndarray
                 ) -> diffusion.DenoiseFn:
  """Classifier-free guidance of an image-to-video model on its image.

  The prediction is pred(z, null image) + s_f (pred(z, image) - pred(z,
  null image)) with a scale s_f per frame (`guidance_ramp`; SVD: 1 on the
  given frame to 3 on the last): frames far from the given one, which
  depend on it least, are pushed hardest. Combined in the model's
  parameterization (linear in it at fixed z, like x and eps).

  Args:
    denoise_fn: (z, logsnr, cond) -> prediction; cond holds 'image'.
    scale: float [T] per-frame scales.

  Returns:
    A denoise_fn (a tree_util.Partial: the parameters stay traced).
  """
  return jax.tree_util.Partial(_image_guided_apply, denoise_fn,
                               jnp.asarray(scale, jnp.float32))


def averaged_ramp(scale: jnp.ndarray) -> jnp.ndarray:
  """float32 [T]: per-frame scales averaged with their time flip, (s_f +
  s_{T-1-f}) / 2 (Generative Inbetweening's guidance with w = 0.5: both
  models get the same scale on every frame; a linear ramp becomes the
  constant (first + last) / 2)."""
  scale = jnp.asarray(scale, jnp.float32)
  return 0.5 * (scale + jnp.flip(scale, axis=0))


FUSION_WEIGHTS = ('half', 'ramp')


def fusion_weights(kind: str, num_frames: int) -> jnp.ndarray:
  """float32 [T] weight of the forward prediction per frame: 'half'
  (0.5) or 'ramp' (1 on the first keyframe to 0 on the last)."""
  if kind == 'half':
    return jnp.full((num_frames,), 0.5, jnp.float32)
  if kind == 'ramp':
    return jnp.linspace(1.0, 0.0, num_frames, dtype=jnp.float32)
  raise ValueError(f'Unknown sample.inbetween_weight {kind!r}; choose one of'
                   f' {FUSION_WEIGHTS}.')


def _fused_apply(pair_fn, weight, scale, z, logsnr, cond):
  z_b = jnp.flip(z, axis=1)
  cond_f, cond_b = cond['forward'], cond['backward']
  if scale is None:
    pred_f, pred_b = pair_fn(z, z_b, logsnr, cond_f, cond_b)
  else:
    b = z.shape[0]

    def both(c):
      c = dict(c)
      c.setdefault('image_null', jnp.zeros((b,), bool))
      u = dict(c, image_null=jnp.ones((b,), bool))
      return jax.tree.map(lambda a, d: jnp.concatenate([a, d]), c, u)

    pf, pb = pair_fn(jnp.concatenate([z, z]), jnp.concatenate([z_b, z_b]),
                     jnp.concatenate([logsnr, logsnr]), both(cond_f),
                     both(cond_b))
    # Both models are guided with the one `scale`, each in its own time
    # (frame 0 is its keyframe), before the backward prediction is flipped
    # back, as their code does.
    pred_f = _per_frame_cfg(*jnp.split(pf, 2), scale)
    pred_b = _per_frame_cfg(*jnp.split(pb, 2), scale)
  w = weight.reshape((1, -1) + (1,) * (z.ndim - 2))
  return w * pred_f + (1.0 - w) * jnp.flip(pred_b, axis=1)


def fused_bidirectional(pair_fn, weight: jnp.ndarray,
                        scale: jnp.ndarray | None = None
                        ) -> diffusion.DenoiseFn:
  """Generative Inbetweening's fused denoiser (Wang et al. 2024, Sec. 3.4).

  At z, the forward model predicts from z conditioned on the first
  keyframe, the backward model from flip(z) (time reversed) conditioned on
  the last keyframe; the fused prediction is
  w_f pred_fwd + (1 - w_f) flip(pred_bwd), per frame f. Predictions are
  linear in x and eps at fixed z, so this fuses the x and eps estimates
  alike, for any parameterization.

  Args:
    pair_fn: (z_fwd, z_bwd, logsnr, cond_fwd, cond_bwd) -> (pred_fwd,
      pred_bwd), both models in one call (the backward one uses the forward
      one's attention: adapt/inbetween.py), a pytree.
    weight: float [T] forward weights (`fusion_weights`).
    scale: float [T] per-frame image guidance scales, applied to each
      model in its own time (entry 0 on its keyframe), or None (no
      guidance). Their code passes `guidance_ramp` (1 -> 3) with the
      'ramp' weights and, with w = 0.5, that ramp averaged with its flip
      (`averaged_ramp`: a constant 2).

  Returns:
    denoise_fn(z, logsnr, cond) with cond = {'forward': the forward
    model's cond, 'backward': the backward model's}.
  """
  return jax.tree_util.Partial(
      _fused_apply, pair_fn, jnp.asarray(weight, jnp.float32),
      None if scale is None else jnp.asarray(scale, jnp.float32))


def replace_known(
    z: jnp.ndarray,
    logsnr: jnp.ndarray,
    noise: jnp.ndarray,
    x_a: jnp.ndarray,
    mask: jnp.ndarray,
) -> jnp.ndarray:
  """z with z^a replaced by a forward sample alpha x^a + sigma eps (imputation).

  Args:
    z: [B, T, H, W, C] current latent at logsnr ([B]).
    logsnr: [B].
    noise: [B, T, H, W, C] standard noise of the forward sample.
    x_a, mask: known values and where they are known (broadcastable bool).

  Returns:
    [B, T, H, W, C].
  """
  z_a = diffusion.q_sample(x_a, logsnr, noise)
  return jnp.where(mask, z_a, z)


def reconstruction_guided(
    xeps_fn: XEpsFn,
    z: jnp.ndarray,
    logsnr: jnp.ndarray,
    terms: Sequence[tuple[jnp.ndarray, Callable[[jnp.ndarray], jnp.ndarray]]],
    grad_mask: jnp.ndarray | None = None,
    remat: bool = False,
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Reconstruction guidance (VDM 3.1, eq. 7) of a prediction at z.

  x~ = x_hat - (alpha_t / 2) grad_z sum_i w_i ||r_i(x_hat(z))||^2, the
  gradient restricted to ~grad_mask (the b part) when given. eps~ is moved
  consistently: eps = (z - alpha x) / sigma, so d eps = -(alpha / sigma) dx.
  The gradient goes through the whole denoiser (`jax.vjp`) once, whatever
  the number of terms, so a guided step costs a forward and a backward
  pass. (One term: w_1 scales the gradient of ||r_1||^2, as eq. 7 reads.)

  Args:
    xeps_fn: (z, logsnr) -> (x_hat, eps_hat).
    z: [B, T, H, W, C]; logsnr: [B].
    terms: (w_i scalar, r_i) pairs; r_i maps x_hat to the residual whose
      squared norm is the error (x^a - x_hat^a on the known part, or
      y - downsample(x_hat)).
    grad_mask: bool broadcastable to z, True where z is known (no update
      there); None updates all of x_hat (super-resolution).
    remat: `jax.checkpoint` xeps_fn, so activations are recomputed in the
      backward pass instead of stored.

  Returns:
    (x~, eps~), each [B, T, H, W, C].
  """
  if not terms:
    raise ValueError('reconstruction_guided needs at least one term.')
  f = jax.checkpoint(xeps_fn) if remat else xeps_fn
  scale = terms[0][0] if len(terms) == 1 else 1.0

  def err(z_):
    x_hat, eps_hat = f(z_, logsnr)
    if len(terms) == 1:
      total = jnp.sum(jnp.square(terms[0][1](x_hat)))
    else:
      total = sum(w * jnp.sum(jnp.square(r(x_hat))) for w, r in terms)
    return total, (x_hat, eps_hat)

  grad, (x_hat, eps_hat) = jax.grad(err, has_aux=True)(z)
  alpha, sigma = schedules.alpha_sigma(diffusion.broadcast_to_video(logsnr, z))
  dx = -0.5 * scale * alpha * grad
  if grad_mask is not None:
    dx = jnp.where(grad_mask, 0.0, dx)
  return x_hat + dx, eps_hat - (alpha / sigma) * dx


def downsample(x: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
  """Differentiable bilinear (antialiased) spatial downsample.

  Args:
    x: [B, T, H, W, C].
    size: (h, w).

  Returns:
    [B, T, h, w, C].
  """
  b, t, _, _, c = x.shape
  return jax.image.resize(x, (b, t) + tuple(size) + (c,), 'bilinear',
                          antialias=True)


def guided_predictor(
    denoise_fn: diffusion.DenoiseFn,
    target: str,
    cond: Mapping[str, Any],
    guidance: Guidance,
) -> Callable[..., tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]]:
  """(z, logsnr, noise) -> (z', x_hat, eps_hat) with all guidance applied.

  z' is z after replacement of the known part by alpha x^a + sigma noise
  (equal to z when nothing is replaced); the sampler continues from z'.
  x_hat is not clipped here.
  """
  g = guidance
  if g.null_label is not None or g.null_text:
    xeps_fn = classifier_free(denoise_fn, target, cond, g.cfg_weight,
                              g.null_label)
  else:
    xeps_fn = model_x_eps(denoise_fn, target, cond)

  def predict(z, logsnr, noise):
    if g.replace:
      z = replace_known(z, logsnr, noise, g.x_a, g.mask)
    terms = []
    if 'frames' in g.terms:
      terms.append((g.recon_weight,
                    lambda x: jnp.where(g.mask, g.x_a - x, 0.0)))
    if 'lowres' in g.terms:
      size = g.x_lowres.shape[2:4]
      terms.append((g.lowres_weight,
                    lambda x: g.x_lowres - downsample(x, size)))
    if terms:
      x_hat, eps_hat = reconstruction_guided(
          xeps_fn, z, logsnr, terms, g.mask if g.replace else None, g.remat)
    else:
      x_hat, eps_hat = xeps_fn(z, logsnr)
    return z, x_hat, eps_hat

  return predict


def _clip(x_hat, eps_hat, z, logsnr, clip_x):
  """Clips x_hat to [-1, 1] and recomputes eps_hat from it (DDIM)."""
  if not clip_x:
    return x_hat, eps_hat
  x_hat = jnp.clip(x_hat, -1.0, 1.0)
  return x_hat, diffusion.x_to_eps(x_hat, z, logsnr)


def ancestral_step(z, x_hat, noise, logsnr_t, logsnr_s, gamma):
  """One ancestral step t -> s (VDM 2).

  Args:
    z: [B, ...] z_t; x_hat: [B, ...]; noise: [B, ...] standard normal.
    logsnr_t, logsnr_s: scalars, logsnr_s > logsnr_t.
    gamma: scalar log-variance interpolation.

  Returns:
    z_s: [B, ...].
  """
  alpha_t, _ = schedules.alpha_sigma(logsnr_t)
  alpha_s, sigma_s = schedules.alpha_sigma(logsnr_s)
  r = jnp.exp(logsnr_t - logsnr_s)  # e^{lambda_t - lambda_s}
  one_minus_r = -jnp.expm1(logsnr_t - logsnr_s)
  mean = r * (alpha_s / alpha_t) * z + one_minus_r * alpha_s * x_hat
  log_var_tilde = jnp.log(one_minus_r) + 2 * jnp.log(sigma_s)
  log_var_ts = jnp.log(one_minus_r) + jnp.log(jax.nn.sigmoid(-logsnr_t))
  std = jnp.exp(0.5 * ((1 - gamma) * log_var_tilde + gamma * log_var_ts))
  return mean + std * noise


def ddim_step(x_hat, eps_hat, noise, logsnr_t, logsnr_s, eta):
  """One DDIM step t -> s; eta = 0 deterministic, eta = 1 ancestral (gamma 0).

  Also runs backwards (logsnr_s < logsnr_t) with eta = 0 for inversion.
  """
  alpha_s, sigma_s = schedules.alpha_sigma(logsnr_s)
  var_tilde = -jnp.expm1(logsnr_t - logsnr_s) * jnp.square(sigma_s)
  c2 = jnp.square(eta) * jnp.maximum(var_tilde, 0.0)
  return (alpha_s * x_hat + jnp.sqrt(jnp.square(sigma_s) - c2) * eps_hat
          + jnp.sqrt(c2) * noise)


def langevin_step(z, eps_hat, noise, logsnr, delta):
  """Langevin corrector z - 1/2 delta sigma eps_hat + sqrt(delta) sigma eps'."""
  _, sigma = schedules.alpha_sigma(logsnr)
  return z - 0.5 * delta * sigma * eps_hat + jnp.sqrt(delta) * sigma * noise


def renoise(z_s, noise, logsnr_s, logsnr_t):
  """A draw of q(z_t | z_s), t before s: z_s taken back to the noise of t.

  z_t = (alpha_t / alpha_s) z_s + sigma_{t|s} eps, sigma_{t|s}^2 =
  sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2: the variance-preserving form of
  adding N(0, sigma_t^2 - sigma_s^2) in the variance-exploding
  parameterization (Generative Inbetweening's noise re-injection).
  """
  alpha_t, _ = schedules.alpha_sigma(logsnr_t)
  alpha_s, _ = schedules.alpha_sigma(logsnr_s)
  # sigma_{t|s}^2 = sigma_t^2 (1 - e^{lambda_t - lambda_s}).
  var = -jnp.expm1(logsnr_t - logsnr_s) * jax.nn.sigmoid(-logsnr_t)
  return (alpha_t / alpha_s) * z_s + jnp.sqrt(var) * noise


@functools.partial(
    jax.jit, static_argnames=('shape', 'target', 'sampler', 'clip_x',
                              'reinject', 'denoise_last'))
def _sample_scan(denoise_fn, noise, rng, z, logsnrs, cond, guidance, gamma,
                 eta, delta, *, shape, target, sampler, clip_x,
                 reinject=(0, 1), denoise_last=True, logsnrs_to=None):
  """The compiled sampler: one lax.scan over the len(logsnrs) - 1 steps."""
  num_steps = logsnrs.shape[0] - 1
  batch = shape[0]
  rng_init, rng = jax.random.split(rng)
  if z is None:
    z = noise.draw(rng_init, shape)
  predict = guided_predictor(denoise_fn, target, cond, guidance)
  # All of a step's noise in one vmapped draw (one RNG program to compile),
  # each of `shape`: the step noise, the forward-process noise of replacement
  # at t, and for 'pc' the Langevin noise and the replacement noise at s.
  replace = guidance.replace
  names = ['step'] + ['replace_t'] * replace
  if sampler == 'pc':
    names += ['langevin'] + ['replace_s'] * replace

  def step(z, i, key):
    keys = jax.random.split(key, len(names))
    noises = jax.vmap(lambda k: noise.draw(k, shape))(keys)
    noises = dict(zip(names, noises))
    lt = logsnrs[i]
    ls = logsnrs[i + 1] if logsnrs_to is None else logsnrs_to[i]
    last = i == num_steps - 1
    z, x_hat, eps_hat = predict(z, jnp.full((batch,), lt),
                                noises.get('replace_t'))
    x_c, eps_c = _clip(x_hat, eps_hat, z, lt, clip_x)
    if sampler == 'ddim':
      z_s = ddim_step(x_c, eps_c, noises['step'], lt, ls, eta)
    else:
      z_s = ancestral_step(z, x_c, noises['step'], lt, ls, gamma)
    if sampler == 'pc':

      def correct(z_s):
        z_s, _, eps_s = predict(z_s, jnp.full((batch,), ls),
                                noises.get('replace_s'))
        return langevin_step(z_s, eps_s, noises['langevin'], ls, delta)

      z_s = jax.lax.cond(last, lambda z_s: z_s, correct, z_s)
    return jnp.where(last & denoise_last, x_c, z_s)

  reinject_steps, repeats = reinject

  def scan_step(z, i):
    key = jax.random.fold_in(rng, i)
    if not reinject_steps or repeats < 1:
      return step(z, i, key), None
    # Noise re-injection (Wang et al. 2024's code): each of the first
    # reinject_steps steps is taken, then `repeats` times its result is
    # taken back to t and the step taken again: repeats + 1 takes.

    def again(r, z_t):
      k_step, k_back = jax.random.split(jax.random.fold_in(key, r))
      z_s = step(z_t, i, k_step)
      return renoise(z_s, noise.draw(k_back, shape), logsnrs[i + 1],
                     logsnrs[i])

    count = jnp.where(i < reinject_steps, repeats, 0)
    z = jax.lax.fori_loop(0, count, again, z)
    return step(z, i, jax.random.fold_in(key, repeats)
                if reinject_steps else key), None

  x, _ = jax.lax.scan(scan_step, z, jnp.arange(num_steps))
  if guidance.replace:
    x = jnp.where(guidance.mask, guidance.x_a, x)
  return x


@functools.partial(jax.jit, static_argnums=(0, 1))
def timestep_logsnrs(
    logsnr_fn: schedules.LogSNRFn, num_steps: int
) -> jnp.ndarray:
  """logsnr at t_i = 1 - i / N, i = 0..N: float32 [N + 1], increasing.

  Jitted on its own (a small program per schedule and N), so that the
  sampler itself does not depend on the identity of `logsnr_fn`.
  """
  t = 1.0 - jnp.arange(num_steps + 1, dtype=jnp.float32) / num_steps
  return jnp.asarray(logsnr_fn(t), jnp.float32)


def check_grid(logsnrs: Any) -> jnp.ndarray:
  """An explicit log-SNR grid as float32 [N + 1], checked non-decreasing.

  A pretrained model's scheduler fixes its grid (schedules.DiscreteSchedule
  .grid); the last entry may be +inf (the step to t = 0).
  """
  grid = np.asarray(logsnrs, np.float32)
  if grid.ndim != 1 or grid.shape[0] < 2:
    raise ValueError(f'logsnrs must be a vector of N + 1 >= 2 log-SNRs, got '
                     f'shape {grid.shape}.')
  if not np.all(np.diff(grid) >= 0) or np.isnan(grid).any():
    raise ValueError('logsnrs must not decrease (noise to data).')
  return jnp.asarray(grid)


def start_index(num_steps: int, t_start: float) -> int:
  """The grid index i of t_i = 1 - i / N nearest to t_start (< N)."""
  if not 0.0 < t_start <= 1.0:
    raise ValueError(f't_start must lie in (0, 1], got {t_start}.')
  return min(int(round((1.0 - t_start) * num_steps)), num_steps - 1)


def _as_partial(fn):
  """A jit-able pytree for fn: params of a tree_util.Partial stay traced.

  Callables that are pytrees themselves (a tree_util.Partial, a
  flax.struct.dataclass such as noise.Noise) pass through with
  their leaves traced; any other callable becomes a leafless Partial, keyed
  by its identity.
  """
  leaves = jax.tree_util.tree_leaves(fn)
  if len(leaves) != 1 or leaves[0] is not fn:  # A registered pytree.
    return fn
  return jax.tree_util.Partial(fn)


def sample(
    denoise_fn: diffusion.DenoiseFn,
    rng: jax.Array,
    shape: tuple[int, ...],
    *,
    logsnr_fn: schedules.LogSNRFn,
    target: str,
    spec: SamplerSpec = SamplerSpec(),
    noise: noise_lib.Noise | None = None,
    cond: Mapping[str, Any] | None = None,
    guidance: Guidance | None = None,
    z_init: jnp.ndarray | None = None,
    t_start: float = 1.0,
    reinject: tuple[int, int] = (0, 1),
    logsnrs: jnp.ndarray | None = None,
    denoise_last: bool = True,
    logsnrs_to: jnp.ndarray | None = None,
) -> jnp.ndarray:
  """Draws x ~ p(x | cond) with spec.sampler in spec.num_steps steps.

  Compiled once per (shapes, sampler, target, clip_x, denoise_fn, guidance
  terms, noise type); gamma/eta/delta, guidance weights and the leaves of
  `noise` (VideoFusion's lambdas) are traced, so new values do not
  recompile. Pass `denoise_fn` as a `jax.tree_util.Partial(apply, params)`
  (denoiser.make_denoise_fn) to keep the parameters traced arguments rather
  than compile-time constants; a plain function is keyed by its identity.

  Args:
    denoise_fn: (z [B, T, H, W, C], logsnr [B], cond) -> prediction.
    rng: PRNG key, split into the z_1 key and the step key; step i draws
      its noise from fold_in(step key, i).
    shape: (B, T, H, W, C).
    logsnr_fn: schedule t -> logsnr.
    target: the model's parameterization, 'eps', 'v' or 'x'.
    spec: sampler, steps, gamma, eta, delta, clip_x (its guidance weights
      are read by `make_guidance`, not here).
    noise: a noise.Noise (default i.i.d.): z_1, per-step noise, Langevin
      noise and the forward samples of replacement all come from
      noise.draw(key, shape).
    cond: model inputs ('label' int32[B], 'frame_mask' bool[B, T]).
    guidance: a `Guidance` from `make_guidance` (replacement /
      reconstruction / super-resolution and classifier-free guidance);
      None: the plain conditional model.
    z_init: [B, T, H, W, C] starting z_1 (e.g. from `ddim_invert`), or
      z at t_start.
    t_start: start at t = t_start of the num_steps grid instead of t = 1
      (the steps of t > t_start are skipped; `start_index`), from z_init:
      SDEdit-style partial regeneration of an inverted video.
    reinject: (steps, repeats): each of the first `steps` steps is taken,
      then `repeats` times its result is re-noised back to t (`renoise`)
      and the step taken again (Generative Inbetweening's noise
      re-injection as their code does it: `repeats` re-noisings, repeats +
      1 denoiser evaluations per step; steps or repeats 0: none).
    logsnrs: an explicit grid, float32 [N + 1] increasing, used instead of
      logsnr_fn on t_i = 1 - i / N (a pretrained scheduler's timesteps;
      schedules.DiscreteSchedule.grid); N replaces spec.num_steps.
    denoise_last: the last step returns x_hat (the grid ends at t = 0);
      False takes it as a regular step to logsnrs[-1] (diffusers' DDIM with
      set_alpha_to_one=False ends at alpha_bar_0, not at the data).
    logsnrs_to: float32 [N], where step i goes (default logsnrs[1:]);
      step i + 1 still starts at logsnrs[i + 1]. diffusers' DDIMScheduler
      steps from timestep t to t - T // N, which its 'trailing' and
      'linspace' spacings do not list next; this reproduces it.

  Returns:
    x: [B, T, H, W, C] float32.
  """
  diffusion.check_target(target)
  cond = dict(cond or {})
  noise = noise_lib.Noise() if noise is None else noise
  guidance = make_guidance() if guidance is None else guidance
  shape = tuple(int(d) for d in shape)
  if z_init is not None:
    z_init = jnp.asarray(z_init, jnp.float32)
    if z_init.shape != shape:
      raise ValueError(f'z_init shape {z_init.shape} != shape {shape}.')
  if logsnrs is None:
    logsnrs = timestep_logsnrs(logsnr_fn, spec.num_steps)
  else:
    logsnrs = check_grid(logsnrs)
  if t_start != 1.0:
    if z_init is None:
      raise ValueError('t_start < 1 starts from z_init (z at t_start).')
    logsnrs = logsnrs[start_index(logsnrs.shape[0] - 1, t_start):]
  return _sample_scan(
      _as_partial(denoise_fn), _as_partial(noise), rng, z_init,
      logsnrs, cond, guidance,
      spec.gamma, spec.eta, spec.delta, shape=shape, target=target,
      sampler=spec.sampler, clip_x=spec.clip_x,
      reinject=(int(reinject[0]), int(reinject[1])),
      denoise_last=bool(denoise_last),
      logsnrs_to=(None if logsnrs_to is None
                  else jnp.asarray(logsnrs_to, jnp.float32)))


@functools.partial(jax.jit,
                   static_argnames=('target', 'clip_x', 'model_at_next'))
def _invert_scan(denoise_fn, x, logsnrs, cond, *, target, clip_x,
                 model_at_next=False):
  batch = x.shape[0]
  xeps_fn = model_x_eps(denoise_fn, target, cond)

  def step(z, i):
    lt, ls = logsnrs[i], logsnrs[i + 1]
    x_hat, eps_hat = xeps_fn(z, jnp.full((batch,), ls if model_at_next
                                         else lt))
    if model_at_next:  # eps_hat from level ls; z is at lt.
      x_hat = diffusion.eps_to_x(eps_hat, z, jnp.full((batch,), lt))
    x_hat, eps_hat = _clip(x_hat, eps_hat, z, lt, clip_x)
    return ddim_step(x_hat, eps_hat, 0.0, lt, ls, 0.0), None

  z, _ = jax.lax.scan(step, x, jnp.arange(logsnrs.shape[0] - 1))
  return z


def ddim_invert(
    denoise_fn: diffusion.DenoiseFn,
    x: jnp.ndarray,
    *,
    logsnr_fn: schedules.LogSNRFn,
    target: str,
    num_steps: int = 256,
    cond: Mapping[str, Any] | None = None,
    clip_x: bool = False,
    t_end: float = 1.0,
    logsnrs: jnp.ndarray | None = None,
    model_at_next: bool = False,
) -> jnp.ndarray:
  """DDIM inversion x -> z_1: the eta = 0 sampler run from t = 0 to t = 1.

  The mirror of `sample(sampler='ddim', eta=0)` on the same grid: starting at
  z_0 = x (logsnr_max), step t_i -> t_{i+1} uses (x_hat, eps_hat) at t_i,
  z_{t_{i+1}} = alpha x_hat + sigma eps_hat (Song et al. 2021; used by
  Tune-A-Video for editing). Feed the result to `sample(z_init=...)`.

  Args:
    denoise_fn: (z, logsnr, cond) -> prediction.
    x: [B, T, H, W, C] clean video.
    logsnr_fn, target, num_steps, cond: as in `sample`.
    clip_x: clip x_hat to [-1, 1] (off by default: inversion should follow
      the model's ODE).
    t_end: stop at t = t_end of the grid (the mirror of sample's t_start).
    logsnrs: an explicit grid as `sample`'s (float32 [N + 1] increasing; a
      pretrained scheduler's DDIM timesteps, DiscreteSchedule.grid), run
      from logsnrs[-1] (x is z there) to logsnrs[0]; logsnr_fn, num_steps
      and t_end are then unused.
    model_at_next: evaluate the model at each step's destination level
      (with z still at the step's start), as Tune-A-Video's ddim_inversion
      does (showlab/Tune-A-Video, tuneavideo/util.py `next_step`, after
      prompt-to-prompt's null-text inversion); False: at the start level.

  Returns:
    z_1 (z at t_end): [B, T, H, W, C] float32.
  """
  diffusion.check_target(target)
  if logsnrs is None:
    logsnrs = timestep_logsnrs(logsnr_fn, num_steps)
    logsnrs = logsnrs[start_index(num_steps, t_end):][::-1]
  else:
    logsnrs = jnp.asarray(logsnrs, jnp.float32)[::-1]
  return _invert_scan(_as_partial(denoise_fn), jnp.asarray(x, jnp.float32),
                      logsnrs, dict(cond or {}), target=target, clip_x=clip_x,
                      model_at_next=model_at_next)
