"""--mode=sample for every task and --mode=eval, end to end through main.

The tiny model is trained once (2 steps); each task then runs in-process
through `vdm_jax.main.main` with command-line overrides, as a user runs it.
"""

import json
import os
import sys

from absl import flags
import jax
import numpy as np
import pytest

from configs import tiny
from vdm_jax import denoiser
from vdm_jax import evaluate
from vdm_jax import main
from vdm_jax import sample
from vdm_jax import sample_inputs
from vdm_jax import sharding
from vdm_jax import tasks
from vdm_jax import train
from vdm_jax import video_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T, S = 4, 16  # tiny: frames, image size.


def _train(workdir, **overrides):
  config = tiny.get_config()
  config.training.num_train_steps = 2
  config.training.checkpoint_every_steps = 2
  for key, value in overrides.items():
    group, field = key.split('.')
    config[group][field] = value
  train.train(config, workdir)
  return workdir


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return _train(str(tmp_path_factory.mktemp('tiny')))


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
  """main.main joins the multi-process runtime, which must happen before
  JAX starts; in this (already started) test process it is one process."""
  monkeypatch.setattr(sharding, 'initialize_distributed',
                      lambda *args: None, raising=False)


def run_main(workdir, *args, mode='sample'):
  """`python -m vdm_jax.main --config=configs/tiny.py ...` in-process."""
  argv = ['main', f'--config={ROOT}/configs/tiny.py', f'--workdir={workdir}',
          f'--mode={mode}', *args]
  saved, sys.argv = sys.argv, argv  # config_flags reads overrides there.
  try:
    flags.FLAGS.unparse_flags()
    for name in list(flags.FLAGS):  # Overrides of the previous run.
      if name.startswith('config.'):
        delattr(flags.FLAGS, name)
    flags.FLAGS(argv)
    main.main(None)
  finally:
    sys.argv = saved


def outputs(workdir, task):
  out = os.path.join(workdir, 'samples', 'step_2', task)
  names = os.listdir(out)
  with np.load(os.path.join(out, 'samples.npz')) as data:
    arrays = {k: data[k] for k in data.files}
  return out, names, arrays


def check_files(out, names, n):
  assert 'grid.png' in names
  assert sum(x.endswith('.mp4') for x in names) == n
  assert sum(x.endswith('.gif') for x in names) == n
  assert os.path.getsize(os.path.join(out, 'sample_000.mp4')) > 0


def test_unconditional_and_class(workdir):
  run_main(workdir)
  out, names, arrays = outputs(workdir, 'unconditional')
  check_files(out, names, 2)
  assert arrays['videos'].shape == (2, T, S, S, 3)
  assert arrays['videos'].dtype == np.uint8
  run_main(workdir, '--config.sample.task=class',
           '--config.sample.label=1', '--config.sample.guidance_weight=1.0',
           '--config.sample.num_videos=3')
  out, names, arrays = outputs(workdir, 'class')
  check_files(out, names, 3)
  assert arrays['videos'].shape == (3, T, S, S, 3)
  np.testing.assert_array_equal(arrays['labels'], [1, 1, 1])


def _given_frames_kept(arrays, known):
  np.testing.assert_array_equal(arrays['known'], known)
  videos, inputs = arrays['videos'], arrays['inputs']
  return videos, inputs


def test_predict_from_dataset_keeps_given_frames(workdir):
  # Replacement (recon_weight = 0); the keyframes test uses reconstruction.
  run_main(workdir, '--config.sample.task=predict',
           '--config.sample.num_cond_frames=2')
  out, names, arrays = outputs(workdir, 'predict')
  check_files(out, names, 2)
  videos, inputs = _given_frames_kept(arrays, [True, True, False, False])
  assert videos.shape == inputs.shape == (2, T, S, S, 3)
  np.testing.assert_array_equal(videos[:, :2], inputs[:, :2])
  assert not np.array_equal(videos[:, 2:], inputs[:, 2:])
  # The display puts the ground truth left of the result: twice as wide.
  gif = video_io.read_video(os.path.join(out, 'sample_000.gif'))
  assert gif.shape[2] == 2 * gif.shape[1]


def test_extend_from_a_gif_file(workdir, tmp_path):
  # A real 320x240 clip: short-side resize to 16 and centre crop.
  path = os.path.join(ROOT, 'tests', 'data', 'v_CricketShot_g04_c01_rgb.gif')
  run_main(workdir, '--config.sample.task=extend',
           f'--config.sample.input={path}',
           '--config.sample.num_cond_frames=2',
           '--config.sample.num_frames_out=7')
  out, names, arrays = outputs(workdir, 'extend')
  check_files(out, names, 2)
  videos, inputs = _given_frames_kept(arrays, [True] * T + [False] * 3)
  assert videos.shape == (2, 7, S, S, 3)
  assert inputs.shape == (2, T, S, S, 3)
  np.testing.assert_array_equal(videos[:, :T], inputs)
  expected = tasks.fit(video_io.read_video(path)[None, :T], S, 3)
  np.testing.assert_array_equal(inputs[0], expected[0])


