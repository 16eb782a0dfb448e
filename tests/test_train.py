"""Training loop, checkpoints, exact resume after SIGKILL, config checks."""

import functools
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from vdm_jax import checkpoint
from vdm_jax import denoiser
from vdm_jax import sharding
from vdm_jax import train
from vdm_jax import training
from vdm_jax.data import pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny(**overrides):
  config = tiny.get_config()
  for key, value in overrides.items():
    group, field = key.split('.')
    config[group][field] = value
  return config


def _run_main(workdir, *flags, env_extra=None, check=True, prelude=''):
  """Runs `python -m vdm_jax.main` on the tiny config in a subprocess."""
  env = dict(os.environ)
  env.update(env_extra or {})
  args = [f'--config={ROOT}/configs/tiny.py', f'--workdir={workdir}', *flags]
  code = textwrap.dedent(prelude) + textwrap.dedent(f"""
      import sys
      sys.argv = ['main'] + {args!r}
      from absl import app
      from vdm_jax import main
      app.run(main.main)
  """)
  proc = subprocess.run(
      [sys.executable, '-c', code], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=600,
  )
  if check and proc.returncode != 0:
    raise AssertionError(f'main failed ({proc.returncode}):\n{proc.stderr}')
  return proc


def _saved_params(workdir, step):
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  restored = ocp.StandardCheckpointer().restore(path)
  return jax.tree.map(np.asarray, restored)


def test_train_tiny(tmp_path):
  workdir = str(tmp_path)
  state = train.train(_tiny(), workdir)
  assert int(state.step) == 4
  ckpt = checkpoint.Checkpointer(workdir)
  assert ckpt.all_steps() == [2, 4]
  ckpt.close()
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  events = [f for f in os.listdir(workdir) if f.startswith('events.out')]
  assert events
  # The loop logs the step's throughput (training.Step: FLOPs from XLA).
  with open(os.path.join(workdir, events[0]), 'rb') as f:
    tags = f.read()
  assert b'tflops_per_device' in tags and b'mfu' in tags
  # EMA moved towards the parameters but is not equal to them.
  leaves = zip(jax.tree.leaves(state.params),
               jax.tree.leaves(state.ema_params))
  assert any(not np.allclose(p, e) for p, e in leaves)
  # Running again on the finished workdir resumes at step 4 and does nothing.
  again = train.train(_tiny(), workdir)
  assert int(again.step) == 4


def test_resume_is_exact_after_sigkill_during_a_save(tmp_path):
  """6 steps straight == (killed inside the save at step 4) + resume to 6."""
  straight, killed = str(tmp_path / 'straight'), str(tmp_path / 'killed')
  flags = ['--config.training.num_train_steps=6',
           '--config.training.checkpoint_every_steps=2']
  _run_main(straight, *flags)
  # SIGKILL from inside orbax's finalize of step 4: the data is written to a
  # temporary directory that is never committed.
  prelude = """
      import os, signal
      from orbax.checkpoint._src.handlers import composite_checkpoint_handler as c
      _orig = c.CompositeCheckpointHandler.finalize
      def finalize(self, directory):
        if os.path.basename(str(directory)).split('.')[0] == '4':
          os.kill(os.getpid(), signal.SIGKILL)
        return _orig(self, directory)
      c.CompositeCheckpointHandler.finalize = finalize
  """
  proc = _run_main(killed, *flags, prelude=prelude, check=False)
  assert proc.returncode == -9, proc.stderr[-2000:]
  ckpt_dir = os.path.join(killed, 'checkpoints')
  assert sorted(os.listdir(ckpt_dir))[0] == '2'
  assert not os.path.exists(os.path.join(ckpt_dir, '4'))
  assert any('tmp' in name for name in os.listdir(ckpt_dir)), (
      'the kill should have hit an unfinished save')
  # The same command again resumes from step 2 and finishes.
  proc = _run_main(killed, *flags)
  assert 'Resuming from checkpoint at step 2' in proc.stderr
  a, b = _saved_params(straight, 6), _saved_params(killed, 6)
  assert int(a['step']) == int(b['step']) == 6
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)  # XLA on CPU is deterministic.


