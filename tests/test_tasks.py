"""The task registry: every task is one class, and a new one plugs in."""

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from configs import tiny
from vdm_jax import sample
from vdm_jax import tasks


def test_registry_names_and_configs():
  config = tiny.get_config()
  for name, cls in tasks.REGISTRY.items():
    assert cls.name == name
    config.sample.task = name
    assert isinstance(tasks.from_config(config.sample), cls)
  assert tasks.TASKS == tuple(tasks.REGISTRY)


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
