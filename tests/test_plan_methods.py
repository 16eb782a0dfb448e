"""--mode=plan of the methods beside VDM's training (vdm_jax/plan_methods.py):
every shipped config plans, each method's programs are its driver's (the
same layout, parameters and batch), bad input fails before compiling."""

import glob
import json
import importlib
import os

import jax
import numpy as np
import pytest

import sd_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-order
import svd_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-order
from configs import single_video  # pylint: disable=g-import-not-at-top
from configs import stable_diffusion as sd_config  # pylint: disable=g-import-not-at-top
from configs import svd as svd_config  # pylint: disable=g-import-not-at-top
from configs import tune_a_video_sd  # pylint: disable=g-import-not-at-top
from vdm_jax import plan  # pylint: disable=g-import-not-at-top
from vdm_jax import training  # pylint: disable=g-import-not-at-top
from vdm_jax.adapt import inflate_sd  # pylint: disable=g-import-not-at-top
from vdm_jax.pretrained import svd as svd_format  # pylint: disable=g-import-not-at-top
from vdm_jax.pretrained import unet2d  # pylint: disable=g-import-not-at-top
from vdm_jax.sinfusion import train as sf_train  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(os.path.basename(p)[:-3] for p in glob.glob(
    os.path.join(ROOT, 'configs', '*.py')) if not p.endswith('__init__.py'))
QUIET = dict(progress=lambda m: None, emit=lambda m: None)


@pytest.fixture(scope='module')
def sd_folder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('plan_sd'))
  sd_fixtures.tiny_sd_pipeline(folder)
  return folder


@pytest.fixture(scope='module')
def svd_folder(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('plan_svd'))
  svd_fixtures.tiny_svd_pipeline(folder)
  return folder


@pytest.mark.parametrize('name', CONFIGS)
def test_every_shipped_config_plans(name, monkeypatch):
  """--mode=plan builds every shipped config's programs at full size for
  the 8 CPU devices (compiling is replaced by a record of what would be)."""
  built = []
  monkeypatch.setattr(plan, 'measure', lambda config, target, devices,
                      program, **kw: built.append(program) or {})
  monkeypatch.setattr(plan, 'measure_program', lambda program, *a, **kw:
                      built.append(program.name) or {})
  monkeypatch.setattr(plan, 'table', lambda rows: '')
  config = importlib.import_module(f'configs.{name}').get_config()
  config.plan.targets = 'cpu'
  plan.plan(config, **QUIET)
  want = {'sinfusion': ['train'], 'pretrained': ['sample'],
          'tune_a_video_sd': ['tune', 'sample'],
          'svd': ['sample']}.get(config.get('method', 'vdm'),
                                 ['train', 'sample'])
  if config.plan.mode == 'tune':  # configs/tune_a_video.py: --mode=tune.
    want = ['tune']
  assert built == want


def _tav(folder, **fields):
  config = tune_a_video_sd.get_config('tiny')
  config.pretrained.path = folder
  config.tune.height = config.tune.width = 16
  config.plan.targets = 'cpu'
  for key, value in fields.items():
    group, field = key.split('.')
    config[group][field] = value
  return config


def test_tune_a_video_plan_splits_one_clip_by_frames(sd_folder):
  """8 frames on the 8 CPU devices: the tune's state and frozen parameters
  are sharded over them (tune_sd.layout 'frames'), so each device holds
  about an eighth of the 4-frame plan's one-device arguments."""
  split = plan.plan(_tav(sd_folder, **{'tune.num_frames': 8}), **QUIET)
  whole = plan.plan(_tav(sd_folder, **{'tune.num_frames': 4}), **QUIET)
  assert [r['program'] for r in split] == ['tune', 'sample']
  tune8, tune4 = split[0], whole[0]
  assert tune8['mesh'] == 'frames over fsdp=8' and tune8['devices'] == 8
  assert tune4['mesh'] == 'one device' and tune4['devices'] == 1
  assert tune8['work_split'] == 8 and tune4['work_split'] == 1
  _, sd_params = unet2d.load(sd_folder)
  module, _ = unet2d.load(sd_folder)
  inflated = inflate_sd.abstract_params(inflate_sd.inflate_module(module))
  assert tune8['params'] == inflate_sd.count(inflated)
  assert inflate_sd.count(inflated) > inflate_sd.count(sd_params)
  arg8, arg4 = tune8['memory']['argument'], tune4['memory']['argument']
  assert arg8 < arg4 / 4, (arg8, arg4)
  # The edit: reconstruction + one prompt, guided: a batch of 2 x 2 that
  # does not split over 8 devices, so each computes all of it.
  sample = split[1]
  assert sample['batch'] == 2 and sample['work_split'] == 1
  assert sample['model'] == sd_folder and sample['fits']


