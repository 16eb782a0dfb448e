"""Forward process, parameterization round trips and the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vdm_jax import diffusion
from vdm_jax import schedules


def _data(seed=0, shape=(4, 3, 5, 5, 2)):
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.uniform(k1, shape, minval=-1, maxval=1)
  eps = jax.random.normal(k2, shape)
  logsnr = jax.random.uniform(k3, shape[:1], minval=-8, maxval=8)
  return x, eps, logsnr


@pytest.mark.parametrize('target', diffusion.TARGETS)
def test_prediction_round_trip(target):
  x, eps, logsnr = _data()
  z = diffusion.q_sample(x, logsnr, eps)
  pred = diffusion.x_eps_to_target(x, eps, logsnr, target)
  x_hat, eps_hat = diffusion.prediction_to_x_eps(pred, z, logsnr, target)
  np.testing.assert_allclose(x_hat, x, atol=2e-3)
  np.testing.assert_allclose(eps_hat, eps, atol=2e-3)


def test_v_identities():
  x, eps, logsnr = _data(1)
  z = diffusion.q_sample(x, logsnr, eps)
  v = diffusion.x_eps_to_target(x, eps, logsnr, 'v')
  alpha, sigma = schedules.alpha_sigma(logsnr[:, None, None, None, None])
  # z and v are a rotation of (x, eps): norms are preserved.
  np.testing.assert_allclose(z**2 + v**2, x**2 + eps**2, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(v, alpha * eps - sigma * x, atol=1e-6)
  np.testing.assert_allclose(
      diffusion.eps_to_x(eps, z, logsnr), x, atol=2e-3)
  np.testing.assert_allclose(
      diffusion.x_to_eps(x, z, logsnr), eps, atol=2e-3)


def test_per_frame_logsnr_broadcasts():
  x, eps, _ = _data(2)
  logsnr = jnp.linspace(-5, 5, x.shape[0] * x.shape[1]).reshape(x.shape[:2])
  z = diffusion.q_sample(x, logsnr, eps)
  alpha, sigma = schedules.alpha_sigma(logsnr[1, 2])
  np.testing.assert_allclose(
      z[1, 2], alpha * x[1, 2] + sigma * eps[1, 2], atol=1e-6)


def test_q_sample_statistics():
  x = jnp.full((20000, 1, 1, 1, 1), 0.5)
  logsnr = jnp.full((20000,), 1.0)
  eps = jax.random.normal(jax.random.key(3), x.shape)
  z = np.asarray(diffusion.q_sample(x, logsnr, eps))
  alpha, sigma = schedules.alpha_sigma(1.0)
  assert abs(z.mean() - 0.5 * alpha) < 4 * sigma / np.sqrt(20000)
  assert abs(z.std() - sigma) < 0.02


@pytest.mark.parametrize('target', diffusion.TARGETS)
def test_loss_is_zero_for_the_oracle(target):
  x, _, _ = _data(4)

  # The loss draws its own noise; the oracle recovers it from z by knowing x.
  def oracle(z, logsnr, cond):
    del cond
    eps = diffusion.x_to_eps(x, z, logsnr)
    return diffusion.x_eps_to_target(x, eps, logsnr, target)

  out = diffusion.loss(
      oracle, x, jax.random.key(5),
      logsnr_fn=lambda t: schedules.cosine_logsnr(t, -6.0, 6.0),
      target=target,
  )
  assert out.loss.shape == (x.shape[0],)
  np.testing.assert_allclose(out.loss, 0.0, atol=1e-3)
  np.testing.assert_allclose(out.mse_x, 0.0, atol=1e-3)


def test_loss_of_zero_predictor_is_target_variance():
  x = jnp.zeros((256, 2, 4, 4, 1))
  out = diffusion.loss(
      lambda z, l, c: jnp.zeros_like(z), x, jax.random.key(6),
      logsnr_fn=schedules.cosine_logsnr, target='eps',
  )
  # E||eps||^2 / d = 1.
  assert abs(float(out.loss.mean()) - 1.0) < 0.05


def test_low_discrepancy_times_cover_the_interval():
  t = np.sort(np.asarray(
      diffusion.sample_time(jax.random.key(7), 16, 'low_discrepancy')))
  np.testing.assert_allclose(np.diff(t), 1 / 16, atol=1e-6)
  with pytest.raises(ValueError, match='time_sampling'):
    diffusion.sample_time(jax.random.key(7), 16, 'sobol')


def test_unknown_target_errors():
  with pytest.raises(ValueError, match='Unknown diffusion.target'):
    diffusion.check_target('score')
