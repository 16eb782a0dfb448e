"""Diffusers and transformers folders on disk: configs and safetensors.

A pipeline folder (diffusers' `DiffusionPipeline.save_pretrained` layout) has
`model_index.json` and one subfolder per component (`unet/`, `vae/`,
`text_encoder/`, `tokenizer/`, `scheduler/`, and for Stable Video Diffusion
`image_encoder/`, `feature_extractor/`). A model folder has `config.json`
and its weights: `diffusion_pytorch_model.safetensors` (diffusers) or
`model.safetensors` (transformers), or shards listed in
`*.safetensors.index.json`, optionally as a variant (`*.fp16.safetensors`).

The safetensors format (huggingface/safetensors, docs "Format"): an 8-byte
little-endian header length N, N bytes of JSON mapping each tensor name to
{dtype, shape, data_offsets} (offsets into the bytes after the header), then
the data. It is read here with numpy alone (no torch, and bfloat16 through
ml_dtypes, which JAX ships), memory-mapped, so a tensor is read from disk
when it is converted.
"""

import json
import os
import struct
from typing import Any, Mapping, Optional, Sequence

import ml_dtypes
import numpy as np

DTYPES = {
    'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
    'BF16': ml_dtypes.bfloat16, 'I64': np.int64, 'I32': np.int32,
    'I16': np.int16, 'I8': np.int8, 'U8': np.uint8, 'BOOL': np.bool_,
}
# Weight file stems, diffusers' first.
WEIGHT_STEMS = ('diffusion_pytorch_model', 'model')
VARIANTS = (None, 'fp16', 'bf16', 'fp32')


def read_json(path: str) -> dict[str, Any]:
  """A JSON file as a dict, with an error that names the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path} does not exist.')
  with open(path, encoding='utf-8') as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not valid JSON: {e}') from e


def is_pipeline(path: str) -> bool:
  """Whether `path` is a diffusers pipeline folder (has model_index.json)."""
  return os.path.isfile(os.path.join(path, 'model_index.json'))


def component_folder(path: str, component: str) -> str:
  """The folder of one component of a pipeline (or `path` itself).

  Args:
    path: a pipeline folder (with model_index.json) or a model folder.
    component: the pipeline's subfolder name, e.g. 'unet', 'vae'.

  Returns:
    path/component for a pipeline, else path (a model folder is its own
    component).

  Raises:
    FileNotFoundError: the path does not exist, or the pipeline has no such
      component.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f'pretrained path {path!r} is not a folder; give a local diffusers '
        'pipeline folder (with model_index.json) or a model folder (with '
        'config.json).')
  if not is_pipeline(path):
    return path
  index = read_json(os.path.join(path, 'model_index.json'))
  sub = os.path.join(path, component)
  if component not in index or not os.path.isdir(sub):
    listed = sorted(k for k in index if not k.startswith('_'))
    raise FileNotFoundError(
        f'{path} is a pipeline folder without a {component!r} component '
        f'(model_index.json lists {listed}).')
  return sub


def model_config(folder: str) -> dict[str, Any]:
  """config.json of a model folder (scheduler: scheduler_config.json)."""
  for name in ('config.json', 'scheduler_config.json'):
    path = os.path.join(folder, name)
    if os.path.isfile(path):
      return read_json(path)
  raise FileNotFoundError(
      f'{folder} has no config.json: it is not a diffusers or transformers '
      'model folder.')


def class_name(config: Mapping[str, Any]) -> Optional[str]:
  """The model class a config names: diffusers' `_class_name`, else the
  first of transformers' `architectures`."""
  if '_class_name' in config:
    return config['_class_name']
  archs = config.get('architectures') or []
  return archs[0] if archs else None


def _variant_name(stem: str, variant: Optional[str], ext: str) -> str:
  return f'{stem}.{variant}.{ext}' if variant else f'{stem}.{ext}'


def weight_files(folder: str, variant: Optional[str] = None) -> list[str]:
  """The safetensors files holding a model folder's weights.

  Args:
    folder: a model folder.
    variant: 'fp16', 'bf16', ... to prefer `*.{variant}.safetensors`; None
      takes the plain files, else the first variant found.

  Returns:
    Paths of one file or of every shard of an index.

  Raises:
    FileNotFoundError: no safetensors weights (naming what is there), or a
      shard named by the index is missing.
  """
  variants = (variant,) if variant else VARIANTS
  for v in variants:
    for stem in WEIGHT_STEMS:
      index = os.path.join(folder, _variant_name(stem, v, 'safetensors.index.json'))
      if os.path.isfile(index):
        shards = sorted(set(read_json(index)['weight_map'].values()))
        paths = [os.path.join(folder, s) for s in shards]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
          raise FileNotFoundError(
              f'{index} lists shards that are missing: {missing}.')
        return paths
      single = os.path.join(folder, _variant_name(stem, v, 'safetensors'))
      if os.path.isfile(single):
        return [single]
  present = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
  bins = [f for f in present if f.endswith(('.bin', '.ckpt', '.pt'))]
  hint = (f' It has PyTorch pickles {bins}: convert them to safetensors '
          '(diffusers: `save_pretrained(..., safe_serialization=True)`).'
          if bins else '')
  wanted = f' of variant {variant!r}' if variant else ''
  raise FileNotFoundError(
      f'{folder} has no safetensors weights{wanted} (looked for '
      f'{WEIGHT_STEMS[0]}.safetensors, model.safetensors and their sharded '
      f'indexes; found {present}).{hint}')


