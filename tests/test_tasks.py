"""The task registry: every task is one class, and a new one plugs in."""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from vdm_jax import noise as noise_lib
from vdm_jax import sample
from vdm_jax import tasks

MODEL = tasks.ModelShape(num_frames=4, image_size=16, channels=3,
                         num_classes=3)


def test_registry_names_and_configs():
  config = tiny.get_config()
  for name, cls in tasks.REGISTRY.items():
    assert cls.name == name
    config.sample.task = name
    assert isinstance(tasks.from_config(config.sample), cls)
  assert tasks.TASKS == tuple(tasks.REGISTRY)
  assert set(tasks.TASKS) == {'unconditional', 'class', 'predict', 'extend',
                              'interpolate', 'keyframes', 'upsample',
                              'edit', 'image_to_video', 'inbetween'}
  config.sample.task = 'outpaint'
  with pytest.raises(ValueError, match='Unknown sample.task'):
    tasks.from_config(config.sample)


def test_settings_come_from_config():
  config = tiny.get_config()
  config.sample.update(task='extend', num_cond_frames=2, num_frames_out=0,
                       direction='backward', input_frames=3, label=1)
  task = tasks.from_config(config.sample)
  assert task == tasks.Extend(input_frames=3, label=1, num_cond_frames=2,
                              num_frames_out=0, direction='backward')
  assert task.frames_out(MODEL) == 8  # 0: 2 T.
  config.sample.update(task='predict', fixed_base_noise=True)
  with pytest.raises(ValueError, match='applies to task'):
    tasks.from_config(config.sample)
  config.sample.task = 'extend'
  task = tasks.from_config(config.sample)
  with pytest.raises(ValueError, match='decomposed'):
    tasks.check_noise(task, noise_lib.from_config(config.diffusion, 4))


@dataclasses.dataclass(frozen=True)
class _Reverse(tasks.Unconditional):
  """A new task: an unconditional sample played backwards."""

  name: ClassVar[str] = 'reverse'

  def run(self, sample_block, video, model):
    return sample_block(0)[:, ::-1]


def _zero_eps(z, logsnr, cond):
  del logsnr, cond
  return jnp.zeros_like(z)


def test_a_new_task_is_one_class_and_one_registry_line(monkeypatch):
  monkeypatch.setitem(tasks.REGISTRY, 'reverse', _Reverse)
  config = tiny.get_config()
  config.model.num_classes = 0
  config.sample.task = 'reverse'
  config.sample.num_steps = 2
  request = sample.prepare(config, 2, seed=0)
  assert isinstance(request.task, _Reverse) and request.labels is None
  fn = jax.tree_util.Partial(_zero_eps)
  x = tasks.run(request.task, fn, jax.random.key(0), request.setup,
                num_videos=2)
  config.sample.task = 'unconditional'
  forward = tasks.run(tasks.from_config(config.sample), fn,
                      jax.random.key(0), request.setup, num_videos=2)
  np.testing.assert_array_equal(np.asarray(x), np.asarray(forward)[:, ::-1])


def test_known_positions_and_output_frames():
  config = tiny.get_config()
  model = tasks.ModelShape.from_config(config)  # T = 4
  cases = {
      'predict': dict(num_cond_frames=2),
      'keyframes': {},
      'interpolate': dict(interp_factor=3),
      'extend': dict(num_frames_out=7, direction='backward'),
  }
  expected = {
      'predict': (4, [1, 1, 0, 0]),
      'keyframes': (4, [1, 0, 0, 1]),
      'interpolate': (7, [1, 0, 0, 1, 0, 0, 1]),
      'extend': (7, [0, 0, 0, 1, 1, 1, 1]),
  }
  for name, fields in cases.items():
    config.sample.task = name
    for k, v in fields.items():
      config.sample[k] = v
    task = tasks.from_config(config.sample)
    num_in = 3 if name == 'interpolate' else 4
    num_out = task.num_output_frames(model, num_in)
    known = task.known_positions(model, num_in, num_out)
    assert (num_out, known.astype(int).tolist()) == expected[name], name


