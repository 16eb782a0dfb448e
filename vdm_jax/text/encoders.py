"""Text encoders: texts -> token embeddings + mask, and a pooled vector.

Every encoder has `name`, `dim` (D), `max_length` (L) and
`encode(texts) -> TextEmbeddings`; the model only ever sees the embeddings,
so a model trained on one encoder's embeddings needs that encoder (or its
precomputed file) to sample. Encoders run on the host, outside the jitted
train step: the text encoder is frozen, as in VDM (Ho et al. 2022, 4.3:
BERT-large embeddings) and Imagen Video (Ho et al. 2022b: frozen T5-XXL).

  - 'wordllama' (the offline default): the pretrained static token
    embeddings that the `wordllama` wheel ships (Llama-2 vocabulary, 256-d,
    `wordllama/weights/l2_supercat_256.safetensors`) with its tokenizer;
    a lookup, so encoding costs nothing next to the train step. Pooled:
    the mean of the token embeddings (wordllama's own pooling).
  - 'files': embeddings precomputed by `prepare` (any encoder, e.g. a
    Hugging Face T5 or CLIP text model, text/hf.py), read from the .npz
    at `config.text.path` and looked up by caption.

An empty text has no tokens (mask all False): the model reads it as the
null text of classifier-free guidance. Texts longer than L tokens are cut
to L with a warning naming the text.
"""

import dataclasses
import functools
import os
from typing import Any, Optional, Protocol, Sequence

from absl import logging
import ml_collections
import numpy as np

from vdm_jax import fileio

ENCODERS = ('none', 'wordllama', 'files')
WORDLLAMA_WEIGHTS = 'weights/l2_supercat_256.safetensors'
WORDLLAMA_TOKENIZER = 'tokenizers/l2_supercat_tokenizer_config.json'
# Keys of an embeddings file written by `save_embeddings`.
FILE_KEYS = ('texts', 'tokens', 'mask', 'pooled')


@dataclasses.dataclass(frozen=True)
class TextEmbeddings:
  """What an encoder gives for B texts.

  Attributes:
    tokens: float32 [B, L, D] token embeddings (zeros where masked).
    mask: bool [B, L], True on the tokens of each text.
    pooled: float32 [B, D] one vector per text (zeros for an empty text).
  """

  tokens: np.ndarray
  mask: np.ndarray
  pooled: np.ndarray

  def __len__(self) -> int:
    return self.tokens.shape[0]

  def take(self, indices: Any) -> 'TextEmbeddings':
    return TextEmbeddings(self.tokens[indices], self.mask[indices],
                          self.pooled[indices])


class TextEncoder(Protocol):
  """texts -> TextEmbeddings, frozen, on the host."""

  name: str
  dim: int
  max_length: int

  def encode(self, texts: Sequence[str]) -> TextEmbeddings:
    ...


def _pad(rows: Sequence[np.ndarray], max_length: int, dim: int,
         texts: Sequence[str], name: str) -> tuple[np.ndarray, np.ndarray]:
  """[n_i, D] token rows -> ([B, L, D] float32, [B, L] bool), cut to L."""
  tokens = np.zeros((len(rows), max_length, dim), np.float32)
  mask = np.zeros((len(rows), max_length), bool)
  for i, row in enumerate(rows):
    if row.shape[0] > max_length:
      logging.warning(
          'Text %r has %d %s tokens, more than text.max_length=%d: it is'
          ' cut to the first %d.', texts[i], row.shape[0], name, max_length,
          max_length)
      row = row[:max_length]
    tokens[i, :row.shape[0]] = row
    mask[i, :row.shape[0]] = True
  return tokens, mask


