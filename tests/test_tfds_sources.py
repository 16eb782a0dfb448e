"""TFDS sources under tfds.testing.mock_data (no download), and on a tiny
ArrayRecord dataset prepared here from a generator."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import tiny
from vdm_jax.data import pipeline
from vdm_jax.data import prepare
from vdm_jax.data import sources
from vdm_jax.data import tfds_sources

NUM_EXAMPLES = 6
# Tests that read real files instead of the mock.
_UNMOCKED = ('test_a_prepared_array_record_dataset',)


@pytest.fixture(autouse=True)
def _mock_tfds(request):
  if request.node.name in _UNMOCKED:
    yield
    return
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES,
                              policy=tfds.testing.MockPolicy.USE_CODE):
    yield


def _data(name, **overrides):
  data = tiny.get_config().data
  data.name = name
  data.num_classes = 0
  for key, value in overrides.items():
    data[key] = value
  return data


def _pipeline(data, **kw):
  args = dict(global_batch_size=4, num_frames=data.num_frames, seed=0,
              frame_stride=data.frame_stride, image_frames=data.image_frames)
  args.update(sources.pipeline_options(data))
  args.update(kw)
  return pipeline.Pipeline(sources.get_source(data, seed=0), **args)


def _decoded(name, split='train'):
  """TFDS's own decoding of the mock examples (the reference)."""
  return tfds.data_source(name, split=split)


PRESETS = [
    ('ucf101', dict(split='train+test'), 3),
    ('bair_robot_pushing_small', dict(view='image_aux1'), 3),
    ('moving_mnist', dict(split='test', channels=1), 1),
]


@pytest.mark.parametrize('name,overrides,channels', PRESETS)
def test_batches_have_the_training_layout(name, overrides, channels):
  data = _data(name, image_frames=1, random_flip=True, crop='random',
               **overrides)
  batch = _pipeline(data, global_batch_size=2).batch_for_step(3)
  assert batch['video'].shape == (2, 5, 16, 16, channels)
  assert batch['video'].dtype == np.uint8
  assert batch['label'].dtype == np.int32
  np.testing.assert_array_equal(batch['frame_mask'].sum(1), 4)
  # The same structure as the synthetic batches the tiny model trains on.
  synthetic = _pipeline(_data('synthetic', image_frames=1),
                        global_batch_size=2).batch_for_step(0)
  assert batch.keys() == synthetic.keys()
  for key in batch:
    assert batch[key].dtype == synthetic[key].dtype
    assert batch[key].shape[:2] == synthetic[key].shape[:2]
  # Uniform noise frames, averaged by the antialiased resize: mean 127.5.
  assert abs(batch['video'].mean() - 127.5) < 10
  assert batch['video'].std() > 1


def test_ucf101_labels_and_class_names():
  source = sources.get_source(_data('ucf101', split='train+test'), seed=0)
  assert len(source.label_names) == 101
  assert source.label_names[0] == 'ApplyEyeMakeup'
  reference = _decoded('ucf101', 'train+test')
  for i in range(NUM_EXAMPLES):
    assert source[i]['label'] == reference[i]['label']
  with pytest.raises(ValueError, match='num_classes=101'):
    sources.get_source(_data('ucf101', num_classes=3), seed=0)


@pytest.mark.parametrize('view', tfds_sources.BAIR_VIEWS)
def test_bair_view_selection_is_exact(view):
  data = _data('bair_robot_pushing_small', view=view, image_size=64)
  source = sources.get_source(data, seed=0)
  reference = _decoded('bair_robot_pushing_small')
  for i in range(2):
    video = source[i]['video']
    assert video.shape == (30, 64, 64, 3)
    np.testing.assert_array_equal(video, np.stack(reference[i][view]))
  other = 'image_main' if view == 'image_aux1' else 'image_aux1'
  assert not np.array_equal(source[0]['video'],
                            np.stack(reference[0][other]))
  with pytest.raises(ValueError, match='image_main'):
    sources.get_source(_data('bair_robot_pushing_small', view='top'), 0)


def test_stride_cuts_clips_from_the_30_frame_sequences():
  data = _data('bair_robot_pushing_small', image_size=64, frame_stride=3)
  p = _pipeline(data, global_batch_size=NUM_EXAMPLES, random_start=False)
  batch = p.batch_for_step(0)
  reference = _decoded('bair_robot_pushing_small')
  for j, example in enumerate(p._permutation(0)):
    frames = np.stack(reference[int(example)]['image_main'])
    np.testing.assert_array_equal(batch['video'][j], frames[0:10:3])
  # Random starts stay inside the sequence: 30 - 10 + 1 = 21 choices.
  p = _pipeline(data, global_batch_size=NUM_EXAMPLES)
  assert p.batch_for_step(1)['video'].shape == (NUM_EXAMPLES, 4, 64, 64, 3)


def test_flips_are_seeded_by_the_position():
  data = _data('bair_robot_pushing_small')
  plain = _pipeline(data, global_batch_size=NUM_EXAMPLES)
  flipped = _pipeline(data, global_batch_size=NUM_EXAMPLES, random_flip=True)
  flips = []
  for step in range(2):
    a, b = plain.batch_for_step(step), flipped.batch_for_step(step)
    np.testing.assert_array_equal(a['label'], b['label'])
    for x, y in zip(a['video'], b['video']):
      same = np.array_equal(x, y)
      assert same or np.array_equal(x[:, :, ::-1], y)
      flips.append(not same)
  assert 0 < sum(flips) < len(flips)
  again = _pipeline(data, global_batch_size=NUM_EXAMPLES, random_flip=True)
  np.testing.assert_array_equal(again.batch_for_step(1)['video'],
                                flipped.batch_for_step(1)['video'])


