"""Tune-A-Video: inflation, sparse-causal attention, one-shot tuning, editing."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from tests import perturb
from vdm_jax import checkpoint
from vdm_jax import denoiser
from vdm_jax import sample
from vdm_jax import video_io
from vdm_jax.adapt import inflate
from vdm_jax.adapt import tuned
from vdm_jax.data import synthetic
from vdm_jax.models import layers

L = 12
T = 4


def _image_config(**overrides):
  """A tiny text-to-image model (no temporal attention)."""
  config = tiny.get_config()
  config.text.encoder = 'wordllama'
  config.text.max_length = L
  config.data.motion = 'straight'
  config.data.num_frames = 1
  config.model.num_classes = 0
  config.model.temporal_attention = False
  config.training.label_dropout = 0.0
  config.training.num_train_steps = 2
  config.training.checkpoint_every_steps = 2
  for k, v in overrides.items():
    group, field = k.split('.')
    config[group][field] = v
  return config


def _video_config(spatial='sparse_causal', **overrides):
  """The inflated model of _image_config, for T-frame clips."""
  config = _image_config()
  config.data.num_frames = T
  config.model.temporal_attention = True
  config.model.spatial_attention = spatial
  config.tune.num_frames = T
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 1e-2
  config.optimizer.weight_decay = 1e-2
  config.optimizer.warmup_steps = 0
  config.optimizer.ema_decay = 0.0
  config.training.batch_size = 1
  config.training.num_train_steps = 3
  config.training.checkpoint_every_steps = 3
  config.text.dropout = 0.0
  config.sample.task = 'edit'
  config.sample.sampler = 'ddim'
  config.sample.eta = 0.0
  config.sample.num_steps = 4
  config.sample.guidance_weight = 2.0
  config.sample.prompt = 'a blue square moving left'
  for k, v in overrides.items():
    group, field = k.split('.')
    config[group][field] = v
  return config


def _inputs(config, b, rng):
  emb = denoiser.text_encoder(config).encode(['a red square moving up'] * b)
  z = jax.random.normal(rng, (b, T, 16, 16, 3))
  return z, jnp.full((b,), 1.5), {'text': emb.tokens, 'text_mask': emb.mask}


def _params(config, rng):
  model = denoiser.create_model(config)
  return model, jax.jit(lambda r: denoiser.init_params(config, model, r))(
      rng)


def _apply(model):
  return jax.jit(lambda p, z, logsnr, cond: model.apply({'params': p}, z,
                                                        logsnr, **cond))


def _trained(params, seed, scale=0.2):
  """params moved off their initialisation (zero output layers included),
  as training would."""
  return perturb.perturbed(params, seed, scale)


def test_sparse_causal_attention_sees_frames_zero_and_previous():
  """Frame i's queries attend to frames 0 and i - 1 (their code's
  former_frame_index), values equal to a direct reference."""
  t, b, c = 5, 2, 16
  layer = layers.SpatialAttention(head_dim=8, pattern='sparse_causal',
                                  num_frames=t)
  x = jax.random.normal(jax.random.key(0), (b * t, 4, 4, c))
  params = layer.init(jax.random.key(1), x)['params']
  params['out']['kernel'] = jax.random.normal(jax.random.key(2), (c, c))
  apply = lambda x: layer.apply({'params': params}, x)
  jac = jax.jacrev(lambda x: apply(x).reshape(b, t, -1)[0].sum(-1))(x)
  # jac[i]: d(sum of query frame i) / d x, per input frame of video 0.
  seen = np.abs(np.asarray(jac)).reshape(t, b, t, -1).sum(-1)[:, 0] > 0
  want = np.zeros((t, t), bool)
  for i in range(t):
    want[i, [0, max(i - 1, 0), i]] = True  # i: its own query (residual).
  np.testing.assert_array_equal(seen, want)
  # Values: the attention of frame i's queries over [frame 0, frame i-1].
  h = layers.GroupNorm().apply({'params': params['norm']}, x)
  dense = lambda p, v: v @ p['kernel'] + p['bias']
  q = dense(params['q'], h).reshape(b, t, 16, 2, 8) / np.sqrt(8)
  kv = dense(params['kv'], h).reshape(b, t, 16, 2, 2, 8)
  out = np.zeros((b, t, 16, 2, 8), np.float32)
  for i in range(t):
    keys = np.concatenate([kv[:, 0], kv[:, max(i - 1, 0)]], axis=1)
    logits = np.einsum('bqhd,bkhd->bhqk', q[:, i], keys[:, :, 0])
    w = jax.nn.softmax(logits, axis=-1)
    out[:, i] = np.einsum('bhqk,bkhd->bqhd', w, keys[:, :, 1])
  ref = x + dense(params['out'], out.reshape(b * t, 4, 4, c))
  np.testing.assert_allclose(apply(x), ref, atol=1e-5, rtol=1e-5)


def test_inflated_model_equals_the_image_model_at_step_zero():
  image_config = _image_config()
  image_model, image_params = _params(image_config, jax.random.key(0))
  image_params = _trained(image_params, 3)
  z, logsnr, cond = _inputs(image_config, 2, jax.random.key(1))
  image_fn = _apply(image_model)
  want = image_fn(image_params, z, logsnr, cond)
  assert np.abs(want).mean() > 0.1
  # The temporal attentions alone (full spatial attention): bitwise.
  config = _video_config(spatial='self')
  model, fresh = _params(config, jax.random.key(2))
  params = inflate.inflate_params(image_params, fresh)
  fn = _apply(model)
  got = fn(params, z, logsnr, cond)
  np.testing.assert_array_equal(got, want)
  # Trained temporal attention (non-zero output projection) does change it.
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  assert any('tattn' in jax.tree_util.keystr(p) for p, _ in flat)
  moved = jax.tree_util.tree_map_with_path(
      lambda p, v: v + 0.1 if 'tattn' in jax.tree_util.keystr(p) else v,
      params)
  assert np.abs(fn(moved, z, logsnr, cond)
                - want).max() > 1e-3
  # With sparse-causal attention: frame 0 (which attends to itself) on any
  # video, and every frame of a still video, to float32 precision.
  config = _video_config()
  model, fresh = _params(config, jax.random.key(2))
  params = inflate.inflate_params(image_params, fresh)
  fn = _apply(model)
  got = fn(params, z, logsnr, cond)
  np.testing.assert_allclose(got[:, 0], want[:, 0], atol=2e-5)
  assert np.abs(got[:, 1:] - want[:, 1:]).max() > 1e-3
  still = jnp.broadcast_to(z[:, :1], z.shape)
  want = image_fn(image_params, still, logsnr, cond)
  got = fn(params, still, logsnr, cond)
  np.testing.assert_allclose(got, want, atol=2e-5)


def test_tuned_parameters_are_the_queries_and_temporal_attention():
  config = _video_config()
  _, params = _params(config, jax.random.key(0))
  tuned_half, frozen = inflate.split(params)
  paths = ['/'.join(k) for k in inflate._flat(tuned_half)]
  assert paths and all(
      '/tattn' in p or p.startswith('mid_tattn') or p.endswith(('q/kernel',
                                                                'q/bias'))
      for p in paths), paths
  assert any('sattn_0/q/' in p for p in paths)
  assert any('xattn_0/q/' in p for p in paths)
  assert not any('/kv/' in p or 'res_' in p for p in paths)
  assert denoiser.count_params(tuned_half) + denoiser.count_params(frozen) == (
      denoiser.count_params(params))
  jax.tree.map(np.testing.assert_array_equal,
               inflate.merge(tuned_half, frozen), params)
  everything, none = inflate.split(params, 'all')
  assert denoiser.count_params(none) == 0
  with pytest.raises(ValueError, match='tune.trainable'):
    inflate.split(params, 'queries')


def test_inflation_refuses_a_different_network():
  _, image_params = _params(_image_config(**{'model.emb_dim': 16}),
                            jax.random.key(0))
  _, fresh = _params(_video_config(), jax.random.key(1))
  with pytest.raises(ValueError, match='model size'):
    inflate.inflate_params(image_params, fresh)


def _write_source(path, num_frames):
  clips = synthetic.SyntheticVideos(num_frames, 16, motion='straight'
                                    ).render_batch([3])['video']
  video_io.write_mp4(path, clips[0], fps=8)
  return clips[0]


@pytest.fixture(scope='module')
def tuned_run(tmp_path_factory):
  """A tiny text-to-image base (2 steps), then a 3-step tune on one clip."""
  from vdm_jax import train  # pylint: disable=g-import-not-at-top
  from vdm_jax.adapt import tune  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('tav')
  base = str(root / 'base')
  train.train(_image_config(), base)
  video = str(root / 'clip.mp4')
  _write_source(video, 10)
  config = _video_config(**{'tune.base_workdir': base,
                            'tune.video': video,
                            'tune.caption': 'a red square moving up',
                            'tune.frame_stride': 2})
  state = tune.tune(config, str(root / 'tav'))
  return config, str(root / 'tav'), state


def test_tune_trains_only_the_tuned_half(tuned_run):
  config, workdir, state = tuned_run
  record = tuned.read_record(workdir)
  assert record['num_frames'] == T and record['caption'] == (
      'a red square moving up')
  # The state (the checkpoint) holds the tuned parameters only.
  _, inflated0 = tuned.inflated_params(config, record,
                                       rng=jax.random.split(
                                           jax.random.key(config.seed))[0])
  tuned0, frozen0 = inflate.split(inflated0)
  assert jax.tree.structure(state.params) == jax.tree.structure(tuned0)
  assert jax.tree.structure(state.opt_state[1][0].mu) == jax.tree.structure(
      tuned0)
  _, params, step = sample.restore_ema_params(config, workdir)
  assert step == 3
  got_tuned, got_frozen = inflate.split(params)
  # Frozen: bitwise the base's; tuned: moved.
  jax.tree.map(np.testing.assert_array_equal, got_frozen, frozen0)
  moved = {'/'.join(k): float(np.abs(v - inflate._flat(tuned0)[k]).max())
           for k, v in inflate._flat(got_tuned).items()}
  # Every tuned weight matrix moved (biases may see ~0 gradients from a
  # 2-step base whose attention outputs are still near zero).
  assert all(v > 0 for k, v in moved.items() if k.endswith('kernel')), moved
  with np.load(os.path.join(workdir, tuned.SOURCE)) as f:
    assert f['videos'].shape == (1, T, 16, 16, 3)


def test_edit_inverts_then_samples_each_prompt(tuned_run):
  """The edit program on a tuned workdir: the tuned clip, inverted once,
  redrawn under the empty prompt and each edit prompt."""
  config, workdir, _ = tuned_run
  paths = sample.sample_and_save(config, workdir)
  with np.load(paths['npz']) as f:
    videos, inputs = f['videos'], f['inputs']
    assert list(f['prompts']) == ['', config.sample.prompt]
  with np.load(os.path.join(workdir, tuned.SOURCE)) as f:
    np.testing.assert_array_equal(inputs, np.repeat(f['videos'], 2, 0))
  assert videos.shape == (2, T, 16, 16, 3)
  assert len(paths['mp4']) == 2 and os.path.isfile(paths['grid'])
  assert 'edit' in paths['dir']


def test_edit_task_with_an_exact_denoiser():
  """Inversion with the empty prompt, regeneration with each prompt.

  An exact denoiser of x ~ N(mu, Sigma) under the empty prompt and of
  N(mu + shift, Sigma) under any other: the DDIM map is affine, so
  regenerating with the empty prompt gives the source back (the only error
  is DDIM's O(1/N) discretization: measured max 0.0045 at N = 1024,
  data std 0.3) and with the other prompt the source moved by the shift,
  its deviation from the mean (the 'motion') kept.
  """
  from vdm_jax import noise as noise_lib  # pylint: disable=g-import-not-at-top
  from vdm_jax import sampling  # pylint: disable=g-import-not-at-top
  from vdm_jax import tasks  # pylint: disable=g-import-not-at-top
  import test_sampling as ts  # pylint: disable=g-import-not-at-top
  shift = np.full(ts.SHAPE, 0.4, np.float32)
  oracle = ts.GaussianOracle(ts.MU, ts.COV, 'eps', shifts=[shift])

  def denoise_fn(z, logsnr, cond):
    null = ~jnp.any(cond['text_mask'], -1)
    if 'text_null' in cond:
      null = null | cond['text_null']
    return oracle(z, logsnr, {'label': jnp.where(null, 1, 0)})

  n = 16
  chol = np.linalg.cholesky(ts.COV).T.astype(np.float32)
  x0 = (ts.MU.reshape(-1) + np.asarray(
      jax.random.normal(jax.random.key(5), (n, 8))) @ chol).reshape(
          (n,) + ts.SHAPE)
  setup = tasks.Setup(
      tasks.ModelShape(2, 2, 1),
      sampling.SamplerSpec(sampler='ddim', num_steps=1024, eta=0.0,
                           clip_x=False),
      ts.logsnr_fn(), 'eps', noise_lib.Noise())
  mask = np.zeros((2 * n, 3), bool)
  mask[n:, 0] = True  # First n: the empty prompt; then an edit prompt.
  out = tasks.run(tasks.Edit(), denoise_fn, jax.random.key(0), setup,
                  video=np.concatenate([x0, x0]),
                  text={'text': np.ones((2 * n, 3, 4), np.float32),
                        'text_mask': mask})
  np.testing.assert_allclose(out[:n], x0, atol=0.03)
  np.testing.assert_allclose(out[n:], x0 + shift, atol=0.03)
  # Half the trajectory (sample.edit_strength=0.5): the empty prompt still
  # gives the source back; the other prompt moves it only part of the way.
  out = tasks.run(tasks.Edit(edit_strength=0.5), denoise_fn,
                  jax.random.key(0), setup, video=np.concatenate([x0, x0]),
                  text={'text': np.ones((2 * n, 3, 4), np.float32),
                        'text_mask': mask})
  np.testing.assert_allclose(out[:n], x0, atol=0.03)
  moved = float(np.mean(out[n:] - x0))
  assert 0.05 < moved < 0.35, moved
  with pytest.raises(ValueError, match="sampler='ddim'"):
    tasks.run(tasks.Edit(), denoise_fn, jax.random.key(0),
              dataclasses.replace(setup, spec=setup.spec.replace(
                  sampler='ancestral')), video=x0,
              text={'text': np.ones((n, 3, 4)), 'text_mask': mask[:n]})


def test_tune_refuses_bad_input_before_compiling(tuned_run, tmp_path,
                                                 monkeypatch):
  from vdm_jax.adapt import tune  # pylint: disable=g-import-not-at-top
  config, workdir, _ = tuned_run
  monkeypatch.setattr(jax, 'jit', None)  # Any compile would fail loudly.
  base = config.tune.base_workdir
  bad = config.copy_and_resolve_references()
  bad.model.base_channels = 16
  with pytest.raises(ValueError, match='model.base_channels'):
    tune.validate(bad, str(tmp_path / 'a'))
  short = str(tmp_path / 'short.mp4')
  _write_source(short, 3)
  bad = config.copy_and_resolve_references()
  bad.tune.video = short
  with pytest.raises(ValueError, match='has 3 frames.*needs 7'):
    tune.validate(bad, str(tmp_path / 'b'))
  bad = config.copy_and_resolve_references()
  bad.tune.caption = ' '
  with pytest.raises(ValueError, match='tune.caption is empty'):
    tune.validate(bad, str(tmp_path / 'c'))
  bad = config.copy_and_resolve_references()
  bad.text.encoder = 'none'
  with pytest.raises(ValueError, match='text model'):
    tune.validate(bad, str(tmp_path / 'd'))
  # A base that is a video model.
  video_base = tmp_path / 'video_base'
  video_base.mkdir()
  saved = checkpoint.load_config(base)
  saved['model']['temporal_attention'] = True
  (video_base / checkpoint.CONFIG_FILE).write_text(json.dumps(saved))
  bad = config.copy_and_resolve_references()
  bad.tune.base_workdir = str(video_base)
  with pytest.raises(ValueError, match='holds a video model'):
    tune.validate(bad, str(tmp_path / 'e'))
  # Another source into an existing tune.
  bad = config.copy_and_resolve_references()
  bad.tune.caption = 'a green circle moving down'
  with pytest.raises(ValueError, match='different source'):
    tuned.check_same_source(workdir, tuned.make_record(bad, 2))
  # Editing without text, or without an edit prompt.
  bad = config.copy_and_resolve_references()
  bad.text.encoder = 'none'
  with pytest.raises(ValueError, match='no text'):
    tuned.edit_config(bad, workdir)
  bad = config.copy_and_resolve_references()
  bad.sample.prompt = ''
  with pytest.raises(ValueError, match='edited caption'):
    tuned.edit_config(bad, workdir)
  bad = config.copy_and_resolve_references()
  bad.sample.sampler = 'ancestral'
  with pytest.raises(ValueError, match="sampler='ddim'"):
    sample.prepare(tuned.edit_config(bad, workdir), 2, seed=0)
