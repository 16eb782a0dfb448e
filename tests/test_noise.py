"""VideoFusion decomposed noise: statistics, training, samplers, extension.

eps_i = sqrt(lam_i) b + sqrt(1 - lam_i) r_i with one base noise b per clip
and a residual r_i per frame. Statistical thresholds are 5 standard errors
of a correlation estimate, SE <= 1 / sqrt(n) for n independent pairs.
"""

import dataclasses
import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from configs import tiny
from vdm_jax import diffusion
from vdm_jax import noise as noise_lib
from vdm_jax import sampling
from vdm_jax import schedules
from vdm_jax import tasks
from vdm_jax import train
from vdm_jax import training
from test_sampling import COV, MU, NUM_SAMPLES, NUM_STEPS, SHAPE
from test_sampling import GaussianOracle, ORACLES, check_moments, key
from test_sampling import logsnr_fn


def frame_corr(eps):
  """[n, T] correlations between frames, pooled over pixels: [T, T]."""
  eps = np.asarray(eps, np.float64)
  t = eps.shape[1]
  flat = np.moveaxis(eps, 1, -1).reshape(-1, t)  # (B H W C) x T samples.
  return np.corrcoef(flat.T), flat.shape[0]


def test_unit_variance_and_scalar_correlation():
  eps = noise_lib.Noise(0.5).draw(key(0), (4000, 3, 4, 4, 1))
  assert eps.shape == (4000, 3, 4, 4, 1) and eps.dtype == jnp.float32
  eps = np.asarray(eps)
  # Clips are independent: n = 4000 per element; a variance estimate has
  # SE sqrt(2 / n), a correlation at most 1 / sqrt(n).
  se = 1 / np.sqrt(4000)
  np.testing.assert_allclose(eps.var(axis=0), 1.0, atol=5 * np.sqrt(2) * se)
  corr, _ = frame_corr(eps)
  np.testing.assert_allclose(corr[np.triu_indices(3, 1)], 0.5, atol=5 * se)
  # Different pixels of a frame stay independent (b is per pixel).
  pix = np.corrcoef(eps[:, 0, 0, 0, 0], eps[:, 0, 1, 2, 0])[0, 1]
  assert abs(pix) < 5 * se


def test_per_frame_correlation_is_sqrt_product():
  lam = np.array([0.1, 0.4, 0.9, 0.0], np.float32)
  eps = np.asarray(noise_lib.Noise(lam).draw(key(1), (4000, 4, 4, 4, 1)))
  np.testing.assert_allclose(eps.var(axis=0), 1.0,
                             atol=5 * np.sqrt(2 / 4000))
  corr, _ = frame_corr(eps)
  expected = np.sqrt(np.outer(lam, lam))
  np.fill_diagonal(expected, 1.0)
  np.testing.assert_allclose(corr, expected, atol=5 / np.sqrt(4000))


def test_lambda_zero_is_iid_bitwise():
  shape = (3, 4, 5, 5, 2)
  for rng in (key(2), jax.random.key(2)):
    iid = noise_lib.Noise().draw(rng, shape)
    np.testing.assert_array_equal(iid, jax.random.normal(rng, shape))
    np.testing.assert_array_equal(noise_lib.Noise(0.0).draw(rng, shape), iid)
    np.testing.assert_array_equal(
        noise_lib.Noise(jnp.zeros((4,)))(rng, shape), iid)
    assert not np.array_equal(noise_lib.Noise(0.5).draw(rng, shape), iid)


def test_lambda_one_is_the_shared_base():
  eps = np.asarray(noise_lib.Noise(1.0).draw(key(3), (2, 5, 3, 3, 1)))
  np.testing.assert_array_equal(eps, np.broadcast_to(eps[:, :1], eps.shape))
  assert not np.allclose(eps[0], eps[1])  # One base per clip.


