"""CLIP text and vision encoders, tokenizer and SVD's image preprocessing
against transformers / diffusers (PyTorch) on tiny random models saved in
their own layout and loaded by vdm_jax; full size on the meta device."""

import json
import logging
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffusers.pipelines.stable_video_diffusion import pipeline_stable_video_diffusion as svd  # pylint: disable=line-too-long
import torch
import transformers
# pylint: disable=g-import-not-at-top
from safetensors import numpy as safetensors_np

import sd_fixtures  # pylint: disable=wrong-import-order
from vdm_jax.models import clip
from vdm_jax.models import clip_preprocess
from vdm_jax.pretrained import clip as clip_pt
from vdm_jax.pretrained import clip_tokenizer
from vdm_jax.pretrained import convert

TOL = 1e-5
L = 16
VOCAB = 100
# Tiny text configs that together use every option: both activations, the
# legacy eos_token_id (argmax pooling) and a real one (the first end
# token, here not the largest id, so that argmax pooling would differ),
# with and without the projection, keys with and without `text_model.`.
TEXT_CASES = {
    'quick_gelu': dict(cls='CLIPTextModel', hidden_act='quick_gelu',
                       eos_token_id=2, prefixed=True),
    'gelu_projection': dict(cls='CLIPTextModelWithProjection',
                            hidden_act='gelu', eos_token_id=1,
                            prefixed=False, projection_dim=24),
}


def _randomize(model: 'torch.nn.Module') -> None:
  """Weights of order 1 so that outputs are of order 1 (init std is 0.02)."""
  with torch.no_grad():
    for name, p in model.named_parameters():
      if 'norm' in name and name.endswith('weight'):
        p.copy_(1 + 0.2 * torch.randn_like(p))
      elif name.endswith('bias'):
        p.copy_(0.2 * torch.randn_like(p))
      elif 'class_embedding' in name or ('embedding' in name
                                         and 'patch' not in name):
        p.copy_(torch.randn_like(p))
      else:
        p.copy_(torch.randn_like(p) / np.prod(p.shape[1:])**0.5)


def _save(model, folder, prefix: str = '') -> None:
  """save_pretrained, optionally rewritten with a pre-5.0 key prefix."""
  model.save_pretrained(folder)
  if prefix:
    path = os.path.join(folder, 'model.safetensors')
    tensors = safetensors_np.load_file(path)
    safetensors_np.save_file({prefix + k: v for k, v in tensors.items()},
                             path, metadata={'format': 'pt'})


