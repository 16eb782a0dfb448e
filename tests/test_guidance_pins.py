"""Reconstruction guidance pinned to closed form on a linear-Gaussian model.

For x ~ N(mu, Sigma) the exact denoiser is affine in z (test_sampling),
  x_hat(z) = mu + A (z - alpha mu),  A = alpha Sigma (alpha^2 Sigma
  + sigma^2 I)^{-1},
so the gradient of the reconstruction error is closed-form,
  grad_z ||m (x^a - x_hat(z))||^2 = -2 A^T m (x^a - x_hat),
and VDM (Ho et al. 2022) Sec. 3.1, eq. 7 gives the guided prediction
  x~ = x_hat - (w_r alpha_t / 2) grad_z ||x^a - x_hat^a||^2
on the unknown (b) part only, with eps~ = (z - alpha x~) / sigma moved with
it. The super-resolution variant replaces the error by ||y - D x_hat||^2
(D the bilinear downsample, as a matrix) and updates all of x. Everything
here is computed in float64 numpy and compared with the library in float32.

The statistical test_sampling.test_reconstruction_guidance_beats_replacement
passes with the alpha_t factor dropped or squared and with eps_hat left
unchanged (the ancestral step reads only x_hat); these pins do not: the
corrections are O(0.1) against tolerances of O(1e-5), and the DDIM runs read
eps~. The sampler checks use a zero noise, so that a whole guided run is a
deterministic function of z_1 that numpy can follow step by step.
"""

import flax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import noise as noise_lib
from vdm_jax import sampling
from test_sampling import GaussianOracle, key, make_cov

VIDEO = (2, 4, 4, 1)  # T, H, W, C: 32 dimensions.
N = int(np.prod(VIDEO))
BATCH = 2
MU = np.linspace(-0.4, 0.4, N).reshape(VIDEO)
# Strongly correlated frames, so that x^a moves x_hat^b through A.
COV = make_cov(t=2, h=4, w=4, rho_t=0.9, rho_s=0.6, scale=0.5)
ORACLES = {t: GaussianOracle(MU, COV, t) for t in ('eps', 'x', 'v')}
MASK = np.broadcast_to([True, False], (BATCH, 2))  # Frame 0 known.
M_FLAT = np.broadcast_to(MASK[:, :, None], (BATCH, 2, N // 2)).reshape(
    BATCH, N)
W_R = 3.0
TOL = dict(rtol=2e-4, atol=2e-5)

_RNG = np.random.default_rng(0)
Z = _RNG.standard_normal((BATCH,) + VIDEO)
X_A = MU + 0.8 * _RNG.standard_normal((BATCH,) + VIDEO)
REPLACE_NOISE = _RNG.standard_normal((BATCH,) + VIDEO)
Y_LOW = 0.5 * _RNG.standard_normal((BATCH, 2, 2, 2, 1))
# Per-example log-SNR, away from alpha = sigma so that alpha, alpha^2 and
# sigma are all different factors.
LOGSNR = np.array([-1.0, 0.6])


def alpha_sigma(logsnr):
  logsnr = np.asarray(logsnr, np.float64)
  return np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))


def denoiser_matrix(logsnr):
  """A of x_hat = mu + A (z - alpha mu) at one log-SNR: [N, N]."""
  alpha, sigma = alpha_sigma(logsnr)
  return alpha * COV @ np.linalg.inv(alpha**2 * COV + sigma**2 * np.eye(N))


def flat(a):
  a = np.asarray(a, np.float64)
  return a.reshape(a.shape[0], -1)


def downsample_matrix():
  """D [T*2*2*C, N] of sampling.downsample to 2x2 (it is linear)."""
  basis = np.eye(N, dtype=np.float32).reshape((N,) + VIDEO)
  return flat(sampling.downsample(jnp.asarray(basis), (2, 2))).T