def test_extend_backward_and_interpolate_from_dataset(workdir):
  run_main(workdir, '--config.sample.task=extend',
           '--config.sample.direction=backward',
           '--config.sample.num_cond_frames=2',
           '--config.sample.num_frames_out=6',
           '--config.sample.num_videos=1')
  _, _, arrays = outputs(workdir, 'extend')
  videos, inputs = _given_frames_kept(arrays, [False] * 2 + [True] * T)
  assert videos.shape == (1, 6, S, S, 3)
  np.testing.assert_array_equal(videos[:, 2:], inputs)
  run_main(workdir, '--config.sample.task=interpolate',
           '--config.sample.interp_factor=3',
           '--config.sample.input_frames=3')
  out, names, arrays = outputs(workdir, 'interpolate')
  check_files(out, names, 2)
  known = np.arange(7) % 3 == 0
  videos, inputs = _given_frames_kept(arrays, known)
  assert videos.shape == (2, 7, S, S, 3) and inputs.shape == (2, 3, S, S, 3)
  np.testing.assert_array_equal(videos[:, known], inputs)


def test_keyframes_with_reconstruction_guidance(workdir):
  run_main(workdir, '--config.sample.task=keyframes',
           '--config.sample.recon_weight=2.0',
           '--config.sample.remat_guidance=True')
  _, _, arrays = outputs(workdir, 'keyframes')
  videos, inputs = _given_frames_kept(arrays, [True, False, False, True])
  np.testing.assert_array_equal(videos[:, [0, -1]], inputs[:, [0, -1]])


def test_upsample_cascade_from_samples_npz(workdir):
  """The low-res stage's samples.npz is the input of the upsampler."""
  run_main(workdir, '--config.sample.num_videos=3')
  lowres_npz = os.path.join(workdir, 'samples', 'step_2', 'unconditional',
                            'samples.npz')
  run_main(workdir, '--config.sample.task=upsample',
           f'--config.sample.input={lowres_npz}',
           '--config.sample.lowres_size=8',
           '--config.sample.recon_weight=2.0')
  out, names, arrays = outputs(workdir, 'upsample')
  check_files(out, names, 2)
  assert arrays['videos'].shape == (2, T, S, S, 3)
  with np.load(lowres_npz) as data:
    lowres = tasks.fit(data['videos'][:2], 8, 3)
  np.testing.assert_array_equal(arrays['inputs'], lowres)
  assert not arrays['known'].any()


def test_prepare_checks_and_loads_without_a_model():
  config = tiny.get_config()
  config.sample.update(task='interpolate', interp_factor=3, input_frames=3)
  request = sample.prepare(config, 3, seed=0)
  assert isinstance(request.task, tasks.Interpolate)
  assert request.inputs.video.shape == (3, 3, S, S, 3)
  # The ground truth is on the output timeline; the input is every 3rd frame.
  assert request.inputs.reference.shape == (3, 7, S, S, 3)
  np.testing.assert_array_equal(request.inputs.video,
                                request.inputs.reference[:, ::3])
  np.testing.assert_array_equal(request.labels, request.inputs.labels)
  assert request.batch_size == config.sample.batch_size
  config.sample.update(task='unconditional')
  request = sample.prepare(config, 2, seed=0)
  assert request.inputs.video is None and request.labels is None


def test_side_by_side_frames_given_frames():
  reference = np.zeros((1, 2, 8, 8, 3), np.uint8)
  result = np.full((1, 2, 16, 16, 3), 255, np.uint8)
  out = sample.side_by_side(reference, result, np.array([True, False]))
  assert out.shape == (1, 2, 18, 36, 3)  # p = 1, the reference enlarged.
  np.testing.assert_array_equal(out[0, 0, 0, 0], sample.KNOWN_COLOUR)
  np.testing.assert_array_equal(out[0, 1, 0, 0], sample.OTHER_COLOUR)
  np.testing.assert_array_equal(out[0, :, 1:17, 1:17], 0)
  np.testing.assert_array_equal(out[0, :, 1:17, 19:35], 255)


def test_sampling_is_sharded_over_the_batch(workdir):
  config = tiny.get_config()
  mesh = sharding.make_mesh(config.mesh)
  model, params, step = sample.restore_ema_params(config, workdir, mesh)
  assert step == 2
  denoise_fn = denoiser.make_denoise_fn(model, params, mesh)
  x = tasks.run(tasks.from_config(config.sample), denoise_fn,
                jax.random.key(0), tasks.Setup.from_config(config),
                num_videos=8)
  assert x.shape == (8, T, S, S, 3)
  assert len(x.sharding.device_set) == 8
  assert {s.data.shape[0] for s in x.addressable_shards} == {1}


