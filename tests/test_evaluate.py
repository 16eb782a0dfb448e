"""--mode=eval streams its clips: same scores as whole arrays, bounded memory.

I3D is replaced by a cheap per-video feature function and the checkpoint by
an analytic denoiser, so the real sampler, data pipeline, batching, folds
and distances run in seconds; tests/test_fvd.py checks that the real I3D
gives the same features streamed as in one array.
"""

import dataclasses
import json
import os
import weakref

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from configs import tiny
from vdm_jax import evaluate
from vdm_jax import sample
from vdm_jax import sample_inputs
from vdm_jax import sharding
from vdm_jax import tasks
from vdm_jax import video_io
from vdm_jax.data import pipeline
from vdm_jax.evaluation import fvd

STEP = 3


def _fake_apply(scale, z, logsnr, cond):
  """An analytic denoiser: eps_hat = scale * z (a deterministic sampler)."""
  del logsnr, cond
  return scale * z


def _fake_features(variables, videos):
  """[B, T, H, W, 3] -> per-video [B, 3 T] frame-channel means (+ squares)."""
  del variables
  x = videos.astype(jnp.float32).mean(axis=(2, 3)) / 255.0
  x = x.reshape(x.shape[0], -1)
  return {'logits_mean': x, 'pool': jnp.concatenate([x, x * x], axis=1)}


@pytest.fixture(name='calls')
def _fake_model(monkeypatch):
  """Cheap I3D and checkpoint; returns the list of I3D batch sizes."""
  calls = []

  def feature_fn(resize, mesh):
    del resize
    fn = jax.jit(_fake_features, out_shardings=NamedSharding(mesh, P()))

    def wrapped(variables, videos):
      calls.append(videos.shape[0])
      return fn(variables, videos)

    return wrapped

  monkeypatch.setattr(fvd, '_feature_fn', feature_fn)
  monkeypatch.setattr(fvd, '_variables', lambda mesh: None)
  monkeypatch.setattr(sample, 'restore_ema_params',
                      lambda config, workdir, mesh: (None, None, STEP))
  monkeypatch.setattr(
      evaluate.denoiser, 'make_denoise_fn',
      lambda model, params, mesh: jax.tree_util.Partial(
          _fake_apply, jnp.float32(0.3)))
  return calls


def _config(num_generated, num_real, task='unconditional', batch_size=8,
            eval_batch_size=8):
  config = tiny.get_config()
  config.data.num_frames = 16
  config.sample.task = task
  config.sample.num_steps = 2
  config.sample.batch_size = batch_size
  config.eval.num_videos = num_generated
  config.eval.num_real = num_real
  config.eval.batch_size = eval_batch_size
  return config


def _whole_set_scores(config):
  """The previous --mode=eval: every sample and real clip in one array."""
  task = tasks.from_config(config.sample)
  run = evaluate.plan(config, task, tasks.ModelShape.from_config(config))
  request = sample.prepare(
      config, run.num_real, seed=config.eval.seed, split=run.split,
      random_start=run.protocol.clip_start == 'random')
  real = evaluate.real_clips(config, run, request.inputs)
  idx = np.arange(run.num_generated) % run.num_real
  inputs = request.inputs
  request = dataclasses.replace(
      request,
      inputs=sample_inputs.TaskInputs(
          None if inputs.video is None else inputs.video[idx]),
      labels=task.labels(request.setup.model.num_classes,
                         None if inputs.labels is None else inputs.labels[idx],
                         run.num_generated))
  mesh = sharding.make_mesh(config.mesh)
  rng = jax.random.fold_in(jax.random.key(config.seed), 5)
  denoise_fn = evaluate.denoiser.make_denoise_fn(None, None, mesh)
  videos = sample.sample_videos(request, denoise_fn, rng, mesh,
                                run.num_generated)
  feature = run.protocol.feature
  kwargs = dict(batch_size=config.eval.batch_size, progress=False)
  gen = fvd.extract_features(evaluate._rgb(videos), **kwargs)[feature]
  ref = fvd.extract_features(evaluate._rgb(real), **kwargs)[feature]
  return fvd.compute_fvd(gen, ref, folds=run.protocol.folds), videos


@pytest.mark.parametrize('task,num_generated,num_real,batch_size', [
    # Unconditional; sampling batches (8) != I3D batches (16), last short.
    ('unconditional', 27, 21, 8),
    # Conditioned on real clips, cycled (more samples than clips), across
    # pipeline chunks of 64 clips.
    ('predict', 83, 70, 16),
])
def test_streamed_eval_equals_whole_arrays(calls, tmp_path, task,
                                           num_generated, num_real,
                                           batch_size):
  config = _config(num_generated, num_real, task, batch_size,
                   eval_batch_size=16)
  config.eval.save_samples = True
  expected, videos = _whole_set_scores(config)
  result = evaluate.sample_and_evaluate(config, str(tmp_path))
  for key in ('fvd', 'kvd'):
    np.testing.assert_allclose(result[key], expected[key], rtol=1e-10)
  assert result['num_generated'] == num_generated
  assert result['num_real'] == num_real
  with open(result['path']) as f:
    assert json.load(f)['fvd'] == result['fvd']
  saved = video_io.read_npz_videos(result['path'][:-len('.json')] + '.npz')
  assert len(saved) == min(num_generated, evaluate.MAX_SAVED_SAMPLES)
  np.testing.assert_array_equal(saved, videos[:len(saved)])