def _ids(eos: int, bos: int = VOCAB - 2) -> np.ndarray:
  """[3, L] ids: start token, text, an end token (twice in row 0), padding
  with the end token (row 1) or with 0 (row 2, SD-2's '!')."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, VOCAB - 2, size=(3, L))
  ids[:, 0] = bos
  ids[0, 5] = ids[0, 9] = eos
  ids[1, 7:] = eos
  ids[2, 11] = eos
  ids[2, 12:] = 0
  return ids


@pytest.fixture(scope='module')
def text_models(tmp_path_factory):
  """{case: (torch model, folder)}."""
  out = {}
  for i, (case, c) in enumerate(TEXT_CASES.items()):
    torch.manual_seed(i)
    config = transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=L,
        hidden_act=c['hidden_act'], eos_token_id=c['eos_token_id'],
        bos_token_id=VOCAB - 2, pad_token_id=0,
        projection_dim=c.get('projection_dim', 512))
    model = getattr(transformers, c['cls'])(config).eval()
    _randomize(model)
    folder = str(tmp_path_factory.mktemp(case))
    _save(model, folder, 'text_model.' if c['prefixed'] else '')
    out[case] = (model, folder)
  return out


@pytest.mark.parametrize('case', list(TEXT_CASES))
def test_text_encoder_matches_transformers(text_models, case):
  model, folder = text_models[case]
  c = TEXT_CASES[case]
  ids = _ids(c['eos_token_id'] if c['eos_token_id'] != 2 else VOCAB - 1)
  with open(os.path.join(folder, 'config.json')) as f:
    assert json.load(f)['architectures'] == [c['cls']]
  module, params = clip_pt.load(folder)
  assert module.hidden_act == c['hidden_act']
  with torch.no_grad():
    ref = model(torch.from_numpy(ids), output_hidden_states=True)
    # diffusers' clip_skip=1: final_layer_norm of the penultimate layer.
    body = getattr(model, 'text_model', model)
    skip = body.final_layer_norm(ref.hidden_states[-2]).numpy()
  got = jax.jit(lambda p, x: module.apply({'params': p}, x, clip_skip=1))(
      params, jnp.asarray(ids))
  last = ref.last_hidden_state.numpy()
  assert 0.3 < np.abs(last).mean() < 3
  np.testing.assert_allclose(got.last_hidden_state, last, rtol=0, atol=TOL)
  np.testing.assert_allclose(got.context, skip, rtol=0, atol=TOL)
  assert len(got.hidden_states) == len(ref.hidden_states) == 3
  for g, r in zip(got.hidden_states, ref.hidden_states):
    np.testing.assert_allclose(g, r.numpy(), rtol=0, atol=TOL)
  if c['cls'] == 'CLIPTextModel':
    np.testing.assert_allclose(got.pooler_output, ref.pooler_output.numpy(),
                               rtol=0, atol=TOL)
  else:
    # The projection of the pooled end token (its first occurrence).
    np.testing.assert_allclose(got.text_embeds, ref.text_embeds.numpy(),
                               rtol=0, atol=TOL)
    pooled = ref.last_hidden_state[np.arange(3), [5, 7, 11]].numpy()
    np.testing.assert_allclose(got.pooler_output, pooled, rtol=0, atol=TOL)


def test_text_encoder_attention_mask_and_bfloat16(text_models):
  model, folder = text_models['gelu_projection']
  ids = _ids(1)
  mask = (np.arange(L) < np.array([[10], [8], [12]])).astype(np.int64)
  with torch.no_grad():
    ref = model(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
  module, params = clip_pt.load(folder)
  run = lambda m: jax.jit(lambda p, x, k: m.apply({'params': p}, x, k))
  got = run(module)(params, jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(got.last_hidden_state,
                             ref.last_hidden_state.numpy(), rtol=0, atol=TOL)
  bf16, _ = clip_pt.load(folder, dtype='bfloat16')
  low = run(bf16)(params, jnp.asarray(ids), jnp.asarray(mask))
  assert low.last_hidden_state.dtype == jnp.float32
  err = np.abs(np.asarray(low.last_hidden_state)
               - ref.last_hidden_state.numpy()).max()
  assert 1e-4 < err < 0.1, err


@pytest.fixture(scope='module')
def vision_model(tmp_path_factory):
  torch.manual_seed(7)
  config = transformers.CLIPVisionConfig(
      hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, image_size=28, patch_size=7, projection_dim=16,
      hidden_act='gelu')
  model = transformers.CLIPVisionModelWithProjection(config).eval()
  _randomize(model)
  folder = str(tmp_path_factory.mktemp('vision'))
  model.save_pretrained(folder)
  return model, folder


def test_vision_encoder_matches_transformers(vision_model):
  model, folder = vision_model
  module, params = clip_pt.load(folder)
  assert isinstance(module, clip.CLIPVisionModel)
  x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    ref = model(x, output_hidden_states=True)
  got = jax.jit(lambda p, x: module.apply({'params': p}, x))(
      params, jnp.asarray(x.numpy().transpose(0, 2, 3, 1)))
  assert 0.3 < np.abs(ref.image_embeds.numpy()).mean() < 3
  np.testing.assert_allclose(got.image_embeds, ref.image_embeds.numpy(),
                             rtol=0, atol=TOL)
  np.testing.assert_allclose(got.last_hidden_state,
                             ref.last_hidden_state.numpy(), rtol=0, atol=TOL)
  assert len(got.hidden_states) == len(ref.hidden_states)
  for g, r in zip(got.hidden_states, ref.hidden_states):
    np.testing.assert_allclose(g, r.numpy(), rtol=0, atol=TOL)
  with pytest.raises(ValueError, match='takes 28x28'):
    module.apply({'params': params}, jnp.zeros((1, 32, 32, 3)))


# Down by 1.4 x 3.6 (blurs of 3 and 5 taps), up (no blur to speak of),
# and the identity.
@pytest.mark.parametrize('hw', [(320, 800), (40, 30), (224, 224)])
def test_svd_preprocess_matches_diffusers(hw):
  img = torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(1))
  img = img * 2 - 1
  mean, std = clip_pt.OPENAI_CLIP_MEAN, clip_pt.OPENAI_CLIP_STD
  # StableVideoDiffusionPipeline._encode_image, then CLIPImageProcessor's
  # normalisation (do_resize, do_center_crop, do_rescale off).
  ref = (svd._resize_with_antialiasing(img, (224, 224)) + 1) / 2
  ref = (ref - torch.tensor(mean)[:, None, None]) / torch.tensor(
      std)[:, None, None]
  got = clip_preprocess.svd_image_preprocess(
      jnp.asarray(img.numpy().transpose(0, 2, 3, 1)), mean, std)
  np.testing.assert_allclose(got, ref.numpy().transpose(0, 2, 3, 1), rtol=0,
                             atol=TOL)


def test_image_normalization_reads_the_feature_extractor(tmp_path):
  (tmp_path / 'model_index.json').write_text('{"feature_extractor": []}')
  (tmp_path / 'feature_extractor').mkdir()
  (tmp_path / 'feature_extractor' / 'preprocessor_config.json').write_text(
      json.dumps({'image_mean': [0.5, 0.5, 0.5], 'image_std': [0.25] * 3}))
  assert clip_pt.image_normalization(str(tmp_path)) == ((0.5,) * 3,
                                                         (0.25,) * 3)


PROMPTS = [
    'a photo of a cat riding a horse on the moon',
    'An ASTRONAUT,   highly\tdetailed\n4K!!', "it's a dog's life; DON'T",
    'café crème brûlée 日本語 🐱 naïve e\u0301', '', '   ', 'hello!',
    'a <|endoftext|> b <|startoftext|>', '12345 3.14 x-y_z',
    ' '.join(['the quick brown fox jumps over the lazy dog'] * 10),
]


@pytest.mark.parametrize('pad_token', ['<|endoftext|>', '!'])
def test_tokenizer_matches_transformers(tmp_path, caplog, pad_token):
  folder = str(tmp_path / 'tokenizer')
  sd_fixtures.write_clip_tokenizer(folder, pad_token)
  (tmp_path / 'model_index.json').write_text('{"tokenizer": []}')
  ref = transformers.CLIPTokenizer.from_pretrained(folder)
  ours = clip_tokenizer.load(str(tmp_path))
  assert ours.pad_token_id == ref.pad_token_id
  assert ours.pad_token_id == (0 if pad_token == '!' else ours.eos_token_id)
  want = ref(PROMPTS, padding='max_length', max_length=77,
             truncation=True).input_ids
  with caplog.at_level(logging.WARNING):
    got = ours(PROMPTS)
  assert got.dtype == np.int32 and got.shape == (len(PROMPTS), 77)
  np.testing.assert_array_equal(got, np.array(want))
  # Only the long prompt was cut, and the warning names it and the limit.
  cut = [r for r in caplog.records if 'truncated' in r.getMessage()]
  assert len(cut) == 1 and 'the quick brown' in cut[0].getMessage()
  assert '77' in cut[0].getMessage()
  # A folder with tokenizer.json instead of vocab.json and merges.txt.
  ours._tokenizer.save(os.path.join(folder, 'tokenizer.json'))
  os.remove(os.path.join(folder, 'vocab.json'))
  os.remove(os.path.join(folder, 'merges.txt'))
  np.testing.assert_array_equal(clip_tokenizer.load(folder)(PROMPTS[:-1]),
                                np.array(want[:-1]))


def _meta_state_shapes(cls, config) -> dict[str, tuple[int, ...]]:
  with torch.device('meta'):
    model = cls(config)
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _full_size(config, cls_name):
  shapes = _meta_state_shapes(getattr(transformers, cls_name), config)
  folder_config = config.to_dict()
  folder_config['architectures'] = [cls_name]
  module = clip_pt.build(folder_config)
  abstract = clip_pt.abstract_params(module)
  entries = convert.plan(shapes, abstract, clip_pt.table(module))
  # Pre-5.0 checkpoints (every published one) prefix the plain models.
  prefix = {'CLIPTextModel': 'text_model.', 'CLIPVisionModel':
            'vision_model.'}.get(cls_name)
  if prefix:
    convert.plan({prefix + k: v for k, v in shapes.items()}, abstract,
                 clip_pt.table(module))
  return len(entries), len(shapes), convert.count(abstract)


def test_full_size_sd15_text_encoder_on_meta():
  """OpenAI CLIP ViT-L/14's text tower: 123,060,480 parameters."""
  config = transformers.CLIPTextConfig(
      hidden_size=768, intermediate_size=3072, num_attention_heads=12,
      num_hidden_layers=12, vocab_size=49408, max_position_embeddings=77,
      hidden_act='quick_gelu', eos_token_id=2, projection_dim=768)
  mapped, tensors, n = _full_size(config, 'CLIPTextModel')
  assert mapped == tensors and n == 123_060_480