class _Recording:
  """Delegates to a source and records the examples read."""

  def __init__(self, source):
    self.source, self.seen = source, []

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return self.source[i]

  def read_frames(self, i, select, crop=None):
    self.seen.append(i)
    return self.source.read_frames(i, select, crop)


def test_processes_split_the_epoch_and_resume_is_exact():
  data = _data('moving_mnist', split='test')
  source = sources.get_source(data, seed=0)
  seen = []
  for process in range(2):
    recording = _Recording(source)
    p = pipeline.Pipeline(recording, global_batch_size=NUM_EXAMPLES,
                          num_frames=4, seed=0, process_index=process,
                          process_count=2, random_flip=True)
    p.batch_for_step(0)
    seen.append(set(recording.seen))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(NUM_EXAMPLES))
  run = _pipeline(data, random_flip=True)
  straight = [run.batch_for_step(s) for s in range(4)]
  with _pipeline(data, random_flip=True).iterate(start_step=2) as resumed:
    for step in (2, 3):
      batch = next(resumed)
      for key in batch:
        np.testing.assert_array_equal(batch[key], straight[step][key])


def test_moving_mnist_has_no_train_split():
  with pytest.raises(ValueError, match="only the authors' 10,000 test"):
    sources.get_source(_data('moving_mnist', split='train'), seed=0)
  with pytest.raises(ValueError, match="no split 'train'"):
    sources.get_source(_data('moving_mnist', split='train+test'), seed=0)


def test_generic_tfds_name_needs_its_keys():
  with pytest.raises(ValueError, match='tfds_name'):
    sources.get_source(_data('tfds'), seed=0)
  with pytest.raises(ValueError, match='not a feature'):
    sources.get_source(
        _data('tfds', tfds_name='moving_mnist', video_key='frames'), seed=0)
  data = _data('tfds', tfds_name='moving_mnist', video_key='image_sequence',
               split='test')
  assert _pipeline(data).batch_for_step(0)['video'].shape == (4, 4, 16, 16, 3)


class TinyVideos(tfds.core.GeneratorBasedBuilder):
  """Labelled JPEG videos of different lengths and aspect ratios."""

  VERSION = tfds.core.Version('1.0.0')

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({
            'clip': tfds.features.Video((None, None, None, 3),
                                        encoding_format='jpeg'),
            'action': tfds.features.ClassLabel(names=['run', 'jump']),
            'caption': tfds.features.Text(),
        }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {'train': self._generate_examples(0, 3),
            'test': self._generate_examples(3, 5)}

  def _generate_examples(self, start, stop):
    for i in range(start, stop):
      video = np.zeros((8 + i, 24, 40, 3), dtype=np.uint8)
      video[..., 0] = 40 * i  # Tags the example.
      video[..., 1] = 20 * np.arange(8 + i)[:, None, None]  # Tags the frame.
      yield i, {'clip': video, 'action': i % 2,
                'caption': f'clip  number {i}'}


def test_a_prepared_array_record_dataset(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  data = _data('tfds', tfds_name='tiny_videos', video_key='clip',
               label_key='action', split='train+test', data_dir=data_dir)
  with pytest.raises(ValueError, match='vdm_jax.data.prepare tiny_videos'):
    sources.get_source(data, seed=0)
  prepare.prepare('tiny_videos', data_dir)
  source = sources.get_source(data, seed=0)
  assert len(source) == 5 and source.label_names == ['run', 'jump']
  found = set()
  for index in range(5):
    clip = source.read_frames(index, lambda n: np.array([n - 1, 2]))
    assert clip['video'].shape == (2, 16, 16, 3)
    # JPEG is lossy: the tags come back to within a few levels.
    i = int(round(clip['video'][..., 0].mean() / 40))
    found.add(i)
    assert clip['label'] == i % 2
    np.testing.assert_allclose(clip['video'][:, 8, 8, 1], [20 * (7 + i), 40],
                               atol=6)
  assert found == set(range(5))
  # A Text feature gives the captions of text-to-video training.
  captioned = sources.get_source(_data(
      'tfds', tfds_name='tiny_videos', video_key='clip', label_key='action',
      caption_key='caption', split='train+test', data_dir=data_dir), seed=0)
  captions = {captioned[i]['caption'] for i in range(5)}
  assert captions == {f'clip number {i}' for i in range(5)}
  assert 'caption' not in source[0]
  # 24x40 frames: the short side becomes 16, the window slides along x.
  left = source.read_frames(0, np.arange, crop=(0.0, 0.0))['video']
  right = source.read_frames(0, np.arange, crop=(0.99, 0.99))['video']
  centre = source[0]['video']
  assert left.shape == right.shape == centre.shape == (
      len(centre), 16, 16, 3)
  p1 = _pipeline(data, global_batch_size=5, random_crop=True)
  p2 = _pipeline(data, global_batch_size=5, random_crop=True)
  np.testing.assert_array_equal(p1.batch_for_step(1)['video'],
                                p2.batch_for_step(1)['video'])
  sources.save_label_names(source, str(tmp_path))
  assert sources.load_label_names(str(tmp_path)) == ['run', 'jump']


@pytest.mark.parametrize('name,overrides,channels', PRESETS)
def test_one_train_step_of_the_tiny_config(name, overrides, channels,
                                           tmp_path):
  from vdm_jax import train  # pylint: disable=g-import-not-at-top
  config = tiny.get_config()
  config.data.name = name
  config.data.num_classes = 0
  config.training.label_dropout = 0.0
  config.training.num_train_steps = 1
  for key, value in overrides.items():
    config.data[key] = value
  state = train.train(config, str(tmp_path))
  assert int(state.step) == 1
  assert state.params['conv_in']['kernel'].shape[2] == channels
  assert (tmp_path / 'checkpoints' / '1').is_dir()
