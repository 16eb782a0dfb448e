"""SD's UNet (diffusers' UNet2DConditionModel) against diffusers' PyTorch.

Tiny random models are built from configs, saved in diffusers layout and
loaded by vdm_jax.pretrained.unet2d: the prediction matches diffusers 0.42.1
to 1e-5 in float32 with outputs of order 1. The resnet, transformer and
transformer-block layers are also matched alone at inputs where a wrong
norm epsilon or a tanh GELU shows. The full-size SD-1.5 and SD-2.1 UNets are
checked on the meta device (every key maps with its shape; the published
parameter count).
"""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vdm_jax.models import sd_blocks
from vdm_jax.models import sd_unet
from vdm_jax.pretrained import convert
from vdm_jax.pretrained import unet2d

TOL = 1e-5

# Three tiny configs that together use every supported option:
# 'sd1': SD-1.x style: conv projections, one head count for all levels
#   (attention_head_dim 4 = 4 heads), a cross-attention and a plain level,
#   batch 2 with distinct (one fractional) timesteps and a context mask.
# 'sd2': SD-2.x style: linear projections, per-level heads ([2, 4, 4], head
#   width 16), upcast_attention, flip_sin_to_cos False with freq_shift 1,
#   an odd, non-square latent (9x11 -> 5x6 -> 3x3 and back up to the skips'
#   sizes), 3 levels.
# 'mixed': plain level first, only_cross_attention per level, 2 transformer
#   layers, layers_per_block per level, downsample_padding 0, mid scale
#   factor, time_embedding_dim, conv_in/out kernel sizes, other in/out
#   channels.
CONFIGS = {
    'sd1': dict(
        block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8,
        attention_head_dim=4, cross_attention_dim=24, sample_size=8,
        down_block_types=['CrossAttnDownBlock2D', 'DownBlock2D'],
        up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D']),
    'sd2': dict(
        block_out_channels=[32, 64, 64], layers_per_block=1,
        norm_num_groups=8, attention_head_dim=[2, 4, 4],
        cross_attention_dim=32, use_linear_projection=True,
        upcast_attention=True, flip_sin_to_cos=False, freq_shift=1,
        norm_eps=1e-6, sample_size=9,
        down_block_types=['CrossAttnDownBlock2D', 'CrossAttnDownBlock2D',
                          'DownBlock2D'],
        up_block_types=['UpBlock2D', 'CrossAttnUpBlock2D',
                        'CrossAttnUpBlock2D']),
    'mixed': dict(
        block_out_channels=[16, 32], layers_per_block=[2, 1],
        norm_num_groups=4, attention_head_dim=2, cross_attention_dim=8,
        only_cross_attention=[False, True], transformer_layers_per_block=2,
        downsample_padding=0, mid_block_scale_factor=1.5,
        time_embedding_dim=48, conv_in_kernel=1, conv_out_kernel=5,
        in_channels=3, out_channels=5, sample_size=8,
        down_block_types=['DownBlock2D', 'CrossAttnDownBlock2D'],
        up_block_types=['CrossAttnUpBlock2D', 'UpBlock2D']),
}
# (batch, height, width, context length, timesteps, with a context mask).
INPUTS = {
    'sd1': (2, 8, 8, 5, [999.0, 37.25], True),
    'sd2': (1, 9, 11, 6, [500.5], False),
    'mixed': (2, 8, 8, 3, [1.0, 250.0], False),
}

SD15 = unet2d.SD15_CONFIG
SD21 = dict(SD15, sample_size=96, attention_head_dim=[5, 10, 20, 20],
            cross_attention_dim=1024, use_linear_projection=True,
            upcast_attention=True)
SD15_PARAMS = 859_520_964


def _randomize(model, seed):
  """Moves every parameter off its init (norm affines too), so that a
  misplaced scale or bias changes the outputs."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if 'norm' in name and name.endswith('weight'):
        p.copy_(1.0 + 0.3 * noise)
      elif name.endswith('bias'):
        p.copy_(0.3 * noise)
      else:
        p.mul_(1.0 + 0.3 * noise)
  return model.eval()


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(t):
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def case(request, tmp_path_factory):
  """Config name, the torch model, the loaded Flax module and params, the
  inputs and diffusers' prediction."""
  name = request.param
  torch.manual_seed(0)
  model = _randomize(diffusers.UNet2DConditionModel.from_config(
      CONFIGS[name]), 1)
  folder = tmp_path_factory.mktemp(f'unet_{name}')
  model.save_pretrained(str(folder))
  module, params = unet2d.load(str(folder))
  b, hgt, wid, length, t, masked = INPUTS[name]
  rng = np.random.RandomState(0)
  x = rng.randn(b, hgt, wid, module.in_channels).astype(np.float32)
  ctx = rng.randn(b, length, module.cross_attention_dim).astype(np.float32)
  t = np.asarray(t, np.float32)
  mask = None
  if masked:
    mask = np.ones((b, length), bool)
    mask[0, 3:] = False
  with torch.no_grad():
    want = model(
        _nchw(x), torch.from_numpy(t), torch.from_numpy(ctx),
        encoder_attention_mask=(None if mask is None
                                else torch.from_numpy(mask))).sample
  return dict(name=name, torch=model, module=module, params=params, x=x,
              t=t, ctx=ctx, mask=mask, want=_nhwc(want))


def _predict(module, params, x, t, ctx, mask=None):
  fn = jax.jit(lambda p, x, t, c, m: module.apply({'params': p}, x, t, c, m))
  return np.asarray(fn(params, x, t, ctx, mask))


def test_prediction_matches_diffusers(case):
  got = _predict(case['module'], case['params'], case['x'], case['t'],
                 case['ctx'], case['mask'])
  want = case['want']
  assert got.shape == want.shape
  assert 0.5 < np.abs(want).max() < 20, np.abs(want).max()
  err = np.abs(got - want).max()
  print(f'{case["name"]}: max |diff| {err:.2e}, max |want| '
        f'{np.abs(want).max():.2f}')
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_module_fields_from_config(case):
  module, cfg = case['module'], CONFIGS[case['name']]
  n = len(cfg['block_out_channels'])
  heads = cfg['attention_head_dim']
  assert tuple(module.num_attention_heads) == tuple(
      heads if isinstance(heads, list) else [heads] * n)
  assert module.sample_size == cfg['sample_size']
  assert module.in_channels == cfg.get('in_channels', 4)
  assert module.out_channels == cfg.get('out_channels', 4)


@pytest.mark.parametrize('option, value', [
    ('class_embed_type', 'timestep'),
    ('addition_embed_type', 'text_time'),
    ('resnet_time_scale_shift', 'scale_shift'),
    ('num_attention_heads', 8),
    ('time_embedding_type', 'fourier'),
    ('down_block_types', ['AttnDownBlock2D', 'DownBlock2D']),
    ('mid_block_type', 'UNetMidBlock2DSimpleCrossAttn'),
    ('cross_attention_dim', [24, 32]),
])
def test_unsupported_option_is_named(option, value):
  with pytest.raises(ValueError, match=option):
    unet2d.module_kwargs(dict(CONFIGS['sd1'], **{option: value}))


def test_unsupported_class_is_named():
  with pytest.raises(ValueError, match='UNet2DConditionModel'):
    unet2d.module_kwargs(dict(CONFIGS['sd1'],
                              _class_name='UNetSpatioTemporalConditionModel'))


def _meta_state_shapes(cfg):
  with torch.device('meta'):
    model = diffusers.UNet2DConditionModel.from_config(cfg)
  return {k: tuple(v.shape) for k, v in model.state_dict().items()}, model


@pytest.mark.parametrize('cfg', [SD15, SD21], ids=['sd15', 'sd21'])
def test_full_size_keys_map(cfg):
  """Every state-dict key of the real config maps onto the Flax tree with
  its shape (no weights: meta device and jax.eval_shape)."""
  shapes, model = _meta_state_shapes(cfg)
  module = unet2d.build(cfg)
  abstract = unet2d.abstract_params(module)
  entries = convert.plan(shapes, abstract, unet2d.TABLE)
  assert len(entries) == len(shapes)
  torch_count = sum(p.numel() for p in model.parameters())
  assert convert.count(abstract) == torch_count
  if cfg is SD15:
    assert torch_count == SD15_PARAMS
    assert module.num_attention_heads == (8, 8, 8, 8)
  else:
    assert module.num_attention_heads == (5, 10, 20, 20)


# Block parity at inputs where the details show: activations of scale 1e-3
# make every GroupNorm / LayerNorm epsilon matter (variance ~ eps), and a
# feed-forward gate of order 3 separates exact from tanh GELU by ~1e-3.
SMALL = 1e-3


def _block_params(torch_block, flax_block, *inputs):
  abstract = jax.eval_shape(flax_block.init, jax.random.PRNGKey(0),
                            *inputs)['params']
  state = {k: v.detach().numpy() for k, v in torch_block.state_dict().items()}
  return convert.convert(state, abstract, convert.RuleTable('block'))


def _block_case(torch_block, flax_block, torch_inputs, flax_inputs):
  params = _block_params(torch_block, flax_block, *flax_inputs)
  with torch.no_grad():
    want = torch_block(*torch_inputs)
  want = getattr(want, 'sample', want)
  want = want[0] if isinstance(want, tuple) else want
  got = jax.jit(lambda p, *a: flax_block.apply({'params': p}, *a))(
      params, *flax_inputs)
  return np.asarray(got), want.detach().numpy()


def test_resnet_block_matches_diffusers_at_small_scale():
  from diffusers.models import resnet  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  block = _randomize(resnet.ResnetBlock2D(
      in_channels=8, out_channels=16, temb_channels=12, groups=4,
      eps=1e-5), 2)
  rng = np.random.RandomState(1)
  x = (SMALL * rng.randn(2, 5, 3, 8)).astype(np.float32)
  temb = rng.randn(2, 12).astype(np.float32)
  got, want = _block_case(
      block, sd_blocks.ResnetBlock2D(16, groups=4, eps=1e-5),
      (_nchw(x), torch.from_numpy(temb)), (x, temb))
  want = want.transpose(0, 2, 3, 1)
  assert 0.5 < np.abs(want).max() < 20
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_transformer_matches_diffusers_at_small_scale():
  """Transformer2DModel (GroupNorm eps 1e-6) on inputs of scale 1e-3."""
  torch.manual_seed(0)
  block = _randomize(diffusers.Transformer2DModel(
      num_attention_heads=2, attention_head_dim=8, in_channels=16,
      norm_num_groups=4, cross_attention_dim=12), 3)
  rng = np.random.RandomState(2)
  x = (SMALL * rng.randn(2, 5, 3, 16)).astype(np.float32)
  ctx = rng.randn(2, 4, 12).astype(np.float32)
  got, want = _block_case(
      block, sd_blocks.Transformer2D(heads=2, dim_head=8, groups=4),
      (_nchw(x), torch.from_numpy(ctx)), (x, ctx))
  want = want.transpose(0, 2, 3, 1)
  assert 0.5 < np.abs(want).max() < 20
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_transformer_block_matches_diffusers_at_small_scale():
  """BasicTransformerBlock: LayerNorm eps 1e-5 on tokens of scale 1e-3,
  exact GELU on a gate of order 3."""
  from diffusers.models import attention  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  block = _randomize(attention.BasicTransformerBlock(
      16, 2, 8, cross_attention_dim=12), 4)
  with torch.no_grad():
    block.ff.net[0].proj.weight.mul_(4.0)
  rng = np.random.RandomState(3)
  x = (SMALL * rng.randn(2, 7, 16)).astype(np.float32)
  ctx = rng.randn(2, 4, 12).astype(np.float32)
  got, want = _block_case(
      block, sd_blocks.BasicTransformerBlock(2, 8),
      (torch.from_numpy(x), None, torch.from_numpy(ctx)), (x, ctx))
  assert 0.5 < np.abs(want).max() < 50
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_remat_and_bfloat16_trace(case):
  """The remat policies with their own wrappers ('full': each block and
  level under nn.remat with a static upsample size; 'dots_saveable': one
  checkpoint with a policy) trace the gradient with the same parameter tree;
  bfloat16 compute returns float32 predictions. Abstract (jax.eval_shape):
  nothing compiles."""
  args = tuple(jnp.asarray(a) for a in (case['x'], case['t'], case['ctx']))
  for remat in ('full', 'dots_saveable'):
    module = case['module'].clone(remat=remat)

    def loss(p, m=module):
      return jnp.sum(m.apply({'params': p}, *args) ** 2)
    grads = jax.eval_shape(jax.grad(loss), case['params'])
    assert jax.tree.structure(grads) == jax.tree.structure(case['params'])
  out = jax.eval_shape(case['module'].clone(dtype='bfloat16').apply,
                       {'params': case['params']}, *args)
  assert out.dtype == jnp.float32 and out.shape == case['want'].shape
