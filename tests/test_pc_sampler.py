"""The predictor-corrector sampler against its exactly propagated moments.

With Gaussian data x ~ N(mu, Sigma) and the exact denoiser (test_sampling's
GaussianOracle), x_hat(z) = mu + A_t (z - alpha_t mu) is affine in z, so
every step of the 'pc' sampler (VDM, Ho et al. 2022, Sec. 3.1; Song et al.
2021b, Alg. 2) is an affine map plus independent Gaussian noise:
  predictor (VDM Sec. 2): z_s = mu~_{s|t}(z_t, x_hat(z_t))
      + sqrt((sigma~^2_{s|t})^{1-gamma} (sigma^2_{t|s})^gamma) eps,
  corrector (at s, skipped after the last predictor):
      z_s <- z_s - 1/2 delta sigma_s eps_hat(z_s) + sqrt(delta) sigma_s eps',
  output: x_hat(z) at the last grid point.
The mean and covariance of the output then follow in closed form (float64),
m <- M m + c, P <- M P M^T + v I, from z_1 ~ N(0, I).

The schedule runs over logsnr in [2, 5] only, so the z_1 ~ N(0, I) the
sampler starts from is far from q(z_1) = N(alpha mu, alpha^2 Sigma +
sigma^2 I): pulling samples towards the marginal is the corrector's job,
which makes it visible in the output. With 16384 samples the output moments
without the corrector lie 28 standard errors (mean) and 22 (covariance)
from those with it; with delta halved, 12 and 9; with the sign of the eps
term flipped, 69 and 104. The Monte Carlo check allows 5 standard errors.
(test_sampling.test_samples_match_gaussian runs 'pc' over 256 steps from
logsnr -20, where a sampler without its corrector is exact too.)
"""

import numpy as np
import pytest

from vdm_jax import sampling
from test_sampling import COV, GaussianOracle, key

SHAPE = (2, 2, 2, 1)
N = int(np.prod(SHAPE))
MU = np.linspace(-0.9, 0.9, N)  # Far from the sampler's starting mean 0.
ORACLE = GaussianOracle(MU.reshape(SHAPE), COV, 'v')
NUM_SAMPLES = 16384
NUM_STEPS = 6
GAMMA = 0.1
DELTA = 0.5
MAX_SE = 5.0


def logsnr_fn(t):
  """logsnr(1) = 2, logsnr(0) = 5: linear, a short stretch of high SNR."""
  return 5.0 - 3.0 * t


def alpha_sigma(logsnr):
  logsnr = np.float64(logsnr)
  return np.sqrt(1 / (1 + np.exp(-logsnr))), np.sqrt(1 / (1 + np.exp(logsnr)))


def denoiser(logsnr):
  """(A, b) of the exact x_hat(z) = A z + b at one log-SNR."""
  alpha, sigma = alpha_sigma(logsnr)
  a_mat = alpha * COV @ np.linalg.inv(alpha**2 * COV + sigma**2 * np.eye(N))
  return a_mat, MU - alpha * a_mat @ MU


def grid():
  """The sampler's log-SNR grid at t_i = 1 - i / N, as float32 values."""
  t = (1.0 - np.arange(NUM_STEPS + 1, dtype=np.float32) / NUM_STEPS)
  return np.float32(5.0) - np.float32(3.0) * t.astype(np.float32)


