"""SinFusion (vdm_jax.sinfusion, models/nextnet.py) on a tiny moving square.

Checks the receptive-field bound, the frame offsets of the training
examples, backward generation and upsampling with analytic (oracle)
denoisers through the real sampler, that training lowers each model's
loss, the train -> sample -> eval programs end to end, the save-and-stop
on SIGTERM of the shared loop (vdm_jax.training) and exact resume, the
workdir compatibility check, that sampling never imports the optimizer,
and the errors on bad inputs.
"""

import functools
import json
import logging
import os
import signal
import shutil
import subprocess
import sys

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import single_video
from configs import tiny
from vdm_jax import checkpoint
from vdm_jax import schedules
from vdm_jax import sinfusion
from vdm_jax import training
from vdm_jax import video_io
from vdm_jax.models import layers
from vdm_jax.models import nextnet
from vdm_jax.sinfusion import data
from vdm_jax.sinfusion import generate
from vdm_jax.sinfusion import memory
from vdm_jax.sinfusion import metrics
from vdm_jax.sinfusion import train as sf_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_FRAMES = 12
SIZE = 16


def moving_square(num_frames=NUM_FRAMES, size=SIZE, side=4, step=1):
  """uint8 [T, size, size, 3]: a red square moving right over a gradient."""
  y, x = np.mgrid[0:size, 0:size] / (size - 1)
  frames = np.repeat(
      (np.stack([x, y, 0.5 * np.ones_like(x)], -1) * 200 + 20)[None],
      num_frames, axis=0)
  top = size // 2 - side // 2
  for i in range(num_frames):
    left = (1 + i * step) % (size - side)
    frames[i, top:top + side, left:left + side] = (250, 30, 30)
  return frames.astype(np.uint8)


@pytest.fixture(name='video_path')
def fixture_video_path(tmp_path):
  path = str(tmp_path / 'clip.mp4')
  video_io.write_mp4(path, moving_square())
  return path


def _config(path, **overrides):
  config = single_video.get_config('tiny')
  config.data.path = path
  for key, value in overrides.items():
    group, field = key.split('.')
    config[group][field] = value
  return config


def test_receptive_field_is_bounded():
  model = nextnet.NextNet(out_channels=3, width=8, depth=2, kernel_size=3,
                          emb_dim=16, num_cond_frames=1, max_offset=3)
  r = nextnet.receptive_field_radius(2, 3)
  assert r == 7
  rng = np.random.default_rng(0)
  z, frames = (jnp.asarray(rng.normal(size=(1, 20, 20, 3)), jnp.float32)
               for _ in range(2))
  logsnr, k = jnp.zeros((1,)), jnp.full((1,), -2, jnp.int32)
  params = model.init(jax.random.key(0), z, logsnr, frames, k)
  out = model.apply(params, z, logsnr, frames, k)
  yy, xx = np.mgrid[0:20, 0:20]
  for which in ('z', 'frames'):
    z2 = z.at[0, 2, 2].add(5.0) if which == 'z' else z
    f2 = frames.at[0, 2, 2].add(5.0) if which == 'frames' else frames
    changed = np.any(
        np.asarray(model.apply(params, z2, logsnr, f2, k) != out), axis=-1)[0]
    distance = np.maximum(abs(yy - 2), abs(xx - 2))
    assert not changed[distance > r].any(), which
    assert changed[distance == r].any(), which  # The bound is tight.


@pytest.mark.parametrize('kernel_size', [3, 7])
def test_shifted_depthwise_conv_matches_the_grouped_conv(kernel_size):
  """layers.depthwise_conv 'shifted' == 'conv': values and both gradients.

  A random (asymmetric) kernel, so a flipped or transposed tap order fails,
  and a non-square frame with borders, so wrong padding fails.
  """
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 9, 13, 5)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 1, 5)),
                       jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

  @functools.partial(jax.jit, static_argnums=0)
  def value_and_grads(impl):
    out, vjp = jax.vjp(lambda a, b: layers.depthwise_conv(a, b, impl), x,
                       kernel)
    return (out, *vjp(cotangent))

  for got, want in zip(value_and_grads('shifted'), value_and_grads('conv')):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='depthwise impl'):
    layers.depthwise_conv(x, kernel, 'fft')