def test_real_clips_stream_is_dataset_clips(calls):
  del calls
  config = _config(4, 70)
  run = evaluate.plan(config, tasks.from_config(config.sample),
                      tasks.ModelShape.from_config(config))
  for start in ('first', 'random'):
    run = dataclasses.replace(
        run, protocol=dataclasses.replace(run.protocol, clip_start=start))
    whole, labels = sample_inputs.dataset_clips(
        config, 70, 16, seed=config.eval.seed,
        random_start=start == 'random')
    real = evaluate.RealClips(config, run)
    np.testing.assert_array_equal(np.concatenate(list(real.batches(16))),
                                  whole)
    idx = np.array([69, 3, 64, 0, 5])
    got = real.get(idx)
    np.testing.assert_array_equal(got['video'], whole[idx])
    np.testing.assert_array_equal(got['label'], labels[idx])


class _Alive:
  """Counts the clips (leading-axis rows) of tracked arrays still alive."""

  def __init__(self):
    self.now = self.peak = 0

  def track(self, array):
    n = len(array)
    self.now += n
    self.peak = max(self.peak, self.now)
    weakref.finalize(array, self._free, n)
    return array

  def _free(self, n):
    self.now -= n


def test_eval_holds_a_bounded_number_of_clips(calls, tmp_path, monkeypatch):
  """Every generated batch, pipeline chunk and batch of real clips is
  tracked; materialising either set keeps all its clips alive at once."""
  alive = _Alive()
  to_uint8 = video_io.to_uint8
  monkeypatch.setattr(video_io, 'to_uint8',
                      lambda x: alive.track(to_uint8(x)))
  batch_for_step = pipeline.Pipeline.batch_for_step

  def tracked_batch(self, step, captions=False):
    batch = batch_for_step(self, step, captions=captions)
    batch['video'] = alive.track(batch['video'])
    return batch

  monkeypatch.setattr(pipeline.Pipeline, 'batch_for_step', tracked_batch)
  get = evaluate.RealClips.get

  def tracked_get(self, idx):
    clips = get(self, idx)
    clips['video'] = alive.track(clips['video'])
    return clips

  monkeypatch.setattr(evaluate.RealClips, 'get', tracked_get)
  num = 200
  result = evaluate.sample_and_evaluate(_config(num, num), str(tmp_path))
  assert result['num_generated'] == result['num_real'] == num
  assert sum(calls) == 2 * -(-num // 8) * 8  # Every clip scored once.
  # One pipeline chunk (64 clips) + batches of 8 (real, conditioning,
  # sampled, I3D), with room for one more: independent of num.
  print('peak clips alive', alive.peak)
  assert 0 < alive.peak <= 64 + 5 * 8, alive.peak


def test_extract_features_reads_a_stream_lazily(calls):
  pulled = []

  def stream():
    for i in range(10):
      pulled.append(i)
      yield np.full((3, 9, 4, 4, 3), i, np.uint8)

  lag = []
  feature_fn = fvd._feature_fn

  def watching(resize, mesh):
    fn = feature_fn(resize, mesh)

    def wrapped(variables, videos):
      lag.append(3 * len(pulled) - sum(calls) - videos.shape[0])
      return fn(variables, videos)

    return wrapped

  fvd._feature_fn = watching
  try:
    feats = fvd.extract_features(stream(), batch_size=8, progress=False,
                                 mesh=jax.sharding.Mesh(
                                     np.asarray(jax.devices()[:1]), ('data',)))
  finally:
    fvd._feature_fn = feature_fn
  # Videos read ahead of each I3D batch: fewer than a batch plus an input.
  assert max(lag) < 3, lag
  whole = np.repeat(np.arange(10), 3)
  np.testing.assert_allclose(feats['logits_mean'][:, 0] * 255.0, whole,
                             rtol=1e-6)


def test_rebatch_keeps_every_video_once():
  batches = [np.arange(a, b) for a, b in ((0, 3), (3, 4), (4, 4), (4, 13))]
  out = list(fvd.rebatch(iter(batches), 5))
  assert [len(b) for b in out] == [5, 5, 3]
  np.testing.assert_array_equal(np.concatenate(out), np.arange(13))
