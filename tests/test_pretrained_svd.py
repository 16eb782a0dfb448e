"""SVD's UNet (diffusers' UNetSpatioTemporalConditionModel) against PyTorch.

Tiny random models built from configs, saved in diffusers layout and loaded
by vdm_jax.pretrained.svd predict as diffusers 0.42.1 does (<= 1e-5 in
float32, outputs of order 1); the full-size SVD UNet is checked on the meta
device (every key maps with its shape; 1,524,623,082 parameters; Generative
Inbetweening's trainable set of 24,780,800). The controlled temporal
attention's probabilities are captured and injected.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusers  # pylint: disable=g-bad-import-order
import torch  # pylint: disable=g-bad-import-order

from vdm_jax import denoiser  # pylint: disable=g-import-not-at-top
from vdm_jax import sampling  # pylint: disable=g-import-not-at-top
from vdm_jax import schedules  # pylint: disable=g-import-not-at-top
from vdm_jax.models import layers  # pylint: disable=g-import-not-at-top
from vdm_jax.models import svd_unet  # pylint: disable=g-import-not-at-top
from vdm_jax.pretrained import convert  # pylint: disable=g-import-not-at-top
from vdm_jax.pretrained import svd  # pylint: disable=g-import-not-at-top
import svd_fixtures  # pylint: disable=g-import-not-at-top

TOL = 1e-5
_CROSS_DOWN, _DOWN = ('CrossAttnDownBlockSpatioTemporal',
                      'DownBlockSpatioTemporal')
_CROSS_UP, _UP = 'CrossAttnUpBlockSpatioTemporal', 'UpBlockSpatioTemporal'
# Two tiny configs that together use every block type and option:
# 'svd': SVD's layout (attention levels, a plain deepest level), one
#   transformer layer (only the controlled temporal attention), batch 2
#   with distinct c_noise and added time ids.
# 'mixed': a plain level first, then an attention level, 2 transformer
#   layers (a second, uncontrolled temporal attention), layers_per_block
#   per level, odd non-square latents (5x7 -> 3x4 and back up to the
#   skip's size), 4 ids of width 4, other in/out channels.
CONFIGS = {
    'svd': dict(
        block_out_channels=[32, 64], layers_per_block=1,
        num_attention_heads=[2, 4], cross_attention_dim=16,
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=24,
        num_frames=3, sample_size=8, down_block_types=[_CROSS_DOWN, _DOWN],
        up_block_types=[_UP, _CROSS_UP]),
    'mixed': dict(
        block_out_channels=[32, 64], layers_per_block=[2, 1],
        num_attention_heads=[1, 2], cross_attention_dim=8,
        transformer_layers_per_block=2, addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=16, num_frames=2,
        in_channels=6, out_channels=5, sample_size=5,
        down_block_types=[_DOWN, _CROSS_DOWN],
        up_block_types=[_CROSS_UP, _UP]),
}
# (batch, frames, height, width, c_noise, added time ids).
INPUTS = {
    'svd': (2, 3, 8, 8, [1.2, -0.7], [[6, 127, 0.02], [3, 30, 0.5]]),
    'mixed': (1, 2, 5, 7, [0.4], [[6, 127, 0.02, 2]]),
}
SVD_XT = svd.SVD_XT_CONFIG
SVD_PARAMS = 1_524_623_082
INBETWEEN_TRAINABLE = 24_780_800


def randomize(model, seed):
  """Moves every parameter off its init (norm affines, AlphaBlenders'
  mix factors too), so that a misplaced scale or bias shows."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if 'norm' in name and name.endswith('weight'):
        p.copy_(1.0 + 0.3 * noise)
      elif name.endswith('bias') or name.endswith('mix_factor'):
        p.copy_(0.3 * noise)
      else:
        p.mul_(1.0 + 0.3 * noise)
  return model.eval()


def _to_torch(x):  # [B, F, H, W, C] -> [B, F, C, H, W]
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3)))