def test_residual_salt_shares_the_base_only():
  shape, rng = (4000, 2, 2, 2, 1), key(4)
  a = np.asarray(noise_lib.Noise(0.5, jnp.int32(0)).draw(rng, shape))
  b = np.asarray(noise_lib.Noise(0.5, jnp.int32(1)).draw(rng, shape))
  c = np.asarray(noise_lib.Noise(0.5, jnp.int32(1)).draw(key(5), shape))
  # Same key, different salts: correlation lambda (the base); different
  # keys: independent.
  assert abs(np.corrcoef(a.ravel(), b.ravel())[0, 1] - 0.5) < 5 / 63
  assert abs(np.corrcoef(a.ravel(), c.ravel())[0, 1]) < 5 / 63
  np.testing.assert_array_equal(
      a, noise_lib.Noise(0.5).with_salt(0).draw(rng, shape))


def test_config_validation():
  config = default.get_config()
  d = config.diffusion
  assert noise_lib.from_config(d, 4).noise_lambda is None  # 'iid' default.
  d.noise = 'decomposed'
  assert noise_lib.from_config(d, 4).noise_lambda.shape == ()
  d.noise_lambda = (0.1, 0.2, 0.3, 0.4)
  np.testing.assert_allclose(noise_lib.from_config(d, 4).noise_lambda,
                             [0.1, 0.2, 0.3, 0.4])
  with pytest.raises(ValueError, match='one value per frame'):
    noise_lib.from_config(d, 5)
  for bad in (1.5, -0.1, (0.5, 0.5, 0.5, 2.0), float('nan')):
    d.noise_lambda = bad
    with pytest.raises(ValueError, match=r'lie in \[0, 1\]'):
      noise_lib.from_config(d, 4)
  d.noise = 'gaussian'
  with pytest.raises(ValueError, match="Unknown diffusion.noise 'gaussian'"):
    noise_lib.from_config(d, 4)


def _recorded_loss_noise(x, rng, **kw):
  """The eps the loss drew, recovered from the z it fed the denoiser."""
  seen = []

  def oracle(z, logsnr, cond):
    del cond
    eps = diffusion.x_to_eps(x, z, logsnr)
    seen.append(eps)
    return eps

  out = diffusion.loss(
      oracle, x, rng, logsnr_fn=lambda t: schedules.cosine_logsnr(t, -4., 4.),
      target='eps', **kw)
  return out, np.asarray(seen[0])


@pytest.mark.parametrize('per_example', [False, True])
def test_loss_draws_decomposed_noise(per_example):
  n = 2000
  x = jnp.zeros((n, 3, 2, 2, 1))
  rng = jax.random.split(key(6), n) if per_example else key(6)
  out, eps = _recorded_loss_noise(x, rng, noise=noise_lib.Noise(0.5))
  np.testing.assert_allclose(out.loss, 0.0, atol=1e-4)
  corr, _ = frame_corr(eps)
  np.testing.assert_allclose(corr[np.triu_indices(3, 1)], 0.5,
                             atol=5 / np.sqrt(n))
  # lambda = 0 is the i.i.d. loss, bit for bit.
  out_iid, eps_iid = _recorded_loss_noise(x, rng)
  out_0, eps_0 = _recorded_loss_noise(x, rng, noise=noise_lib.Noise(0.0))
  np.testing.assert_array_equal(eps_0, eps_iid)
  np.testing.assert_array_equal(out_0.t, out_iid.t)


def test_image_frames_get_iid_noise():
  """Joint image-video batches: frames with frame_mask False are images."""
  config = default.get_config()
  config.diffusion.noise = 'decomposed'
  config.diffusion.noise_lambda = 0.8
  n, t, images = 2000, 3, 2
  frame_mask = np.zeros((n, t + images), bool)
  frame_mask[:, :t] = True
  noise = noise_lib.from_config(config.diffusion, t).for_frames(frame_mask)
  np.testing.assert_allclose(noise.noise_lambda,
                             np.where(frame_mask, 0.8, 0.0))
  x = jnp.zeros((n, t + images, 2, 2, 1))
  _, eps = _recorded_loss_noise(x, key(7), noise=noise)
  corr, _ = frame_corr(eps)
  se = 1 / np.sqrt(n)
  np.testing.assert_allclose(corr[:t, :t][np.triu_indices(t, 1)], 0.8,
                             atol=5 * se)
  assert np.all(np.abs(corr[:, t:][~np.eye(t + images, dtype=bool)[:, t:]])
                < 5 * se)
  np.testing.assert_allclose(eps.var(axis=0), 1.0, atol=5 * np.sqrt(2) * se)
  assert noise_lib.from_config(default.get_config().diffusion, t).for_frames(
      frame_mask).noise_lambda is None