def test_full_size_sd2_text_encoder_on_meta():
  """SD 2.x's OpenCLIP ViT-H/14 text tower (23 of its 24 layers)."""
  config = transformers.CLIPTextConfig(
      hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
      num_hidden_layers=23, vocab_size=49408, max_position_embeddings=77,
      hidden_act='gelu', projection_dim=512)
  mapped, tensors, n = _full_size(config, 'CLIPTextModel')
  assert mapped == tensors and n == 340_387_840


def test_full_size_svd_image_encoder_on_meta():
  """SVD's CLIP ViT-H/14 with projection: 632,076,800 parameters."""
  config = transformers.CLIPVisionConfig(
      hidden_size=1280, intermediate_size=5120, num_attention_heads=16,
      num_hidden_layers=32, image_size=224, patch_size=14,
      projection_dim=1024, hidden_act='gelu')
  mapped, tensors, n = _full_size(config, 'CLIPVisionModelWithProjection')
  assert mapped == tensors and n == 632_076_800


def test_bad_configs_are_refused():
  base = {'architectures': ['CLIPTextModel'], 'hidden_size': 32,
          'num_attention_heads': 4}
  with pytest.raises(ValueError, match="hidden_act='gelu_new'.*quick_gelu"):
    clip_pt.module_kwargs(dict(base, hidden_act='gelu_new'))
  with pytest.raises(ValueError, match="'CLIPModel'.*CLIPTextModel"):
    clip_pt.module_kwargs(dict(base, architectures=['CLIPModel']))
  with pytest.raises(ValueError, match='hidden_size=30'):
    clip_pt.module_kwargs(dict(base, hidden_size=30))
  with pytest.raises(ValueError, match="remat='full'.*dots_saveable"):
    clip_pt.build(base, remat='full')
  with pytest.raises(ValueError, match="dtype='float16'"):
    clip_pt.build(base, dtype='float16')


def test_bad_tokenizer_folders_are_refused(tmp_path):
  with pytest.raises(FileNotFoundError, match='vocab.json and merges.txt'):
    clip_tokenizer.load(str(tmp_path))
  with pytest.raises(ValueError,
                     match=re.escape("bos_token='<|startoftext|>'")):
    clip_tokenizer.CLIPTokenizer({'<|endoftext|>': 0}, [])
