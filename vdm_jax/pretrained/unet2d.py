"""diffusers' UNet2DConditionModel (Stable Diffusion 1.x / 2.x) from a local
folder into models/sd_unet.py.

config.json sets the module's fields as diffusers' constructor resolves them
(huggingface/diffusers, src/diffusers/models/unets/unet_2d_condition.py):
`num_attention_heads` must be absent or null and `attention_head_dim` is
taken as the number of heads (diffusers issue #2011: SD-1.5's
`attention_head_dim: 8` is 8 heads of 40, 80, 160 channels); per-level
settings given as one value are repeated per level. The state dict maps by
convert.py's generic rule alone: the Flax module names its submodules as
diffusers does, and 1x1-conv projections ([O, I, 1, 1], SD-1.x) and linear
ones (SD-2.x) both load into Dense kernels.
"""

import logging
from typing import Any, Optional, Sequence

import jax

from vdm_jax.models import sd_unet
from vdm_jax.pretrained import convert
from vdm_jax.pretrained import formats

CLASS_NAMES = ('UNet2DConditionModel',)
TABLE = convert.RuleTable('UNet2DConditionModel')
ACT_FNS = ('silu', 'swish')
# SD-1.5's unet/config.json, the fields that differ from diffusers'
# defaults (859,520,964 parameters): for compiling and benchmarking the
# full-size model without a folder, and the tests' full-size checks.
SD15_CONFIG = dict(
    _class_name='UNet2DConditionModel', sample_size=64, in_channels=4,
    out_channels=4, block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
    down_block_types=['CrossAttnDownBlock2D'] * 3 + ['DownBlock2D'],
    up_block_types=['UpBlock2D'] + ['CrossAttnUpBlock2D'] * 3)

# Options sd_unet does not implement: the value(s) it supports, which are
# diffusers' defaults.
_FIXED = {
    'act_fn': ACT_FNS,
    'resnet_time_scale_shift': ('default',),
    'dual_cross_attention': (False,),
    'class_embed_type': (None,),
    'num_class_embeds': (None,),
    'class_embeddings_concat': (False,),
    'addition_embed_type': (None,),
    'encoder_hid_dim': (None,),
    'encoder_hid_dim_type': (None,),
    'time_embedding_type': ('positional',),
    'time_embedding_act_fn': (None,),
    'timestep_post_act': (None,),
    'time_cond_proj_dim': (None,),
    'attention_type': ('default',),
    'cross_attention_norm': (None,),
    'center_input_sample': (False,),
    'resnet_skip_time_act': (False,),
    'reverse_transformer_layers_per_block': (None,),
    'num_attention_heads': (None,),
    'dropout': (0.0, 0),
}
# Entries that change nothing for the supported block types (they apply to
# options refused above or to blocks sd_unet does not have).
_INERT = ('_class_name', '_diffusers_version', '_name_or_path',
          'addition_time_embed_dim', 'projection_class_embeddings_input_dim',
          'addition_embed_type_num_heads', 'resnet_out_scale_factor',
          'mid_block_only_cross_attention')


def _unsupported(name: str, value: Any, supported: Any) -> ValueError:
  return ValueError(f'UNet2DConditionModel config: {name}={value!r} is not '
                    f'supported (supported: {supported}).')


def _per_level(config: dict[str, Any], name: str, default: Any, levels: int,
               cast: type) -> tuple[Any, ...]:
  value = config.get(name, default)
  if isinstance(value, (list, tuple)):
    if len(value) != levels:
      raise ValueError(f'UNet2DConditionModel config: {name} has '
                       f'{len(value)} entries but block_out_channels has '
                       f'{levels}.')
    if any(isinstance(v, (list, tuple)) for v in value):
      raise _unsupported(name, value, 'one number per level')
    return tuple(cast(v) for v in value)
  return (cast(value),) * levels


def _check_types(types: Sequence[str], name: str,
                 allowed: Sequence[Any]) -> None:
  bad = sorted({str(t) for t in types if t not in allowed})
  if bad:
    raise _unsupported(name, bad, list(allowed))


