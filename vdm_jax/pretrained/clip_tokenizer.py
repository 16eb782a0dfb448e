"""CLIP's BPE tokenizer from a folder's own files, with `tokenizers` only.

Builds the same `tokenizers.Tokenizer` as transformers' CLIPTokenizer
(transformers/models/clip/tokenization_clip.py, transformers 5): byte-level
BPE with the end-of-word suffix `</w>`; NFC, runs of whitespace to one space
and lowercasing; CLIP's split pattern (the special tokens, contractions,
letter runs, single digits, runs of other symbols); `<|startoftext|>` ...
`<|endoftext|>` around every text. Stable Diffusion pipelines then pad to
`model_max_length` (77) with the folder's pad token (SD 1.x: `<|endoftext|>`,
SD 2.x: `!`, id 0) and truncate longer prompts, which is what `__call__`
does.

Files read (a pipeline folder's `tokenizer/`, or that folder itself):
`vocab.json` and `merges.txt` (or, without them, the model of
`tokenizer.json`), `tokenizer_config.json` (model_max_length, special
tokens) and `special_tokens_map.json` (special tokens; it wins over
tokenizer_config.json as in transformers). No torch, no transformers.
"""

import logging
import os
from typing import Any, Optional, Sequence, Union

import numpy as np
import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import processors

from vdm_jax.pretrained import formats