def _identity_x(z, logsnr, cond):
  """An 'x' denoiser returning z: one sampler step returns z_1 itself."""
  del logsnr, cond
  return z


def test_sampler_initial_and_step_noise_are_decomposed():
  n, lam = 3000, 0.6
  spec = sampling.SamplerSpec(num_steps=1, clip_x=False)
  kw = dict(logsnr_fn=logsnr_fn(), target='x',
            noise=noise_lib.Noise(jnp.float32(lam)))
  z1 = np.asarray(sampling.sample(_identity_x, key(8), (n,) + SHAPE,
                                  spec=spec, **kw))
  np.testing.assert_allclose(frame_corr(z1)[0][0, 1], lam, atol=5 / 77)
  np.testing.assert_allclose(z1.var(axis=0), 1.0, atol=5 * np.sqrt(2 / n))
  # Two steps: z_s = a z_1 + std eps_step with a^2 ~ std^2. Decomposed
  # step noise keeps the correlation at lambda; i.i.d. would halve it.
  for sampler in ('ancestral', 'ddim', 'pc'):
    zs = np.asarray(sampling.sample(
        _identity_x, key(9), (n,) + SHAPE,
        spec=spec.replace(num_steps=2, sampler=sampler, gamma=0.0, eta=1.0),
        **kw))
    np.testing.assert_allclose(frame_corr(zs)[0][0, 1], lam, atol=5 / 77,
                               err_msg=sampler)


def test_decomposed_sampler_compiles_once():
  oracle = GaussianOracle(MU, COV, 'eps')
  chex.clear_trace_counter()
  counted = chex.assert_max_traces(oracle.__call__, n=1)
  for lam in (0.0, 0.5, np.array([0.2, 0.7], np.float32)):
    x = sampling.sample(
        counted, key(10), (3,) + SHAPE, logsnr_fn=logsnr_fn(), target='eps',
        spec=sampling.SamplerSpec(num_steps=4), noise=noise_lib.Noise(
            jnp.asarray(lam, jnp.float32) * jnp.ones((2,))))
    assert x.shape == (3,) + SHAPE and np.all(np.isfinite(x))


class CorrelatedNoiseOracle:
  """Exact denoiser for x ~ N(mu, Sigma) under noise covariance S.

  q(z | x) = N(alpha x, sigma^2 S): with W = S^{-1/2}, W z is the standard
  process of W x ~ N(W mu, W Sigma W), whose exact denoiser is
  `GaussianOracle`; x_hat and eps_hat map back with S^{1/2}.
  """

  def __init__(self, mu, cov, noise_cov, target):
    s, u = np.linalg.eigh(noise_cov)
    self.w = (u / np.sqrt(s)) @ u.T
    self.s_half = jnp.asarray((u * np.sqrt(s)) @ u.T, jnp.float32)
    mu_w = (self.w @ np.reshape(mu, -1)).reshape(np.shape(mu))
    cov_w = self.w @ cov @ self.w
    self.inner_x = GaussianOracle(mu_w, cov_w, 'x')
    self.inner_eps = GaussianOracle(mu_w, cov_w, 'eps')
    self.w = jnp.asarray(self.w, jnp.float32)
    self.target = target

  def __call__(self, z, logsnr, cond):
    b = z.shape[0]
    y = (z.reshape(b, -1) @ self.w).reshape(z.shape)
    x = self.inner_x(y, logsnr, cond).reshape(b, -1) @ self.s_half
    eps = self.inner_eps(y, logsnr, cond).reshape(b, -1) @ self.s_half
    alpha, sigma = schedules.alpha_sigma(logsnr[:, None])
    pred = {'x': x, 'eps': eps, 'v': alpha * eps - sigma * x}[self.target]
    return pred.reshape(z.shape)


