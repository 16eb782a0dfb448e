"""VideoFusion's two generators (vdm_jax/videofusion.py), issue 46's checks.

- The two-step denoiser recovers the true base and residual noise, and its
  sampler equals the single-network sampler, when the base generator is
  the exact image denoiser of an analytic toy (known data, so b is known).
- The stop-gradient: per-frame losses reach the base generator only
  through the key frame ('joint'), never ('frozen').
- lambda = 0 is VDM: i.i.d. noise and the residual generator alone, bit
  for bit in the loss, to float32 precision in the sampler.
- The train program starts the base from an image model's workdir; the
  frozen base stays equal to it; the samples of every task keep working.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import videofusion_quickstart
from tests import perturb
from vdm_jax import checkpoint
from vdm_jax import denoiser
from vdm_jax import diffusion
from vdm_jax import noise as noise_lib
from vdm_jax import sampling
from vdm_jax import schedules
from vdm_jax import tasks
from vdm_jax import train
from vdm_jax import training
from vdm_jax import videofusion

T, H, C = 5, 4, 2  # Key frame 2.
LAM = 0.5


def _lambdas(lam=LAM, key=True):
  lam = np.full((T,), lam, np.float32)
  return noise_lib.with_key_frame(lam, T // 2 if key else -1)


def _toy(seed=0, batch=2):
  """Known data c and a noisy clip of it with known b and r."""
  rng = np.random.default_rng(seed)
  c = jnp.asarray(rng.uniform(-1, 1, (1, T, H, H, C)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((batch, 1, H, H, C)), jnp.float32)
  r = jnp.asarray(rng.standard_normal((batch, T, H, H, C)), jnp.float32)
  logsnr = jnp.asarray(rng.uniform(-4, 4, (batch,)), jnp.float32)
  return c, b, r, logsnr


def _oracles(c, lam, base_target='eps'):
  """Exact denoisers of the data c: the image model on the key frame, the
  residual generator, and the single network."""
  k = T // 2
  lam_v = jnp.asarray(lam).reshape(1, T, 1, 1, 1)

  def base_fn(z_k, logsnr, cond):
    del cond
    assert z_k.shape[1] == 1
    x = jnp.broadcast_to(c[:, k:k + 1], z_k.shape)
    eps = diffusion.x_to_eps(x, z_k, logsnr)
    return diffusion.x_eps_to_target(x, eps, logsnr, base_target)

  def residual_fn(z_res, logsnr, cond):
    del cond
    alpha, sigma = schedules.alpha_sigma(
        diffusion.broadcast_to_video(logsnr, z_res))
    scale = jnp.sqrt(jnp.where(lam_v < 1, 1.0 - lam_v, 1.0))
    return jnp.where(lam_v < 1, (z_res - alpha * c) / (sigma * scale), 0.0)

  def single_fn(z, logsnr, cond):
    del cond
    return diffusion.x_to_eps(jnp.broadcast_to(c, z.shape), z, logsnr)

  return base_fn, residual_fn, single_fn


@pytest.mark.parametrize('key', [True, False])
@pytest.mark.parametrize('base_target', ['eps', 'v'])
def test_two_step_recovers_the_true_base_and_residuals(key, base_target):
  c, b, r, logsnr = _toy()
  lam = _lambdas(key=key)
  lam_v = jnp.asarray(lam).reshape(1, T, 1, 1, 1)
  eps = jnp.sqrt(lam_v) * b + jnp.sqrt(1 - lam_v) * r
  z = diffusion.q_sample(c, logsnr, eps)
  base_fn, residual_fn, _ = _oracles(c, lam, base_target)
  d = videofusion.decompose(base_fn, residual_fn, z, logsnr, {}, {},
                            lambdas=lam, base_target=base_target)
  k = T // 2
  if key:  # The key frame's noise is b itself: the image model finds it.
    np.testing.assert_allclose(d.b_hat, b, atol=2e-5)
  else:  # Its lambda is 0.5: the base estimate is sqrt(lam_k) eps_k.
    np.testing.assert_allclose(d.b_hat, np.sqrt(LAM) * eps[:, k:k + 1],
                               atol=2e-5)
  alpha, sigma = schedules.alpha_sigma(logsnr[:, None, None, None, None])
  if key:  # With the true b removed the residual generator sees its noise.
    np.testing.assert_allclose(
        d.residual_input, alpha * c + sigma * jnp.sqrt(1 - lam_v) * r,
        atol=2e-5)
    others = np.arange(T) != k
    np.testing.assert_allclose(d.r_hat[:, others], r[:, others], atol=1e-4)
  np.testing.assert_allclose(d.eps_hat, eps, atol=1e-4)


@pytest.mark.parametrize('sampler', ['ancestral', 'ddim'])
def test_two_step_sampler_equals_the_single_network(sampler):
  c, _, _, _ = _toy(1)
  lam = _lambdas()
  base_fn, residual_fn, single_fn = _oracles(c, lam)
  two_step = videofusion.two_step_denoise_fn(base_fn, residual_fn,
                                             lambdas=lam, target='eps')
  run = functools.partial(
      sampling.sample, rng=jax.random.key(3), shape=(2, T, H, H, C),
      # Ends at log-SNR 3: the last x_hat still shows eps_hat's errors.
      logsnr_fn=lambda t: 3.0 - 9.0 * t, target='eps',
      spec=sampling.SamplerSpec(sampler=sampler, num_steps=6,
                                clip_x=False),
      noise=noise_lib.Noise(noise_lambda=jnp.asarray(lam)))
  a, b = run(two_step), run(single_fn)
  np.testing.assert_allclose(a, b, atol=5e-5)
  # A random z (not drawn from the toy's noise) agrees as well.
  z = jax.random.normal(jax.random.key(4), (2, T, H, H, C))
  logsnr = jnp.array([-2.0, 1.5])
  np.testing.assert_allclose(two_step(z, logsnr, {}),
                             single_fn(z, logsnr, {}), atol=1e-4)


def _tiny_config(**overrides):
  config = videofusion_quickstart.get_config()
  config.data.num_frames = T
  config.data.image_size = 8
  config.data.channels = C
  config.model.update(base_channels=8, channel_mults=(1,), head_dim=8,
                      attn_resolutions=(8,), emb_dim=16,
                      max_temporal_distance=4)
  config.videofusion.base_model.update(
      base_channels=8, channel_mults=(1,), head_dim=8, attn_resolutions=(8,),
      emb_dim=16)
  for k, v in overrides.items():
    group, field = k.split('.', 1)
    if '.' in field:
      sub, field = field.split('.')
      config[group][sub][field] = v
    else:
      config[group][field] = v
  return config


def _params(config, seed=0):
  model = denoiser.create_model(config)
  params = denoiser.init_params(config, model, jax.random.key(seed))
  return model, perturb.perturbed(params, seed, 0.1)


def _frame_losses(model, config, params, x, rng):
  """[T] per-frame eps MSE of the two generators at one noisy clip."""
  noise = noise_lib.from_config(config.diffusion, config.data.num_frames)
  rng_t, rng_e = jax.random.split(rng)
  logsnr = jax.random.uniform(rng_t, (x.shape[0],), minval=-3, maxval=3)
  eps = noise.draw(rng_e, x.shape)
  z = diffusion.q_sample(x, logsnr, eps)
  pred = model.apply({'params': params}, z, logsnr)
  return jnp.mean(jnp.square(pred - eps), axis=(0, 2, 3, 4))


def _norm(tree):
  return float(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))


@pytest.mark.parametrize('mode', ['joint', 'frozen'])
def test_gradients_reach_the_base_only_through_the_key_frame(mode):
  config = _tiny_config(**{'videofusion.base_training': mode})
  model, params = _params(config)
  x = jax.random.uniform(jax.random.key(1), (2, T, 8, 8, C), minval=-1)
  # One compile: the gradient of the frames' losses weighted by w [T].
  grad = jax.jit(jax.grad(lambda p, w: jnp.sum(w * _frame_losses(
      model, config, p, x, jax.random.key(2)))))
  k = T // 2
  key = np.arange(T) == k
  of_others = grad(params, jnp.asarray(~key, jnp.float32))
  of_key = grad(params, jnp.asarray(key, jnp.float32))
  # The other frames train the residual generator and never the base.
  assert _norm(of_others['residual']) > 0
  jax.tree.map(lambda g: np.testing.assert_array_equal(g, 0.0),
               of_others['base'])
  if mode == 'joint':  # The key frame's noise is b: it trains the base.
    assert _norm(of_key['base']) > 0
  else:
    assert _norm(of_key['base']) == 0


def test_lambda_zero_is_vdm_with_the_residual_generator_alone():
  config = _tiny_config(**{'diffusion.noise_lambda': 0.0})
  vdm = _tiny_config(**{'videofusion.enabled': False,
                        'diffusion.noise': 'iid'})
  model, params = _params(config)
  unet = denoiser.create_model(vdm)
  assert not isinstance(unet, videofusion.VideoFusion)
  # lambda = 0 keeps the key frame's lambda 0 too: plain i.i.d. noise.
  np.testing.assert_array_equal(
      noise_lib.from_config(config.diffusion, T).noise_lambda, 0.0)
  x = jax.random.uniform(jax.random.key(1), (2, T, 8, 8, C), minval=-1)

  def loss(model, params, diffusion_config):
    return diffusion.loss(
        denoiser.make_denoise_fn(model, params), x, jax.random.key(5),
        logsnr_fn=lambda t: 6.0 - 12.0 * t, target='eps',
        noise=noise_lib.from_config(diffusion_config, T)).loss

  np.testing.assert_array_equal(
      loss(model, params, config.diffusion),
      loss(unet, params['residual'], vdm.diffusion))

  def draw(model, params, diffusion_config):
    return sampling.sample(
        denoiser.make_denoise_fn(model, params), jax.random.key(6),
        (2, T, 8, 8, C), logsnr_fn=lambda t: 6.0 - 12.0 * t, target='eps',
        spec=sampling.SamplerSpec(num_steps=3),
        noise=noise_lib.from_config(diffusion_config, T))

  # Float32 precision: XLA fuses the two compiled samplers differently.
  np.testing.assert_allclose(
      draw(model, params, config.diffusion),
      draw(unet, params['residual'], vdm.diffusion), atol=1e-5, rtol=0)


def test_the_key_frames_noise_is_the_base_noise():
  noise = noise_lib.from_config(_tiny_config().diffusion, T)
  np.testing.assert_array_equal(noise.noise_lambda, _lambdas())
  eps = noise.draw(jax.random.key(0), (4000, T, 1, 1, 1))[..., 0, 0, 0]
  corr = np.corrcoef(np.asarray(eps).T)
  k = T // 2
  # Frame k is b: every other frame correlates with it by sqrt(lam).
  np.testing.assert_allclose(np.delete(corr[k], k), np.sqrt(LAM), atol=0.05)
  np.testing.assert_allclose(corr[0, 1], LAM, atol=0.05)


class _ImageDenoiser(nn.Module):
  """A stand-in for a latent image UNet: [B, H, W, C] images."""

  @nn.compact
  def __call__(self, z, logsnr, train=False):
    assert z.ndim == 4
    return nn.Conv(z.shape[-1], (3, 3))(z) * logsnr[:, None, None, None]


def test_an_image_denoiser_plugs_in_as_the_base_generator():
  config = _tiny_config()
  residual = denoiser.create_model(config).residual
  model = videofusion.VideoFusion(
      base=videofusion.FrameAsImage(_ImageDenoiser()), residual=residual,
      noise_lambda=tuple(_lambdas()), base_target='eps')
  z, logsnr, _ = denoiser.example_inputs(config)
  params = model.init(jax.random.key(0), z, jnp.ones_like(logsnr))['params']
  assert set(params) == {'base', 'residual'}
  out = model.apply({'params': params}, z + 1.0, logsnr + 1.0, train=False)
  assert out.shape == z.shape


@pytest.mark.parametrize('override,match', [
    ({'diffusion.target': 'v'}, "target must be 'eps'"),
    ({'diffusion.noise_key_frame': 0}, 'key frame'),
    ({'videofusion.base_training': 'sometimes'}, 'base_training'),
    ({'diffusion.noise': 'iid'}, 'decomposed'),
])
def test_bad_settings_fail_before_compiling(override, match):
  with pytest.raises(ValueError, match=match):
    denoiser.validate(_tiny_config(**override))


def _train_config(**overrides):
  config = _tiny_config(**overrides)
  config.data.channels = 3
  config.training.update(batch_size=8, num_train_steps=2,
                         checkpoint_every_steps=2, log_every_steps=1)
  config.optimizer.warmup_steps = 1
  config.sample.update(num_steps=2, num_videos=2, batch_size=2)
  return config


def _image_workdir(workdir, **model):
  """A workdir holding an image model of the base's shape (step 0)."""
  config = _train_config()
  config.videofusion.enabled = False
  config.data.num_frames = 1
  config.diffusion.update(noise='iid', target='v', noise_key_frame=-1)
  config.model.update(config.videofusion.base_model)
  config.model.update(model)
  unet = denoiser.create_model(config)
  params = perturb.perturbed(
      denoiser.init_params(config, unet, jax.random.key(7)), 7, 0.1)
  state = training.TrainState.create(params, optax.adam(1e-3))
  checkpoint.save_config(config, workdir)
  ckpt = checkpoint.Checkpointer(workdir, async_save=False)
  ckpt.save(0, state, force=True)
  ckpt.close()
  return state