@pytest.fixture(scope='module', params=sorted(CONFIGS))
def case(request, tmp_path_factory):
  """The torch model, the loaded Flax module and params, inputs, output."""
  name = request.param
  torch.manual_seed(0)
  model = randomize(diffusers.UNetSpatioTemporalConditionModel.from_config(
      CONFIGS[name]), 1)
  folder = tmp_path_factory.mktemp(f'svd_unet_{name}')
  model.save_pretrained(str(folder))
  module, params = svd.load(str(folder))
  b, f, h, w, t, ids = INPUTS[name]
  rng = np.random.RandomState(0)
  x = rng.randn(b, f, h, w, module.in_channels).astype(np.float32)
  ctx = rng.randn(b, 1, module.cross_attention_dim).astype(np.float32)
  t, ids = np.asarray(t, np.float32), np.asarray(ids, np.float32)
  with torch.no_grad():
    want = model(_to_torch(x), torch.from_numpy(t), torch.from_numpy(ctx),
                 torch.from_numpy(ids)).sample
  return dict(name=name, module=module, params=params, args=(x, t, ctx, ids),
              want=want.numpy().transpose(0, 1, 3, 4, 2))


# 'svd' is checked by test_attention_capture_and_injection (one compile).
@pytest.mark.parametrize(
    'case', [n for n in sorted(CONFIGS) if n != 'svd'], indirect=True)
def test_prediction_matches_diffusers(case):
  got = np.asarray(jax.jit(
      lambda p, *a: case['module'].apply({'params': p}, *a))(
          case['params'], *case['args']))
  want = case['want']
  assert got.shape == want.shape
  assert 0.5 < np.abs(want).max() < 20, np.abs(want).max()
  print(f'{case["name"]}: max |diff| {np.abs(got - want).max():.2e}')
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


@pytest.mark.parametrize('case', ['svd'], indirect=True)  # One suffices.
def test_attention_capture_and_injection(case):
  """Capturing gives [B, H*W, heads, F, F] rows that sum to 1 at every
  controlled attention (the first temporal block of each transformer, not
  the second); injecting what was captured reproduces the prediction;
  injecting the maps rotated by 180 degrees changes it."""
  module, params, args = case['module'], case['params'], case['args']

  @jax.jit
  def capture(p):
    return module.apply({'params': p}, *args, mutable=[layers.CAPTURE])

  @jax.jit
  def inject(p, probs):
    return module.apply({'params': p, layers.INJECT: probs}, *args)

  pred, state = capture(params)
  np.testing.assert_allclose(np.asarray(pred), case['want'], rtol=0,
                             atol=TOL)
  probs = state[layers.CAPTURE]
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(probs))
  paths = {k[:-2] for k in flat}
  assert all(k[-2:] == (svd_unet.CONTROLLED[1], layers.PROBS)
             and k[-3] == svd_unet.CONTROLLED[0] for k in flat)
  assert len(paths) == sum(1 for k in flax.traverse_util.flatten_dict(
      params) if k[-4:-1] == svd_unet.CONTROLLED + ('to_v',))
  b, f = args[0].shape[:2]
  for p in flat.values():
    assert p.shape[0] == b and p.shape[-2:] == (f, f)
    np.testing.assert_allclose(np.asarray(p).sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(inject(params, probs)),
                             np.asarray(pred), rtol=0, atol=TOL)
  rotated = jax.tree.map(lambda a: jnp.flip(a, (-2, -1)), probs)
  assert np.abs(np.asarray(inject(params, rotated)) - np.asarray(pred)).max(
  ) > 1e-3


@pytest.mark.parametrize('option, value', [
    ('down_block_types', ['CrossAttnDownBlock2D', _DOWN]),
    ('up_block_types', [_UP, 'CrossAttnUpBlock3D']),
    ('cross_attention_dim', [16, 24]),
    ('_class_name', 'UNet2DConditionModel'),
])
def test_unsupported_option_is_named(option, value):
  with pytest.raises(ValueError, match=option):
    svd.module_kwargs(dict(CONFIGS['svd'], **{option: value}))