LAM = 0.5
# SHAPE = (T=2, H=2, W=2, C=1): flat index t * 4 + pixel.
NOISE_COV = np.kron(np.array([[1.0, LAM], [LAM, 1.0]]), np.eye(4))


@functools.lru_cache(maxsize=None)
def decomposed_samples(sampler, target, exact=True, **kw):
  oracle = (CorrelatedNoiseOracle(MU, COV, NOISE_COV, target) if exact
            else ORACLES[target])
  return np.asarray(sampling.sample(
      oracle, key(0), (NUM_SAMPLES,) + SHAPE, logsnr_fn=logsnr_fn(),
      target=target, spec=sampling.SamplerSpec(
          sampler=sampler, num_steps=NUM_STEPS, clip_x=False, **kw),
      noise=noise_lib.Noise(jnp.float32(LAM))))


def test_correlated_oracle_is_the_posterior_mean():
  # E[x | z] by direct linear algebra, against the whitened construction.
  oracle = CorrelatedNoiseOracle(MU, COV, NOISE_COV, 'x')
  z = np.asarray(jax.random.normal(key(11), (5,) + SHAPE)).reshape(5, -1)
  logsnr = np.array([-3.0, -1.0, 0.0, 1.0, 4.0])
  a2, s2 = 1 / (1 + np.exp(-logsnr)), 1 / (1 + np.exp(logsnr))
  mu = MU.reshape(-1)
  expect = np.stack([
      mu + np.sqrt(a2[i]) * COV @ np.linalg.solve(
          a2[i] * COV + s2[i] * NOISE_COV, z[i] - np.sqrt(a2[i]) * mu)
      for i in range(5)])
  got = oracle(jnp.asarray(z.reshape((5,) + SHAPE), jnp.float32),
               jnp.asarray(logsnr, jnp.float32), {})
  np.testing.assert_allclose(np.asarray(got).reshape(5, -1), expect,
                             atol=1e-4)


@pytest.mark.parametrize('sampler,target,kw', [
    ('ancestral', 'eps', dict(gamma=0.3)),
    ('ddim', 'eps', dict(eta=0.0)),
    ('pc', 'v', dict(gamma=0.1, delta=0.1)),
])
def test_decomposed_samplers_match_gaussian(sampler, target, kw):
  """Exact: the denoiser is exact for the correlated forward process."""
  check_moments(decomposed_samples(sampler, target, **kw), MU, COV)


def test_mismatched_denoiser_is_not_exact():
  """An i.i.d.-noise denoiser sampled with decomposed noise is biased.

  DDIM (eta 0) maps z_1 linearly to x; fed N(0, S) instead of N(0, I) it
  gives a wrong covariance (the check fails by far more than 5 SE).
  """
  with pytest.raises(AssertionError):
    check_moments(decomposed_samples('ddim', 'eps', exact=False, eta=0.0),
                  MU, COV)


T, S = 4, 4


def _extend_config(fixed_base, lam):
  config = default.get_config()
  config.data.num_frames = T
  config.data.image_size = S
  config.data.channels = 1
  config.diffusion.target = 'x'
  config.diffusion.noise = 'decomposed'
  config.diffusion.noise_lambda = lam
  config.sample.task = 'extend'
  config.sample.num_cond_frames = 1
  config.sample.num_frames_out = 10  # 4 -> 7 -> 10: two new blocks.
  config.sample.num_steps = 1
  config.sample.clip_x = False
  config.sample.fixed_base_noise = fixed_base
  return config


def _extend(fixed_base, lam, n, denoise_fn=_identity_x):
  config = _extend_config(fixed_base, lam)
  video = np.zeros((n, T, S, S, 1), np.float32)
  setup = dataclasses.replace(tasks.Setup.from_config(config),
                              logsnr_fn=logsnr_fn())
  x = tasks.run(tasks.from_config(config.sample), denoise_fn, key(12), setup,
                video=video)
  # One step of the identity x-denoiser: each block's new frames are its
  # z_1 there, i.e. the noise drawn for the block.
  x = np.asarray(x)
  return x[:, T:T + T - 1], x[:, T + T - 1:]


