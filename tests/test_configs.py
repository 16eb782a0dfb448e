"""Every file in configs/ loads, validates, finds its data and traces.

For each config (with its argument variants): the train program's checks
(`train.validate_config`), the sample program's (`sample.prepare`, which
builds the task and reads its dataset inputs) and the eval program's
(`evaluate.plan`); its dataset resolves (TFDS presets under
`tfds.testing.mock_data`, Kinetics-600 as a small folder written here) and
yields one training batch; and its train step and sampling task trace
abstractly (`jax.eval_shape`: nothing is allocated, so the 1.2 B-parameter
paper models cost only tracing time) at a batch of one example per device.

The paper configs must evaluate under their paper's FVD protocol by
default, with no deviation the plan can see (protocol, split, conditioning
frames).
"""

import glob
import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking as tfds_mocking

from vdm_jax import denoiser
from vdm_jax import evaluate
from vdm_jax import sample
from vdm_jax import sharding
from vdm_jax import tasks
from vdm_jax import train
from vdm_jax import training
from vdm_jax import video_io
from vdm_jax.data import sources
from vdm_jax.sinfusion import generate as sf_generate
from vdm_jax.sinfusion import train as sf_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_NAMES = sorted(
    os.path.basename(p)[:-len('.py')]
    for p in glob.glob(os.path.join(ROOT, 'configs', '*.py'))
    if not p.endswith('__init__.py'))
# Configs of other programs than VDM's train/sample/eval.
SINFUSION = ('single_video',)
# Argument variants (`--config=configs/X.py:arg`); the others take none.
ARGS = {'single_video': (None, 'tiny')}
# Paper configs -> (FVD protocol, real split) they evaluate under by default.
PAPER_PROTOCOLS = {
    'bair_64': ('bair_vdm', 'test'),
    'kinetics600_64': ('kinetics600_vdm', 'test'),
    'ucf101_64': ('stylegan_v_2048', 'train'),
    'videofusion_ucf101_64': ('stylegan_v_2048', 'train'),
}
MOCK_EXAMPLES = 12  # > image_frames (8): each image frame's own video.
MOCK_FRAMES = 20  # Frames of mock videos of unknown length (UCF101's).


def _load(name, arg=None):
  return importlib.import_module(f'configs.{name}').get_config(arg)


def _variants(names):
  return [(n, a) for n in names for a in ARGS.get(n, (None,))]


def _vdm(name):
  """A config of VDM's train/sample/eval programs (not SinFusion's, nor a
  pretrained model's: configs/stable_diffusion.py and the like, whose
  programs read a local diffusers folder; tests/test_pretrained_*.py)."""
  return name not in SINFUSION and _load(name).method == 'vdm'


PRETRAINED = [n for n in CONFIG_NAMES
              if n not in SINFUSION and not _vdm(n)]


@pytest.mark.parametrize('name', PRETRAINED)
def test_pretrained_configs_need_a_folder(name):
  """Every pretrained-model config names its folder field, and its
  program says to set it (before reading or compiling anything)."""
  config = _load(name)
  assert 'pretrained' in config and config.pretrained.path == ''
  assert config.method in ('pretrained', 'tune_a_video_sd', 'svd',
                           'svd_inbetween'), config.method
  if config.method == 'pretrained':
    from vdm_jax import sample_pretrained  # pylint: disable=g-import-not-at-top
    with pytest.raises(ValueError, match='pretrained.path is empty'):
      sample_pretrained.check(config)


def test_every_config_file_is_covered():
  assert set(PAPER_PROTOCOLS) <= set(CONFIG_NAMES)
  assert set(SINFUSION) <= set(CONFIG_NAMES)
  assert len(CONFIG_NAMES) >= 7, CONFIG_NAMES


@pytest.fixture(scope='module')
def kinetics_root(tmp_path_factory):
  """A Kinetics-600 layout, <root>/<split>/<class>/<clip>.gif, tiny."""
  root = tmp_path_factory.mktemp('k600')
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for c in ('abseiling', 'zumba'):
      os.makedirs(root / split / c)
      for i in range(5):
        video = rng.integers(0, 256, (17, 36, 48, 3), dtype=np.uint8)
        video_io.write_gif(str(root / split / c / f'{i}.gif'), video)
  return str(root)


class _FixedLengthMock(tfds_mocking.SerializedRandomFakeGenerator):
  """TFDS's mock examples with MOCK_FRAMES frames where the length is free.

  The mock draws 5..49 frames, often fewer than a 16-frame clip needs.
  """

  def _generate_random_obj(self, feature, tensor_info, rng):
    shape = tuple(tensor_info.shape)
    if shape and shape[0] is None:
      tensor_info = tfds.features.TensorInfo(
          shape=(MOCK_FRAMES,) + shape[1:], dtype=tensor_info.dtype)
    return super()._generate_random_obj(feature, tensor_info, rng)


