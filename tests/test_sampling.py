"""Samplers and guidance against an analytic denoiser on Gaussian data.

For x ~ N(mu, Sigma) the exact posterior mean is known,
E[x | z_t] = mu + alpha Sigma (alpha^2 Sigma + sigma^2 I)^{-1} (z - alpha mu),
so `GaussianOracle` stands in for a trained network, and sample statistics
can be compared with mu, Sigma and the exact conditionals.

Thresholds (n samples, fixed seeds, so every run is the same):
  mean: |mean_i - mu_i| <= 5 SE_i, SE_i = sqrt(Sigma_ii / n).
  covariance: |C_ij - Sigma_ij| <= 5 SE_ij + BIAS, with
    SE_ij = sqrt((Sigma_ii Sigma_jj + Sigma_ij^2) / n) (Gaussian data), and
    BIAS = 0.004 the discretization error of a 256-step sampler: propagating
    the exact mean and covariance through the linear-Gaussian chain that these
    samplers form with this oracle gives at most 0.0032 (ancestral gamma 0;
    gamma 1: 0.0009, DDIM eta 0: 0.0013, pc: 0.0018) against a largest
    variance of 0.09; the mean has no discretization bias (docs/sampling.md).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vdm_jax import diffusion
from vdm_jax import sampling
from vdm_jax import schedules

SHAPE = (2, 2, 2, 1)  # T, H, W, C: 8 dimensions.
NUM_SAMPLES = 4096
NUM_STEPS = 256
COV_BIAS = 0.004


def key(seed):
  """PRNG keys of the 'rbg' implementation: any key works with the samplers;
  this one compiles faster on CPU than threefry, which keeps the suite short.
  """
  return jax.random.key(seed, impl='rbg')


def logsnr_fn():
  return _LOGSNR_FN


_LOGSNR_FN = schedules.get_logsnr_fn(ml_collections.ConfigDict(dict(
    schedule='cosine', logsnr_min=-20.0, logsnr_max=20.0, shift_base=64)))


def make_cov(t=2, h=2, w=2, rho_t=0.9, rho_s=0.5, scale=0.09):
  """Sigma = scale * (rho_t^|dt|) kron (rho_s^|dxy|_1): frames correlated."""
  ct = rho_t ** np.abs(np.subtract.outer(np.arange(t), np.arange(t)))
  idx = np.array([(i, j) for i in range(h) for j in range(w)])
  cs = rho_s ** np.abs(idx[:, None, :] - idx[None, :, :]).sum(-1)
  return scale * np.kron(ct, cs)


class GaussianOracle:
  """Exact denoiser for x ~ N(mu + shift[label], Sigma), x [T, H, W, C].

  Labels 0..K-1 shift the mean by shifts[label]; label K (the null label) or
  no label gives the mixture-free base N(mu, Sigma) (used for classifier-free
  guidance tests, where all classes share Sigma).
  """

  def __init__(self, mu, cov, target, shifts=None):
    self.shape = tuple(mu.shape)
    self.mu = jnp.asarray(np.reshape(mu, -1), jnp.float32)
    s, u = np.linalg.eigh(np.asarray(cov, np.float64))
    self.s, self.u = jnp.asarray(s, jnp.float32), jnp.asarray(u, jnp.float32)
    self.target = target
    k = 0 if shifts is None else len(shifts)
    shifts = np.zeros((k + 1, self.mu.shape[0])) if shifts is None else (
        np.concatenate([np.reshape(shifts, (k, -1)),
                        np.zeros((1, self.mu.shape[0]))]))
    self.shifts = jnp.asarray(shifts, jnp.float32)

  def __call__(self, z, logsnr, cond):
    b = z.shape[0]
    mu = self.mu
    if 'label' in cond:
      mu = mu + self.shifts[cond['label']]
    zf = z.reshape(b, -1)
    a2 = jax.nn.sigmoid(logsnr)[:, None]
    s2 = jax.nn.sigmoid(-logsnr)[:, None]
    alpha, sigma = jnp.sqrt(a2), jnp.sqrt(s2)
    y = (zf - alpha * mu) @ self.u
    den = a2 * self.s + s2
    x = mu + (y * (alpha * self.s / den)) @ self.u.T
    eps = (y * (sigma / den)) @ self.u.T  # (z - alpha x) / sigma, stably.
    pred = {'x': x, 'eps': eps, 'v': alpha * eps - sigma * x}[self.target]
    return pred.reshape(z.shape)


MU = np.linspace(-0.3, 0.3, 8).reshape(SHAPE)
COV = make_cov()
ORACLES = {t: GaussianOracle(MU, COV, t) for t in diffusion.TARGETS}


def check_moments(x, mu, cov, bias=COV_BIAS):
  x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  n = x.shape[0]
  mu, cov = np.reshape(mu, -1), np.asarray(cov)
  se_mean = np.sqrt(np.diag(cov) / n)
  se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
  mean_err = np.abs(x.mean(0) - mu)
  cov_err = np.abs(np.cov(x.T) - cov)
  assert np.all(mean_err <= 5 * se_mean), (mean_err / se_mean).max()
  assert np.all(cov_err <= 5 * se_cov + bias), (cov_err - bias).max()


@functools.lru_cache(maxsize=None)
def gaussian_samples(sampler, target, **kw):
  return np.asarray(sampling.sample(
      ORACLES[target], key(0), (NUM_SAMPLES,) + SHAPE,
      logsnr_fn=logsnr_fn(), target=target, spec=sampling.SamplerSpec(
          sampler=sampler, num_steps=NUM_STEPS, clip_x=False, **kw)))


@pytest.mark.parametrize('sampler,target,kw', [
    ('ancestral', 'eps', dict(gamma=0.0)),
    ('ancestral', 'eps', dict(gamma=0.3)),
    ('ancestral', 'eps', dict(gamma=1.0)),
    ('ddim', 'eps', dict(eta=0.0)),
    ('ddim', 'eps', dict(eta=1.0)),
    ('pc', 'v', dict(gamma=0.1, delta=0.1)),
])
def test_samples_match_gaussian(sampler, target, kw):
  x = gaussian_samples(sampler, target, **kw)
  assert x.shape == (NUM_SAMPLES,) + SHAPE and x.dtype == np.float32
  check_moments(x, MU, COV)


def test_ddim_eta1_is_ancestral_gamma0():
  # c = eta sigma~_{s|t}: eta = 1 is the ancestral step with gamma = 0, and
  # both draw the same noise from the same keys.
  np.testing.assert_allclose(
      gaussian_samples('ddim', 'eps', eta=1.0),
      gaussian_samples('ancestral', 'eps', gamma=0.0), atol=1e-4)


def test_unknown_names_raise():
  # The sampler is checked where it is named, in the spec.
  with pytest.raises(ValueError, match='ancestral.*ddim.*pc'):
    sampling.sample(ORACLES['eps'], key(0), (1,) + SHAPE,
                    logsnr_fn=logsnr_fn(), target='eps',
                    spec=sampling.SamplerSpec(sampler='euler', num_steps=2))
  with pytest.raises(ValueError, match='num_steps must be >= 1'):
    sampling.SamplerSpec(num_steps=0)
  with pytest.raises(ValueError, match='target'):
    sampling.sample(ORACLES['eps'], key(0), (1,) + SHAPE,
                    logsnr_fn=logsnr_fn(), target='score')
  with pytest.raises(ValueError, match='guidance method'):
    sampling.make_guidance(method='inpaint')


# Conditional sampling: frame 0 (dims 0-3) given, frame 1 (dims 4-7) sampled.
A, B = np.arange(4), np.arange(4, 8)
MU_F, X_A_VAL = MU.reshape(-1), MU.reshape(-1)[:4] + [0.6, -0.5, 0.4, 0.5]
MU_COND = MU_F[B] + COV[np.ix_(B, A)] @ np.linalg.solve(
    COV[np.ix_(A, A)], X_A_VAL - MU_F[A])
COV_COND = COV[np.ix_(B, B)] - COV[np.ix_(B, A)] @ np.linalg.solve(
    COV[np.ix_(A, A)], COV[np.ix_(A, B)])
COND_STEPS = 128


@functools.lru_cache(maxsize=None)
def conditional_samples(method, recon_weight, sampler='ancestral'):
  n = NUM_SAMPLES
  x_a = np.zeros((n, 8), np.float32)
  x_a[:, A] = X_A_VAL
  guidance = sampling.make_guidance(
      x_a=x_a.reshape((n,) + SHAPE),
      mask=np.broadcast_to([True, False], (n, 2)),
      recon_weight=recon_weight, method=method)
  return np.asarray(sampling.sample(
      ORACLES['eps'], key(1), (n,) + SHAPE, logsnr_fn=logsnr_fn(),
      target='eps', spec=sampling.SamplerSpec(
          sampler=sampler, num_steps=COND_STEPS, gamma=0.1, clip_x=False),
      guidance=guidance)).reshape(n, 8)


def conditional_errors(x):
  mean_err = np.abs(x[:, B].mean(0) - MU_COND).max()
  cov_err = np.abs(np.cov(x[:, B].T) - COV_COND).max()
  return mean_err, cov_err


def test_reconstruction_guidance_beats_replacement():
  """VDM 3.1: replacement is incoherent; reconstruction guidance is closer.

  Exact conditional N(mu_b|a, Sigma_b|a) with corr 0.9 between the frames.
  Measured (4096 samples, 128 steps): replacement mean error 0.17, cov error
  0.0096 (its variance 0.026 against 0.017); w_r = 2: 0.028 and 0.003. The
  Monte Carlo SE is 0.002 (mean) and 0.0004 (cov), so the factor-2 margins
  below are far outside noise.
  """
  rep = conditional_errors(conditional_samples('replacement', 0.0))
  rec = conditional_errors(conditional_samples('reconstruction', 2.0))
  assert rep[0] > 0.1  # replacement is measurably biased here.
  assert rec[0] < 0.5 * rep[0] and rec[0] < 0.05, (rec, rep)
  assert rec[1] < 0.5 * rep[1], (rec, rep)


def test_known_frames_are_kept():
  for method, w in (('replacement', 0.0), ('reconstruction', 2.0)):
    x = conditional_samples(method, w)
    np.testing.assert_allclose(x[:, A], np.broadcast_to(X_A_VAL, (len(x), 4)),
                               atol=1e-6)


def test_recon_weight_zero_is_replacement():
  np.testing.assert_allclose(
      conditional_samples('reconstruction', 0.0),
      conditional_samples('replacement', 0.0), atol=1e-6)


SHIFTS = np.stack([np.full(SHAPE, 0.3), np.full(SHAPE, -0.2)])
CLASS_ORACLE = GaussianOracle(MU, COV, 'v', shifts=SHIFTS)


def _class_samples(n, guidance=None, num_steps=64):
  label = jnp.zeros((n,), jnp.int32)
  return np.asarray(sampling.sample(
      CLASS_ORACLE, key(2), (n,) + SHAPE, logsnr_fn=logsnr_fn(),
      target='v', spec=sampling.SamplerSpec(
          num_steps=num_steps, gamma=0.1, clip_x=False),
      cond={'label': label}, guidance=guidance))


def test_classifier_free_weight_zero_is_conditional():
  cfg0 = _class_samples(512, sampling.make_guidance(cfg_weight=0.0,
                                                    null_label=2))
  np.testing.assert_allclose(cfg0, _class_samples(512), atol=1e-5)
  # Shared covariance: p(z|c)^{1+w} / p(z)^w has mean mu + (1 + w) shift at
  # every noise level, so guided samples centre there (SE 0.013).
  cfg1 = _class_samples(512, sampling.make_guidance(cfg_weight=1.0,
                                                    null_label=2))
  np.testing.assert_allclose(cfg1.mean(0), MU + 2 * SHIFTS[0], atol=0.07)
  np.testing.assert_allclose(cfg0.mean(0), MU + SHIFTS[0], atol=0.07)


def test_classifier_free_needs_null_label():
  # Without a null label (a model without classes) make_guidance leaves
  # classifier-free guidance off: the plain conditional model is sampled.
  guidance = sampling.make_guidance(cfg_weight=1.0)
  assert guidance.null_label is None and float(guidance.cfg_weight) == 0.0
  np.testing.assert_array_equal(_class_samples(512, guidance),
                                _class_samples(512))


def test_spec_from_config():
  sample_config = ml_collections.ConfigDict(dict(
      sampler='pc', num_steps=7, gamma=0.3, eta=0.5, delta=0.2, clip_x=False,
      guidance_weight=1.5, recon_weight=2.0, remat_guidance=True))
  spec = sampling.SamplerSpec.from_config(sample_config)
  assert spec == sampling.SamplerSpec(
      sampler='pc', num_steps=7, gamma=0.3, eta=0.5, delta=0.2,
      clip_x=False, guidance_weight=1.5, recon_weight=2.0,
      remat_guidance=True)
  assert spec.replace(num_steps=3).num_steps == 3 and spec.num_steps == 7
  sample_config.sampler = 'euler'
  with pytest.raises(ValueError, match='ancestral.*ddim.*pc'):
    sampling.SamplerSpec.from_config(sample_config)


def test_ddim_inversion_round_trips():
  """eta = 0 is a deterministic map z_1 -> x; inversion undoes it.

  With the exact oracle the only error is the first-order discretization of
  the DDIM ODE, O(1/N): max |z_1 - invert(ddim(z_1))| is 0.59, 0.16, 0.041
  for N = 64, 256, 1024 (unit-scale z). At N = 1024 the tolerances are 0.1 on
  z_1 and 0.03 on x (the data std is 0.3).
  """
  n, kw = 64, dict(logsnr_fn=logsnr_fn(), target='eps')
  spec = sampling.SamplerSpec(sampler='ddim', num_steps=1024, eta=0.0,
                              clip_x=False)
  z1 = jax.random.normal(key(3), (n,) + SHAPE)
  x = sampling.sample(ORACLES['eps'], key(4), z1.shape, spec=spec,
                      z_init=z1, **kw)
  z1_inv = sampling.ddim_invert(ORACLES['eps'], x, num_steps=1024, **kw)
  np.testing.assert_allclose(z1_inv, z1, atol=0.1)
  chol = np.linalg.cholesky(COV).T.astype(np.float32)
  x0 = MU.reshape(-1) + jax.random.normal(key(5), (n, 8)) @ chol
  x0 = x0.reshape(x.shape)
  z = sampling.ddim_invert(ORACLES['eps'], x0, num_steps=1024, **kw)
  x_rec = sampling.sample(ORACLES['eps'], key(6), x0.shape, spec=spec,
                          z_init=z, **kw)
  np.testing.assert_allclose(x_rec, x0, atol=0.03)  # measured 0.0045.


@pytest.mark.parametrize('sampler,method,traces,steps', [
    ('ancestral', 'none', 1, (3, 17)),
    ('pc', 'none', 2, (5,)),  # predictor and corrector call sites.
    ('ddim', 'reconstruction', 1, (5,)),
])
def test_traces_once(sampler, method, traces, steps):
  oracle = GaussianOracle(MU, COV, 'x')
  guidance = None
  if method == 'reconstruction':
    guidance = sampling.make_guidance(
        x_a=np.zeros((3,) + SHAPE), mask=np.ones((3, 2), bool) & [True, False],
        recon_weight=1.0, remat=True)
  kw = dict(logsnr_fn=logsnr_fn(), target='x', guidance=guidance)
  for num_steps in steps:
    # The scan body is traced once whatever the number of steps; a second
    # call with the same shapes is a cache hit (no trace at all).
    chex.clear_trace_counter()
    counted = chex.assert_max_traces(oracle.__call__, n=traces)
    for seed in (0, 1):
      x = sampling.sample(counted, key(seed), (3,) + SHAPE,
                          spec=sampling.SamplerSpec(sampler=sampler,
                                                    num_steps=num_steps),
                          **kw)
      assert x.shape == (3,) + SHAPE
      assert np.all(np.isfinite(x)) and np.all(np.abs(x) <= 1)


def test_tree_partial_params_are_traced():
  # Parameters bound with jax.tree_util.Partial are arguments, not
  # constants: new values reuse the compiled sampler.
  def apply(params, z, logsnr, cond):
    del logsnr, cond
    return params * z

  chex.clear_trace_counter()
  counted = chex.assert_max_traces(apply, n=1)
  kw = dict(logsnr_fn=logsnr_fn(), target='x',
            spec=sampling.SamplerSpec(num_steps=2))
  xs = [sampling.sample(jax.tree_util.Partial(counted, jnp.float32(p)),
                        key(0), (1,) + SHAPE, **kw)
        for p in (0.0, 0.5)]
  assert not np.allclose(xs[0], xs[1])


def test_frames_and_lowres_terms_compose_in_one_step():
  """Both reconstruction terms act in one step (VDM 3.1): with a linear
  denoiser x_hat = M z the guided x~ is closed-form,
  x~ = x_hat + alpha M^T [w_f m (x^a - x_hat) + w_l D^T (y - D x_hat)]
  on the unknown part (D the bilinear downsample as a matrix)."""
  b, t, h, w, c = 2, 2, 4, 4, 1
  n = t * h * w * c
  rng = np.random.default_rng(0)
  m_mat = np.eye(n) * 0.5 + 0.02 * rng.standard_normal((n, n))

  def denoise(z, logsnr, cond):
    del logsnr, cond
    flat = z.reshape(z.shape[0], -1)
    return (flat @ jnp.asarray(m_mat.T, jnp.float32)).reshape(z.shape)

  basis = np.eye(n).reshape(n, t, h, w, c)
  d_mat = np.asarray(sampling.downsample(
      jnp.asarray(basis[:, None].reshape(n, t, h, w, c)), (2, 2))
                     ).reshape(n, -1).T  # [t*2*2*c, n]
  z = rng.standard_normal((b, t, h, w, c)).astype(np.float32)
  x_a = rng.standard_normal((b, t, h, w, c)).astype(np.float32)
  y = rng.standard_normal((b, t, 2, 2, c)).astype(np.float32)
  mask = np.broadcast_to([True, False], (b, t))
  noise = np.zeros_like(z)
  logsnr = jnp.full((b,), 0.7)
  w_f, w_l = 1.5, 3.0
  guidance = sampling.make_guidance(x_a=x_a, mask=mask, recon_weight=w_f,
                                    x_lowres=y, lowres_weight=w_l)
  assert guidance.terms == ('frames', 'lowres') and guidance.replace
  z_rep, x_t, eps_t = sampling.guided_predictor(
      denoise, 'x', {}, guidance)(jnp.asarray(z), logsnr, jnp.asarray(noise))
  alpha, sigma = np.sqrt(1 / (1 + np.exp(-0.7))), np.sqrt(1 / (1 + np.exp(0.7)))
  m5 = np.broadcast_to(mask[:, :, None, None, None], z.shape)
  z_ref = np.where(m5, alpha * x_a, z)  # Replacement with zero noise.
  np.testing.assert_allclose(z_rep, z_ref, atol=1e-6)
  flat_z = z_ref.reshape(b, -1)
  x_hat = flat_z @ m_mat.T
  mf = m5.reshape(b, -1)
  r_f = np.where(mf, x_a.reshape(b, -1) - x_hat, 0.0)
  r_l = y.reshape(b, -1) - x_hat @ d_mat.T
  dx = alpha * (w_f * r_f @ m_mat + w_l * (r_l @ d_mat) @ m_mat)
  dx = np.where(mf, 0.0, dx)
  x_ref = x_hat + dx
  eps_ref = (flat_z - alpha * x_hat) / sigma - alpha / sigma * dx
  np.testing.assert_allclose(np.asarray(x_t).reshape(b, -1), x_ref,
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(eps_t).reshape(b, -1), eps_ref,
                             rtol=1e-4, atol=1e-5)
  # Each term alone is its own part of the correction.
  only_lowres = sampling.make_guidance(x_lowres=y, recon_weight=w_l)
  assert only_lowres.terms == ('lowres',) and not only_lowres.replace
  _, x_l, _ = sampling.guided_predictor(denoise, 'x', {}, only_lowres)(
      jnp.asarray(z_ref), logsnr, jnp.asarray(noise))
  np.testing.assert_allclose(
      np.asarray(x_l).reshape(b, -1),
      x_hat + alpha * w_l * (r_l @ d_mat) @ m_mat, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match='same batch, frames'):
    sampling.make_guidance(x_a=x_a, mask=mask, recon_weight=1.0,
                           x_lowres=y[:, :1])