def propagate(gamma=GAMMA, delta=DELTA, corrector=True, sign=-1.0):
  """Exact output mean [N] and covariance [N, N] of the pc sampler.

  Args:
    gamma, delta: the sampler's settings.
    corrector: False drops the Langevin corrector (ancestral sampling).
    sign: of the eps_hat term of the corrector (-1 is Langevin).
  """
  eye = np.eye(N)
  m, p = np.zeros(N), eye
  logsnrs = grid()
  for i in range(NUM_STEPS):
    lt, ls = logsnrs[i], logsnrs[i + 1]
    a_t, b_t = denoiser(lt)
    if i == NUM_STEPS - 1:
      return a_t @ m + b_t, a_t @ p @ a_t.T
    alpha_t, sigma_t = alpha_sigma(lt)
    alpha_s, sigma_s = alpha_sigma(ls)
    # VDM Sec. 2: q(z_s | z_t, x) with alpha_{t|s} = alpha_t / alpha_s and
    # sigma^2_{t|s} = sigma_t^2 - alpha_{t|s}^2 sigma_s^2.
    alpha_ts = alpha_t / alpha_s
    var_ts = sigma_t**2 - alpha_ts**2 * sigma_s**2
    var_tilde = var_ts * sigma_s**2 / sigma_t**2
    c_z = alpha_ts * sigma_s**2 / sigma_t**2
    c_x = alpha_s * var_ts / sigma_t**2
    step = c_z * eye + c_x * a_t
    m = step @ m + c_x * b_t
    p = step @ p @ step.T + var_tilde**(1 - gamma) * var_ts**gamma * eye
    if corrector:
      # eps_hat(z) = (z - alpha_s x_hat(z)) / sigma_s, affine in z.
      a_s, b_s = denoiser(ls)
      e_mat = (eye - alpha_s * a_s) / sigma_s
      e_vec = -alpha_s * b_s / sigma_s
      corr = eye + sign * 0.5 * delta * sigma_s * e_mat
      m = corr @ m + sign * 0.5 * delta * sigma_s * e_vec
      p = corr @ p @ corr.T + delta * sigma_s**2 * eye
  raise AssertionError('unreachable')


def standardized_errors(mean, cov, mu, p, n=NUM_SAMPLES):
  """Largest |error| / SE of the mean and of the covariance entries.

  SE(mean_i) = sqrt(P_ii / n); SE(C_ij) = sqrt((P_ii P_jj + P_ij^2) / n)
  (Gaussian samples, which these are exactly).
  """
  d = np.diag(p)
  mean_z = np.abs(mean - mu) / np.sqrt(d / n)
  cov_z = np.abs(cov - p) / np.sqrt((np.outer(d, d) + p**2) / n)
  return mean_z.max(), cov_z.max()


def pc_samples(delta=DELTA):
  x = sampling.sample(
      ORACLE, key(7), (NUM_SAMPLES,) + SHAPE, logsnr_fn=logsnr_fn,
      target='v', spec=sampling.SamplerSpec(
          sampler='pc', num_steps=NUM_STEPS, gamma=GAMMA, delta=delta,
          clip_x=False))
  return np.asarray(x, np.float64).reshape(NUM_SAMPLES, N)


def test_pc_matches_propagated_moments():
  x = pc_samples()
  mean, cov = x.mean(0), np.cov(x.T)
  mu, p = propagate()
  mean_z, cov_z = standardized_errors(mean, cov, mu, p)
  assert mean_z <= MAX_SE and cov_z <= MAX_SE, (mean_z, cov_z)


@pytest.mark.parametrize('wrong', [
    dict(corrector=False),
    dict(delta=DELTA / 2),
    dict(sign=1.0),
])
def test_wrong_corrector_is_many_standard_errors_away(wrong):
  """The test above has the power to see a missing or wrong corrector."""
  mu, p = propagate()
  mu_w, p_w = propagate(**wrong)
  mean_z, cov_z = standardized_errors(mu_w, p_w, mu, p)
  assert max(mean_z, cov_z) > 2 * MAX_SE, (mean_z, cov_z)


def test_langevin_step_formula():
  rng = np.random.default_rng(0)
  z, eps_hat, noise = rng.standard_normal((3, 4, N))
  for logsnr, delta in ((-1.0, 0.1), (2.5, 0.7)):
    _, sigma = alpha_sigma(logsnr)
    expected = (z - 0.5 * delta * sigma * eps_hat
                + np.sqrt(delta) * sigma * noise)
    out = sampling.langevin_step(
        np.float32(z), np.float32(eps_hat), np.float32(noise),
        np.float32(logsnr), np.float32(delta))
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