def test_nonfinite_loss_stops_with_the_step_named(tmp_path):
  config = _tiny(**{'optimizer.learning_rate': 1e38,
                    'optimizer.grad_clip': 0.0,
                    'optimizer.warmup_steps': 0})
  with pytest.raises(FloatingPointError, match=r'at step \d'):
    train.train(config, str(tmp_path))


def test_incompatible_workdir_is_refused_before_compiling(tmp_path):
  train.train(_tiny(**{'training.num_train_steps': 2}), str(tmp_path))
  with pytest.raises(ValueError, match='model.base_channels'):
    train.validate_config(_tiny(**{'model.base_channels': 16}),
                          str(tmp_path))


@pytest.mark.parametrize('overrides,message', [
    ({'data.image_size': 17}, 'divisible'),
    ({'model.attn_resolutions': (5,)}, 'attn'),
    ({'diffusion.target': 'score'}, 'diffusion.target'),
    ({'diffusion.schedule': 'quadratic'}, 'diffusion.schedule'),
    ({'optimizer.name': 'sgd'}, 'optimizer.name'),
    ({'optimizer.decay': 'linear'}, 'optimizer.decay'),
    ({'optimizer.decay_to': 1.5}, 'optimizer.decay_to'),
])
def test_bad_config_errors(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    train.validate_config(_tiny(**overrides), str(tmp_path))


@pytest.mark.parametrize('decay_to', [0.0, 0.2])
def test_cosine_learning_rate_decay(decay_to):
  config = _tiny(**{'optimizer.learning_rate': 2.0,
                    'optimizer.warmup_steps': 10, 'optimizer.decay': 'cosine',
                    'optimizer.decay_to': decay_to,
                    'training.num_train_steps': 110})
  _, lr_fn = training.create_optimizer(config)
  lr = lambda step: float(lr_fn(step))
  floor = 2.0 * decay_to
  np.testing.assert_allclose(
      [lr(0), lr(5), lr(10), lr(60), lr(110), lr(500)],
      [0.0, 1.0, 2.0, (2.0 + floor) / 2, floor, floor], atol=1e-6)
  # A half cosine between the end of the warmup and the last step.
  np.testing.assert_allclose(
      lr(35), floor + (2.0 - floor) * (1 + np.cos(np.pi / 4)) / 2, rtol=1e-6)


def test_constant_learning_rate_after_warmup():
  config = _tiny(**{'optimizer.learning_rate': 2.0,
                    'optimizer.warmup_steps': 10,
                    'training.num_train_steps': 110})
  assert config.optimizer.decay == 'constant'
  _, lr_fn = training.create_optimizer(config)
  np.testing.assert_allclose([float(lr_fn(s)) for s in (5, 10, 110, 10**6)],
                             [1.0, 2.0, 2.0, 2.0])


def test_batch_not_divisible_by_devices(tmp_path):
  assert jax.device_count() == 8
  with pytest.raises(ValueError, match='not divisible by the 8 devices'):
    train.train(_tiny(**{'training.batch_size': 6}), str(tmp_path))


def test_main_train_then_sample(tmp_path):
  workdir = str(tmp_path)
  _run_main(workdir, '--mode=train', '--config.training.num_train_steps=2')
  _run_main(workdir, '--mode=sample')
  out = os.path.join(workdir, 'samples', 'step_2', 'unconditional')
  names = sorted(os.listdir(out))
  assert 'grid.png' in names and 'samples.npz' in names
  assert sum(n.endswith('.mp4') for n in names) == 2
  assert sum(n.endswith('.gif') for n in names) == 2
  videos = np.load(os.path.join(out, 'samples.npz'))
  videos = videos[videos.files[0]]
  assert videos.shape == (2, 4, 16, 16, 3) and videos.dtype == np.uint8


def test_checkpoints_in_a_relative_workdir(tmp_path, monkeypatch):
  # The quickstart passes --workdir=runs/quickstart; orbax needs absolute
  # paths, so the Checkpointer resolves local ones.
  monkeypatch.chdir(tmp_path)
  state = training.TrainState(
      step=jax.numpy.asarray(3, jax.numpy.int32),
      params={'w': jax.numpy.arange(4.0)},
      ema_params={'w': jax.numpy.ones(4)},
      opt_state={'m': jax.numpy.zeros(4)},
  )
  ckpt = checkpoint.Checkpointer('runs/rel')
  ckpt.save(3, state, force=True)
  ckpt.wait()
  assert (tmp_path / 'runs' / 'rel' / 'checkpoints' / '3').is_dir()
  restored = checkpoint.Checkpointer('runs/rel').restore(state)
  np.testing.assert_array_equal(restored.params['w'], np.arange(4.0))
  np.testing.assert_array_equal(restored.ema_params['w'], np.ones(4))
  assert int(restored.step) == 3


class _ExampleTagged:
  """Videos whose pixels name their example; label = example % 3."""

  def __len__(self):
    return 24

  def __getitem__(self, i):
    video = np.full((6, 4, 4, 3), 10 * i, dtype=np.uint8)
    return {'video': video, 'label': i % 3}


_SEEN = []  # (label, frame_mask) each call of _LabelModel saw.


class _LabelModel(nn.Module):
  """A label-sensitive per-frame denoiser that records its conditioning."""

  num_classes: int = 3

  @nn.compact
  def __call__(self, z, logsnr, label=None, frame_mask=None, train=False):
    del train
    b, t = z.shape[:2]
    label = jnp.broadcast_to(
        label[:, None] if label.ndim == 1 else label, (b, t))
    mask = (jnp.ones((b, t), bool) if frame_mask is None else frame_mask)
    jax.debug.callback(lambda l, m: _SEEN.append((l, m)), label, mask)
    shift = nn.Embed(self.num_classes + 1, z.shape[-1])(label)
    out = nn.Dense(z.shape[-1])(z) + shift[:, :, None, None]
    return out * logsnr.reshape(b, *([1] * (z.ndim - 1)))


def _label_config(**overrides):
  config = _tiny(**{'data.image_frames': 2, 'training.label_dropout': 0.0,
                    'data.image_size': 4, **overrides})
  assert config.model.num_classes == 3
  return config


def _run_label_step(config, batch):
  model = _LabelModel()
  tx, lr_fn = training.create_optimizer(config)
  state = train.init_state(config, model, tx, jax.random.key(0))
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx,
                                   lr_fn=lr_fn, config=config))
  _SEEN.clear()
  _, metrics = step(state, batch, jax.random.key(2))
  jax.block_until_ready(metrics)
  assert _SEEN, 'the model was never called with its conditioning'
  return metrics