def test_known_positions_of_every_task():
  # (task, settings, T_in) -> (T_out, given output frames).
  cases = [
      (tasks.Unconditional(), 4, 4, []),
      (tasks.Class(), 4, 4, []),
      (tasks.Upsample(), 8, 8, []),
      (tasks.Predict(num_cond_frames=3), 4, 4, [0, 1, 2]),
      (tasks.Keyframes(), 4, 4, [0, 3]),
      (tasks.Interpolate(interp_factor=2), 3, 5, [0, 2, 4]),
      (tasks.Extend(num_frames_out=6), 4, 6, [0, 1, 2, 3]),
      (tasks.Extend(direction='backward'), 4, 8, [4, 5, 6, 7]),
  ]
  for task, num_in, num_out, known in cases:
    assert task.num_output_frames(MODEL, num_in) == num_out, task
    got = task.known_positions(MODEL, num_in, num_out)
    assert got.dtype == bool and got.shape == (num_out,), task
    assert np.flatnonzero(got).tolist() == known, task


def test_input_from_clips():
  # Frame j of the clips has the value j.
  clips = np.broadcast_to(np.arange(8, dtype=np.uint8).reshape(1, 8, 1, 1, 1),
                          (2, 8, 16, 16, 3))

  def frames(x):
    return x[0, :, 0, 0, 0].tolist()

  assert tasks.Unconditional().input_from_clips(MODEL, clips) is None
  assert frames(tasks.Predict().input_from_clips(MODEL, clips)) == list(
      range(8))
  assert frames(tasks.Interpolate(interp_factor=3).input_from_clips(
      MODEL, clips)) == [0, 3, 6]
  assert frames(tasks.Extend(input_frames=3).input_from_clips(
      MODEL, clips)) == [0, 1, 2]
  assert frames(tasks.Extend(direction='backward').input_from_clips(
      MODEL, clips)) == [4, 5, 6, 7]
  low = tasks.Upsample(lowres_size=4).input_from_clips(MODEL, clips)
  assert low.shape == (2, 8, 4, 4, 3)
  assert tasks.Upsample().lowres(MODEL) == 8
  assert tasks.Upsample().lowres(MODEL, input_size=4) == 4
  with pytest.raises(ValueError, match='must divide'):
    tasks.Upsample(lowres_size=5).lowres(MODEL)


def test_input_from_file():
  videos = np.zeros((1, 10, 32, 24, 3), np.uint8)
  assert tasks.Predict().input_from_file(MODEL, videos).shape == (
      1, 4, 16, 16, 3)
  assert tasks.Extend(input_frames=6).input_from_file(MODEL, videos).shape == (
      1, 6, 16, 16, 3)
  # Upsample at half the model's size (not square): every frame with
  # overlapping blocks, whole blocks without.
  assert tasks.Upsample().input_from_file(MODEL, videos).shape == (
      1, 10, 8, 8, 3)
  assert tasks.Upsample(upsample_overlap=0).input_from_file(
      MODEL, videos).shape == (1, 8, 8, 8, 3)


def test_labels():
  dataset = np.array([2, 0, 1])
  assert tasks.Unconditional().labels(3, dataset, 3) is None
  assert tasks.Predict().labels(0, dataset, 3) is None
  assert tasks.Class().labels(3, None, 4).tolist() == [0, 1, 2, 0]
  assert tasks.Class(label=2).labels(3, dataset, 2).tolist() == [2, 2]
  assert tasks.Predict().labels(3, dataset, 3).tolist() == [2, 0, 1]
  assert tasks.Predict(label=1).labels(3, dataset, 3).tolist() == [1, 1, 1]
  assert tasks.Predict().labels(3, None, 2).tolist() == [0, 1]
  with pytest.raises(ValueError, match='sample.label=3'):
    tasks.class_labels(3, 3, 1)


def test_display_reference():
  video = np.arange(1, 4, dtype=np.uint8).reshape(1, 3, 1, 1, 1)
  task = tasks.Interpolate(interp_factor=2)
  known = task.known_positions(MODEL, 3, 5)
  ref = task.display_reference(video, known, 5)
  assert ref[0, :, 0, 0, 0].tolist() == [1, 0, 2, 0, 3]
  ref = tasks.Keyframes().display_reference(video, None, 4)
  assert ref[0, :, 0, 0, 0].tolist() == [1, 0, 0, 3]


def test_extend_from_nothing_samples_block_zero_first():
  calls = []

  def block(i, x_a=None, mask=None, x_lowres=None):
    del x_lowres
    calls.append((i, None if mask is None else mask[0].tolist()))
    return jnp.zeros((1, 4, 2, 2, 1))

  model = tasks.ModelShape(4, 2, 1)
  x = tasks.Extend(num_cond_frames=1, num_frames_out=10).run(
      block, None, model)
  assert x.shape == (1, 10, 2, 2, 1)
  # 4 sampled frames, then 3 new frames per block: 4 -> 7 -> 10.
  assert calls == [(0, None), (1, [True, False, False, False]),
                   (2, [True, False, False, False])]