def mean_pool(tokens: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Masked mean over tokens: [B, L, D], [B, L] -> [B, D] (0 if empty)."""
  count = mask.sum(axis=1, keepdims=True)
  total = (tokens * mask[..., None]).sum(axis=1)
  return (total / np.maximum(count, 1)).astype(np.float32)


@functools.lru_cache(maxsize=2)
def _wordllama_files() -> tuple[np.ndarray, Any]:
  """(float16 [32000, 256] table, tokenizers.Tokenizer), loaded once."""
  # Imported here: only text models need these packages loaded.
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  import tokenizers  # pylint: disable=g-import-not-at-top
  import wordllama  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(wordllama.__file__)
  table = safetensors.numpy.load_file(
      os.path.join(root, WORDLLAMA_WEIGHTS))['embedding.weight']
  tokenizer = tokenizers.Tokenizer.from_file(
      os.path.join(root, WORDLLAMA_TOKENIZER))
  return table, tokenizer


class WordLlama:
  """wordllama's static Llama-2 token embeddings (256-d), offline."""

  name = 'wordllama'

  def __init__(self, max_length: int):
    if max_length < 1:
      raise ValueError(f'text.max_length must be >= 1, got {max_length}.')
    self.max_length = max_length
    self._table, self._tokenizer = _wordllama_files()
    self.dim = int(self._table.shape[1])

  def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
    return [self._tokenizer.encode(t, add_special_tokens=False).ids
            for t in texts]

  def encode(self, texts: Sequence[str]) -> TextEmbeddings:
    rows = [self._table[ids].astype(np.float32) if ids
            else np.zeros((0, self.dim), np.float32)
            for ids in self.token_ids(texts)]
    tokens, mask = _pad(rows, self.max_length, self.dim, texts, self.name)
    return TextEmbeddings(tokens, mask, mean_pool(tokens, mask))


class Precomputed:
  """Embeddings from a file written by `save_embeddings`, by caption."""

  name = 'files'

  def __init__(self, path: str, max_length: int):
    if not path:
      raise ValueError(
          "text.encoder='files' needs text.path: the .npz of caption"
          ' embeddings written by --mode=embed_captions (or'
          ' text.encoders.save_embeddings).')
    if not os.path.exists(path):
      raise ValueError(f'text.path={path!r}: no such embeddings file.')
    with np.load(path, allow_pickle=False) as f:
      missing = [k for k in FILE_KEYS if k not in f.files]
      if missing:
        raise ValueError(
            f'{path} is not an embeddings file: keys {missing} missing'
            f' (it has {f.files}); write it with text.save_embeddings.')
      data = {k: f[k] for k in FILE_KEYS}
      self.source = str(f['encoder']) if 'encoder' in f.files else 'unknown'
    self.path = path
    self.dim = int(data['tokens'].shape[-1])
    self.max_length = max_length
    if data['tokens'].shape[1] < max_length:
      logging.info('%s has %d tokens per text; padded to text.max_length=%d.',
                   path, data['tokens'].shape[1], max_length)
    self._index = {str(t): i for i, t in enumerate(data['texts'])}
    self._data = data

  def encode(self, texts: Sequence[str]) -> TextEmbeddings:
    missing = [t for t in texts if t not in self._index and t != '']
    if missing:
      raise KeyError(
          f'{len(missing)} text(s) have no embedding in {self.path}, e.g.'
          f' {missing[:3]}; run --mode=embed_captions again over these'
          ' captions (sample.prompts_file adds prompts).')
    rows = []
    for t in texts:
      if t == '':
        rows.append(np.zeros((0, self.dim), np.float32))
        continue
      i = self._index[t]
      rows.append(self._data['tokens'][i][self._data['mask'][i]].astype(
          np.float32))
    tokens, mask = _pad(rows, self.max_length, self.dim, texts, self.name)
    pooled = np.stack([
        np.zeros(self.dim, np.float32) if t == '' else
        self._data['pooled'][self._index[t]].astype(np.float32)
        for t in texts]) if texts else np.zeros((0, self.dim), np.float32)
    return TextEmbeddings(tokens, mask, pooled)


def read_prompts(path: str) -> list[str]:
  """The prompts of a prompts file: one per line, blank lines skipped."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'sample.prompts_file={path}: no such file.')
  with open(path, encoding='utf-8') as f:
    prompts = [line.strip() for line in f if line.strip()]
  if not prompts:
    raise ValueError(f'sample.prompts_file={path} holds no prompt.')
  return prompts


def save_embeddings(path: str, texts: Sequence[str], emb: TextEmbeddings,
                    encoder: str) -> None:
  """Writes an embeddings file (atomically): tokens stored as float16."""
  texts = [str(t) for t in texts]
  if len(set(texts)) != len(texts):
    raise ValueError('save_embeddings takes each text once.')
  with fileio.atomic_path(path) as tmp:
    with open(tmp, 'wb') as f:
      np.savez(f, texts=np.asarray(texts, dtype=str),
               tokens=emb.tokens.astype(np.float16), mask=emb.mask,
               pooled=emb.pooled.astype(np.float32),
               encoder=np.asarray(encoder))


def from_config(text_config: ml_collections.ConfigDict
                ) -> Optional[TextEncoder]:
  """The encoder of config.text, or None for text.encoder='none'."""
  name = text_config.encoder
  if name not in ENCODERS:
    raise ValueError(f'Unknown text.encoder {name!r}; choose one of'
                     f' {ENCODERS}.')
  if name == 'none':
    return None
  if name == 'wordllama':
    return WordLlama(int(text_config.max_length))
  return Precomputed(text_config.path, int(text_config.max_length))