def read_header(path: str) -> dict[str, dict[str, Any]]:
  """{name: {'dtype', 'shape', 'data_offsets'}} of one safetensors file."""
  with open(path, 'rb') as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise ValueError(f'{path} is not a safetensors file (too short).')
    (size,) = struct.unpack('<Q', raw)
    if size > os.path.getsize(path):
      raise ValueError(f'{path} is not a safetensors file (bad header).')
    header = json.loads(f.read(size))
  header.pop('__metadata__', None)
  return {k: dict(v, header_size=size) for k, v in header.items()}


def tensor_shapes(folder: str, variant: Optional[str] = None
                  ) -> dict[str, tuple[tuple[int, ...], str]]:
  """{name: (shape, safetensors dtype)} of a model folder, data unread."""
  out = {}
  for path in weight_files(folder, variant):
    for name, info in read_header(path).items():
      out[name] = (tuple(info['shape']), info['dtype'])
  return out


def load_tensors(folder: str, variant: Optional[str] = None
                 ) -> dict[str, np.ndarray]:
  """{name: array} of a model folder, memory-mapped (read on access).

  Raises:
    ValueError: a tensor of a dtype numpy cannot hold (named).
  """
  out = {}
  for path in weight_files(folder, variant):
    data = np.memmap(path, dtype=np.uint8, mode='r')
    for name, info in read_header(path).items():
      if info['dtype'] not in DTYPES:
        raise ValueError(
            f'{path}: tensor {name} has dtype {info["dtype"]}, which is not'
            f' supported (supported: {sorted(DTYPES)}).')
      start, end = info['data_offsets']
      base = 8 + info['header_size']
      dtype = np.dtype(DTYPES[info['dtype']])
      out[name] = data[base + start:base + end].view(dtype).reshape(
          info['shape'])
  return out


def check_pipeline(path: str, name: str, pipelines: Sequence[str],
                   components: Mapping[str, Optional[Sequence[str]]],
                   weighted: Sequence[str]) -> dict[str, str]:
  """{component: class name} of a pipeline folder, checked before any read.

  Args:
    path: the folder.
    name: what it should be, for messages ('Stable Diffusion', ...).
    pipelines: the accepted model_index.json `_class_name`s.
    components: {subfolder: accepted class names, or None for any}.
    weighted: the components whose config.json and weights must exist.

  Raises:
    FileNotFoundError / ValueError: not a folder, not a pipeline folder, a
      pipeline of another class, a missing component or file, or a class
      not supported (naming the supported ones).
  """
  needs = ', '.join(f'{c}/' for c in components)
  if not os.path.isdir(path):
    raise FileNotFoundError(
        f'pretrained.path {path!r} is not a folder: give a local {name} '
        'pipeline folder (diffusers layout, with model_index.json).')
  if not is_pipeline(path):
    raise FileNotFoundError(
        f'{path} has no model_index.json: it is not a diffusers pipeline '
        f'folder ({name} needs {needs} together).')
  index = read_json(os.path.join(path, 'model_index.json'))
  pipeline = index.get('_class_name')
  if pipeline not in pipelines:
    raise ValueError(f'{path}: pipeline class {pipeline!r} is not {name}; '
                     f'supported: {tuple(pipelines)}.')
  classes = {}
  for component, allowed in components.items():
    entry = index.get(component)
    if not entry or entry[1] is None:
      raise FileNotFoundError(f'{path}: model_index.json has no '
                              f'{component!r} component.')
    if allowed is not None and entry[1] not in allowed:
      raise ValueError(f'{path}: {component} class {entry[1]!r} is not '
                       f'supported; supported: {tuple(allowed)}.')
    if not os.path.isdir(os.path.join(path, component)):
      raise FileNotFoundError(f'{path}: the {component}/ folder is missing.')
    classes[component] = entry[1]
  for component in weighted:
    model_config(os.path.join(path, component))
    weight_files(os.path.join(path, component))
  return classes