def test_full_size_keys_map_and_counts():
  """Every state-dict key of SVD's config maps onto the Flax tree with its
  shape; 1,524,623,082 parameters; Gen-Inb's trainable set 24,780,800."""
  with torch.device('meta'):
    model = diffusers.UNetSpatioTemporalConditionModel.from_config(SVD_XT)
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  module = svd.build(SVD_XT)
  abstract = svd.abstract_params(module)
  entries = convert.plan(shapes, abstract, svd.TABLE)
  assert len(entries) == len(shapes)
  assert convert.count(abstract) == SVD_PARAMS
  assert sum(p.numel() for p in model.parameters()) == SVD_PARAMS
  flat = flax.traverse_util.flatten_dict(abstract)
  trainable = [k for k in flat if svd_unet.trainable_inbetween(k)]
  assert len(trainable) == 32
  assert sum(int(np.prod(flat[k].shape)) for k in trainable) == (
      INBETWEEN_TRAINABLE)
  torch_names = {e['source'] for e in entries
                 if svd_unet.trainable_inbetween(e['target'])}
  assert all(n.endswith(('temporal_transformer_blocks.0.attn1.to_v.weight',
                         'temporal_transformer_blocks.0.attn1.to_out.0.weight'))
             for n in torch_names)


@pytest.mark.parametrize('case', ['svd'], indirect=True)  # One suffices.
def test_remat_and_bfloat16_trace(case):
  """The remat policies trace the gradient with the same parameter tree;
  bfloat16 compute returns float32. Abstract: nothing compiles."""
  args = tuple(jnp.asarray(a) for a in case['args'])
  for remat in svd_unet.REMAT[1:]:
    module = case['module'].clone(remat=remat)

    def loss(p, m=module):
      return jnp.sum(m.apply({'params': p}, *args) ** 2)
    grads = jax.eval_shape(jax.grad(loss), case['params'])
    assert jax.tree.structure(grads) == jax.tree.structure(case['params'])
  out = jax.eval_shape(case['module'].clone(dtype='bfloat16').apply,
                       {'params': case['params']}, *args)
  assert out.dtype == jnp.float32


SVD_SCHEDULER = dict(svd_fixtures.SVD_SCHEDULER,
                     _class_name='EulerDiscreteScheduler')


@pytest.mark.parametrize('steps', [25, 4])
def test_karras_grid_matches_diffusers(steps):
  sched = diffusers.EulerDiscreteScheduler.from_config(SVD_SCHEDULER)
  sched.set_timesteps(steps)
  grid = schedules.karras_grid(SVD_SCHEDULER, steps)
  np.testing.assert_allclose(grid['sigmas'], sched.sigmas.numpy(), rtol=1e-6)
  np.testing.assert_allclose(grid['timesteps'], sched.timesteps.numpy(),
                             rtol=0, atol=1e-6)
  sigma0 = float(sched.sigmas[0])
  assert grid['init_scale'] == pytest.approx(
      float(sched.init_noise_sigma) / (sigma0 ** 2 + 1) ** 0.5, rel=1e-6)
  assert np.isinf(grid['logsnrs'][-1]) and grid['denoise_last']
  np.testing.assert_allclose(np.exp(-0.5 * grid['logsnrs'][:-1]),
                             grid['sigmas'][:-1], rtol=1e-6)


class _ToyV(nn.Module):
  """A stand-in network F(x, c_noise, context, ids) with SVD's arguments."""

  @nn.compact
  def __call__(self, x, c_noise, context, ids):
    w = self.param('w', nn.initializers.constant(0.7), (1,))
    c = x.shape[-1] // 2
    per_example = 0.1 * c_noise + context.mean((1, 2)) + 0.01 * ids.sum(1)
    return jnp.tanh(w * x[..., :c] + 0.3 * x[..., c:]
                    + per_example[:, None, None, None, None])