# transformers' CLIPTokenizer defaults.
DEFAULT_SPECIAL_TOKENS = {
    'bos_token': '<|startoftext|>',
    'eos_token': '<|endoftext|>',
    'unk_token': '<|endoftext|>',
    'pad_token': '<|endoftext|>',
}
DEFAULT_MAX_LENGTH = 77
# transformers' tokenization_clip.py split pattern.
SPLIT_PATTERN = (r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll"""
                 r"""|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""")


def _content(token: Union[str, dict[str, Any], None]) -> Optional[str]:
  """A special token as a string (configs write AddedToken dicts too)."""
  if isinstance(token, dict):
    return token.get('content')
  return token


def _read_merges(path: str) -> list[tuple[str, str]]:
  merges = []
  with open(path, encoding='utf-8') as f:
    for i, line in enumerate(f):
      line = line.rstrip('\n')
      if (i == 0 and line.startswith('#version')) or not line.strip():
        continue
      pair = line.split(' ')
      if len(pair) != 2:
        raise ValueError(f'{path} line {i + 1}: a merge is two tokens '
                         f'separated by one space, got {line!r}.')
      merges.append((pair[0], pair[1]))
  return merges


def _read_vocab_and_merges(folder: str
                           ) -> tuple[dict[str, int], list[tuple[str, str]]]:
  vocab_path = os.path.join(folder, 'vocab.json')
  merges_path = os.path.join(folder, 'merges.txt')
  if os.path.isfile(vocab_path) and os.path.isfile(merges_path):
    return formats.read_json(vocab_path), _read_merges(merges_path)
  json_path = os.path.join(folder, 'tokenizer.json')
  if os.path.isfile(json_path):
    model = formats.read_json(json_path).get('model', {})
    if model.get('type') == 'BPE' and isinstance(model.get('vocab'), dict):
      merges = [tuple(m.split(' ')) if isinstance(m, str) else tuple(m)
                for m in model.get('merges', [])]
      return model['vocab'], merges
  raise FileNotFoundError(
      f'{folder} is not a CLIP tokenizer folder: it needs vocab.json and '
      'merges.txt (or a BPE tokenizer.json).')


class CLIPTokenizer:
  """Text -> int32 token ids [B, max_length], as Stable Diffusion feeds CLIP.

  Attributes:
    model_max_length: tokens per text, start and end tokens included (77).
    bos_token_id, eos_token_id, pad_token_id: the special tokens' ids.
  """

  def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]],
               bos_token: str = DEFAULT_SPECIAL_TOKENS['bos_token'],
               eos_token: str = DEFAULT_SPECIAL_TOKENS['eos_token'],
               unk_token: str = DEFAULT_SPECIAL_TOKENS['unk_token'],
               pad_token: str = DEFAULT_SPECIAL_TOKENS['pad_token'],
               model_max_length: int = DEFAULT_MAX_LENGTH):
    """Builds the tokenizer.

    Args:
      vocab: {token: id}, as vocab.json.
      merges: BPE merges in priority order, as merges.txt.
      bos_token, eos_token, unk_token, pad_token: special tokens; each must
        be in the vocabulary.
      model_max_length: tokens per text (start and end included).
    """
    special = dict(bos_token=bos_token, eos_token=eos_token,
                   unk_token=unk_token, pad_token=pad_token)
    absent = sorted(f'{k}={v!r}' for k, v in special.items() if v not in vocab)
    if absent:
      raise ValueError(f'CLIP tokenizer: special tokens not in the vocabulary: '
                       f'{", ".join(absent)}.')
    if model_max_length < 2:
      raise ValueError(f'CLIP tokenizer: model_max_length={model_max_length} '
                       'leaves no room for the start and end tokens.')
    tok = tokenizers.Tokenizer(models.BPE(
        vocab=dict(vocab), merges=list(merges), dropout=None,
        continuing_subword_prefix='', end_of_word_suffix='</w>',
        fuse_unk=False, unk_token=unk_token))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFC(),
        normalizers.Replace(tokenizers.Regex(r'\s+'), ' '),
        normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(SPLIT_PATTERN),
                             behavior='removed', invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    # As transformers' tokenizer backend: the special tokens are matched in
    # the raw text before the BPE (in the order bos, eos, unk, pad).
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True)
                            for t in dict.fromkeys(special.values())])
    self.bos_token_id = vocab[bos_token]
    self.eos_token_id = vocab[eos_token]
    self.pad_token_id = vocab[pad_token]
    tok.post_processor = processors.RobertaProcessing(
        (eos_token, self.eos_token_id), (bos_token, self.bos_token_id),
        trim_offsets=False, add_prefix_space=False)
    self.model_max_length = int(model_max_length)
    self._pad_token = pad_token
    self._tokenizer = tok

  @classmethod
  def from_folder(cls, path: str, component: str = 'tokenizer'
                  ) -> 'CLIPTokenizer':
    """The tokenizer of a pipeline folder (its `component`) or a tokenizer
    folder."""
    folder = formats.component_folder(path, component)
    vocab, merges = _read_vocab_and_merges(folder)
    config = {}
    for name in ('tokenizer_config.json', 'special_tokens_map.json'):
      if os.path.isfile(os.path.join(folder, name)):
        config.update(formats.read_json(os.path.join(folder, name)))
    kwargs = {k: _content(config.get(k)) or v
              for k, v in DEFAULT_SPECIAL_TOKENS.items()}
    max_length = config.get('model_max_length', DEFAULT_MAX_LENGTH)
    # transformers writes a huge sentinel when a folder sets no limit.
    if not isinstance(max_length, int) or max_length > 10**6:
      max_length = DEFAULT_MAX_LENGTH
    return cls(vocab, merges, model_max_length=max_length, **kwargs)

  def tokenize(self, text: str) -> list[int]:
    """The ids of one text, start and end tokens included, no limit."""
    return self._tokenizer.encode(text).ids

  def __call__(self, prompts: Union[str, Sequence[str]],
               max_length: Optional[int] = None) -> np.ndarray:
    """Token ids of prompts, padded and truncated as SD pipelines do.

    transformers' `tokenizer(prompts, padding='max_length',
    max_length=model_max_length, truncation=True)`: a prompt longer than
    the limit keeps its first max_length - 2 tokens between the start and
    end tokens (with a warning naming it); shorter ones are padded with the
    pad token.

    Args:
      prompts: one text or a sequence of B texts.
      max_length: tokens per text; None is model_max_length.

    Returns:
      int32 [B, max_length] ids.
    """
    if isinstance(prompts, str):
      prompts = [prompts]
    length = self.model_max_length if max_length is None else max_length
    if length < 2:
      raise ValueError(f'max_length={length} leaves no room for the start '
                       'and end tokens.')
    out = np.full((len(prompts), length), self.pad_token_id, np.int32)
    for i, text in enumerate(self._tokenizer.encode_batch(list(prompts))):
      ids = text.ids
      if len(ids) > length:
        dropped = self._tokenizer.decode(ids[length - 1:-1]).replace(
            '</w>', ' ').strip()
        logging.warning(
            'Prompt %r is %d tokens long; CLIP takes %d (start and end '
            'included), so it is truncated and this part is dropped: %r.',
            prompts[i], len(ids), length, dropped)
        ids = ids[:length - 1] + [self.eos_token_id]
      out[i, :len(ids)] = ids
    return out


def load(path: str, component: str = 'tokenizer') -> CLIPTokenizer:
  """CLIPTokenizer.from_folder: a pipeline folder or a tokenizer folder."""
  return CLIPTokenizer.from_folder(path, component)
