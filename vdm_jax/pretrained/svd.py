"""diffusers' UNetSpatioTemporalConditionModel (Stable Video Diffusion) from a
local folder into models/svd_unet.py.

config.json sets the module's fields as diffusers' constructor resolves them
(huggingface/diffusers, src/diffusers/models/unets/
unet_spatio_temporal_condition.py): per-level settings given as one value
are repeated per level; `cross_attention_dim` must be one width. The state
dict maps by convert.py's generic rule alone (the Flax module names its
submodules as diffusers does; the temporal res blocks' Conv3d kernels and
the AlphaBlenders' `mix_factor` included).
"""

import logging
from typing import Any, Optional

import jax

from vdm_jax.models import svd_unet
from vdm_jax.pretrained import convert
from vdm_jax.pretrained import formats

CLASS_NAMES = ('UNetSpatioTemporalConditionModel',)
TABLE = convert.RuleTable('UNetSpatioTemporalConditionModel')
_INERT = ('_class_name', '_diffusers_version', '_name_or_path')
# SVD-xt's unet/config.json, the fields that differ from diffusers'
# defaults (1,524,623,082 parameters; SVD's 14-frame release differs only
# in num_frames): for compiling the full-size model without a folder, and
# the tests' full-size checks.
_CROSS_DOWN, _DOWN = ('CrossAttnDownBlockSpatioTemporal',
                      'DownBlockSpatioTemporal')
_CROSS_UP, _UP = 'CrossAttnUpBlockSpatioTemporal', 'UpBlockSpatioTemporal'
SVD_XT_CONFIG = dict(
    _class_name='UNetSpatioTemporalConditionModel', sample_size=96,
    in_channels=8, out_channels=4, block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2, num_attention_heads=[5, 10, 20, 20],
    cross_attention_dim=1024, addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=768, transformer_layers_per_block=1,
    num_frames=25, down_block_types=[_CROSS_DOWN] * 3 + [_DOWN],
    up_block_types=[_UP] + [_CROSS_UP] * 3)


def _unsupported(name: str, value: Any, supported: Any) -> ValueError:
  return ValueError(f'UNetSpatioTemporalConditionModel config: {name}='
                    f'{value!r} is not supported (supported: {supported}).')


def _per_level(config: dict[str, Any], name: str, default: Any, levels: int
               ) -> tuple[int, ...]:
  value = config.get(name, default)
  if isinstance(value, (list, tuple)):
    if len(value) != levels:
      raise ValueError(f'UNetSpatioTemporalConditionModel config: {name} has '
                       f'{len(value)} entries but block_out_channels has '
                       f'{levels}.')
    if any(isinstance(v, (list, tuple)) for v in value):
      raise _unsupported(name, value, 'one number per level')
    return tuple(int(v) for v in value)
  return (int(value),) * levels