def test_tune_a_video_plan_compiles_for_a_tpu_slice(sd_folder):
  """4 frames over a v5e-4's 4 chips: the tune compiles with libtpu."""
  config = _tav(sd_folder, **{'tune.num_frames': 4})
  config.plan.targets = 'tpu:v5e:2x2'
  config.plan.programs = 'tune'
  (row,) = plan.plan(config, **QUIET)
  assert row['mesh'] == 'frames over fsdp=4' and row['fits']
  assert row['device_kind'] == 'TPU v5 lite'
  assert 0 < row['memory']['total'] < 2**30


def test_svd_and_sd_plans_count_the_folders_parameters(sd_folder,
                                                      svd_folder):
  config = svd_config.get_config('inbetween')
  config.pretrained.path = svd_folder
  config.svd.height = config.svd.width = svd_fixtures.SIZE
  config.tune.num_frames = svd_fixtures.FRAMES
  config.plan.targets = 'cpu'
  rows = plan.plan(config, **QUIET)
  _, params = svd_format.load(svd_folder)
  n = sum(x.size for x in jax.tree.leaves(params))
  assert [(r['program'], r['params']) for r in rows] == [
      ('sample', 2 * n), ('tune', n)]
  assert rows[1]['mesh'] == 'one device' and rows[1]['remat'] == 'block'
  assert all(r['fits'] and r['memory']['total'] > 0 for r in rows)
  config = sd_config.get_config()
  config.pretrained.path = sd_folder
  config.sample.height = config.sample.width = 32
  config.sample.batch_size = 4  # Guided: 8, split over the 8 devices.
  config.plan.targets = 'cpu'
  (row,) = plan.plan(config, **QUIET)
  _, params = unet2d.load(sd_folder)
  assert row['params'] == sum(x.size for x in jax.tree.leaves(params))
  assert row['work_split'] == 8 and row['fits']


def test_sinfusion_plans_the_largest_frames_without_a_video():
  config = single_video.get_config('tiny')
  config.plan.targets = 'cpu'
  (row,) = plan.plan(config, **QUIET)
  models = sf_train.create_models(config)
  tx, _ = training.create_optimizer(config)
  state = jax.eval_shape(lambda: sf_train.init_state(
      models, tx, jax.random.key(0)))
  assert row['params'] == sum(np.prod(x.shape)
                              for x in jax.tree.leaves(state.params))
  assert row['mesh'] == 'one device' and row['fits']
  assert '12 frames of 16x16' in row['model']
  assert row['grad_accum_steps'] == config.training.grad_accum_steps


def _no_compile(*args, **kwargs):
  raise AssertionError('compiled before checking the input')


def test_bad_input_fails_before_compiling(sd_folder, tmp_path, monkeypatch):
  monkeypatch.setattr(plan, 'measure_program', _no_compile)
  config = _tav(sd_folder)
  config.plan.search = True
  with pytest.raises(ValueError, match="plan.search .* method 'vdm'"):
    plan.plan(config, **QUIET)
  with pytest.raises(FileNotFoundError, match='no such folder'):
    plan.plan(_tav(str(tmp_path)), **QUIET)
  with pytest.raises(ValueError, match='no video is given'):
    plan.plan(_tav(sd_folder, **{'tune.height': 0}), **QUIET)
  with pytest.raises(ValueError, match='trainable'):
    plan.plan(_tav(sd_folder, **{'tune.trainable': 'everything'}), **QUIET)
  config = _tav(sd_folder)
  config.plan.programs = 'train'
  with pytest.raises(ValueError, match='plans tune, sample'):
    plan.plan(config, **QUIET)
  # A bad target among good ones: nothing compiles.
  config = _tav(sd_folder)
  config.plan.targets = 'cpu,tpu:v9:2x2'
  with pytest.raises(ValueError, match='Unknown target'):
    plan.plan(config, **QUIET)


