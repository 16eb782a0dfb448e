"""Image-to-video and Generative Inbetweening: conditioning, attention
rotation, the backward tune, fused sampling, re-injection, inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import tiny
from tests import perturb
from vdm_jax import checkpoint
from vdm_jax import denoiser
from vdm_jax import sample_inputs
from vdm_jax import sampling
from vdm_jax import schedules
from vdm_jax import tasks
from vdm_jax import train
from vdm_jax import training
from vdm_jax.adapt import inbetween
from vdm_jax.adapt import tune_backward
from vdm_jax.models import layers

T, S = 4, 16


def _config():
  config = tiny.get_config()
  config.model.image_condition = True
  config.data.num_classes = 0
  config.training.label_dropout = 0.0
  config.diffusion.target = 'v'
  return config


@pytest.fixture(scope='module')
def model_params():
  """A tiny image-to-video UNet whose zero-initialised output projections
  are randomised, so every attention reaches the output."""
  config = _config()
  model = denoiser.create_model(config)
  params = jax.jit(lambda r: denoiser.init_params(config, model, r))(
      jax.random.key(0))
  return config, model, perturb.perturbed(params, 1, 0.05)


def _inputs(seed=2, b=2):
  rng = np.random.default_rng(seed)
  z = jnp.asarray(rng.normal(size=(b, T, S, S, 3)), jnp.float32)
  image = jnp.asarray(rng.uniform(-1, 1, size=(b, S, S, 3)), jnp.float32)
  logsnr = jnp.asarray(rng.uniform(-3, 3, size=(b,)), jnp.float32)
  return z, image, logsnr


def _cond(image):
  return denoiser.image_cond(image, jnp.full((image.shape[0],), 0.02),
                             jnp.zeros_like(image))


def test_a_null_image_ignores_the_image_and_the_image_matters(model_params):
  _, model, params = model_params
  z, image, logsnr = _inputs()
  apply = jax.jit(lambda img, null: model.apply(
      {'params': params}, z, logsnr, image=img,
      image_sigma=jnp.full((2,), 0.02), image_null=jnp.full((2,), null)))
  np.testing.assert_array_equal(apply(image, True), apply(-image, True))
  assert float(jnp.abs(apply(image, False) - apply(-image, False)).max()) > 1e-3


def test_injected_attention_is_exactly_the_rotated_map(model_params):
  _, model, params = model_params
  z, image, logsnr = _inputs()
  cond = _cond(image)
  pred, probs = inbetween.capture(model, params, z, logsnr, cond)
  paths = inbetween.temporal_attention_paths(params)
  assert len(jax.tree.leaves(probs)) == len(paths) == 4  # One per block.
  # Injecting a pass's own maps reproduces it exactly.
  np.testing.assert_array_equal(
      inbetween.inject(model, params, z, logsnr, cond, probs), pred)
  # The backward pass uses the forward maps flipped along both frame axes:
  # what it attends with (captured while injected) is exactly that.
  z_b = jnp.flip(z, 1)
  rotated = inbetween.rotate(probs)
  out, used = model.apply({'params': params, layers.INJECT: rotated}, z_b,
                          logsnr, mutable=[layers.CAPTURE], **cond)
  for got, p in zip(jax.tree.leaves(used[layers.CAPTURE]),
                    jax.tree.leaves(probs)):
    np.testing.assert_array_equal(got, p[..., ::-1, ::-1])
    assert not np.array_equal(got, p[..., ::-1, :])  # Not one axis only.
    np.testing.assert_allclose(np.asarray(got).sum(-1), 1.0, atol=1e-5)
  own = model.apply({'params': params}, z_b, logsnr, **cond)
  assert float(jnp.abs(out - own).max()) > 1e-4  # The injection acts.
  # The pair function is that forward capture and rotated injection.
  bwd = inbetween.merge_backward(inbetween.split_backward(params), params)
  pair = inbetween.make_pair_fn(model, params, bwd)
  pred_f, pred_b = pair(z, z_b, logsnr, cond, cond)
  np.testing.assert_array_equal(pred_f, pred)
  np.testing.assert_array_equal(pred_b, out)


def test_split_and_merge_touch_only_value_and_output_projections(
    model_params):
  _, _, params = model_params
  tuned = inbetween.split_backward(params)
  same = inbetween.merge_backward(tuned, params)
  assert jax.tree.structure(same) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(same), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)
  changed = jax.tree.map(lambda a: a + 1.0, tuned)
  merged = inbetween.merge_backward(changed, params)
  flat_m = jax.tree_util.tree_flatten_with_path(merged)[0]
  flat_p = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  n_changed = 0
  for path, leaf in flat_m:
    names = [k.key for k in path]
    diff = np.asarray(leaf) != np.asarray(flat_p[path])
    temporal = any(n.startswith('tattn_') or n == 'mid_tattn' for n in names)
    if temporal and names[-2] == 'qkv':
      c = leaf.shape[-1] // 3
      assert diff[..., 2 * c:].all() and not diff[..., :2 * c].any(), names
      n_changed += 1
    elif temporal and names[-2] == 'out':
      assert diff.all(), names
      n_changed += 1
    else:
      assert not diff.any(), names
  assert n_changed == 4 * 4


def _gaussian_x_eps(scale):
  """The exact denoiser of x ~ N(0, scale^2) per pixel, as an 'eps' model."""

  def denoise_fn(z, logsnr, cond):
    del cond
    alpha, sigma = schedules.alpha_sigma(
        logsnr.reshape((-1,) + (1,) * (z.ndim - 1)))
    var = jnp.square(alpha * scale) + jnp.square(sigma)
    x_hat = alpha * scale**2 / var * z
    return (z - alpha * x_hat) / sigma

  return denoise_fn


def test_renoise_takes_the_marginal_of_s_back_to_t():
  key = jax.random.key(0)
  x = 0.7
  ls, lt = jnp.float32(2.0), jnp.float32(-1.0)
  a_s, s_s = schedules.alpha_sigma(ls)
  a_t, s_t = schedules.alpha_sigma(lt)
  k1, k2 = jax.random.split(key)
  z_s = a_s * x + s_s * jax.random.normal(k1, (200_000,))
  z_t = sampling.renoise(z_s, jax.random.normal(k2, (200_000,)), ls, lt)
  assert abs(float(z_t.mean()) - float(a_t * x)) < 0.01
  assert abs(float(z_t.std()) - float(s_t)) < 0.01


def test_reinjection_keeps_the_sampled_distribution(sampler='ancestral'):
  """With the exact denoiser of Gaussian data, re-injected sampling still
  draws the data's variance (to the sampler's discretisation error: 0.472
  without re-injection at 64 ancestral steps), and it is not the plain
  sampler."""
  scale = 0.5
  fn = _gaussian_x_eps(scale)
  logsnr_fn = schedules.get_logsnr_fn(tiny.get_config().diffusion, S)
  spec = sampling.SamplerSpec(sampler=sampler, num_steps=64, eta=1.0,
                              clip_x=False)
  x = sampling.sample(fn, jax.random.key(3), (64, 2, 8, 8, 1),
                      logsnr_fn=logsnr_fn, target='eps', spec=spec,
                      reinject=(32, 5))
  assert abs(float(jnp.std(x)) - scale) < 0.03, float(jnp.std(x))
  plain = sampling.sample(fn, jax.random.key(3), (64, 2, 8, 8, 1),
                          logsnr_fn=logsnr_fn, target='eps', spec=spec)
  assert not np.array_equal(np.asarray(x), np.asarray(plain))


def _block(config, model, params, pair_fn=None, steps=3):
  setup = tasks.Setup.from_config(config, num_steps=steps)
  setup = tasks.Setup(setup.model, setup.spec.replace(sampler='ddim'),
                      setup.logsnr_fn, setup.target, setup.noise)
  return setup, denoiser.make_denoise_fn(model, params), pair_fn


def test_fusion_with_forward_weight_one_is_the_forward_sampler(model_params):
  config, model, params = model_params
  z, image, _ = _inputs()
  setup, denoise_fn, _ = _block(config, model, params)
  bwd = inbetween.merge_backward(
      jax.tree.map(lambda a: -a, inbetween.split_backward(params)), params)
  pair = inbetween.make_pair_fn(model, params, bwd)
  scale = sampling.guidance_ramp(1.0, 3.0, T)
  cond = _cond(image)
  kw = dict(logsnr_fn=setup.logsnr_fn, target='v', spec=setup.spec)
  forward = sampling.sample(sampling.image_guided(denoise_fn, scale),
                            jax.random.key(4), z.shape, cond=cond, **kw)
  other = dict(cond, image=jnp.flip(image, 1))
  fused = lambda w: sampling.sample(
      sampling.fused_bidirectional(pair, jnp.full((T,), w), scale),
      jax.random.key(4), z.shape, cond={'forward': cond, 'backward': other},
      **kw)
  np.testing.assert_array_equal(fused(1.0), forward)
  assert float(jnp.abs(fused(0.5) - forward).max()) > 1e-3


def _write_png(path, h, w, value):
  Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def test_inbetween_keeps_its_keyframes_and_image_to_video_its_first(
    model_params, tmp_path):
  config, model, params = model_params
  setup, denoise_fn, _ = _block(config, model, params, steps=2)
  pair = inbetween.make_pair_fn(model, params, params)
  _, image, _ = _inputs()
  video = jnp.stack([image, jnp.zeros_like(image), -image], axis=1)
  task = tasks.Inbetween(inbetween_reinject_repeats=2)
  x = tasks.run(task, denoise_fn, jax.random.key(5), setup, video=video,
                pair_fn=pair)
  assert x.shape == (2, T, S, S, 3)
  np.testing.assert_array_equal(x[:, 0], image)
  np.testing.assert_array_equal(x[:, -1], -image)
  np.testing.assert_array_equal(task.known_positions(setup.model, 2, T),
                                [True, False, False, True])
  with pytest.raises(ValueError, match='backward-motion model'):
    tasks.run(task, denoise_fn, jax.random.key(5), setup, video=video)
  x = tasks.run(tasks.ImageToVideo(), denoise_fn, jax.random.key(5), setup,
                video=image[:, None])
  np.testing.assert_array_equal(x[:, 0], image)


def test_keyframe_files_same_size_resized_different_sizes_refused(
    model_params, tmp_path, caplog):
  config, _, _ = model_params
  a, b, c = (str(tmp_path / n) for n in ('a.png', 'b.png', 'c.png'))
  _write_png(a, 24, 32, 10)
  _write_png(b, 24, 32, 200)
  _write_png(c, 20, 32, 200)
  with pytest.raises(ValueError, match='must have one size'):
    sample_inputs.read_keyframes(f'{a},{c}')
  with pytest.raises(ValueError, match='two image files'):
    sample_inputs.read_keyframes(a)
  config.sample.task = 'inbetween'
  config.sample.keyframes = f'{a},{b}'
  task = tasks.from_config(config.sample)
  model = tasks.ModelShape.from_config(config)
  with caplog.at_level('WARNING'):
    inputs = sample_inputs.load(config, task, model, 3, seed=0)
  assert 'resized' in caplog.text
  assert inputs.video.shape == (3, 2, S, S, 3)
  assert (inputs.video[:, 0] == 10).all() and (inputs.video[:, 1] == 200).all()


def test_bad_requests_are_refused_before_compiling(model_params, tmp_path):
  config, _, _ = model_params
  spec = sampling.SamplerSpec()
  two = tasks.ModelShape(2, S, 3, image_condition=True)
  with pytest.raises(ValueError, match='at least 3 frames'):
    tasks.Inbetween().validate(two, (1, 2, S, S, 3), spec)
  plain = tasks.ModelShape(T, S, 3)
  with pytest.raises(ValueError, match='image-to-video model'):
    tasks.ImageToVideo().validate(plain, (1, 1, S, S, 3), spec)
  with pytest.raises(ValueError, match='inbetween_weight'):
    tasks.Inbetween(inbetween_weight='linear').validate(
        tasks.ModelShape(T, S, 3, image_condition=True), (1, 2, S, S, 3),
        spec)
  # A joint image-video i2v config.
  bad = _config()
  bad.data.image_frames = 2
  with pytest.raises(ValueError, match='image_frames'):
    train.validate_config(bad, str(tmp_path / 'w'))
  # A backward tune of a base that is not an image-to-video model.
  base = tiny.get_config()
  base.data.num_classes = 0
  checkpoint.save_config(base, str(tmp_path / 'base'))
  tune_config = _config()
  tune_config.tune.base_workdir = str(tmp_path / 'base')
  with pytest.raises(ValueError, match='without image conditioning'):
    tune_backward.validate(tune_config, str(tmp_path / 'bwd'))


def test_backward_tune_changes_only_the_tuned_params(model_params):
  config, model, params = model_params
  config = tune_backward.backward_config(config)
  # Their code keeps no EMA: the EMA the sampler restores is the tuned
  # parameters (the forward model's 0.9999 left a 2,000-step tune ~82%
  # untuned).
  assert config.optimizer.ema_decay == 0.0
  config.optimizer.learning_rate = 1e-2
  tx, lr_fn = training.create_optimizer(config)
  forward = jax.tree.map(jnp.array, params)
  before = jax.tree.map(np.array, forward)
  state = training.TrainState.create(
      jax.tree.map(jnp.copy, inbetween.split_backward(forward)), tx)
  tuned0 = jax.tree.map(np.array, state.params)
  step = jax.jit(lambda s, f, b, r: tune_backward.tune_backward_step(
      s, f, b, r, model=model, tx=tx, lr_fn=lr_fn, config=config),
                 donate_argnums=0)
  video = np.random.default_rng(0).integers(0, 256, (1, T, S, S, 3), np.uint8)
  for _ in range(2):
    state, metrics = step(state, forward, {'video': video},
                          jax.random.key(0))
  assert np.isfinite(float(metrics['loss']))
  for a, b in zip(jax.tree.leaves(forward), jax.tree.leaves(before)):
    np.testing.assert_array_equal(np.asarray(a), b)  # Bitwise unchanged.
  moved = [float(np.abs(np.asarray(a) - b).max())
           for a, b in zip(jax.tree.leaves(state.params),
                           jax.tree.leaves(tuned0))]
  assert min(moved) > 0, moved
  for e, p in zip(jax.tree.leaves(state.ema_params),
                  jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(e, p)


def test_backward_loss_pairs_the_reversed_clip_with_the_forward_reference(
    model_params, monkeypatch):
  """The denoiser the backward loss trains: the backward model on z (the
  reversed clip's noisy latent) conditioned on the clip's LAST frame, with
  the maps of the frozen forward model run on flip(z) (the forward clip,
  its noise flipped in time) conditioned on the clip's FIRST frame,
  rotated; the target is the reversed clip."""
  _, model, params = model_params
  tuned = jax.tree.map(lambda a: -a, inbetween.split_backward(params))
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.uniform(-1, 1, (2, T, S, S, 3)), jnp.float32)
  seen = {}

  def fake_loss(denoise_fn, x0, rngs, **kw):
    del rngs, kw
    seen['fn'], seen['x'] = denoise_fn, x0

  monkeypatch.setattr(inbetween.diffusion, 'loss', fake_loss)
  # Augmentation level e^-40: the conditioning frames are the keyframes.
  inbetween.backward_loss(
      model, params, tuned, x, jax.random.key(1), logsnr_fn=None,
      target='v', noise=None, image_kwargs=dict(
          dropout=0.0, noise_mean=-40.0, noise_std=0.0),
      dropout_rng=jax.random.key(2))
  np.testing.assert_array_equal(seen['x'], x[:, ::-1])
  z, _, logsnr = _inputs(seed=8)
  sigma = jnp.full((2,), np.exp(-40.0), jnp.float32)
  first = denoiser.image_cond(x[:, 0], sigma, jnp.zeros_like(x[:, 0]))
  last = denoiser.image_cond(x[:, -1], sigma, jnp.zeros_like(x[:, 0]))
  _, maps = inbetween.capture(model, params, z[:, ::-1], logsnr, first)
  want = inbetween.inject(model, inbetween.merge_backward(tuned, params), z,
                          logsnr, last, inbetween.rotate(maps))
  got = seen['fn'](z, logsnr, {})
  np.testing.assert_allclose(got, want, atol=1e-5)
  # What the mutations would give differs well beyond that.
  _, own = inbetween.capture(model, params, z, logsnr, first)
  wrong = inbetween.inject(model, inbetween.merge_backward(tuned, params), z,
                           logsnr, first, inbetween.rotate(own))
  assert float(jnp.abs(wrong - want).max()) > 1e-3


def _analytic_pair(z_f, z_b, logsnr, cond_f, cond_b):
  """Each model's prediction, frame g of its own time: 0.3 z + (g + 1) u
  with the null image, 0.3 z + (g + 1) image + 1 with the image (u = -2
  forward, 5 backward), image a scalar per video."""
  del logsnr
  g = jnp.arange(z_f.shape[1], dtype=jnp.float32).reshape(1, -1, 1, 1, 1)

  def pred(z, cond, u):
    null = cond['image_null'].reshape(-1, 1, 1, 1, 1)
    image = cond['image'][:, None, :1, :1, :1]
    return 0.3 * z + jnp.where(null, (g + 1) * u, (g + 1) * image + 1)

  return pred(z_f, cond_f, -2.0), pred(z_b, cond_b, 5.0)


def _expected_fusion(z, a, b, w, s_f, s_b):
  """By hand, frame by frame: w_f g_f + (1 - w_f) g_b(T - 1 - f) with each
  model's guided prediction u + s (c - u) in its own time."""
  t = z.shape[1]
  out = np.zeros_like(z)
  for f in range(t):
    fwd_c = 0.3 * z[:, f] + (f + 1) * a + 1
    fwd_u = 0.3 * z[:, f] + (f + 1) * -2.0
    g = t - 1 - f  # The backward model's frame for fused frame f.
    bwd_c = 0.3 * z[:, f] + (g + 1) * b + 1  # Its z is flip(z): z[g'] = z[f].
    bwd_u = 0.3 * z[:, f] + (g + 1) * 5.0
    fwd = fwd_u + s_f[f] * (fwd_c - fwd_u)
    bwd = bwd_u + s_b[g] * (bwd_c - bwd_u)
    out[:, f] = w[f] * fwd + (1 - w[f]) * bwd
  return out


@pytest.mark.parametrize('weight,guidance', [
    ('half', 'auto'), ('half', 'own'), ('ramp', 'auto'), ('ramp', 'averaged')])
def test_fused_prediction_flips_the_backward_one_back_and_guides_each(
    weight, guidance):
  """The fused denoiser of tasks.Inbetween against the formula written out
  frame by frame, with analytic models: the backward prediction is made on
  flip(z) and flipped back; guidance is u + s (c - u) with the ramp 1 -> 3
  starting on each model's own keyframe ('own') or averaged with its flip,
  a constant 2 ('averaged': their code's with w = 0.5; 'auto' picks it
  for 'half' and 'own' for 'ramp')."""
  model = tasks.ModelShape(T, S, 3, image_condition=True)
  task = tasks.Inbetween(inbetween_weight=weight, inbetween_guidance=guidance)
  task.validate(model, (2, 2, S, S, 3), sampling.SamplerSpec())
  z = np.random.default_rng(3).normal(size=(2, T, 2, 2, 1)).astype(np.float32)
  a, b = 0.7, -0.4
  cond_f = {'image': jnp.full((2, 2, 2, 1), a)}
  cond_b = {'image': jnp.full((2, 2, 2, 1), b)}
  fused = sampling.fused_bidirectional(
      _analytic_pair, sampling.fusion_weights(weight, T),
      task.image_scales(model))
  got = fused(jnp.asarray(z), jnp.zeros((2,)),
              {'forward': cond_f, 'backward': cond_b})
  w = [0.5] * T if weight == 'half' else np.linspace(1, 0, T)
  mode = {'auto': 'averaged' if weight == 'half' else 'own'}.get(
      guidance, guidance)
  ramp = np.linspace(1.0, 3.0, T)  # 1 on the model's keyframe.
  s = ramp if mode == 'own' else np.full(T, 2.0)
  np.testing.assert_allclose(got, _expected_fusion(z, a, b, w, s, s),
                             rtol=1e-6, atol=1e-5)


def test_image_guidance_is_one_on_the_given_frame_and_three_on_the_last():
  """pred_u + s_f (pred_c - pred_u) with s_f linear 1 -> 3 from the given
  frame: frame 0 is the conditional prediction itself."""
  model = tasks.ModelShape(T, S, 3, image_condition=True)
  c, u = 0.25, -1.5

  def fn(z, logsnr, cond):
    del logsnr
    null = cond['image_null'].reshape(-1, 1, 1, 1, 1)
    return jnp.where(null, u, c) + 0 * z

  guided = sampling.image_guided(fn, tasks.ImageToVideo().image_scales(model))
  got = np.asarray(guided(jnp.zeros((1, T, 2, 2, 1)), jnp.zeros((1,)),
                          {'image': jnp.zeros((1, 2, 2, 1))}))
  want = [u + s * (c - u) for s in np.linspace(1.0, 3.0, T)]
  np.testing.assert_allclose(got[0, :, 0, 0, 0], want, rtol=1e-6)
  assert got[0, 0, 0, 0, 0] == np.float32(c)


def test_reinjection_renoises_repeats_times_as_their_code(monkeypatch):
  """Their loop: each of the first `steps` steps is taken, then `repeats`
  times re-noised (N(0, sigma_t^2 - sigma_s^2)) and taken again at the same
  t: 1 + repeats denoiser calls at t, then one per later step."""
  calls, renoised = [], []
  fn = _gaussian_x_eps(0.5)

  def counted(z, logsnr, cond):
    jax.debug.callback(lambda l: calls.append(float(l[0])), logsnr,
                       ordered=True)
    return fn(z, logsnr, cond)

  real_renoise = sampling.renoise

  def counted_renoise(z_s, noise, logsnr_s, logsnr_t):
    jax.debug.callback(lambda l: renoised.append(float(l)), logsnr_t,
                       ordered=True)
    return real_renoise(z_s, noise, logsnr_s, logsnr_t)

  monkeypatch.setattr(sampling, 'renoise', counted_renoise)
  logsnr_fn = schedules.get_logsnr_fn(tiny.get_config().diffusion, S)
  spec = sampling.SamplerSpec(sampler='ddim', num_steps=4, eta=0.0)
  jax.block_until_ready(sampling.sample(
      jax.tree_util.Partial(counted), jax.random.key(0), (1, 2, 2, 2, 1),
      logsnr_fn=logsnr_fn, target='eps', spec=spec, reinject=(2, 3)))
  jax.effects_barrier()
  grid = np.asarray(sampling.timestep_logsnrs(logsnr_fn, 4))
  want = [grid[0]] * 4 + [grid[1]] * 4 + [grid[2], grid[3]]
  np.testing.assert_allclose(calls, want, rtol=1e-6)
  np.testing.assert_allclose(renoised, [grid[0]] * 3 + [grid[1]] * 3,
                             rtol=1e-6)


def test_sparse_causal_attention_with_joint_image_frames_is_refused(
    tmp_path):
  config = tiny.get_config()
  config.model.spatial_attention = 'sparse_causal'
  config.data.image_frames = 2
  with pytest.raises(ValueError, match='image_frames'):
    train.validate_config(config, str(tmp_path / 'w'))
