"""diffusers' KL autoencoders from a local folder: AutoencoderKL (SD's VAE)
and AutoencoderKLTemporalDecoder (SVD's VAE) into models/autoencoder.py.

config.json sets the module's fields (`module_kwargs`); the state dict maps
by the generic rule of convert.py plus the renames of diffusers'
`ModelMixin._convert_deprecated_attention_blocks` (diffusers
models/modeling_utils.py): checkpoints saved before diffusers 0.14 name the
VAE's mid-block attention `query`, `key`, `value`, `proj_attn` (and some
hold them as 1x1 convolutions, [C, C, 1, 1], which convert.py squeezes).
"""

import logging
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp

from vdm_jax.models import autoencoder as ae
from vdm_jax.pretrained import convert
from vdm_jax.pretrained import formats

CLASS_NAMES = ('AutoencoderKL', 'AutoencoderKLTemporalDecoder')
# The only block types of these classes' encoder and decoder.
DOWN_BLOCK_TYPES = ('DownEncoderBlock2D',)
UP_BLOCK_TYPES = ('UpDecoderBlock2D',)
ACT_FNS = ('silu', 'swish')
# config.json entries that do not change the network (tiling size, fp16
# advice, bookkeeping).
_INERT = ('_class_name', '_diffusers_version', '_name_or_path',
          'sample_size', 'force_upcast')

# Pre-0.14 attention names -> the current ones.
LEGACY_RENAMES = (
    (r'(attentions\.\d+)\.query\.', r'\1.to_q.'),
    (r'(attentions\.\d+)\.key\.', r'\1.to_k.'),
    (r'(attentions\.\d+)\.value\.', r'\1.to_v.'),
    (r'(attentions\.\d+)\.proj_attn\.', r'\1.to_out.0.'),
)
TABLES = {
    'AutoencoderKL': convert.RuleTable('AutoencoderKL', LEGACY_RENAMES),
    'AutoencoderKLTemporalDecoder': convert.RuleTable(
        'AutoencoderKLTemporalDecoder', LEGACY_RENAMES),
}
TABLE = TABLES['AutoencoderKL']

Module = Union[ae.AutoencoderKL, ae.AutoencoderKLTemporalDecoder]


def _unsupported(name: str, value: Any, supported: Any) -> ValueError:
  return ValueError(f'autoencoder config: {name}={value!r} is not supported '
                    f'(supported: {supported}).')


def _check_blocks(config: dict[str, Any], key: str, allowed: tuple[str, ...],
                  levels: int) -> None:
  types = list(config.get(key, [allowed[0]] * levels))
  bad = sorted({t for t in types if t not in allowed})
  if bad:
    raise _unsupported(key, bad, list(allowed))
  if len(types) != levels:
    raise ValueError(f'autoencoder config: {key} has {len(types)} entries '
                     f'but block_out_channels has {levels}.')


def module_kwargs(config: dict[str, Any]) -> dict[str, Any]:
  """config.json of a diffusers autoencoder -> the Flax module's fields.

  Args:
    config: the parsed config.json (its `_class_name` picks the class;
      AutoencoderKL when absent). Defaults are diffusers'.

  Returns:
    Keyword arguments of ae.AutoencoderKL or ae.AutoencoderKLTemporalDecoder
    (`module_class(config)` says which), without dtype and attention.

  Raises:
    ValueError: an unsupported class, block type, activation, group count or
      option, named with what is supported.
  """
  cls = config.get('_class_name', 'AutoencoderKL')
  if cls not in CLASS_NAMES:
    raise _unsupported('_class_name', cls, list(CLASS_NAMES))
  chans = tuple(int(c) for c in config.get('block_out_channels', (64,)))
  kw = dict(
      block_out_channels=chans,
      layers_per_block=int(config.get('layers_per_block', 1)),
      latent_channels=int(config.get('latent_channels', 4)),
      in_channels=int(config.get('in_channels', 3)),
      out_channels=int(config.get('out_channels', 3)),
      scaling_factor=float(config.get('scaling_factor', 0.18215)),
  )
  _check_blocks(config, 'down_block_types', DOWN_BLOCK_TYPES, len(chans))
  known = set(_INERT) | set(kw) | {'down_block_types'}
  groups = 32
  if cls == 'AutoencoderKL':
    _check_blocks(config, 'up_block_types', UP_BLOCK_TYPES, len(chans))
    act = config.get('act_fn', 'silu')
    if act not in ACT_FNS:
      raise _unsupported('act_fn', act, list(ACT_FNS))
    groups = int(config.get('norm_num_groups', 32))
    shift = config.get('shift_factor')
    kw.update(
        norm_num_groups=groups,
        use_quant_conv=bool(config.get('use_quant_conv', True)),
        use_post_quant_conv=bool(config.get('use_post_quant_conv', True)),
        mid_block_add_attention=bool(
            config.get('mid_block_add_attention', True)),
        shift_factor=None if shift is None else float(shift),
    )
    for name in ('latents_mean', 'latents_std'):
      value = config.get(name)
      kw[name] = None if value is None else tuple(float(v) for v in value)
    known |= set(kw) | {'up_block_types', 'act_fn'}
  bad = [c for c in chans if c % groups]
  if bad:
    raise ValueError(f'autoencoder config: block_out_channels {list(chans)} '
                     f'must be multiples of the {groups} GroupNorm groups.')
  if kw['layers_per_block'] < 1:
    raise _unsupported('layers_per_block', kw['layers_per_block'], '>= 1')
  unknown = sorted(set(config) - known)
  if unknown:
    logging.warning('%s config: ignoring unknown options %s (as diffusers '
                    'does).', cls, unknown)
  return kw


def module_class(config: dict[str, Any]) -> type:
  """The Flax class of a config (its `_class_name`)."""
  cls = config.get('_class_name', 'AutoencoderKL')
  if cls not in CLASS_NAMES:
    raise _unsupported('_class_name', cls, list(CLASS_NAMES))
  return getattr(ae, cls)


def build(config: dict[str, Any], dtype: str = 'float32',
          attention: str = 'auto') -> Module:
  """The Flax module of a config.json (no parameters)."""
  return module_class(config)(**module_kwargs(config), attention=attention,
                              dtype=dtype)


def abstract_params(module: Module) -> Any:
  """The module's parameter tree as ShapeDtypeStructs (nothing computed)."""
  f = module.downsample_factor
  x = jax.ShapeDtypeStruct((1, f, f, module.in_channels), jnp.float32)
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), x)['params']


def load(folder: str, dtype: str = 'float32', attention: str = 'auto',
         shardings: Any = None, variant: Optional[str] = None
         ) -> tuple[Module, Any]:
  """An autoencoder and its float32 parameters from a diffusers folder.

  Args:
    folder: a model folder (config.json + safetensors) or a pipeline folder
      (its `vae/` is used).
    dtype: compute dtype, 'float32' or 'bfloat16'.
    attention: attention implementation (models/attention.py).
    shardings: None, or a tree of shardings matching the parameters.
    variant: the weight file variant ('fp16', ...), or None for the default.

  Returns:
    (module, params); `module.apply({'params': params}, x,
    method='encode')` gives (mean, logvar), `method='decode'` pixels.
  """
  folder = formats.component_folder(folder, 'vae')
  config = formats.model_config(folder)
  module = build(config, dtype, attention)
  table = TABLES[config.get('_class_name', 'AutoencoderKL')]
  params = convert.convert(formats.load_tensors(folder, variant),
                           abstract_params(module), table, shardings)
  return module, params
