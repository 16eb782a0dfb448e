"""Caption embeddings from a Hugging Face text encoder, computed once.

Large text-to-video trainers run their frozen text encoder (T5, CLIP's text
tower, BERT) once over the captions and store the embeddings beside the
data, so the accelerators never wait on it. This is that step:

  python -m vdm_jax.main --config=configs/t2v_quickstart.py \
      --mode=embed_captions --config.text.hf_model=google/t5-v1_1-base \
      --config.text.path=/data/captions_t5.npz

then train and sample with `--config.text.encoder=files
--config.text.path=/data/captions_t5.npz`. `text.hf_model` is a model name
or a local folder (`from_pretrained`); the captions are those of
config.data's source (its `captions` list or method; the synthetic source:
its first data.num_examples clips), plus the lines of sample.prompts_file,
so that sampling prompts have embeddings too. Token embeddings are the encoder's last hidden state
(float16 in the file), pooled the model's pooler output where it has one
(CLIP, BERT), the masked mean otherwise (T5).

Needs torch and transformers (requirements-hf.txt); nothing else in
vdm_jax imports them. Tests build a tiny, randomly initialised model from
its config (no download).
"""

from typing import Any, Optional, Sequence

from absl import logging
import numpy as np

from vdm_jax.text import encoders


class HuggingFace:
  """A Hugging Face text encoder (PyTorch), frozen, on the host."""

  def __init__(self, model: Any, tokenizer: Any, max_length: int,
               name: str = 'hf'):
    """Wraps a loaded model and tokenizer.

    Args:
      model: a transformers text model (returns last_hidden_state), e.g.
        CLIPTextModel, T5EncoderModel, BertModel.
      tokenizer: its tokenizer.
      max_length: L, tokens kept per text.
      name: what made the embeddings (stored in the file).
    """
    self.model = model.eval()
    self.tokenizer = tokenizer
    self.max_length = max_length
    self.name = name
    self.dim = int(model.config.hidden_size if hasattr(
        model.config, 'hidden_size') else model.config.d_model)

  @classmethod
  def from_pretrained(cls, name: str, max_length: int) -> 'HuggingFace':
    import transformers  # pylint: disable=g-import-not-at-top
    tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    config = transformers.AutoConfig.from_pretrained(name)
    if config.model_type == 't5':
      model = transformers.T5EncoderModel.from_pretrained(name)
    elif config.model_type == 'clip':
      model = transformers.CLIPTextModel.from_pretrained(name)
    else:
      model = transformers.AutoModel.from_pretrained(name)
    return cls(model, tokenizer, max_length, name)

  def encode(self, texts: Sequence[str], batch_size: int = 64
             ) -> encoders.TextEmbeddings:
    import torch  # pylint: disable=g-import-not-at-top
    tokens, masks, pooled = [], [], []
    for start in range(0, len(texts), batch_size):
      chunk = list(texts[start:start + batch_size])
      full = self.tokenizer(chunk, padding=False, truncation=False)
      for text, ids in zip(chunk, full['input_ids']):
        if len(ids) > self.max_length:
          logging.warning('Text %r has %d tokens, more than max_length=%d:'
                          ' it is cut.', text, len(ids), self.max_length)
      batch = self.tokenizer(chunk, padding='max_length', truncation=True,
                             max_length=self.max_length, return_tensors='pt')
      with torch.no_grad():
        out = self.model(input_ids=batch['input_ids'],
                         attention_mask=batch['attention_mask'])
      hidden = out.last_hidden_state.float().numpy()
      mask = batch['attention_mask'].numpy().astype(bool)
      empty = np.asarray([not t for t in chunk])
      mask[empty] = False  # The empty text is the null text.
      hidden = hidden * mask[..., None]
      if getattr(out, 'pooler_output', None) is not None:
        pool = out.pooler_output.float().numpy()
        pool[empty] = 0.0
      else:
        pool = encoders.mean_pool(hidden, mask)
      tokens.append(hidden.astype(np.float32))
      masks.append(mask)
      pooled.append(pool.astype(np.float32))
    return encoders.TextEmbeddings(np.concatenate(tokens),
                                   np.concatenate(masks),
                                   np.concatenate(pooled))


def dataset_captions(source: Any, num_examples: int) -> list[str]:
  """The distinct captions of a source (in first-seen order)."""
  caps = getattr(source, 'captions', None)
  if callable(caps):
    found = caps(np.arange(min(num_examples, len(source))))
  elif caps is not None:
    found = list(caps)
  else:
    raise ValueError(f'The source {type(source).__name__} has no captions'
                     ' (video folders: data.captions=True).')
  return list(dict.fromkeys(str(c) for c in found if c))


def prepare(encoder: Any, texts: Sequence[str], out: str,
            model_dim: Optional[int] = None) -> None:
  """Encodes the distinct texts and writes the embeddings file.

  Raises:
    ValueError: the encoder's dimension differs from `model_dim` (the
      dimension an existing model was trained on).
  """
  if model_dim is not None and encoder.dim != model_dim:
    raise ValueError(
        f'The encoder {encoder.name} makes {encoder.dim}-d embeddings but the'
        f' model was trained on {model_dim}-d ones: prepare with the'
        ' encoder the model was trained with, or train a new model.')
  texts = list(dict.fromkeys(t for t in texts if t))
  logging.info('Encoding %d captions with %s.', len(texts), encoder.name)
  encoders.save_embeddings(out, texts, encoder.encode(texts), encoder.name)
  logging.info('Wrote %s.', out)


def embed_captions(config: Any, workdir: Optional[str] = None) -> str:
  """--mode=embed_captions: writes config.text.path from text.hf_model.

  The captions are config.data's (the synthetic source: its first
  data.num_examples clips) and the lines of sample.prompts_file. With a
  workdir of a trained model, the encoder's dimension must be the one the
  model was trained on (checked before encoding anything).

  Returns:
    The path written.
  """
  # Imported here: only this command reads a dataset.
  from vdm_jax.data import sources  # pylint: disable=g-import-not-at-top
  t = config.text
  if not t.hf_model or not t.path:
    raise ValueError(
        '--mode=embed_captions needs config.text.hf_model (a Hugging Face'
        ' model name or folder) and config.text.path (the .npz to write).')
  source = sources.get_source(config.data, seed=config.seed)
  texts = dataset_captions(source, config.data.num_examples)
  if config.sample.prompts_file:
    texts += encoders.read_prompts(config.sample.prompts_file)
  encoder = HuggingFace.from_pretrained(t.hf_model, int(t.max_length))
  if workdir:
    from vdm_jax import checkpoint  # pylint: disable=g-import-not-at-top
    checkpoint.check_text_dim(workdir, encoder.dim,
                              f'text.hf_model={t.hf_model!r}')
  prepare(encoder, texts, t.path)
  return t.path