def test_edm_denoiser_and_ddim_equal_diffusers_euler():
  """EDMApply (c_in, c_skip, c_out, c_noise, v) sampled with the library's
  DDIM on karras_grid equals diffusers' EulerDiscreteScheduler loop
  (scale_model_input, step) with the same network, from the same latents,
  with SVD's per-frame guidance ramp."""
  steps, shape = 6, (1, 3, 2, 2, 2)
  rng = np.random.RandomState(0)
  init = rng.randn(*shape).astype(np.float32)
  image = rng.randn(1, 2, 2, 2).astype(np.float32)
  embed = rng.randn(1, 1, 4).astype(np.float32)
  ids = np.asarray([[6, 127, 0.02]], np.float32)
  scale = np.linspace(1.0, 3.0, shape[1], dtype=np.float32)

  def toy_torch(x, c_noise, img, emb):
    c = x[..., :2]
    return torch.tanh(0.7 * c + 0.3 * img + 0.1 * c_noise + emb.mean()
                      + 0.01 * float(ids.sum()))

  sched = diffusers.EulerDiscreteScheduler.from_config(SVD_SCHEDULER)
  sched.set_timesteps(steps)
  lat = torch.from_numpy(init) * sched.init_noise_sigma
  img = torch.from_numpy(image)[:, None].expand(shape)
  with torch.no_grad():
    for t in sched.timesteps:
      x_in = sched.scale_model_input(lat, t)
      pred_u = toy_torch(torch.cat([x_in, 0 * img], -1), t, 0 * img,
                         torch.zeros(1))
      pred_c = toy_torch(torch.cat([x_in, img], -1), t, img,
                         torch.from_numpy(embed))
      pred = pred_u + torch.from_numpy(scale)[None, :, None, None, None] * (
          pred_c - pred_u)
      lat = sched.step(pred, t, lat).prev_sample
  grid = schedules.karras_grid(SVD_SCHEDULER, steps)
  module = _ToyV()
  fn = denoiser.make_edm_denoise_fn(module, {'w': jnp.full((1,), 0.7)})
  got = sampling.sample(
      sampling.image_guided(fn, scale), jax.random.PRNGKey(0), shape,
      logsnr_fn=None, target='v',
      spec=sampling.SamplerSpec(sampler='ddim', num_steps=steps, eta=0.0,
                                clip_x=False),
      cond={'image_latent': image, 'image_embed': embed,
            'added_time_ids': ids},
      z_init=jnp.asarray(init * grid['init_scale']),
      logsnrs=grid['logsnrs'], denoise_last=grid['denoise_last'])
  want = lat.numpy()
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)


@pytest.fixture(scope='module')
def svd_folder(tmp_path_factory):
  """A tiny SVD pipeline folder and the pipeline itself."""
  folder = str(tmp_path_factory.mktemp('svd_pipeline'))
  return folder, svd_fixtures.tiny_svd_pipeline(folder)


def test_image_to_video_matches_diffusers_pipeline(svd_folder):
  """From the same initial latents, image, settings and augmentation noise,
  vdm_jax's image_to_video gives StableVideoDiffusionPipeline's frames
  (<= 1e-4 in [0, 1]); decode_chunk_size 2 splits the 3 frames."""
  import PIL.Image  # pylint: disable=g-import-not-at-top
  from vdm_jax.pretrained import stable_video_diffusion as svdp  # pylint: disable=g-import-not-at-top
  folder, pipe = svd_folder
  img = svd_fixtures.first_frame()
  f, s = svd_fixtures.FRAMES, svd_fixtures.SIZE
  init = torch.randn((1, f, 4, s // 2, s // 2),
                     generator=torch.Generator().manual_seed(1))
  noise = torch.randn((1, 3, s, s), generator=torch.Generator().manual_seed(2))
  settings = dict(height=s, width=s, num_frames=f, decode_chunk_size=2,
                  noise_aug_strength=0.02, fps=7, motion_bucket_id=127)
  with torch.no_grad():
    want = np.asarray(pipe(
        image=PIL.Image.fromarray(img), num_inference_steps=4,
        latents=init.clone(), generator=torch.Generator().manual_seed(2),
        output_type='np', **settings).frames)
  model = svdp.load(folder)
  got, _ = svdp.image_to_video(
      model, (img / 255.0)[None].astype(np.float32), jax.random.PRNGKey(0),
      num_steps=4, init_latents=init.numpy(),
      aug_noise=noise.numpy().transpose(0, 2, 3, 1), **settings)
  assert got.shape == want.shape == (1, f, s, s, 3)
  assert want.std() > 0.1
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