@pytest.fixture(autouse=True)
def _mock_tfds(monkeypatch):
  monkeypatch.setattr(tfds_mocking, 'SerializedRandomFakeGenerator',
                      _FixedLengthMock)
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def _reduced(config, kinetics_root):
  """The config at one example per device, pointed at the test data."""
  config.training.batch_size = jax.device_count()
  config.training.grad_accum_steps = 1
  config.sample.batch_size = 2
  if config.data.name == 'kinetics600':
    config.data.path = kinetics_root
  return config


def _abstract(tree, shardings=None):
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        tree)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


@pytest.mark.parametrize('name', [n for n in CONFIG_NAMES if _vdm(n)])
def test_config_validates_resolves_and_traces(name, kinetics_root, tmp_path):
  config = _reduced(_load(name), kinetics_root)
  # The three programs' checks, before anything compiles.
  train.validate_config(config, str(tmp_path))
  request = sample.prepare(config, 2, seed=0)
  task, setup = request.task, request.setup
  if config.data.num_frames >= 9:  # I3D's minimum.
    run = evaluate.plan(config, task, setup.model)
  else:
    with pytest.raises(ValueError, match='at least 9 frames'):
      evaluate.plan(config, task, setup.model)
    run = None
  if name in PAPER_PROTOCOLS:
    protocol, split = PAPER_PROTOCOLS[name]
    assert run.protocol.name == protocol
    assert run.split == split
    assert run.deviations == (), run.deviations
    assert (task.eval_conditioning_frames() or 0) == (
        run.protocol.conditioning_frames)

  # The dataset resolves and gives a batch of the layout train_step takes.
  pipe = train.create_pipeline(config)
  batch = pipe.batch_for_step(0)
  d = config.data
  t = d.num_frames + d.image_frames
  assert batch['video'].shape == (
      config.training.batch_size, t, d.image_size, d.image_size, d.channels)

  # The train step traces on abstract state and batch.
  mesh = sharding.make_mesh(config.mesh)
  model = denoiser.create_model(config)
  tx, lr_fn = training.create_optimizer(config)
  state, shardings = train.abstract_state(config, model, tx, mesh)
  step_fn = train.make_train_step(config, model, tx, lr_fn, mesh, shardings)
  new_state, metrics = jax.eval_shape(
      step_fn, _abstract(state, shardings),
      _abstract(sharding.host_to_global(batch, mesh)), jax.random.key(0))
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  assert metrics['loss'].shape == ()

  # The sampling task traces on abstract parameters (the EMA's shapes).
  params = _abstract(state.ema_params)
  inputs = request.inputs.video
  video = (None if inputs is None
           else jax.ShapeDtypeStruct(inputs.shape, jnp.float32))
  labels = request.labels
  text = None if request.text is None else {
      'text': request.text.tokens, 'text_mask': request.text.mask}

  def run_task(params, video):
    return tasks.run(task, denoiser.make_denoise_fn(model, params),
                     jax.random.key(1), setup, video=video, num_videos=2,
                     labels=labels, text=text)

  out = jax.eval_shape(run_task, params, video)
  num_out = task.num_output_frames(setup.model,
                                   task.num_input_frames(setup.model))
  assert out.shape == (2, num_out, d.image_size, d.image_size, d.channels)


@pytest.mark.parametrize('name,arg', _variants(SINFUSION))
def test_sinfusion_config_loads_and_validates(name, arg, tmp_path):
  config = _load(name, arg)
  assert config.method == 'sinfusion'
  sf_train.validate_config(config)
  sf_generate.validate_sample_config(config)
  path = str(tmp_path / 'clip.gif')
  video_io.write_gif(path, np.random.default_rng(0).integers(
      0, 256, (12, 40, 48, 3), dtype=np.uint8))
  config.data.path = path
  video, hw = sf_train.prepare(config, str(tmp_path / 'workdir'))
  assert video.shape[0] >= 2 and len(hw) == 2


def test_kinetics600_config_predicts_5_to_11_with_guidance():
  """VDM Sec. 4.2 / App. A: 5 given frames, w_r = 9, 128 + 128 PC steps."""
  config = _load('kinetics600_64')
  task = tasks.from_config(config.sample)
  assert isinstance(task, tasks.Predict)
  assert task.num_cond_frames == 5
  assert config.sample.recon_weight == 9.0
  assert (config.sample.sampler, config.sample.num_steps) == ('pc', 128)
  assert config.data.name in sources.SOURCES


def test_kinetics600_without_path_says_what_to_point_it_at():
  config = _load('kinetics600_64')
  with pytest.raises(ValueError, match='data.path'):
    sources.get_source(config.data, seed=0)


@pytest.mark.parametrize('name', [n for n in CONFIG_NAMES if _vdm(n)])
def test_every_vdm_config_has_the_defaults_fields(name):
  """Configs override fields of configs/default.py, they add none."""
  default = _load('default')
  config = _load(name)
  for group in config.keys():
    if isinstance(config[group], type(default)):
      extra = set(config[group].keys()) - set(default[group].keys())
      assert not extra, (group, extra)
  assert set(config.keys()) == set(default.keys())

