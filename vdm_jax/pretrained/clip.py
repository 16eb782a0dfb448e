"""transformers' CLIP text and vision encoders from a local folder.

Stable Diffusion's `text_encoder/` (CLIPTextModel: OpenAI CLIP ViT-L/14 in
SD 1.x, OpenCLIP ViT-H/14's text tower in SD 2.x) and Stable Video
Diffusion's `image_encoder/` (CLIPVisionModelWithProjection, ViT-H/14) into
vdm_jax/models/clip.py. config.json (transformers' CLIPTextConfig /
CLIPVisionConfig keys) sets the module's fields (`module_kwargs`); the state
dict maps by convert.py's generic rule. Checkpoints written by transformers
before 5.0 (every published one) prefix CLIPTextModel's keys with
`text_model.` and CLIPVisionModel's with `vision_model.`; transformers 5
saves the plain models without the prefix (its `PrefixChange` in
transformers/conversion_mapping.py), which the renames below add back.
The tokenizer is clip_tokenizer.py; SVD's image preprocessing is
models/clip_preprocess.py's `svd_image_preprocess`, given the mean and std
of `image_normalization` below.
"""

import logging
import os
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

from vdm_jax.models import clip
from vdm_jax.pretrained import convert
from vdm_jax.pretrained import formats

TEXT_CLASSES = ('CLIPTextModel', 'CLIPTextModelWithProjection')
VISION_CLASSES = ('CLIPVisionModel', 'CLIPVisionModelWithProjection')
CLASS_NAMES = TEXT_CLASSES + VISION_CLASSES
# transformers' model_type, for configs without `architectures`.
_MODEL_TYPES = {'clip_text_model': 'CLIPTextModel',
                'clip_vision_model': 'CLIPVisionModel'}
# OpenAI CLIP's normalisation (transformers' OPENAI_CLIP_MEAN / _STD), the
# default of CLIPImageProcessor.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_BUFFERS = (r'(.*\.)?position_ids',)
TABLES = {
    'text': convert.RuleTable(
        'CLIPTextModel',
        renames=((r'^(?!text_model\.|text_projection\.)', 'text_model.'),),
        ignore=_BUFFERS),
    'vision': convert.RuleTable(
        'CLIPVisionModel',
        renames=((r'^(?!vision_model\.|visual_projection\.)',
                  'vision_model.'),),
        ignore=_BUFFERS),
}
TABLE = TABLES['text']

# config.json key -> (type, transformers' CLIPTextConfig default).
_TEXT = {'vocab_size': (int, 49408), 'hidden_size': (int, 512),
         'intermediate_size': (int, 2048), 'num_attention_heads': (int, 8),
         'num_hidden_layers': (int, 12), 'max_position_embeddings': (int, 77),
         'hidden_act': (str, 'quick_gelu'), 'layer_norm_eps': (float, 1e-5),
         'eos_token_id': (int, 49407)}
# ... and CLIPVisionConfig's.
_VISION = {'hidden_size': (int, 768), 'intermediate_size': (int, 3072),
           'num_attention_heads': (int, 12), 'num_hidden_layers': (int, 12),
           'image_size': (int, 224), 'patch_size': (int, 32),
           'hidden_act': (str, 'quick_gelu'), 'layer_norm_eps': (float, 1e-5)}
# Keys that do not change inference: dropout (off when frozen), init
# ranges, token ids the model does not use, bookkeeping.
_INERT = ('architectures', 'model_type', 'transformers_version', 'dtype',
          'torch_dtype', '_name_or_path', 'attention_dropout', 'dropout',
          'initializer_range', 'initializer_factor', 'bos_token_id',
          'pad_token_id', 'num_channels', 'projection_dim', 'output_attentions',
          'output_hidden_states', 'return_dict', 'use_return_dict',
          'tie_word_embeddings', 'is_decoder', 'chunk_size_feed_forward',
          'id2label', 'label2id', 'problem_type', 'layer_types')

Module = Union[clip.CLIPTextModel, clip.CLIPVisionModel]


def class_name(config: dict[str, Any]) -> str:
  """The transformers class a config.json names, checked.

  Raises:
    ValueError: a class that is not one of CLASS_NAMES.
  """
  name = formats.class_name(config)
  if name is None:
    name = _MODEL_TYPES.get(config.get('model_type'))
  if name not in CLASS_NAMES:
    raise ValueError(f'CLIP config: class {name!r} is not supported; '
                     f'supported: {", ".join(CLASS_NAMES)}.')
  return name