@pytest.mark.parametrize('accum', [1, 2])
def test_train_step_gives_each_frame_its_own_videos_label(accum):
  """Image frames of other videos train under their own class, and the
  model gets the batch's frame_mask (VDM Sec. 3 joint training)."""
  config = _label_config(**{'training.grad_accum_steps': accum})
  pipe = pipeline.Pipeline(
      _ExampleTagged(), global_batch_size=8, num_frames=4, seed=0,
      image_frames=2)
  batch = pipe.batch_for_step(0)
  examples = batch['video'][..., 0, 0, 0].astype(int) // 10  # [B, T + N]
  want = examples % 3
  assert (want[:, 4:] != want[:, :1]).any()  # Other classes occur.
  _run_label_step(config, batch)
  seen_label = np.concatenate([np.asarray(l) for l, _ in _SEEN])
  seen_mask = np.concatenate([np.asarray(m) for _, m in _SEEN])
  # Microbatch j holds examples j, j + k, ... (training.split_microbatches).
  order = np.concatenate([np.arange(j, 8, accum) for j in range(accum)])
  np.testing.assert_array_equal(seen_label, want[order])
  np.testing.assert_array_equal(seen_mask, batch['frame_mask'][order])
  assert not seen_mask[:, 4:].any() and seen_mask[:, :4].all()


