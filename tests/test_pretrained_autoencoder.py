"""KL autoencoders (SD's, SVD's) against diffusers' PyTorch modules.

Tiny random models are built from configs, saved in diffusers layout and
loaded by vdm_jax.pretrained.autoencoder: encode (mean, logvar) and decode
match diffusers 0.42.1 to 1e-5 in float32 with outputs of order 1. The
full-size SD and SVD autoencoders are checked on the meta device (every key
maps with its shape; the parameter counts).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusers
from safetensors import torch as safetensors_torch
import torch

from vdm_jax.models import autoencoder as ae
from vdm_jax.pretrained import autoencoder as pae
from vdm_jax.pretrained import convert

TOL = 1e-5

# Two AutoencoderKL configs that together use every supported option: 3 and
# 2 levels, 1 and 2 layers per block, channel changes with and without a
# conv_shortcut, quant convs and mid attention on and off, 8 and 4 groups,
# other latent / in / out channel counts, a shift factor.
KL_CONFIGS = {
    'a': dict(block_out_channels=[32, 64, 64], layers_per_block=1,
              norm_num_groups=8, latent_channels=4,
              down_block_types=['DownEncoderBlock2D'] * 3,
              up_block_types=['UpDecoderBlock2D'] * 3),
    'b': dict(block_out_channels=[16, 32], layers_per_block=2,
              norm_num_groups=4, latent_channels=3, out_channels=2,
              in_channels=3, use_quant_conv=False, use_post_quant_conv=False,
              mid_block_add_attention=False, scaling_factor=0.3611,
              shift_factor=0.1159,
              down_block_types=['DownEncoderBlock2D'] * 2,
              up_block_types=['UpDecoderBlock2D'] * 2),
}
# SVD's VAE: GroupNorms of 32 groups are fixed in diffusers, so channels are
# multiples of 32; layers_per_block 2 runs the mid attention.
TEMPORAL_CONFIG = dict(block_out_channels=[32, 64], layers_per_block=2,
                       latent_channels=4,
                       down_block_types=['DownEncoderBlock2D'] * 2)
SD_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
              latent_channels=4, norm_num_groups=32, sample_size=512,
              down_block_types=['DownEncoderBlock2D'] * 4,
              up_block_types=['UpDecoderBlock2D'] * 4)
SVD_VAE = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
               latent_channels=4, sample_size=768,
               down_block_types=['DownEncoderBlock2D'] * 4)


def _randomize(model, seed):
  """Moves every parameter off its init (norm affines, mix factors too),
  so that a misplaced scale, bias or mix factor changes the outputs."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if 'norm' in name and name.endswith('weight'):
        p.copy_(1.0 + 0.3 * noise)
      elif name.endswith('bias') or name.endswith('mix_factor'):
        p.copy_(0.3 * noise if p.ndim else noise)
      else:
        p.mul_(1.0 + 0.3 * noise)
  return model.eval()


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


def _save(model, folder):
  model.save_pretrained(str(folder))
  return str(folder)


@pytest.fixture(scope='module', params=sorted(KL_CONFIGS))
def kl_case(request, tmp_path_factory):
  """(torch model, folder, flax module, params, inputs) of one config."""
  torch.manual_seed(0)
  cfg = KL_CONFIGS[request.param]
  model = _randomize(diffusers.AutoencoderKL.from_config(cfg), 1)
  folder = _save(model, tmp_path_factory.mktemp(f'vae_{request.param}'))
  module, params = pae.load(folder)
  rng = np.random.RandomState(0)
  f = module.downsample_factor
  x = rng.uniform(-1, 1, (2, 4 * f, 3 * f, module.in_channels))
  z = rng.randn(2, 4, 3, module.latent_channels)
  case = dict(name=request.param, torch=model, folder=folder, module=module,
              params=params, x=x.astype(np.float32), z=z.astype(np.float32))
  case['flax'] = _encode_decode(module, params, case['x'], case['z'])
  return case


def _encode_decode(module, params, x, z):
  """((mean, logvar), decode(z)) of one compiled program, as numpy."""
  def fn(p, x, z):
    return (module.apply({'params': p}, x, method='encode'),
            module.apply({'params': p}, z, method='decode'))
  return jax.tree.map(np.asarray, jax.jit(fn)(params, x, z))


def test_kl_encode_matches_diffusers(kl_case):
  with torch.no_grad():
    dist = kl_case['torch'].encode(_nchw(kl_case['x'])).latent_dist
  mean, logvar = kl_case['flax'][0]
  assert mean.shape == _nhwc(dist.mean).shape
  assert 0.3 < np.abs(_nhwc(dist.mean)).max() < 10
  np.testing.assert_allclose(mean, _nhwc(dist.mean), rtol=0, atol=TOL)
  np.testing.assert_allclose(logvar, _nhwc(dist.logvar), rtol=0, atol=TOL)