def test_the_vdm_tune_a_video_config_plans_its_tune_step():
  """configs/tune_a_video.py runs --mode=tune: the plan compiles that step
  (adapt/tune.py) on one device, its batch of 1 not splitting over 8."""
  from configs import tune_a_video  # pylint: disable=g-import-not-at-top
  from vdm_jax import denoiser  # pylint: disable=g-import-not-at-top
  config = tune_a_video.get_config()
  config.plan.targets = 'cpu'
  (row,) = plan.plan(config, **QUIET)
  model = denoiser.create_model(config)
  params = denoiser.abstract_params(config, model)
  assert row['program'] == 'tune' and row['devices'] == 1
  assert row['params'] == sum(np.prod(x.shape)
                              for x in jax.tree.leaves(params))
  assert row['fits'] and row['memory']['temp'] > 0


@pytest.mark.parametrize('frames', ['batch', 'video'])
def test_sd_denoisers_run_the_pallas_kernel_per_device(sd_folder, frames):
  """SD's denoiser (text-to-image, and the inflated UNet of the edit) at
  32x32 latents (1,024 tokens) on a TPU mesh: attention 'auto' takes the
  Pallas kernel inside a shard_map (denoiser enters kernels_on), as the
  train step does; XLA could not partition it otherwise. Traced only."""
  from vdm_jax import denoiser  # pylint: disable=g-import-not-at-top
  from vdm_jax import schedules  # pylint: disable=g-import-not-at-top
  from vdm_jax import sharding  # pylint: disable=g-import-not-at-top
  from vdm_jax.models import attention  # pylint: disable=g-import-not-at-top
  from vdm_jax.pretrained import stable_diffusion  # pylint: disable=g-import-not-at-top
  module, _ = unet2d.load(sd_folder)
  if frames == 'video':
    module = inflate_sd.inflate_module(module)
  params = (inflate_sd.abstract_params(module) if frames == 'video'
            else unet2d.abstract_params(module))
  schedule = schedules.from_scheduler_config(
      stable_diffusion.SD15_SCHEDULER)
  target = plan.parse_target('tpu:v5e:2x2')
  mesh = sharding.make_mesh(svd_config.get_config().mesh,
                            plan.target_devices(target))
  z = jax.ShapeDtypeStruct((4, 2, 32, 32, 4), np.float32)
  cond = {'text': jax.ShapeDtypeStruct((4, 77, 32), np.float32)}
  logsnr = jax.ShapeDtypeStruct((4,), np.float32)
  fn = jax.jit(lambda p, z, l, c: denoiser.make_pretrained_denoise_fn(
      module, p, schedule, frames=frames, mesh=mesh)(z, l, c))
  with attention.compile_for('tpu'):
    text = str(fn.trace(params, z, logsnr, cond).jaxpr)
  assert 'pallas_call' in text and 'shard_map' in text


def test_plan_programs_picks_what_compiles():
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.plan.targets = 'cpu'
  config.plan.programs = 'sample'
  assert [r['program'] for r in plan.plan(config, **QUIET)] == ['sample']


def test_a_plan_stopped_part_way_keeps_its_rows(sd_folder, tmp_path,
                                                monkeypatch):
  """plan.jsonl and plan.md are rewritten (atomically) after every row."""
  real = plan.measure_program
  calls = []

  def first_then_stop(*args, **kwargs):
    calls.append(1)
    if len(calls) > 1:
      raise KeyboardInterrupt
    return real(*args, **kwargs)

  monkeypatch.setattr(plan, 'measure_program', first_then_stop)
  with pytest.raises(KeyboardInterrupt):
    plan.plan(_tav(sd_folder), str(tmp_path), **QUIET)
  lines = (tmp_path / 'plan.jsonl').read_text().splitlines()
  assert [json.loads(line)['program'] for line in lines] == ['tune']
  assert '| cpu | tune |' in (tmp_path / 'plan.md').read_text()
  assert sorted(os.listdir(tmp_path)) == ['plan.jsonl', 'plan.md']