def test_train_starts_from_the_image_model_and_samples(tmp_path):
  """Image model -> VideoFusion with the frozen base -> extend with the
  base noise held fixed (VideoFusion's long videos)."""
  base_dir = str(tmp_path / 'base')
  base_state = _image_workdir(base_dir)

  config = _train_config(**{'videofusion.base_training': 'frozen',
                            'videofusion.base_workdir': base_dir})
  state = train.train(config, str(tmp_path / 'vf'))
  # Frozen: the base is the image model's EMA, unmoved by two Adam steps.
  jax.tree.map(np.testing.assert_array_equal, state.params['base'],
               base_state.ema_params)
  moved = jax.tree.leaves(jax.tree.map(
      lambda a, b: np.any(np.asarray(a) != np.asarray(b)),
      state.params['residual'], state.ema_params['residual']))
  assert any(moved)

  config.sample.update(task='extend', num_frames_out=2 * T,
                       num_cond_frames=1, fixed_base_noise=True)
  setup = tasks.Setup.from_config(config)
  model = denoiser.create_model(config)
  video = jax.random.uniform(jax.random.key(0), (2, T, 8, 8, 3), minval=-1)
  out = tasks.run(tasks.from_config(config.sample),
                  denoiser.make_denoise_fn(model, state.ema_params),
                  jax.random.key(1), setup, video=video, num_videos=2)
  assert out.shape == (2, 2 * T, 8, 8, 3)
  assert np.all(np.isfinite(out))


def test_a_base_workdir_of_another_shape_is_refused(tmp_path):
  config = _train_config(**{'videofusion.base_workdir': str(tmp_path)})
  with pytest.raises(FileNotFoundError, match='config.json'):
    videofusion.check_base_workdir(config, str(tmp_path))
  base_config = _train_config()
  base_config.model.update(config.videofusion.base_model)
  base_config.model.base_channels = 16
  checkpoint.save_config(base_config, str(tmp_path))
  with pytest.raises(ValueError, match='base_channels'):
    videofusion.check_base_workdir(config, str(tmp_path))