@pytest.mark.parametrize('args,error,message', [
    (['--config.sample.task=predict', '--config.sample.input=/no/such.mp4'],
     FileNotFoundError, 'sample.input=/no/such.mp4: no such file'),
    (['--config.sample.task=predict', '--config.sample.input={bad}'],
     ValueError, 'sample.input=.*Could not decode'),
    (['--config.sample.task=predict', '--config.sample.input={bad_npz}'],
     ValueError, 'expected videos'),
    (['--config.sample.task=predict', '--config.sample.num_cond_frames=4'],
     ValueError, 'num_cond_frames=4'),
    (['--config.sample.task=upsample'], ValueError, 'recon_weight > 0'),
    (['--config.sample.task=upsample', '--config.sample.recon_weight=1.0',
      '--config.sample.lowres_size=5'], ValueError, 'must divide'),
    (['--config.sample.task=paint'], ValueError, 'Unknown sample.task'),
    (['--config.sample.sampler=euler'], ValueError, 'sample.sampler'),
    (['--config.sample.label=7', '--config.sample.task=class'], ValueError,
     'sample.label=7'),
])
def test_bad_requests_fail_before_restoring(tmp_path, args, error, message):
  """An empty workdir: anything reaching the checkpoint fails differently."""
  bad = tmp_path / 'bad.mp4'
  bad.write_bytes(b'not a video')
  bad_npz = tmp_path / 'bad.npz'
  np.savez(bad_npz, videos=np.zeros((2, 3), np.uint8))
  args = [a.format(bad=bad, bad_npz=bad_npz) for a in args]
  with pytest.raises(error, match=message):
    run_main(str(tmp_path / 'empty'), *args)


def test_eval_needs_nine_frames_before_sampling(tmp_path):
  with pytest.raises(ValueError, match='at least 9 frames'):
    run_main(str(tmp_path / 'empty'), mode='eval')


def test_eval_writes_fvd_json(tmp_path):
  workdir = _train(str(tmp_path), **{'data.num_frames': 16})
  run_main(workdir, '--config.data.num_frames=16',
           '--config.eval.num_videos=3', '--config.eval.num_real=3',
           '--config.sample.batch_size=8', '--config.eval.batch_size=4',
           mode='eval')
  path = os.path.join(workdir, 'eval',
                      'fvd_stylegan_v_2048_unconditional_step_2.json')
  with open(path) as f:
    result = json.load(f)
  assert result['protocol'] == 'stylegan_v_2048'
  assert result['protocol_settings']['num_generated'] == 2048
  assert result['num_generated'] == result['num_real'] == 3
  assert np.isfinite(result['fvd']) and result['fvd'] > 0
  assert np.isfinite(result['kvd'])
  assert not result['protocol_compliant']
  assert '3 generated != 2048' in result['deviations']
  assert result['checkpoint_step'] == 2
  assert result['config_path'].endswith('configs/tiny.py')
  assert result['sample']['task'] == 'unconditional'
  assert 'git_commit' in result and result['num_frames'] == 16


def test_first_frame_clips_for_protocols_that_want_them(tmp_path, monkeypatch):
  # Two 20-frame videos whose frame i has brightness 10 * i.
  folder = tmp_path / 'videos'
  folder.mkdir()
  for v in range(2):
    frames = np.arange(20, dtype=np.uint8)[:, None, None, None] * 10
    video_io.write_mp4(str(folder / f'v{v}.mp4'),
                       np.broadcast_to(frames, (20, 16, 16, 3)), fps=8)
  config = tiny.get_config()
  config.data.name, config.data.path = 'video_files', str(folder)
  config.data.num_classes = 0
  clips, _ = sample_inputs.dataset_clips(config, 2, 4, seed=0,
                                         random_start=False)
  brightness = clips.reshape(2, 4, -1).mean(-1)
  np.testing.assert_allclose(brightness, [[0, 10, 20, 30]] * 2, atol=3)

  # eval takes the start from the protocol: BAIR's is the first frames.
  seen = []

  def fake_clips(*args, random_start=True, **kwargs):
    del args, kwargs
    seen.append(random_start)
    return np.zeros((1, 16, 8, 8, 3), np.uint8), np.zeros((1,), np.int32)

  monkeypatch.setattr(sample_inputs, 'dataset_clips', fake_clips)
  for name in ('bair_vdm', 'stylegan_v_2048'):
    run = evaluate.Plan(evaluate.protocols.PROTOCOLS[name], 1, 1, 'test', 16,
                        ())
    evaluate.real_clips(config, run, sample_inputs.TaskInputs(None))
  assert seen == [False, True]
