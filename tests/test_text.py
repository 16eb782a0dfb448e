"""Text-to-video: encoders, captions, text conditioning, null text and CFG."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from configs import tiny
from tests import perturb
from vdm_jax import checkpoint
from vdm_jax import denoiser
from vdm_jax import sample
from vdm_jax import sampling
from vdm_jax import sample_inputs
from vdm_jax import tasks
from vdm_jax import video_io
from vdm_jax.data import captions as captions_lib
from vdm_jax.data import pipeline
from vdm_jax.data import synthetic
from vdm_jax.data import video_files
from vdm_jax.models import unet3d
from vdm_jax.text import encoders
from vdm_jax.text import hf

L = 8


@pytest.fixture(scope='module')
def wordllama():
  return encoders.WordLlama(L)


def test_wordllama_embeds_its_tokens(wordllama, monkeypatch):
  table, tokenizer = encoders._wordllama_files()
  assert table.shape == (32000, 256) and wordllama.dim == 256
  # Llama-2 ids of a caption (the tokenizer the wheel ships).
  ids = tokenizer.encode('a red triangle moving left',
                         add_special_tokens=False).ids
  assert ids == [263, 2654, 17205, 8401, 2175]
  emb = wordllama.encode(['a red triangle moving left', ''])
  assert emb.tokens.shape == (2, L, 256) and emb.mask.shape == (2, L)
  np.testing.assert_array_equal(emb.mask[0], [True] * 5 + [False] * 3)
  np.testing.assert_array_equal(emb.tokens[0, :5],
                                table[ids].astype(np.float32))
  assert not emb.tokens[0, 5:].any()
  np.testing.assert_allclose(emb.pooled[0],
                             table[ids].astype(np.float32).mean(0), rtol=1e-5)
  # The empty text has no tokens (the model's null text).
  assert not emb.mask[1].any() and not emb.pooled[1].any()
  warnings = []
  monkeypatch.setattr(encoders.logging, 'warning',
                      lambda msg, *a: warnings.append(msg % a))
  long = 'a very long prompt ' * 5
  cut = wordllama.encode([long])
  assert cut.mask.all() and len(warnings) == 1 and repr(long) in warnings[0]


def test_precomputed_file_round_trip(wordllama, tmp_path):
  texts = ['a red square moving up', 'green circle going left']
  path = str(tmp_path / 'emb.npz')
  encoders.save_embeddings(path, texts, wordllama.encode(texts), 'wordllama')
  files = encoders.Precomputed(path, L)
  assert files.dim == 256 and files.source == 'wordllama'
  got = files.encode([texts[1], '', texts[0]])
  want = wordllama.encode([texts[1], '', texts[0]])
  np.testing.assert_array_equal(got.mask, want.mask)
  np.testing.assert_allclose(got.tokens, want.tokens, atol=2e-3)  # float16.
  with pytest.raises(KeyError, match='no embedding in'):
    files.encode(['a blue ring'])
  np.savez(str(tmp_path / 'bad.npz'), x=np.zeros(2))
  with pytest.raises(ValueError, match='not an embeddings file'):
    encoders.Precomputed(str(tmp_path / 'bad.npz'), L)
  with pytest.raises(ValueError, match='no such embeddings file'):
    encoders.Precomputed(str(tmp_path / 'none.npz'), L)


def _tiny_clip():
  """A randomly initialised CLIP text model and a tokenizer, offline."""
  import transformers  # pylint: disable=g-import-not-at-top
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_file=_wordllama_tokenizer_file())
  tokenizer.pad_token = '<unk>'
  config = transformers.CLIPTextConfig(
      vocab_size=32000, hidden_size=32, intermediate_size=64,
      num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=L,
      eos_token_id=2, bos_token_id=1, pad_token_id=0)
  return transformers.CLIPTextModel(config), tokenizer


def _wordllama_tokenizer_file():
  import wordllama  # pylint: disable=g-import-not-at-top
  return os.path.join(os.path.dirname(wordllama.__file__),
                      encoders.WORDLLAMA_TOKENIZER)


def test_hugging_face_encoder_prepare_and_files(tmp_path):
  model, tokenizer = _tiny_clip()
  encoder = hf.HuggingFace(model, tokenizer, L, name='tiny-clip')
  assert encoder.dim == 32
  texts = ['a red square moving up', 'a blue ring', '']
  emb = encoder.encode(texts)
  assert emb.tokens.shape == (3, L, 32) and emb.pooled.shape == (3, 32)
  assert emb.mask[0].sum() == len(tokenizer(texts[0])['input_ids'])
  assert not emb.mask[2].any()
  assert not emb.tokens[2].any() and not emb.pooled[2].any()
  # The prepare step: distinct texts to a file the 'files' encoder reads.
  path = str(tmp_path / 'clip.npz')
  hf.prepare(encoder, texts + texts[:1], path)
  files = encoders.Precomputed(path, L)
  assert files.dim == 32 and files.source == 'tiny-clip'
  got = files.encode(texts[:2])
  np.testing.assert_allclose(got.tokens, emb.tokens[:2], atol=2e-3)
  np.testing.assert_allclose(got.pooled, emb.pooled[:2], rtol=1e-5)
  with pytest.raises(ValueError, match='makes 32-d embeddings but the'
                     ' model was trained on 256-d'):
    hf.prepare(encoder, texts, path, model_dim=256)


def test_synthetic_captions_say_what_is_rendered():
  source = synthetic.SyntheticVideos(8, 16, motion='straight',
                                     caption_holdout=8, num_classes=3)
  idx = np.arange(400)
  a = source.attributes(idx)
  caps = source.captions(idx)
  for i in range(40):
    c = caps[i]
    assert synthetic.COLOUR_WORDS[a['colour'][i, 0]] in c
    assert synthetic.SHAPE_WORDS[a['kind'][i]] in c
    assert synthetic.DIRECTIONS[a['direction'][i, 0]] in c
  assert len({c.split()[0] for c in caps}) > 2  # Several templates.
  assert not synthetic.held_out(a['kind'], a['colour'][:, 0],
                                a['direction'][:, 0], 8).any()
  # Without the holdout those combinations do occur.
  free = synthetic.SyntheticVideos(8, 16, motion='straight', num_classes=3)
  b = free.attributes(idx)
  assert synthetic.held_out(b['kind'], b['colour'][:, 0],
                            b['direction'][:, 0], 8).any()
  # The rendered centroid moves the captioned way, and stays inside.
  video = source.render_batch(idx[:64])['video'].astype(float).sum(-1)
  fg = video > video.min() + 100
  ys, xs = np.nonzero(fg.any(axis=(0,)).any(axis=0))
  for i in range(64):
    yy, xx = [np.array([np.nonzero(f)[k].mean() for f in fg[i]])
              for k in (0, 1)]
    d = synthetic.DIRECTIONS[a['direction'][i, 0]]
    dx, dy = xx[-1] - xx[0], yy[-1] - yy[0]
    want = {'right': dx > 2, 'left': dx < -2, 'down': dy > 2,
            'up': dy < -2}[d]
    assert want, (i, d, dx, dy)
  assert source.render_batch([3])['caption'] == [caps[3]]


def _write_clip(path, value=100):
  video_io.write_gif(path, np.full((5, 8, 8, 3), value, np.uint8))


def test_video_folder_captions(tmp_path):
  root = tmp_path / 'videos'
  (root / 'a').mkdir(parents=True)
  for name in ('x', 'y', 'z'):
    _write_clip(str(root / 'a' / f'{name}.gif'))
  (root / 'a' / 'x.txt').write_text('  a sidecar\ncaption ')
  (root / 'captions.csv').write_text('path,caption\na/y.gif,from the csv\n')
  (root / 'captions.json').write_text(json.dumps({'z.gif': 'from json'}))
  source = video_files.VideoFiles(str(root), image_size=8, captions=True)
  assert [source[i]['caption'] for i in range(3)] == [
      'a sidecar caption', 'from the csv', 'from json']
  os.remove(root / 'captions.json')
  with pytest.raises(ValueError, match=r'1 of 3 videos .* have no caption.*'
                     r'z\.gif'):
    video_files.VideoFiles(str(root), image_size=8, captions=True)
  source = video_files.VideoFiles(str(root), image_size=8, captions=True,
                                  allow_empty_captions=True)
  assert source[2]['caption'] == ''
  assert 'caption' not in video_files.VideoFiles(str(root),
                                                 image_size=8)[0]
  with pytest.raises(ValueError, match='path,caption'):
    (root / 'captions.csv').write_text('file,text\na/y.gif,x\n')
    captions_lib.load_captions(str(root), source.files)


def test_pipeline_batches_carry_each_frames_own_caption(wordllama):
  source = synthetic.SyntheticVideos(6, 16, motion='straight', seed=3,
                                     num_examples=50)
  pipe = pipeline.Pipeline(source, global_batch_size=6, num_frames=4, seed=0,
                           image_frames=2, random_flip=True,
                           text_encoder=wordllama)
  batch = pipe.batch_for_step(2, captions=True)
  assert batch['text'].shape == (6, L, 256)
  assert batch['image_text'].shape == (6, 2, L, 256)
  # Recompute the captions: the clip's (mirrored when flipped), each image
  # frame's own video's.
  plain = pipeline.Pipeline(synthetic.SyntheticVideos(
      6, 16, motion='straight', seed=3, num_examples=50),
                            global_batch_size=6, num_frames=4, seed=0,
                            image_frames=2, random_flip=True)
  again = plain.batch_for_step(2, captions=True)
  np.testing.assert_array_equal(batch['caption'], again['caption'])
  emb = wordllama.encode(list(batch['caption']))
  np.testing.assert_array_equal(batch['text'], emb.tokens)
  flipped = [c for c in batch['caption'] if 'left' in c or 'right' in c]
  assert flipped  # Some clips move horizontally.
  assert pipeline.flip_caption('a red x moving left, then right') == (
      'a red x moving right, then left')
  # The image frames' captions are those of their own videos: the label
  # (shape kind) of each image frame is named in its caption.
  for j in range(6):
    for k in range(2):
      word = synthetic.SHAPE_WORDS[batch['image_label'][j, k]]
      toks = wordllama.token_ids([word])[0]
      row = batch['image_text'][j, k][batch['image_text_mask'][j, k]]
      table = encoders._wordllama_files()[0].astype(np.float32)
      assert any(np.array_equal(r, table[toks[0]]) for r in row), (j, k)
  # A source without captions cannot feed a text model.

  class NoCaptions:

    def __len__(self):
      return 4

    def __getitem__(self, i):
      return {'video': np.zeros((4, 8, 8, 3), np.uint8), 'label': 0}

  with pytest.raises(ValueError, match='needs captions'):
    pipeline.Pipeline(NoCaptions(), global_batch_size=2, num_frames=2,
                      seed=0, text_encoder=wordllama)


def _text_model():
  return unet3d.UNet3D(base_channels=8, channel_mults=(1, 2),
                       num_res_blocks=1, attn_resolutions=(4,), head_dim=8,
                       emb_dim=16, text_length=L)


def _perturbed_params(model, z, text, mask):
  params = jax.jit(model.init)(jax.random.key(0), z, jnp.zeros(z.shape[:1]),
                               text=text, text_mask=mask)['params']
  # Zero-initialised output projections would hide the cross-attention.
  return perturb.perturbed(params, 1, 0.3)


@pytest.mark.parametrize('cross,pool', [(True, False), (False, True)])
def test_text_conditions_the_unet(wordllama, cross, pool):
  model = _text_model().clone(text_cross_attention=cross, text_pooling=pool)
  # The same z for every row: rows differ only by their text.
  z = jnp.tile(jax.random.normal(jax.random.key(2), (1, 4, 8, 8, 3)),
               (3, 1, 1, 1, 1))
  emb = wordllama.encode(['a red square moving up', 'a blue ring', ''])
  text, mask = jnp.asarray(emb.tokens), jnp.asarray(emb.mask)
  params = _perturbed_params(model, z, text, mask)
  names = set(params)
  assert ('mid_xattn' in names) == cross and ('text_pool' in names) == pool

  # Jitted: op-by-op the UNet costs ~30 s of tiny compiles on 2 cores.
  apply = jax.jit(model.apply)

  def run(t, m, null=None, frame_mask=None):
    # Always arrays (None means these values), so per-clip texts compile
    # once and per-frame texts once.
    null = jnp.zeros((3,), bool) if null is None else null
    frame_mask = jnp.ones((3, 4), bool) if frame_mask is None else frame_mask
    return np.asarray(apply({'params': params}, z,
                            jnp.zeros((3,)), text=t, text_mask=m,
                            text_null=null, frame_mask=frame_mask))

  out = run(text, mask)
  swapped = run(text[::-1], mask[::-1])
  assert np.abs(out[0] - swapped[0]).max() > 1e-3  # The text matters.
  np.testing.assert_allclose(out[1], swapped[1], atol=1e-5)  # Same text.
  # The empty text and a dropped text are the same learned null text.
  null = run(text, mask, null=jnp.array([True, True, True]))
  np.testing.assert_allclose(null[0], out[2], atol=1e-5)
  np.testing.assert_allclose(null[2], out[2], atol=1e-5)
  # Per-frame texts (independent image frames): frame f sees only its own.
  per_frame = jnp.broadcast_to(text[:, None], (3, 4, L, 256))
  per_mask = jnp.broadcast_to(mask[:, None], (3, 4, L))
  images = jnp.zeros((3, 4), bool)
  base = run(per_frame, per_mask, frame_mask=images)
  np.testing.assert_allclose(base, run(text, mask, frame_mask=images),
                             atol=1e-4)
  other = per_frame.at[0, 2].set(text[1])
  other_mask = per_mask.at[0, 2].set(mask[1])
  moved = run(other, other_mask, frame_mask=images)
  np.testing.assert_allclose(moved[0, [0, 1, 3]], base[0, [0, 1, 3]],
                             atol=1e-4)
  assert np.abs(moved[0, 2] - base[0, 2]).max() > 1e-3


def test_text_model_errors(wordllama):
  z = jnp.zeros((1, 2, 8, 8, 3))
  emb = wordllama.encode(['a cat'])
  plain = _text_model().clone(text_length=0)
  params = plain.init(jax.random.key(0), z, jnp.zeros((1,)))['params']
  with pytest.raises(ValueError, match='no text conditioning'):
    plain.apply({'params': params}, z, jnp.zeros((1,)),
                text=emb.tokens, text_mask=emb.mask)
  with pytest.raises(ValueError, match='text_cross_attention or'):
    unet3d.validate_model_config(8, 2, base_channels=8, channel_mults=(1,),
                                 num_res_blocks=1, attn_resolutions=(),
                                 text_length=L, text_cross_attention=False,
                                 text_pooling=False)


def test_training_cond_text_per_frame_and_dropout():
  b, n, d = 2, 1, 3
  batch = {'frame_mask': jnp.array([[True, True, False]] * b),
           'text': jnp.ones((b, L, d)), 'text_mask': jnp.ones((b, L), bool),
           'image_label': jnp.zeros((b, n), jnp.int32),
           'image_text': 2 * jnp.ones((b, n, L, d)),
           'image_text_mask': jnp.zeros((b, n, L), bool)}
  cond = denoiser.training_cond(
      batch, 0, 0.0, jnp.zeros(b), text_dropout=0.5,
      text_drop_u=jnp.array([0.1, 0.9]),
      image_text_drop_u=jnp.array([[0.9], [0.2]]))
  assert cond['text'].shape == (b, 3, L, d)
  np.testing.assert_array_equal(cond['text'][:, :2], 1.0)
  np.testing.assert_array_equal(cond['text'][:, 2], 2.0)
  np.testing.assert_array_equal(cond['text_mask'][:, 2], False)
  np.testing.assert_array_equal(cond['text_null'], [[True, True, False],
                                                    [False, False, True]])


def test_classifier_free_guidance_against_the_null_text():
  """eps~ = (1 + w) eps(z, text) - w eps(z, null text) (Ho & Salimans)."""

  def denoise(z, logsnr, cond):
    del logsnr
    null = cond.get('text_null', jnp.zeros((z.shape[0],), bool))
    shift = jnp.where(null, 0.0, cond['text'][:, 0, 0])
    return z * 0.5 + shift[:, None, None, None, None]

  z = jnp.ones((2, 2, 2, 2, 1))
  cond = {'text': jnp.array([1.0, 3.0])[:, None, None] * jnp.ones((2, L, 1)),
          'text_mask': jnp.ones((2, L), bool)}
  g = sampling.make_guidance(cfg_weight=2.0, null_text=True)
  assert g.null_text and float(g.cfg_weight) == 2.0
  _, x, _ = sampling.guided_predictor(denoise, 'x', cond, g)(
      z, jnp.zeros(2), None)
  want = 3 * (0.5 + np.array([1.0, 3.0])) - 2 * 0.5
  np.testing.assert_allclose(np.asarray(x)[:, 0, 0, 0, 0], want, rtol=1e-6)
  off = sampling.make_guidance(cfg_weight=0.0, null_text=True)
  _, x0, _ = sampling.guided_predictor(denoise, 'x', cond, off)(
      z, jnp.zeros(2), None)
  np.testing.assert_allclose(np.asarray(x0)[:, 0, 0, 0, 0],
                             0.5 + np.array([1.0, 3.0]))


def _text_config(**overrides):
  config = tiny.get_config()
  config.text.encoder = 'wordllama'
  config.text.max_length = L
  config.data.motion = 'straight'
  config.model.num_classes = 0
  config.training.label_dropout = 0.0
  for k, v in overrides.items():
    group, field = k.split('.')
    config[group][field] = v
  return config


def test_prompts_of_the_sample_program(tmp_path):
  config = _text_config()
  inputs = sample_inputs.TaskInputs(None)
  assert sample.prompts_for(config, inputs, 2) == ['', '']
  config.sample.prompt = 'a red square moving up'
  assert sample.prompts_for(config, inputs, 2) == [config.sample.prompt] * 2
  path = tmp_path / 'prompts.txt'
  path.write_text('one\n\n two \n')
  config.sample.prompts_file = str(path)
  assert sample.prompts_for(config, inputs, 3) == ['one', 'two', 'one']
  # Dataset inputs without a prompt: each clip's own caption.
  config.sample.prompts_file = config.sample.prompt = ''
  config.sample.task = 'predict'
  request = sample.prepare(config, 2, seed=0)
  assert request.prompts == list(request.inputs.captions)
  assert all(request.prompts)
  assert request.text.tokens.shape == (2, L, 256)
  # A model without text: a prompt is an error before anything compiles.
  plain = tiny.get_config()
  plain.sample.prompt = 'a cat'
  with pytest.raises(ValueError, match="no text conditioning"):
    sample.prepare(plain, 2, seed=0)
  assert sample.file_stem(3, 'A red square, moving up!') == (
      'sample_003_a_red_square_moving_up')
  assert sample.file_stem(3, '') == 'sample_003'


def test_text_settings_must_match_the_checkpoint(tmp_path):
  workdir = str(tmp_path)
  checkpoint.save_config(tiny.get_config(), workdir)
  config = _text_config()
  with pytest.raises(ValueError, match="text.encoder: saved 'none',"
                     " requested 'wordllama'"):
    checkpoint.check_compatible(config, workdir)
  checkpoint.check_compatible(tiny.get_config(), workdir)
  # An embeddings run of another dimension than the model's.
  checkpoint.save_text_encoder(workdir, 'wordllama', 256, L)
  checkpoint.check_text_dim(workdir, 256, 'text.encoder')
  with pytest.raises(ValueError, match=r"text.hf_model='t5' gives 768-d"
                     r' text embeddings, but the model .* was trained on'
                     r' 256-d'):
    checkpoint.check_text_dim(workdir, 768, "text.hf_model='t5'")


def test_text_model_trains_and_samples_from_prompts(tmp_path):
  """The train program on captions, then every task with a prompt."""
  from vdm_jax import train  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / 'work')
  config = _text_config(**{'training.num_train_steps': 2,
                           'data.image_frames': 2,
                           'sample.guidance_weight': 1.0})
  train.train(config, workdir)
  with open(os.path.join(workdir, checkpoint.TEXT_FILE)) as f:
    assert json.load(f) == {'encoder': 'wordllama', 'dim': 256,
                            'max_length': L}
  config.sample.prompt = 'a blue circle moving right'
  paths = sample.sample_and_save(config, workdir)
  assert all('a_blue_circle_moving_right' in p for p in paths['mp4'])
  with np.load(paths['npz']) as f:
    assert list(f['prompts']) == [config.sample.prompt] * 2
  # The prompt is drawn under each row of the grid.
  with Image.open(paths['grid']) as grid:
    cell = video_io.MIN_GRID_CELL
    assert grid.size[1] == 2 * (cell + 2 + video_io.CAPTION_HEIGHT) + 2
  # Every task takes the prompt (here: predict from dataset clips).
  model, params, _ = sample.restore_ema_params(config, workdir)
  config.sample.task = 'predict'
  request = sample.prepare(config, 2, seed=0)
  setup = request.setup
  x = tasks.run(request.task, denoiser.make_denoise_fn(model, params),
                jax.random.key(0), setup,
                video=request.inputs.video.astype(np.float32) / 127.5 - 1,
                text={'text': request.text.tokens,
                      'text_mask': request.text.mask})
  assert x.shape[:2] == (2, config.data.num_frames)