def guided_np(z, logsnr, x_a=None, noise=None, y=None, w_r=W_R):
  """(z', x~, eps~) of eq. 7, float64; z, x_a, noise [B, N], logsnr [B].

  x_a given: frames guidance (replacement of z^a, gradient on b only);
  y given: super-resolution guidance (gradient on all of x).
  """
  z = np.array(z, np.float64)
  x_t, eps_t = np.zeros_like(z), np.zeros_like(z)
  mu = MU.reshape(-1)
  for i, l in enumerate(logsnr):
    alpha, sigma = alpha_sigma(l)
    a_mat = denoiser_matrix(l)
    if x_a is not None:
      z[i] = np.where(M_FLAT[i], alpha * x_a[i] + sigma * noise[i], z[i])
    x_hat = mu + a_mat @ (z[i] - alpha * mu)
    if x_a is not None:
      # -(w alpha / 2) grad, grad = -2 A^T m (x^a - x_hat); b part only.
      dx = w_r * alpha * a_mat.T @ np.where(M_FLAT[i], x_a[i] - x_hat, 0.0)
      dx = np.where(M_FLAT[i], 0.0, dx)
    else:
      d = downsample_matrix()
      dx = w_r * alpha * a_mat.T @ (d.T @ (y[i] - d @ x_hat))
    x_t[i] = x_hat + dx
    eps_t[i] = (z[i] - alpha * x_t[i]) / sigma
  return z, x_t, eps_t


def library_guided(target, guidance, z, logsnr, noise):
  predict = sampling.guided_predictor(ORACLES[target], target, {}, guidance)
  out = predict(jnp.asarray(z, jnp.float32), jnp.asarray(logsnr, jnp.float32),
                jnp.asarray(noise, jnp.float32))
  return [flat(o) for o in out]


def frames_guidance(w_r=W_R):
  return sampling.make_guidance(x_a=X_A, mask=MASK, recon_weight=w_r,
                                method='reconstruction')


@pytest.mark.parametrize('target', ['eps', 'x', 'v'])
def test_frames_guidance_one_prediction(target):
  z_ref, x_ref, eps_ref = guided_np(flat(Z), LOGSNR, flat(X_A),
                                    flat(REPLACE_NOISE))
  z_rep, x_t, eps_t = library_guided(target, frames_guidance(), Z, LOGSNR,
                                     REPLACE_NOISE)
  np.testing.assert_allclose(z_rep, z_ref, **TOL)
  np.testing.assert_allclose(x_t, x_ref, **TOL)
  np.testing.assert_allclose(eps_t, eps_ref, **TOL)
  # The correction is large against the tolerance (a wrong factor shows).
  _, x_plain, _ = guided_np(flat(Z), LOGSNR, flat(X_A), flat(REPLACE_NOISE),
                            w_r=0.0)
  dx = np.abs(x_ref - x_plain)[~M_FLAT]
  assert dx.max() > 0.1, dx.max()


def test_lowres_guidance_one_prediction():
  guidance = sampling.make_guidance(x_lowres=Y_LOW, recon_weight=W_R)
  _, x_ref, eps_ref = guided_np(flat(Z), LOGSNR, y=flat(Y_LOW))
  z_out, x_t, eps_t = library_guided('eps', guidance, Z, LOGSNR,
                                     np.zeros_like(Z))
  np.testing.assert_allclose(z_out, flat(Z), atol=1e-6)  # Nothing replaced.
  np.testing.assert_allclose(x_t, x_ref, **TOL)
  np.testing.assert_allclose(eps_t, eps_ref, **TOL)
  _, x_plain, _ = guided_np(flat(Z), LOGSNR, y=flat(Y_LOW), w_r=0.0)
  # All of x moves, both frames.
  moved = np.abs(x_ref - x_plain).reshape(BATCH, 2, -1).max(-1)
  assert np.all(moved > 0.05), moved


@flax.struct.dataclass
class ZeroNoise(noise_lib.Noise):
  """Every draw of the sampler is zero: a run is deterministic."""

  def draw(self, rng, shape):
    del rng
    return jnp.zeros(shape, jnp.float32)


def logsnr_grid(t):
  """A short linear schedule: logsnr(1) = -2, logsnr(1/2) = 0, logsnr(0) = 2.

  Ends where alpha is far from 0 and 1, so that guidance matters.
  """
  return 2.0 - 4.0 * t