def module_kwargs(config: dict[str, Any]) -> dict[str, Any]:
  """config.json of a diffusers UNetSpatioTemporalConditionModel -> fields.

  Args:
    config: the parsed config.json; absent entries take diffusers' defaults.

  Returns:
    Keyword arguments of svd_unet.UNetSpatioTemporalConditionModel, without
    dtype, attention and remat.

  Raises:
    ValueError: another class, an unsupported block type or option, named
      with what is supported.
  """
  cls = config.get('_class_name', CLASS_NAMES[0])
  if cls not in CLASS_NAMES:
    raise _unsupported('_class_name', cls, list(CLASS_NAMES))
  field = svd_unet.UNetSpatioTemporalConditionModel.__dataclass_fields__
  default = lambda name: field[name].default
  chans = tuple(int(c) for c in config.get('block_out_channels',
                                           default('block_out_channels')))
  n = len(chans)
  down = tuple(config.get('down_block_types', default('down_block_types')))
  up = tuple(config.get('up_block_types', default('up_block_types')))
  for name, types, ok in (('down_block_types', down,
                           svd_unet.DOWN_BLOCK_TYPES),
                          ('up_block_types', up, svd_unet.UP_BLOCK_TYPES)):
    bad = sorted({t for t in types if t not in ok})
    if bad:
      raise _unsupported(name, bad, list(ok))
    if len(types) != n:
      raise ValueError(f'UNetSpatioTemporalConditionModel config: {name} has'
                       f' {len(types)} entries for {n} block_out_channels.')
  cross = _per_level(config, 'cross_attention_dim', 1024, n)
  if len(set(cross)) != 1:
    raise _unsupported('cross_attention_dim', list(cross),
                       'one width for every level')
  sample = config.get('sample_size', default('sample_size'))
  if isinstance(sample, (list, tuple)):
    sample = sample[0]
  kw = dict(
      sample_size=None if sample is None else int(sample),
      in_channels=int(config.get('in_channels', 8)),
      out_channels=int(config.get('out_channels', 4)),
      block_out_channels=chans,
      down_block_types=down,
      up_block_types=up,
      layers_per_block=_per_level(config, 'layers_per_block', 2, n),
      transformer_layers_per_block=_per_level(
          config, 'transformer_layers_per_block', 1, n),
      num_attention_heads=_per_level(config, 'num_attention_heads',
                                     default('num_attention_heads'), n),
      cross_attention_dim=cross[0],
      addition_time_embed_dim=int(config.get('addition_time_embed_dim', 256)),
      projection_class_embeddings_input_dim=int(
          config.get('projection_class_embeddings_input_dim', 768)),
      num_frames=int(config.get('num_frames', 25)),
  )
  unknown = sorted(set(config) - set(kw) - set(_INERT))
  if unknown:
    logging.warning('%s config: ignoring unknown options %s (as diffusers '
                    'does).', cls, unknown)
  svd_unet.UNetSpatioTemporalConditionModel(**kw).check()
  return kw


def build(config: dict[str, Any], dtype: str = 'float32',
          attention: str = 'auto', remat: str = 'none'
          ) -> svd_unet.UNetSpatioTemporalConditionModel:
  """The Flax module of a config.json (no parameters)."""
  module = svd_unet.UNetSpatioTemporalConditionModel(
      **module_kwargs(config), dtype=dtype, attention=attention, remat=remat)
  module.check()
  return module


def abstract_params(module: svd_unet.UNetSpatioTemporalConditionModel
                    ) -> Any:
  """The module's parameter tree as ShapeDtypeStructs (nothing computed)."""
  size = 2 ** (len(module.block_out_channels) - 1)
  inputs = module.example_inputs(batch=1, num_frames=2, size=(size, size))
  return jax.eval_shape(module.init, jax.random.PRNGKey(0),
                        *inputs)['params']


def load(folder: str, dtype: str = 'float32', attention: str = 'auto',
         remat: str = 'none', shardings: Any = None,
         variant: Optional[str] = None
         ) -> tuple[svd_unet.UNetSpatioTemporalConditionModel, Any]:
  """An SVD UNet and its float32 parameters from a folder.

  Args:
    folder: a model folder (config.json + safetensors) or a pipeline folder
      (its `unet/` is used).
    dtype: compute dtype, 'float32' or 'bfloat16'.
    attention: attention implementation (models/attention.py).
    remat: svd_unet.REMAT policy (training only).
    shardings: None, or a tree of shardings matching the parameters.
    variant: the weight file variant ('fp16', ...), or None.

  Returns:
    (module, params); `module.apply({'params': params}, x, timesteps,
    context, added_time_ids)` with x [B, F, H, W, C].
  """
  folder = formats.component_folder(folder, 'unet')
  module = build(formats.model_config(folder), dtype, attention, remat)
  params = convert.convert(formats.load_tensors(folder, variant),
                           abstract_params(module), TABLE, shardings)
  return module, params