def test_kl_decode_matches_diffusers(kl_case):
  with torch.no_grad():
    want = _nhwc(kl_case['torch'].decode(_nchw(kl_case['z'])).sample)
  got = kl_case['flax'][1]
  assert got.shape == want.shape
  assert 0.3 < np.abs(want).max() < 10
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_kl_fields_from_config(kl_case):
  module, cfg = kl_case['module'], KL_CONFIGS[kl_case['name']]
  assert module.scaling_factor == cfg.get('scaling_factor', 0.18215)
  assert module.shift_factor == cfg.get('shift_factor')
  assert module.downsample_factor == 2 ** (len(cfg['block_out_channels']) - 1)


def test_gaussian_matches_diffusers():
  """Clipping of logvar to [-30, 20], std, sample with given noise, kl."""
  dvae = diffusers.models.autoencoders.vae
  rng = np.random.RandomState(0)
  moments = rng.uniform(-45, 45, (2, 3, 4, 8)).astype(np.float32)
  moments[..., :4] /= 40.0
  noise = rng.randn(2, 3, 4, 4).astype(np.float32)
  ref = dvae.DiagonalGaussianDistribution(_nchw(moments))
  mean, logvar = ae.moments_to_gaussian(jnp.asarray(moments))
  dist = ae.DiagonalGaussian(mean, logvar)
  assert np.asarray(logvar).min() == -30 and np.asarray(logvar).max() == 20
  np.testing.assert_array_equal(np.asarray(logvar), _nhwc(ref.logvar))
  np.testing.assert_allclose(np.asarray(dist.std), _nhwc(ref.std), rtol=1e-6)
  sample = ref.mean + ref.std * _nchw(noise)
  np.testing.assert_allclose(np.asarray(dist.sample(noise)), _nhwc(sample),
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(dist.mode()), _nhwc(ref.mode()))
  # Only where exp(logvar) is moderate: the kl of huge variances is inf.
  small = np.clip(moments, -45, 3)
  ref = dvae.DiagonalGaussianDistribution(_nchw(small))
  dist = ae.DiagonalGaussian(*ae.moments_to_gaussian(jnp.asarray(small)))
  np.testing.assert_allclose(np.asarray(dist.kl()), ref.kl().numpy(),
                             rtol=1e-5)


def test_legacy_attention_names(kl_case, tmp_path):
  """Pre-0.14 names (query/key/value/proj_attn), as Linear weights and as
  1x1-conv weights, load to the same parameters."""
  has_attention = KL_CONFIGS[kl_case['name']].get('mid_block_add_attention',
                                                  True)
  state = {k: v.clone() for k, v in kl_case['torch'].state_dict().items()}
  names = {'to_q': 'query', 'to_k': 'key', 'to_v': 'value',
           'to_out.0': 'proj_attn'}
  legacy = {}
  for k, v in state.items():
    for new, old in names.items():
      if f'.{new}.' in k:
        k = k.replace(f'.{new}.', f'.{old}.')
        if k.endswith('weight') and old in ('query', 'proj_attn'):
          v = v[:, :, None, None]  # An old 1x1-conv attention weight.
    legacy[k] = v.contiguous()
  # A config without mid attention has no attention names to rename.
  assert any('.proj_attn.' in k for k in legacy) == has_attention
  safetensors_torch.save_file(
      legacy, os.path.join(tmp_path, 'diffusion_pytorch_model.safetensors'))
  with open(os.path.join(kl_case['folder'], 'config.json')) as f:
    config = json.load(f)
  with open(os.path.join(tmp_path, 'config.json'), 'w') as f:
    json.dump(config, f)
  _, params = pae.load(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, params, kl_case['params'])


@pytest.fixture(scope='module')
def temporal_case(tmp_path_factory):
  torch.manual_seed(0)
  model = _randomize(
      diffusers.AutoencoderKLTemporalDecoder.from_config(TEMPORAL_CONFIG), 2)
  folder = _save(model, tmp_path_factory.mktemp('svd_vae'))
  module, params = pae.load(folder)
  return dict(torch=model, module=module, params=params)


def test_temporal_decode_matches_diffusers(temporal_case):
  """2 videos of 3 frames stacked [B * F, h, w, C], as diffusers does."""
  frames = 3
  z = np.random.RandomState(1).randn(2 * frames, 4, 3, 4).astype(np.float32)
  with torch.no_grad():
    want = _nhwc(temporal_case['torch'].decode(_nchw(z), frames).sample)
  module, params = temporal_case['module'], temporal_case['params']
  fn = jax.jit(lambda p, z: module.apply({'params': p}, z, frames,
                                         method='decode'))
  got = np.asarray(fn(params, z))
  assert got.shape == want.shape == (6, 8, 6, 3)
  assert 0.3 < np.abs(want).max() < 10
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL)
  # The frames of a video interact (the temporal convs), videos do not.
  z2 = z.copy()
  z2[1] += 1.0
  got2 = np.asarray(fn(params, z2))
  assert np.abs(got2[0] - got[0]).max() > 1e-3
  np.testing.assert_array_equal(got2[3:], got[3:])