def module_kwargs(config: dict[str, Any]) -> dict[str, Any]:
  """config.json of a diffusers UNet2DConditionModel -> sd_unet fields.

  Args:
    config: the parsed config.json; absent entries take diffusers' defaults.

  Returns:
    Keyword arguments of sd_unet.UNet2DConditionModel (per-level tuples,
    resolved head counts, sample_size, in_channels, out_channels), without
    dtype, attention and remat.

  Raises:
    ValueError: an unsupported class, block type or option, named with what
      is supported.
  """
  cls = config.get('_class_name', 'UNet2DConditionModel')
  if cls not in CLASS_NAMES:
    raise _unsupported('_class_name', cls, list(CLASS_NAMES))
  for name, ok in _FIXED.items():
    if name in config and config[name] not in ok:
      raise _unsupported(name, config[name], list(ok))
  field = sd_unet.UNet2DConditionModel.__dataclass_fields__
  chans = tuple(int(c) for c in config.get(
      'block_out_channels', field['block_out_channels'].default))
  n = len(chans)
  down = tuple(config.get('down_block_types',
                          field['down_block_types'].default))
  up = tuple(config.get('up_block_types', field['up_block_types'].default))
  mid = config.get('mid_block_type', 'UNetMidBlock2DCrossAttn')
  _check_types(down, 'down_block_types', sd_unet.DOWN_BLOCK_TYPES)
  _check_types(up, 'up_block_types', sd_unet.UP_BLOCK_TYPES)
  _check_types([mid], 'mid_block_type', sd_unet.MID_BLOCK_TYPES)
  if len(down) != n or len(up) != n:
    raise ValueError(f'UNet2DConditionModel config: {len(down)} down and '
                     f'{len(up)} up block types for {n} block_out_channels.')
  cross = _per_level(config, 'cross_attention_dim', 1280, n, int)
  if len(set(cross)) != 1:
    raise _unsupported('cross_attention_dim', list(cross),
                       'one width for every level')
  groups = config.get('norm_num_groups', 32)
  if groups is None:
    raise _unsupported('norm_num_groups', None, 'an integer')
  sample = config.get('sample_size')
  if isinstance(sample, (list, tuple)):
    sample = sample[0]
  kw = dict(
      sample_size=None if sample is None else int(sample),
      in_channels=int(config.get('in_channels', 4)),
      out_channels=int(config.get('out_channels', 4)),
      block_out_channels=chans,
      down_block_types=down,
      up_block_types=up,
      mid_block_type=mid,
      layers_per_block=_per_level(config, 'layers_per_block', 2, n, int),
      transformer_layers_per_block=_per_level(
          config, 'transformer_layers_per_block', 1, n, int),
      # diffusers: num_attention_heads = num_attention_heads or
      # attention_head_dim (the former must be None in 0.42.1).
      num_attention_heads=_per_level(config, 'attention_head_dim', 8, n, int),
      only_cross_attention=_per_level(config, 'only_cross_attention', False,
                                      n, bool),
      cross_attention_dim=cross[0],
      norm_num_groups=int(groups),
      norm_eps=float(config.get('norm_eps', 1e-5)),
      flip_sin_to_cos=bool(config.get('flip_sin_to_cos', True)),
      freq_shift=float(config.get('freq_shift', 0)),
      time_embedding_dim=config.get('time_embedding_dim'),
      conv_in_kernel=int(config.get('conv_in_kernel', 3)),
      conv_out_kernel=int(config.get('conv_out_kernel', 3)),
      downsample_padding=int(config.get('downsample_padding', 1)),
      mid_block_scale_factor=float(config.get('mid_block_scale_factor', 1)),
  )
  known = (set(kw) | set(_FIXED) | set(_INERT)
           | {'attention_head_dim', 'use_linear_projection',
              'upcast_attention'})
  unknown = sorted(set(config) - known)
  if unknown:
    logging.warning('%s config: ignoring unknown options %s (as diffusers '
                    'does).', cls, unknown)
  sd_unet.UNet2DConditionModel(**kw).check()
  return kw


def build(config: dict[str, Any], dtype: str = 'float32',
          attention: str = 'auto', remat: str = 'none'
          ) -> sd_unet.UNet2DConditionModel:
  """The Flax module of a config.json (no parameters)."""
  module = sd_unet.UNet2DConditionModel(**module_kwargs(config), dtype=dtype,
                                        attention=attention, remat=remat)
  module.check()
  return module


def abstract_params(module: sd_unet.UNet2DConditionModel) -> Any:
  """The module's parameter tree as ShapeDtypeStructs (nothing computed)."""
  size = 2 ** (len(module.block_out_channels) - 1)
  inputs = module.example_inputs(batch=1, context_length=1, size=size)
  return jax.eval_shape(module.init, jax.random.PRNGKey(0),
                        *inputs)['params']


def load(folder: str, dtype: str = 'float32', attention: str = 'auto',
         remat: str = 'none', shardings: Any = None,
         variant: Optional[str] = None
         ) -> tuple[sd_unet.UNet2DConditionModel, Any]:
  """A UNet2DConditionModel and its float32 parameters from a folder.

  Args:
    folder: a model folder (config.json + safetensors) or a pipeline folder
      (its `unet/` is used).
    dtype: compute dtype, 'float32' or 'bfloat16'.
    attention: attention implementation (models/attention.py).
    remat: sd_unet.REMAT policy (training only).
    shardings: None, or a tree of shardings matching the parameters.
    variant: the weight file variant ('fp16', ...), or None for the default.

  Returns:
    (module, params); `module.apply({'params': params}, x, timesteps,
    context)` with x [B, H, W, C], timesteps [B] float, context [B, L, D].
  """
  folder = formats.component_folder(folder, 'unet')
  config = formats.model_config(folder)
  module = build(config, dtype, attention, remat)
  params = convert.convert(formats.load_tensors(folder, variant),
                           abstract_params(module), TABLE, shardings)
  return module, params