def test_tap_by_tap_kernel_gradient_matches_lax():
  """layers.conv3x3 kernel_grad='taps' == 'lax' (NextNet's CPU path)."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 7, 11, 4)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)
  cotangent = jnp.asarray(rng.normal(size=(2, 7, 11, 6)), jnp.float32)

  @functools.partial(jax.jit, static_argnums=0)
  def value_and_grads(kernel_grad):
    out, vjp = jax.vjp(
        lambda a, b: layers.conv3x3(a, b, 1, kernel_grad), x, kernel)
    return (out, *vjp(cotangent))

  for got, want in zip(value_and_grads('taps'), value_and_grads('lax')):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_depthwise_module_has_the_parameters_of_nn_conv():
  """Checkpoints of the nn.Conv(feature_group_count=C) blocks carry over."""
  x = jnp.ones((1, 6, 6, 4))
  ours = layers.DepthwiseConv(5).init(jax.random.key(3), x)
  theirs = flax.linen.Conv(4, (5, 5), feature_group_count=4).init(
      jax.random.key(3), x)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_array_equal(a, b)


def test_examples_have_the_right_offsets():
  # Frame i is the constant i / 20 - 0.5, so (x - frames) * 20 recovers k.
  t, k_max = 10, 3
  video = jnp.broadcast_to(
      (jnp.arange(t) / 20 - 0.5)[:, None, None, None], (t, 8, 8, 3))
  ex = data.make_examples('predictor', video, jax.random.key(1), 256,
                          (6, 7), k_max)
  assert ex['x'].shape == (256, 6, 7, 3)
  k = np.asarray(ex['k'])
  np.testing.assert_allclose((ex['x'] - ex['frames'])[:, 0, 0, 0] * 20, k,
                             atol=1e-4)
  assert set(k.tolist()) == {-3, -2, -1, 1, 2, 3}
  ex = data.make_examples('interpolator', video, jax.random.key(2), 256,
                          (6, 7), k_max)
  before, after = ex['frames'][..., :3], ex['frames'][..., 3:]
  np.testing.assert_allclose((after - before)[:, 0, 0, 0] * 20,
                             2 * np.asarray(ex['k']), atol=1e-4)
  np.testing.assert_allclose(ex['x'], (before + after) / 2, atol=1e-5)


def _oracle_sampler(fine_video, config):
  """A FrameSampler whose denoisers know the video exactly.

  predictor: the frame k after the input frame nearest to the condition;
  projector: the input frame nearest to z / alpha; interpolator: the frame
  midway between the two condition frames. All return clean frames
  (target 'x'), so a correct rollout reproduces the video exactly.
  """
  vid = jnp.asarray(fine_video)
  t = len(vid)

  def nearest(frames):  # [B, H, W, C] -> [B] indices into vid
    d = jnp.sum((frames[:, None] - vid[None]) ** 2, axis=(2, 3, 4))
    return jnp.argmin(d, axis=1)

  def predictor(z, logsnr, cond):
    del z, logsnr
    return vid[jnp.clip(nearest(cond['frames']) + cond['k'], 0, t - 1)]

  def projector(z, logsnr, cond):
    del cond
    alpha, _ = schedules.alpha_sigma(logsnr)
    return vid[nearest(z / alpha[:, None, None, None])]

  def interpolator(z, logsnr, cond):
    del z, logsnr
    a, b = nearest(cond['frames'][..., :3]), nearest(cond['frames'][..., 3:])
    return vid[(a + b) // 2]

  fns = {'predictor': predictor, 'projector': projector,
         'interpolator': interpolator}
  return generate.FrameSampler(
      fns, schedules.get_logsnr_fn(config.diffusion), 'x',
      generate.sampler_spec(config.sample))


def test_backward_generation_and_upsampling_with_oracles():
  config = _config('unused.mp4')
  fine = moving_square(num_frames=17, size=24).astype(np.float32) / 127.5 - 1.0
  video = jnp.asarray(fine[:12])
  sampler = _oracle_sampler(fine, config)
  rng = jax.random.key(0)
  # Backward extrapolation of the last 6 frames rebuilds the first 6 in
  # order: only right if k < 0 reaches the Predictor and the generated
  # frames are reversed into natural time order.
  out = generate.extrapolate(sampler, rng, video[6:], num_videos=2,
                             num_new=6, direction='backward', offset=1,
                             projector_t=0.3)
  np.testing.assert_array_equal(out, np.broadcast_to(video, out.shape))
  out = generate.extrapolate(sampler, rng, video[:5], num_videos=1,
                             num_new=7, direction='forward', offset=1,
                             projector_t=0.3)
  np.testing.assert_array_equal(out[0], video)
  # Offset 2 backward from the last frame: frames 11, 9, ... in time order.
  out = generate.diverse(sampler, rng, video, num_videos=1, num_frames=4,
                         start='input', start_frame=-1, direction='backward',
                         offset=2, projector_t=0.0)
  np.testing.assert_array_equal(out[0], video[5::2])
  # max_batch 3: the Interpolator's pairs in chunks, the last one padded.
  for factor, max_batch in ((2, 8), (4, 8), (2, 3), (4, 3)):
    out = generate.upsample(sampler, rng, jnp.asarray(fine[::factor]),
                            factor=factor, offset=1, max_batch=max_batch)
    np.testing.assert_array_equal(out[0], fine)


def test_each_model_learns(video_path):
  # 30 steps take ~0.06 s each without XLA's optimisations; compiling with
  # them costs ~12 s more than the steps save (2026-12-04: 9.4 s vs 20.3 s
  # for the whole run). After 30 steps each loss is 2-6% of its start.
  config = _config(video_path, **{'training.batch_size': 8})
  video, hw = sf_train.prepare(config, '/nonexistent_workdir')
  video = jnp.asarray(video)
  models = sf_train.create_models(config)
  tx, lr_fn = training.create_optimizer(config)
  state = sf_train.init_state(models, tx, jax.random.key(0))

  eval_config = _config(video_path, **{'training.batch_size': 64})
  eval_losses = jax.jit(lambda p: sf_train.model_losses(
      p, video, jax.random.key(7), models=models, config=eval_config, hw=hw))
  before = jax.device_get(eval_losses(state.params))
  step = sf_train.make_train_step(config, models, tx, lr_fn, hw)
  for _ in range(30):
    state, train_metrics = step(state, video, jax.random.key(1))
  after = jax.device_get(eval_losses(state.params))
  assert np.isfinite(float(train_metrics['loss']))
  for name in data.MODEL_NAMES:
    assert after[name] < 0.5 * before[name], (name, before, after)


def test_microbatches_give_the_batch_loss_and_gradient(video_path):
  config = _config(video_path, **{'training.batch_size': 4})
  video, hw = sf_train.prepare(config, '/nonexistent_workdir')
  models = sf_train.create_models(config)
  params = sf_train.init_state(models, training.create_optimizer(config)[0],
                               jax.random.key(0)).params
  for name in data.MODEL_NAMES:
    ex = sf_train._examples(name, jnp.asarray(video), jax.random.key(3),
                            config=config, hw=hw)
    out = {}
    for k in (1, 2, 4):
      config.training.grad_accum_steps = k
      out[k] = sf_train.model_loss_and_grads(
          params[name], ex, model=models[name], config=config, hw=hw)
    for k in (2, 4):
      for a, b in zip(jax.tree.leaves(out[1]), jax.tree.leaves(out[k])):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)


def test_memory_check_refuses_before_the_state_exists(video_path, tmp_path,
                                                      monkeypatch):
  workdir = str(tmp_path / 'work')
  config = _config(video_path, **{'training.memory_limit_gib': 1e-4})

  def no_workdir(*args, **kwargs):
    raise AssertionError('Training went on after the memory check.')

  monkeypatch.setattr(training, 'open_workdir', no_workdir)
  with pytest.raises(memory.InsufficientMemoryError) as info:
    sf_train.train(config, workdir)
  message = str(info.value)
  for part in ('GiB', 'training.memory_limit_gib=0.0001',
               f'data.max_size (now 16: frames {SIZE}x{SIZE}',
               'training.batch_size (now 4)', 'model.width (now 16)',
               'training.grad_accum_steps'):
    assert part in message, (part, message)
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))


def test_memory_estimate_and_limits(video_path, monkeypatch):
  config = _config(video_path, **{'training.memory_limit_gib': 64.0})
  video, hw = sf_train.prepare(config, '/nonexistent_workdir')
  models = sf_train.create_models(config)
  tx, lr_fn = training.create_optimizer(config)
  step_fn = sf_train.make_train_step(config, models, tx, lr_fn, hw)
  estimate = sf_train.check_memory(config, step_fn, models, tx, lr_fn,
                                   video.shape, hw, jax.random.key(1))
  # Parameters, EMA, Adam's two moments (+ the step counters).
  params_bytes = memory.tree_bytes(jax.eval_shape(
      lambda: sf_train.init_state(models, tx, jax.random.key(0)).params))
  assert 4 * params_bytes <= estimate.state <= 4 * params_bytes + 64
  assert estimate.video == video.size * 4
  assert estimate.temp > 0 and estimate.total > estimate.state
  # The limit: given, disabled, or detected (host RAM on CPU).
  assert memory.available_memory(config) == (64 * 2**30,
                                             'training.memory_limit_gib=64')
  config.training.memory_limit_gib = -1.0
  assert memory.available_memory(config)[0] is None
  config.training.memory_limit_gib = 0.0
  monkeypatch.setattr(memory, '_host_available', lambda: (123, 'host RAM'))
  if jax.default_backend() == 'cpu':
    assert memory.available_memory(config) == (123, 'host RAM')
  # Activations scale with the microbatch: the fewest microbatches that fit.
  gib = memory.GIB
  big = memory.MemoryEstimate(temp=8 * gib, state=gib, video=0, other=0)
  assert memory._fitting_accum_steps(big, int(3.5 * gib), 8, 1) == 4
  assert memory._fitting_accum_steps(big, gib, 8, 1) is None


@pytest.fixture(scope='module', name='straight_run')
def fixture_straight_run(tmp_path_factory):
  """The tiny config's 6 steps, uninterrupted: (video path, workdir, state).

  Trained once for the module: the end-to-end test continues a copy of the
  workdir and the SIGTERM test compares its resumed run with the state.
  """
  root = tmp_path_factory.mktemp('straight')
  path = str(root / 'clip.mp4')
  video_io.write_mp4(path, moving_square())
  workdir = str(root / 'work')
  state = sf_train.train(_config(path), workdir)
  return path, workdir, state


def test_train_sample_eval_end_to_end(straight_run, tmp_path, caplog):
  video_path, trained, state = straight_run
  workdir = str(tmp_path / 'work')
  shutil.copytree(trained, workdir)
  config = _config(video_path)
  assert int(state.step) == 6
  # Resumes from step 6 rather than starting over.
  config.training.num_train_steps = 9
  with caplog.at_level(logging.INFO, logger='absl'):
    assert int(sf_train.train(config, workdir).step) == 9
  assert 'Resuming from checkpoint at step 6' in caplog.text
  t, n = NUM_FRAMES, config.sample.num_frames_out
  results = sinfusion.sample_and_save(config, workdir)
  expected = {'diverse_forward': (2, n), 'extrapolate_forward': (2, t + n),
              'upsample_x2': (1, 2 * t - 1), 'upsample_x4': (1, 4 * t - 3)}
  assert {k: v.shape[:2] for k, v in results.items()} == expected
  for tag, (num, _) in expected.items():
    assert results[tag].shape[2:] == (SIZE, SIZE, 3)
    assert os.path.isfile(os.path.join(workdir, 'samples', f'{tag}_0.mp4'))
    assert os.path.isfile(os.path.join(workdir, 'samples',
                                       f'{tag}_{num - 1}.gif'))
    beside = video_path[:-4] + f'_sinfusion_{tag}.mp4'
    assert video_io.read_video(beside).shape[0] == expected[tag][1]
  # The given frames stay untouched in the extrapolation.
  given = video_io.to_uint8(data.load_video(config))
  np.testing.assert_array_equal(results['extrapolate_forward'][0, :t], given)

  config.sample.direction = 'backward'
  config.sample.modes = ('extrapolate', 'diverse')
  config.sample.write_next_to_input = False
  results = sinfusion.sample_and_save(config, workdir)
  backward = results['extrapolate_backward']
  assert backward.shape[:2] == (2, t + n)
  np.testing.assert_array_equal(backward[0, n:], given)
  assert results['diverse_backward'].shape[:2] == (2, n)

  scores = sinfusion.sample_and_evaluate(config, workdir)
  with open(os.path.join(workdir, 'sinfusion_eval.json')) as f:
    assert json.load(f) == scores
  assert scores['step'] == 9 and scores['num_frames'] == 6
  for key in ('nn_patch_dist', 'nnfdiv_like', 'nnf_compression',
              'sample_diversity'):
    assert np.isfinite(scores[key]), key


def test_sigterm_saves_and_stops_then_resume_is_exact(straight_run, tmp_path,
                                                     monkeypatch):
  """SIGTERM during step 2 (training.run's handler): saved at 2, stopped.

  tiny checkpoints every 3 steps, so step 2 is saved only for the signal;
  the same call again resumes there and ends where an uninterrupted run
  does, bit for bit (XLA on CPU is deterministic).
  """
  video_path, _, straight = straight_run
  config = _config(video_path)  # 6 steps.
  make_step = sf_train.make_train_step

  def make_step_that_gets_sigterm(*args):
    step_fn = make_step(*args)

    def stepped(state, video, rng):
      state, metrics = step_fn(state, video, rng)
      if int(state.step) == 2:  # The notice arrives during step 2.
        os.kill(os.getpid(), signal.SIGTERM)
      return state, metrics

    return stepped

  monkeypatch.setattr(sf_train, 'make_train_step', make_step_that_gets_sigterm)
  workdir = str(tmp_path / 'stopped')
  handler = signal.getsignal(signal.SIGTERM)
  assert int(sf_train.train(config, workdir).step) == 2
  assert signal.getsignal(signal.SIGTERM) == handler  # Restored.
  ckpt = checkpoint.Checkpointer(workdir)
  assert ckpt.all_steps() == [2]
  ckpt.close()
  monkeypatch.undo()
  resumed = sf_train.train(config, workdir)
  assert int(resumed.step) == 6
  for a, b in zip(jax.tree.leaves((straight.params, straight.ema_params)),
                  jax.tree.leaves((resumed.params, resumed.ema_params))):
    np.testing.assert_array_equal(a, b)


def test_workdir_of_other_models_or_method_is_refused(tmp_path):
  workdir = str(tmp_path)
  checkpoint.save_config(_config('a.mp4'), workdir)
  fields = checkpoint.SINFUSION_COMPATIBILITY_FIELDS
  checkpoint.check_compatible(_config('b.mp4'), workdir, fields)  # New video.
  with pytest.raises(ValueError, match='model.width: saved 16, requested 32'):
    checkpoint.check_compatible(_config('a.mp4', **{'model.width': 32}),
                                workdir, fields)
  with pytest.raises(ValueError, match="method: saved 'sinfusion', requested"
                     " 'vdm'"):
    checkpoint.check_compatible(tiny.get_config(), workdir)


def test_sample_program_does_not_import_optax():
  code = ('import sys, vdm_jax.sinfusion, vdm_jax.sinfusion.generate,'
          ' vdm_jax.sinfusion.metrics; sys.exit("optax" in sys.modules)')
  subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True,
                 timeout=120)


def test_patch_metrics_reference_points():
  video = moving_square()
  copy = metrics.patch_metrics(video[None], video, patch=3)
  assert copy['nn_patch_dist'] == pytest.approx(0.0, abs=1e-3)
  assert copy['nnfdiv_like'] == pytest.approx(0.0, abs=0.05)
  noise = np.random.default_rng(0).integers(0, 256, (2, *video.shape),
                                            dtype=np.uint8)
  scores = metrics.patch_metrics(noise, video, patch=3)
  assert scores['nnfdiv_like'] > 10
  assert scores['nnf_compression'] > copy['nnf_compression']


@pytest.mark.parametrize('case', ['missing', 'corrupt', 'no_path',
                                  'too_few_frames', 'crop_too_large',
                                  'bad_accum', 'bad_offset'])
def test_bad_inputs_raise_before_training(case, tmp_path, video_path):
  workdir = str(tmp_path / 'work')
  overrides = {}
  path = video_path
  error, match = ValueError, None
  if case == 'missing':
    path, error, match = str(tmp_path / 'nope.mp4'), FileNotFoundError, (
        'config.data.path')
  elif case == 'corrupt':
    path = str(tmp_path / 'corrupt.mp4')
    with open(path, 'wb') as f:
      f.write(b'not a video' * 100)
    match = 'Cannot use config.data.path'
  elif case == 'no_path':
    path, match = '', 'set --config.data.path'
  elif case == 'too_few_frames':
    overrides = {'data.max_frames': 3}
    match = 'needs at least 4'
  elif case == 'crop_too_large':
    overrides = {'data.crop_size': (SIZE + 1, SIZE)}
    match = 'does not fit'
  elif case == 'bad_accum':
    overrides = {'training.grad_accum_steps': 3}
    match = 'grad_accum_steps=3 must be >= 1 and divide'
  else:
    overrides = {'sample.predict_offset': 4}
    match = 'predict_offset'
  config = _config(path, **overrides)
  with pytest.raises(error, match=match):
    if case == 'bad_offset':
      sinfusion.sample_and_save(config, workdir)
    else:
      sf_train.train(config, workdir)
  assert not os.path.exists(os.path.join(workdir, 'checkpoints'))