def test_temporal_encode_matches_diffusers(temporal_case):
  x = np.random.RandomState(2).uniform(-1, 1, (2, 8, 6, 3)).astype(
      np.float32)
  with torch.no_grad():
    dist = temporal_case['torch'].encode(_nchw(x)).latent_dist
  module, params = temporal_case['module'], temporal_case['params']
  mean, logvar = jax.jit(
      lambda p, x: module.apply({'params': p}, x, method='encode'))(params, x)
  np.testing.assert_allclose(mean, _nhwc(dist.mean), rtol=0, atol=TOL)
  np.testing.assert_allclose(logvar, _nhwc(dist.logvar), rtol=0, atol=TOL)


def test_temporal_decode_rejects_partial_video(temporal_case):
  module = temporal_case['module']
  with pytest.raises(ValueError, match='num_frames=4'):
    module.apply({'params': temporal_case['params']},
                 np.zeros((6, 2, 2, 4), np.float32), 4, method='decode')


def _meta_plan(cls, config, **overrides):
  """(torch parameter count, plan entries) of a config, on the meta device."""
  with torch.device('meta'):
    model = cls.from_config(dict(config, **overrides))
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  full = dict(config, **overrides, _class_name=cls.__name__)
  abstract = pae.abstract_params(pae.build(full))
  entries = convert.plan(shapes, abstract, pae.TABLES[cls.__name__])
  n_torch = sum(p.numel() for p in model.parameters())
  assert convert.count(abstract) == n_torch
  return n_torch, entries


def test_sd_vae_full_size_keys_and_count():
  n, entries = _meta_plan(diffusers.AutoencoderKL, SD_VAE)
  assert n == 83_653_863
  assert len(entries) == 248


def test_svd_vae_full_size_keys_and_count():
  n, _ = _meta_plan(diffusers.AutoencoderKLTemporalDecoder, SVD_VAE)
  assert n == 97_742_847


@pytest.mark.parametrize('layers', [1, 3])
def test_temporal_mid_block_unused_layers_map(layers):
  """diffusers builds `layers_per_block` mid resnets and one attention but
  runs only resnets 0-1 (and the attention only with two): every tensor
  still has its parameter."""
  _meta_plan(diffusers.AutoencoderKLTemporalDecoder, TEMPORAL_CONFIG,
             layers_per_block=layers)


@pytest.mark.parametrize('override, match', [
    (dict(down_block_types=['DownEncoderBlock2D', 'AttnDownEncoderBlock2D']),
     'AttnDownEncoderBlock2D.*supported.*DownEncoderBlock2D'),
    (dict(up_block_types=['UpDecoderBlock2D', 'AttnUpDecoderBlock2D']),
     'AttnUpDecoderBlock2D'),
    (dict(act_fn='gelu'), "act_fn='gelu'.*silu"),
    (dict(_class_name='VQModel'), 'VQModel.*AutoencoderKLTemporalDecoder'),
    (dict(norm_num_groups=12), 'multiples of the 12'),
    (dict(down_block_types=['DownEncoderBlock2D']), 'has 1 entries'),
])
def test_unsupported_config_is_named(override, match):
  with pytest.raises(ValueError, match=match):
    pae.module_kwargs(dict(KL_CONFIGS['a'], **override))


def test_bad_dtype_and_missing_tensor(kl_case, tmp_path):
  cfg = dict(KL_CONFIGS['a'], _class_name='AutoencoderKL')
  with pytest.raises(ValueError, match="float16.*bfloat16"):
    pae.abstract_params(pae.build(cfg, dtype='float16'))
  if kl_case['name'] != 'a':
    return
  state = dict(kl_case['torch'].state_dict())
  state.pop('decoder.conv_out.bias')
  safetensors_torch.save_file(
      {k: v.contiguous() for k, v in state.items()},
      os.path.join(tmp_path, 'diffusion_pytorch_model.safetensors'))
  with open(os.path.join(tmp_path, 'config.json'), 'w') as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match='decoder/conv_out/bias'):
    pae.load(str(tmp_path))


def test_bfloat16_compute_is_close(kl_case):
  """bfloat16 compute, float32 parameters and outputs (one config)."""
  if kl_case['name'] != 'b':
    return
  module = kl_case['module'].clone(dtype='bfloat16')
  got = _encode_decode(module, kl_case['params'], kl_case['x'], kl_case['z'])
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(kl_case['flax'])):
    assert g.dtype == np.float32
    assert np.abs(g - w).max() < 0.05 * np.abs(w).max()


def test_unknown_option_is_warned_and_ignored(caplog):
  """As diffusers does; the published SD and SVD configs warn of nothing."""
  with caplog.at_level('WARNING'):
    pae.module_kwargs(dict(SD_VAE, force_upcast=True, scaling_factor=0.18))
    pae.module_kwargs(dict(SVD_VAE, _class_name='AutoencoderKLTemporalDecoder',
                           force_upcast=True, in_channels=3))
  assert not caplog.records
  with caplog.at_level('WARNING'):
    kw = pae.module_kwargs(dict(SD_VAE, conv_style='new'))
  assert "['conv_style']" in caplog.text
  assert 'conv_style' not in kw
