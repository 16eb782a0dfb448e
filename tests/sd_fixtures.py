"""Tiny random Stable Diffusion folders in diffusers' layout, for tests.

Built with diffusers and transformers (PyTorch) from configs, saved with
`save_pretrained`, so vdm_jax reads them exactly as it reads a real
checkpoint; nothing is downloaded. The tokenizer is a CLIP-style BPE
vocabulary trained here on a few captions (the layout of
openai/clip-vit-large-patch14's vocab.json and merges.txt).
"""

import json
import os

import numpy as np

# An SD-1.5 scheduler_config.json (its PNDM settings, read by any class).
from vdm_jax.pretrained.stable_diffusion import SD15_SCHEDULER  # pylint: disable=g-import-not-at-top,wrong-import-position,unused-import

CORPUS = ['a photo of a cat riding a horse on the moon',
          'an astronaut, highly detailed, 4k, trending on artstation!',
          "it's a dog's life; don't worry", 'café crème brûlée',
          'a red square moving left']


def write_clip_tokenizer(folder: str, pad_token: str = '<|endoftext|>'
                         ) -> None:
  """vocab.json, merges.txt and the token configs of a tiny CLIP BPE."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  from tokenizers import models, normalizers, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  from vdm_jax.pretrained import clip_tokenizer  # pylint: disable=g-import-not-at-top
  os.makedirs(folder, exist_ok=True)
  alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
  tok = tokenizers.Tokenizer(models.BPE(continuing_subword_prefix='',
                                        end_of_word_suffix='</w>'))
  tok.normalizer = normalizers.Lowercase()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(clip_tokenizer.SPLIT_PATTERN),
                           behavior='removed', invert=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.train_from_iterator(CORPUS * 10, trainers.BpeTrainer(
      vocab_size=700, initial_alphabet=alphabet, end_of_word_suffix='</w>',
      show_progress=False))
  model = json.loads(tok.to_str())['model']
  vocab = {}
  for t in alphabet + [a + '</w>' for a in alphabet] + sorted(
      model['vocab'], key=model['vocab'].get) + ['<|startoftext|>',
                                                 '<|endoftext|>']:
    vocab.setdefault(t, len(vocab))
  merges = [m if isinstance(m, str) else ' '.join(m)
            for m in model['merges']]
  with open(os.path.join(folder, 'vocab.json'), 'w') as f:
    json.dump(vocab, f)
  with open(os.path.join(folder, 'merges.txt'), 'w') as f:
    f.write('#version: 0.2\n' + '\n'.join(merges) + '\n')
  added = lambda t: {'__type': 'AddedToken', 'content': t, 'lstrip': False,
                     'normalized': True, 'rstrip': False,
                     'single_word': False}
  # As SD's folders: tokenizer_config.json says '<|endoftext|>' for the pad
  # token, special_tokens_map.json (which wins) the real one.
  with open(os.path.join(folder, 'tokenizer_config.json'), 'w') as f:
    json.dump({'bos_token': added('<|startoftext|>'),
               'eos_token': added('<|endoftext|>'), 'model_max_length': 77,
               'pad_token': '<|endoftext|>', 'do_lower_case': True,
               'tokenizer_class': 'CLIPTokenizer',
               'unk_token': added('<|endoftext|>')}, f)
  with open(os.path.join(folder, 'special_tokens_map.json'), 'w') as f:
    json.dump({'bos_token': added('<|startoftext|>'),
               'eos_token': added('<|endoftext|>'), 'pad_token': pad_token,
               'unk_token': added('<|endoftext|>')}, f)


def tiny_sd_pipeline(folder: str, seed: int = 0, prediction_type='epsilon',
                     scheduler_class: str = 'DDIMScheduler'):
  """A tiny random StableDiffusionPipeline saved in `folder`; returns it.

  The UNet has a cross-attention and a plain level (latents 8x8 -> 4x4),
  the autoencoder a factor of 2 (16x16 images), the text encoder 2 layers;
  weights are scaled to give outputs of order 1.
  """
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  tok_dir = os.path.join(folder, '_tok')
  write_clip_tokenizer(tok_dir)
  tokenizer = transformers.CLIPTokenizer(
      os.path.join(tok_dir, 'vocab.json'), os.path.join(tok_dir, 'merges.txt'),
      pad_token='<|endoftext|>', model_max_length=77)
  text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
      vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
      num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77,
      hidden_act='quick_gelu', eos_token_id=tokenizer.eos_token_id,
      bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id))
  unet = diffusers.UNet2DConditionModel(
      sample_size=8, in_channels=4, out_channels=4,
      block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'),
      up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'),
      cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
  vae = diffusers.AutoencoderKL(
      block_out_channels=(16, 32), in_channels=3, out_channels=3,
      down_block_types=('DownEncoderBlock2D',) * 2,
      up_block_types=('UpDecoderBlock2D',) * 2, latent_channels=4,
      norm_num_groups=8, sample_size=16)
  with torch.no_grad():
    for model in (unet, vae, text):
      for name, p in model.named_parameters():
        if name.endswith('bias'):
          p.copy_(0.1 * torch.randn_like(p))
        elif p.ndim > 1 and 'embedding' not in name:
          p.copy_(torch.randn_like(p) / np.prod(p.shape[1:]) ** 0.5)
  scheduler = getattr(diffusers, scheduler_class).from_config(
      dict(SD15_SCHEDULER, prediction_type=prediction_type))
  pipe = diffusers.StableDiffusionPipeline(
      vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
      scheduler=scheduler, safety_checker=None, feature_extractor=None,
      requires_safety_checker=False)
  pipe.set_progress_bar_config(disable=True)
  pipe.save_pretrained(folder)
  return pipe
