"""The safetensors reader and the strict torch -> Flax conversion rules."""

import json
import os

import flax.linen as nn
import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors import numpy as st_numpy
import torch
from safetensors import torch as st_torch

from vdm_jax.pretrained import convert
from vdm_jax.pretrained import formats


class _Tiny(nn.Module):
  """Names as a torch module would have them: conv, linear, norm, list."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3), padding=((1, 1), (1, 1)), name='conv_in')(x)
    x = nn.GroupNorm(2, name='norm')(x)
    for i in range(2):
      x = nn.Dense(4, name=f'layers_{i}')(x)
    x = nn.Dense(3, use_bias=False, name='to_out_0')(x)
    return x + nn.Embed(5, 3, name='emb')(jax.numpy.zeros((), int))


def _torch_tiny():
  torch.manual_seed(0)
  m = torch.nn.ModuleDict({
      'conv_in': torch.nn.Conv2d(2, 4, 3, padding=1),
      'norm': torch.nn.GroupNorm(2, 4),
      'layers': torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)]),
      'to_out': torch.nn.ModuleList([torch.nn.Linear(4, 3, bias=False)]),
      'emb': torch.nn.Embedding(5, 3),
  })
  for p in m.parameters():  # GroupNorm starts at (1, 0): make it count.
    torch.nn.init.normal_(p)
  return m


def _abstract():
  return jax.eval_shape(lambda: _Tiny().init(
      jax.random.key(0), np.zeros((1, 5, 5, 2), np.float32)))['params']


def _torch_forward(m, x):
  h = m['conv_in'](torch.from_numpy(x).permute(0, 3, 1, 2))
  h = m['norm'](h).permute(0, 2, 3, 1)
  for layer in m['layers']:
    h = layer(h)
  return (m['to_out'][0](h) + m['emb'].weight[0]).detach().numpy()


TABLE = convert.RuleTable('tiny')


def test_convert_matches_torch_forward(tmp_path):
  m = _torch_tiny()
  st_torch.save_file(m.state_dict(), str(tmp_path / 'model.safetensors'))
  (tmp_path / 'config.json').write_text('{"_class_name": "Tiny"}')
  params = convert.convert(formats.load_tensors(str(tmp_path)), _abstract(),
                           TABLE)
  x = np.random.RandomState(0).randn(2, 5, 5, 2).astype(np.float32)
  got = _Tiny().apply({'params': params}, x)
  np.testing.assert_allclose(got, _torch_forward(m, x), atol=1e-5)
  assert formats.class_name(formats.model_config(str(tmp_path))) == 'Tiny'


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_files_and_shards(tmp_path, dtype):
  m = _torch_tiny()
  sd = {k: v.to(dtype) for k, v in m.state_dict().items()}
  keys = sorted(sd)
  shards = {'s-1.safetensors': keys[:3], 's-2.safetensors': keys[3:]}
  for name, ks in shards.items():
    st_torch.save_file({k: sd[k] for k in ks},
                       str(tmp_path / name.replace('.safe', '.fp16.safe')))
  index = {'weight_map': {k: n.replace('.safe', '.fp16.safe')
                          for n, ks in shards.items() for k in ks}}
  (tmp_path / 'diffusion_pytorch_model.fp16.safetensors.index.json'
   ).write_text(json.dumps(index))
  tensors = formats.load_tensors(str(tmp_path))
  for k, v in sd.items():
    np.testing.assert_array_equal(
        np.asarray(tensors[k], np.float32), v.float().numpy())
  shapes = formats.tensor_shapes(str(tmp_path), 'fp16')
  want = 'F16' if dtype == torch.float16 else 'BF16'
  assert {d for _, d in shapes.values()} == {want}
  params = convert.convert(tensors, _abstract(), TABLE)
  assert params['conv_in']['kernel'].dtype == np.float32
  os.remove(tmp_path / 's-2.fp16.safetensors')
  with pytest.raises(FileNotFoundError, match='s-2.fp16.safetensors'):
    formats.load_tensors(str(tmp_path))


def test_coverage_errors_name_keys(tmp_path):
  sd = {k: v.numpy() for k, v in _torch_tiny().state_dict().items()}
  abstract = _abstract()
  extra = dict(sd, **{'spare.weight': np.zeros((2, 2), np.float32)})
  with pytest.raises(ValueError, match='1 checkpoint tensors have no '
                     'parameter: spare.weight'):
    convert.plan({k: v.shape for k, v in extra.items()}, abstract, TABLE)
  less = {k: v for k, v in sd.items() if k != 'layers.1.bias'}
  with pytest.raises(ValueError, match='parameters have no checkpoint '
                     'tensor: layers_1/bias'):
    convert.plan({k: v.shape for k, v in less.items()}, abstract, TABLE)
  bad = dict(sd, **{'layers.0.weight': np.zeros((4, 5), np.float32)})
  with pytest.raises(ValueError, match=r'layers.0.weight \(4, 5\)'):
    convert.plan({k: v.shape for k, v in bad.items()}, abstract, TABLE)
  table = convert.RuleTable('tiny', ignore=(r'spare\..*',))
  assert len(convert.plan({k: v.shape for k, v in extra.items()}, abstract,
                          table)) == len(sd)


def test_renames_and_legacy_1x1_conv_attention():
  abstract = _abstract()
  sd = {k: v.numpy() for k, v in _torch_tiny().state_dict().items()}
  legacy = {('proj_attn.weight' if k == 'to_out.0.weight' else k):
            (v[:, :, None, None] if k == 'to_out.0.weight' else v)
            for k, v in sd.items()}
  table = convert.RuleTable('tiny', renames=((r'^proj_attn\.', 'to_out.0.'),))
  got = convert.convert(legacy, abstract, table)
  np.testing.assert_array_equal(got['to_out_0']['kernel'],
                                sd['to_out.0.weight'].T)


def test_sharded_placement():
  sd = {k: v.numpy() for k, v in _torch_tiny().state_dict().items()}
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]), ('fsdp',))
  spec = jax.sharding.PartitionSpec
  shardings = jax.tree.map(
      lambda x: jax.sharding.NamedSharding(
          mesh, spec('fsdp') if x.shape[0] % 4 == 0 else spec()),
      _abstract())
  params = convert.convert(sd, _abstract(), TABLE, shardings)
  kernel = params['layers_0']['kernel']
  assert kernel.sharding == shardings['layers_0']['kernel']
  assert kernel.addressable_shards[0].data.shape == (1, 4)
  np.testing.assert_array_equal(kernel, sd['layers.0.weight'].T)


def test_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='not a folder'):
    formats.component_folder(str(tmp_path / 'nope'), 'unet')
  (tmp_path / 'model_index.json').write_text('{"vae": ["diffusers", "A"]}')
  with pytest.raises(FileNotFoundError, match="without a 'unet' component"):
    formats.component_folder(str(tmp_path), 'unet')
  (tmp_path / 'vae').mkdir()
  with pytest.raises(FileNotFoundError, match='has no config.json'):
    formats.model_config(str(tmp_path / 'vae'))
  (tmp_path / 'vae' / 'diffusion_pytorch_model.bin').write_bytes(b'x')
  with pytest.raises(FileNotFoundError, match='PyTorch pickles'):
    formats.load_tensors(str(tmp_path / 'vae'))
  st_numpy.save_file({'a': np.zeros(2, np.float32)},
                     str(tmp_path / 'vae' / 'model.safetensors'))
  assert formats.load_tensors(str(tmp_path / 'vae'))['a'].shape == (2,)
  assert ml_dtypes.bfloat16 in formats.DTYPES.values()