def test_fixed_base_noise_is_shared_across_extend_blocks():
  # lambda = 1: the noise is the base alone, so both blocks are equal.
  b1, b2 = _extend(True, 1.0, 4)
  np.testing.assert_array_equal(b1, b2)
  np.testing.assert_array_equal(b1, np.broadcast_to(b1[:, :1], b1.shape))
  assert not np.allclose(b1[0], b1[1])  # One base per video.
  # lambda = 0.5: blocks correlate by lambda (base shared, residual fresh)
  # with a fixed base, and not at all without.
  n = 1000
  chex.clear_trace_counter()
  counted = chex.assert_max_traces(_identity_x, n=1)
  b1, b2 = _extend(True, 0.5, n, counted)
  se = 1 / np.sqrt(n)
  assert abs(np.corrcoef(b1.ravel(), b2.ravel())[0, 1] - 0.5) < 5 * se
  b1, b2 = _extend(False, 0.5, n)
  assert abs(np.corrcoef(b1.ravel(), b2.ravel())[0, 1]) < 5 * se
  # Within a block frames correlate by lambda either way.
  np.testing.assert_allclose(frame_corr(b1)[0][0, 1], 0.5, atol=5 * se)


def test_fixed_base_noise_needs_decomposed_extend():
  config = _extend_config(True, 0.5)
  config.diffusion.noise = 'iid'
  with pytest.raises(ValueError, match="needs diffusion.noise='decomposed'"):
    tasks.check_noise(tasks.from_config(config.sample),
                      noise_lib.from_config(config.diffusion, T))
  config = _extend_config(True, 0.5)
  config.sample.task = 'predict'
  with pytest.raises(ValueError, match="task 'extend'"):
    tasks.from_config(config.sample)


class _PixelModel(nn.Module):
  """A per-pixel linear denoiser: train_step's wiring without a UNet."""

  @nn.compact
  def __call__(self, z, logsnr, label=None, train=False, frame_mask=None):
    del label, train, frame_mask
    return nn.Dense(z.shape[-1])(z) * logsnr[:, None, None, None, None]


def _train_step_loss(**diffusion_fields):
  config = tiny.get_config()
  config.data.image_frames = 2  # Joint image-video batches.
  config.model.num_classes = 0
  for k, v in diffusion_fields.items():
    config.diffusion[k] = v
  model = _PixelModel()
  tx, lr_fn = training.create_optimizer(config)
  state = train.init_state(config, model, tx, jax.random.key(0))
  b, t = config.training.batch_size, config.data.num_frames + 2
  video = jax.random.randint(jax.random.key(1), (b, t, 16, 16, 3), 0, 256)
  batch = {'video': video.astype(jnp.uint8),
           'label': jnp.zeros((b,), jnp.int32),
           'frame_mask': jnp.arange(t)[None].repeat(b, 0) < 4}
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx,
                                   lr_fn=lr_fn, config=config))
  _, metrics = step(state, batch, jax.random.key(2))
  return float(metrics['loss'])


def test_train_step_uses_the_configured_noise():
  iid = _train_step_loss()
  # lambda = 0 (per frame) draws the i.i.d. noise bit for bit (tested above);
  # the compiled step may fuse the rest differently, so compare to 1e-6.
  zero = _train_step_loss(noise='decomposed', noise_lambda=(0.0,) * 4)
  np.testing.assert_allclose(zero, iid, rtol=1e-6)
  half = _train_step_loss(noise='decomposed', noise_lambda=0.5)
  assert abs(half - iid) > 1e-3 * iid, (half, iid)


def test_train_validates_the_noise_early(tmp_path):
  config = tiny.get_config()
  config.diffusion.noise = 'decomposed'
  config.diffusion.noise_lambda = (0.5, 0.5)  # tiny has 4 frames.
  with pytest.raises(ValueError, match='one value per frame'):
    train.validate_config(config, str(tmp_path))