def module_kwargs(config: dict[str, Any]) -> dict[str, Any]:
  """config.json of a transformers CLIP encoder -> the Flax module's fields.

  Args:
    config: the parsed config.json; keys absent take transformers'
      CLIPTextConfig / CLIPVisionConfig defaults (the models' own).

  Returns:
    Keyword arguments of clip.CLIPTextModel or clip.CLIPVisionModel
    (`module_class(config)`), without dtype, attention and remat.

  Raises:
    ValueError: an unsupported class, activation or shape, named with what
      is supported.
  """
  name = class_name(config)
  text = name in TEXT_CLASSES
  fields = _TEXT if text else _VISION
  kw = {k: cast(default if config.get(k) is None else config[k])
        for k, (cast, default) in fields.items()}
  if name.endswith('WithProjection'):
    kw['projection_dim'] = int(config.get('projection_dim', 512))
  else:
    kw['projection_dim'] = None
  if kw['hidden_act'] not in clip.ACTIVATIONS:
    raise ValueError(f'CLIP config: hidden_act={kw["hidden_act"]!r} is not '
                     f'supported; supported: {", ".join(clip.ACTIVATIONS)}.')
  if kw['hidden_size'] % kw['num_attention_heads']:
    raise ValueError(f'CLIP config: hidden_size={kw["hidden_size"]} is not '
                     f'a multiple of num_attention_heads='
                     f'{kw["num_attention_heads"]}.')
  if not text and kw['image_size'] % kw['patch_size']:
    raise ValueError(f'CLIP config: image_size={kw["image_size"]} is not a '
                     f'multiple of patch_size={kw["patch_size"]}.')
  if not text and int(config.get('num_channels', 3)) != 3:
    raise ValueError(f'CLIP config: num_channels={config["num_channels"]} '
                     'is not supported; supported: 3 (RGB).')
  unknown = sorted(set(config) - set(fields) - set(_INERT))
  if unknown:
    logging.warning('%s config: ignoring unknown options %s.', name, unknown)
  return kw


def module_class(config: dict[str, Any]) -> type:
  """clip.CLIPTextModel or clip.CLIPVisionModel, by the config's class."""
  if class_name(config) in TEXT_CLASSES:
    return clip.CLIPTextModel
  return clip.CLIPVisionModel


def build(config: dict[str, Any], dtype: str = 'float32',
          attention: str = 'auto', remat: str = 'none') -> Module:
  """The Flax module of a config.json (no parameters), options checked."""
  kw = module_kwargs(config)
  clip.check_fields(kw['hidden_act'], dtype, remat, attention)
  return module_class(config)(**kw, dtype=dtype, attention=attention,
                              remat=remat)


def table(module: Module) -> convert.RuleTable:
  """The rule table of a module's family."""
  return TABLES['text' if isinstance(module, clip.CLIPTextModel)
                else 'vision']


def abstract_params(module: Module) -> Any:
  """The module's parameter tree as ShapeDtypeStructs (nothing computed)."""
  if isinstance(module, clip.CLIPTextModel):
    x = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  else:
    x = jax.ShapeDtypeStruct((1, module.image_size, module.image_size, 3),
                             jnp.float32)
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), x)['params']


def load(folder: str, dtype: str = 'float32', attention: str = 'auto',
         shardings: Any = None, variant: Optional[str] = None,
         component: str = 'text_encoder', remat: str = 'none'
         ) -> tuple[Module, Any]:
  """A CLIP encoder and its float32 parameters from a local folder.

  Args:
    folder: a transformers model folder (config.json + model.safetensors,
      possibly sharded) or a diffusers pipeline folder (its `component`).
    dtype: compute dtype, 'float32' or 'bfloat16'.
    attention: attention implementation (models/attention.py).
    shardings: None, or a tree of shardings matching the parameters.
    variant: the weight file variant ('fp16', ...), or None.
    component: the pipeline's subfolder: 'text_encoder' (SD),
      'text_encoder_2', 'image_encoder' (SVD).
    remat: 'none', 'block' or 'dots_saveable' (models/clip.py).

  Returns:
    (module, params): `module.apply({'params': params}, ids)` (text: int
    [B, L] ids of clip_tokenizer) or `(..., pixel_values)` (vision:
    [B, 224, 224, 3] from clip_preprocess.svd_image_preprocess).
  """
  folder = formats.component_folder(folder, component)
  module = build(formats.model_config(folder), dtype, attention, remat)
  params = convert.convert(formats.load_tensors(folder, variant),
                           abstract_params(module), table(module), shardings)
  return module, params


def image_normalization(folder: str, component: str = 'feature_extractor'
                        ) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(image_mean, image_std) of a pipeline's CLIP feature extractor.

  Args:
    folder: a pipeline folder (its `component`) or the feature extractor
      folder (with preprocessor_config.json).
    component: the pipeline's subfolder ('feature_extractor' in SVD).

  Returns:
    Per-channel means and standard deviations (OpenAI CLIP's when the
    folder has no preprocessor_config.json).
  """
  path = os.path.join(formats.component_folder(folder, component),
                      'preprocessor_config.json')
  if not os.path.isfile(path):
    logging.warning('%s not found; using OpenAI CLIP mean and std.', path)
    return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
  config = formats.read_json(path)
  mean = tuple(float(v) for v in config.get('image_mean', OPENAI_CLIP_MEAN))
  std = tuple(float(v) for v in config.get('image_std', OPENAI_CLIP_STD))
  return mean, std