def test_train_step_on_sharded_pipeline_batches():
  """The same through host_to_global on the 8-device mesh."""
  config = _label_config()
  pipe = pipeline.Pipeline(
      _ExampleTagged(), global_batch_size=8, num_frames=4, seed=0,
      image_frames=2)
  host = pipe.batch_for_step(3)
  mesh = sharding.make_mesh(config.mesh)
  _run_label_step(config, sharding.host_to_global(host, mesh))
  seen = np.concatenate([np.asarray(l) for l, _ in _SEEN])
  np.testing.assert_array_equal(
      seen, (host['video'][..., 0, 0, 0].astype(int) // 10) % 3)


def test_class_batch_with_image_frames_needs_image_labels():
  config = _label_config()
  batch = pipeline.Pipeline(
      _ExampleTagged(), global_batch_size=8, num_frames=4, seed=0,
      image_frames=2).batch_for_step(0)
  del batch['image_label']
  with pytest.raises(ValueError, match='image_label'):
    _run_label_step(config, batch)


def test_label_dropout_is_per_clip_and_per_image_frame():
  batch = {'frame_mask': jnp.array([[True] * 3 + [False] * 2] * 3),
           'label': jnp.array([0, 1, 2]),
           'image_label': jnp.array([[1, 2], [2, 0], [0, 1]])}
  drop_u = jnp.array([0.05, 0.5, 0.5])  # Clip 0 drops.
  image_u = jnp.array([[0.5, 0.5], [0.05, 0.5], [0.5, 0.01]])
  cond = denoiser.training_cond(batch, 3, 0.1, drop_u, image_u)
  np.testing.assert_array_equal(cond['frame_mask'], batch['frame_mask'])
  np.testing.assert_array_equal(cond['label'], [[3, 3, 3, 1, 2],
                                                [1, 1, 1, 3, 0],
                                                [2, 2, 2, 0, 3]])
  # Without image frames the label stays one per clip.
  no_images = {'frame_mask': batch['frame_mask'][:, :3],
               'label': batch['label'],
               'image_label': jnp.zeros((3, 0), jnp.int32)}
  cond = denoiser.training_cond(no_images, 3, 0.1, drop_u,
                                jnp.zeros((3, 0)))
  np.testing.assert_array_equal(cond['label'], [3, 1, 2])
  assert 'label' not in denoiser.training_cond(batch, 0, 0.0, drop_u,
                                               image_u)


def test_label_dropout_reaches_image_frames_in_train_step():
  """label_dropout ~ 1: every frame, clip or image, sees the null label."""
  config = _label_config(**{'training.label_dropout': 0.999999})
  batch = pipeline.Pipeline(
      _ExampleTagged(), global_batch_size=8, num_frames=4, seed=0,
      image_frames=2).batch_for_step(0)
  _run_label_step(config, batch)
  np.testing.assert_array_equal(np.asarray(_SEEN[0][0]), 3)


def test_library_info_lines_stay_out_of_the_terminal():
  """main's filter: other packages' INFO goes, warnings and ours stay."""
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  from vdm_jax import main  # pylint: disable=g-import-not-at-top

  def record(path, level, msg='msg'):
    return py_logging.LogRecord('absl', level, path, 1, msg, (), None)

  noise = main._LibraryNoise()
  orbax = '/venv/site-packages/orbax/checkpoint/checkpoint_manager.py'
  assert not noise.filter(record(orbax, py_logging.INFO))
  assert noise.filter(record(orbax, py_logging.WARNING))
  # orbax's handler re-registration at import says nothing to a user.
  assert not noise.filter(record(orbax, py_logging.WARNING,
                                 'Type handler registry type "%s" overriding'
                                 ' %s'))
  assert noise.filter(record(os.path.join(main.VDM_PACKAGE, 'training.py'),
                             py_logging.INFO))