def ancestral_np(z, x, noise, lt, ls, gamma):
  """VDM Sec. 2: z_s = mu~_{s|t} + sqrt(var~^{1-gamma} var_{t|s}^gamma) eps."""
  at, st = alpha_sigma(lt)
  as_, ss = alpha_sigma(ls)
  a_ts = at / as_
  var_ts = st**2 - a_ts**2 * ss**2
  mean = a_ts * ss**2 / st**2 * z + as_ * var_ts / st**2 * x
  var_tilde = var_ts * ss**2 / st**2
  return mean + np.sqrt(var_tilde**(1 - gamma) * var_ts**gamma) * noise


def ddim_np(x, eps, noise, lt, ls, eta):
  """DDIM (Song et al. 2021, eq. 12) in alpha/sigma form."""
  at, st = alpha_sigma(lt)
  as_, ss = alpha_sigma(ls)
  c = eta * ss / st * np.sqrt(st**2 - (at / as_)**2 * ss**2)
  return as_ * x + np.sqrt(ss**2 - c**2) * eps + c * noise


@pytest.mark.parametrize('sampler,gamma,eta', [
    ('ancestral', 0.3, 0.0),
    ('ddim', 0.0, 0.0),
    ('ddim', 0.0, 0.7),
])
@pytest.mark.parametrize('num_steps', [1, 2])
def test_guided_sampler_run(sampler, gamma, eta, num_steps):
  """sample() follows the numpy chain: replace, guide (eq. 7), step."""
  spec = sampling.SamplerSpec(sampler=sampler, num_steps=num_steps,
                              gamma=gamma, eta=eta, clip_x=False)
  x = flat(sampling.sample(
      ORACLES['eps'], key(0), (BATCH,) + VIDEO, logsnr_fn=logsnr_grid,
      target='eps', spec=spec, noise=ZeroNoise(), guidance=frames_guidance(),
      z_init=jnp.asarray(Z, jnp.float32)))
  logsnrs = logsnr_grid(1.0 - np.arange(num_steps + 1) / num_steps)
  zeros = np.zeros((BATCH, N))
  z = flat(Z)
  for i in range(num_steps):
    lt, ls = logsnrs[i], logsnrs[i + 1]
    z, x_t, eps_t = guided_np(z, np.full(BATCH, lt), flat(X_A), zeros)
    if sampler == 'ancestral':
      z = ancestral_np(z, x_t, zeros, lt, ls, gamma)
    else:
      z = ddim_np(x_t, eps_t, zeros, lt, ls, eta)
  expected = np.where(M_FLAT, flat(X_A), x_t)
  np.testing.assert_allclose(x, expected, **TOL)


@pytest.mark.parametrize('gamma', [0.0, 0.3, 1.0])
def test_ancestral_step_of_guided_prediction(gamma):
  lt, ls = -1.0, 0.5
  z_rep, x_t, _ = guided_np(flat(Z), np.full(BATCH, lt), flat(X_A),
                            flat(REPLACE_NOISE))
  step_noise = np.random.default_rng(1).standard_normal((BATCH, N))
  z_s = sampling.ancestral_step(
      jnp.asarray(z_rep, jnp.float32), jnp.asarray(x_t, jnp.float32),
      jnp.asarray(step_noise, jnp.float32), jnp.float32(lt), jnp.float32(ls),
      jnp.float32(gamma))
  np.testing.assert_allclose(
      z_s, ancestral_np(z_rep, x_t, step_noise, lt, ls, gamma), **TOL)


@pytest.mark.parametrize('eta', [0.0, 0.5, 1.0])
def test_ddim_step_of_guided_prediction(eta):
  lt, ls = -1.0, 0.5
  _, x_t, eps_t = guided_np(flat(Z), np.full(BATCH, lt), flat(X_A),
                            flat(REPLACE_NOISE))
  step_noise = np.random.default_rng(1).standard_normal((BATCH, N))
  z_s = sampling.ddim_step(
      jnp.asarray(x_t, jnp.float32), jnp.asarray(eps_t, jnp.float32),
      jnp.asarray(step_noise, jnp.float32), jnp.float32(lt), jnp.float32(ls),
      jnp.float32(eta))
  np.testing.assert_allclose(
      z_s, ddim_np(x_t, eps_t, step_noise, lt, ls, eta), **TOL)
