"""Log-SNR schedule properties."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vdm_jax import schedules


def _cfg(name, lo=-20.0, hi=20.0):
  return ml_collections.ConfigDict(
      dict(schedule=name, logsnr_min=lo, logsnr_max=hi, shift_base=64)
  )


@pytest.mark.parametrize('name', schedules.SCHEDULES)
def test_endpoints_and_monotone(name):
  fn = schedules.get_logsnr_fn(_cfg(name), image_size=64)
  t = jnp.linspace(0.0, 1.0, 1001)
  logsnr = np.asarray(fn(t))
  np.testing.assert_allclose(logsnr[0], 20.0, atol=1e-3)
  np.testing.assert_allclose(logsnr[-1], -20.0, atol=1e-3)
  assert np.all(np.diff(logsnr) < 0), 'log-SNR must strictly decrease in t'


def _angles(lo, hi):
  """Cosine-schedule angles at t = 0 and t = 1: tan(angle) = sigma / alpha."""
  return np.arctan(np.exp(-hi / 2.0)), np.arctan(np.exp(-lo / 2.0))


def _cosine_closed_form(t, lo, hi):
  """float64 log(alpha^2 / sigma^2) with alpha = cos(phi), sigma = sin(phi)."""
  phi0, phi1 = _angles(lo, hi)
  phi = phi0 + t * (phi1 - phi0)
  return np.log(np.cos(phi)**2) - np.log(np.sin(phi)**2)


def _shifted_cosine_closed_form(t, lo, hi, base=64, size=64):
  shift = 2.0 * np.log(base / size)
  return _cosine_closed_form(t, lo - shift, hi - shift) + shift


# Independent float64 formulas of every schedule, evaluated away from the
# ends (a linear log-SNR also passes the endpoint and monotonicity checks).
CLOSED_FORMS = {
    'cosine': _cosine_closed_form,
    'shifted_cosine': lambda t, lo, hi: _shifted_cosine_closed_form(
        t, lo, hi, size=256),
    'linear': lambda t, lo, hi: hi + t * (lo - hi),
}


@pytest.mark.parametrize('name', schedules.SCHEDULES)
@pytest.mark.parametrize('lo,hi', [(-20.0, 20.0), (-10.0, 15.0)])
def test_interior_values_match_closed_form(name, lo, hi):
  fn = schedules.get_logsnr_fn(_cfg(name, lo, hi), image_size=256)
  t = np.linspace(0.05, 0.95, 19)
  np.testing.assert_allclose(
      np.asarray(fn(jnp.asarray(t, jnp.float32))),
      CLOSED_FORMS[name](t, lo, hi), rtol=1e-4, atol=1e-4, err_msg=name)


def test_cosine_known_values():
  # Unclipped cosine: logsnr = -2 log tan(pi t / 2); [-20, 20] clipping moves
  # interior values by less than 1e-3.
  t = np.array([0.1, 0.25, 0.5, 0.75, 0.9])
  np.testing.assert_allclose(
      schedules.cosine_logsnr(jnp.asarray(t, jnp.float32)),
      -2.0 * np.log(np.tan(np.pi * t / 2.0)), atol=1e-3)
  # alpha_t = cos(phi_t): at t = 1/4 of a [-20, 20] schedule, phi ~ pi / 8.
  alpha, sigma = schedules.alpha_sigma(schedules.cosine_logsnr(0.25))
  np.testing.assert_allclose([alpha, sigma],
                             [np.cos(np.pi / 8), np.sin(np.pi / 8)],
                             atol=1e-4)


def test_alpha_sigma_variance_preserving():
  logsnr = jnp.linspace(-20.0, 20.0, 401)
  alpha, sigma = schedules.alpha_sigma(logsnr)
  np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, atol=1e-6)
  np.testing.assert_allclose(
      np.log(alpha**2) - np.log(sigma**2), logsnr, rtol=1e-4, atol=1e-4
  )
  # Both ends stay accurate in float32 (no 1 - tiny cancellation).
  a, s = schedules.alpha_sigma(jnp.float32(-20.0))
  np.testing.assert_allclose(a**2, 1.0 / (1.0 + np.exp(20.0)), rtol=1e-4)


def test_cosine_midpoint_is_zero_logsnr():
  np.testing.assert_allclose(schedules.cosine_logsnr(0.5), 0.0, atol=1e-5)


def test_shifted_cosine_has_less_signal_for_larger_frames():
  t = jnp.linspace(0.05, 0.95, 19)
  base = schedules.get_logsnr_fn(_cfg('cosine'))(t)
  big = schedules.get_logsnr_fn(_cfg('shifted_cosine'), image_size=256)(t)
  small = schedules.get_logsnr_fn(_cfg('shifted_cosine'), image_size=16)(t)
  assert np.all(big < base) and np.all(small > base)
  # In the middle the shift is 2 log(64 / 256) exactly.
  mid = schedules.get_logsnr_fn(_cfg('shifted_cosine'), image_size=256)(0.5)
  np.testing.assert_allclose(mid, 2 * np.log(64 / 256), atol=1e-3)


@pytest.mark.parametrize('name', schedules.SCHEDULES)
def test_schedules_can_be_built_inside_jit(name):
  """The train step builds its schedule while tracing."""
  eager = schedules.get_logsnr_fn(_cfg(name), image_size=16)(0.3)
  traced = jax.jit(lambda t: schedules.get_logsnr_fn(
      _cfg(name), image_size=16)(t))(0.3)
  np.testing.assert_allclose(traced, eager, rtol=1e-6)


def test_bad_schedule_errors():
  with pytest.raises(ValueError, match='Unknown diffusion.schedule'):
    schedules.get_logsnr_fn(_cfg('quadratic'))
  with pytest.raises(ValueError, match='must be below'):
    schedules.get_logsnr_fn(_cfg('cosine', lo=5.0, hi=-5.0))
