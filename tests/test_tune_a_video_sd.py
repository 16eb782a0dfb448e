"""Tune-A-Video on Stable Diffusion against a PyTorch reference of theirs.

The reference is their inflated UNet (showlab/Tune-A-Video,
tuneavideo/models/) rebuilt here from diffusers' modules with their three
changes: a sparse-causal attention processor on every attn1, the res
blocks' and conv_norm_out's GroupNorm run on the 5-D [B, C, F, H, W] tensor
(statistics over all frames), and the temporal block (norm_temp, attn_temp
after the feed-forward, no positional encoding). On a tiny random SD
folder (tests/sd_fixtures.py) vdm_jax's inflated UNet equals it to 1e-5 at
init and with the temporal attention perturbed. Then: identical frames and
single frames give SD's prediction; the trainable set and LoRA counts at
full SD-1.5 size (abstract); tuning leaves the frozen parameters bitwise
unchanged; tune -> invert -> edit end to end on the UCF101 clip in
tests/data; bad input is refused before anything compiles.
"""

import logging
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffusers  # pylint: disable=g-bad-import-order
import torch  # pylint: disable=g-bad-import-order

import sd_fixtures  # pylint: disable=g-import-not-at-top,wrong-import-order
from configs import tune_a_video_sd  # pylint: disable=g-import-not-at-top
from vdm_jax.adapt import edit_sd  # pylint: disable=g-import-not-at-top
from vdm_jax.adapt import inflate_sd  # pylint: disable=g-import-not-at-top
from vdm_jax.adapt import lora  # pylint: disable=g-import-not-at-top
from vdm_jax.adapt import tune_sd  # pylint: disable=g-import-not-at-top
from vdm_jax.adapt import tuned_sd  # pylint: disable=g-import-not-at-top
from vdm_jax.models import sd_blocks  # pylint: disable=g-import-not-at-top
from vdm_jax.pretrained import unet2d  # pylint: disable=g-import-not-at-top

TOL = 1e-5
FRAMES = 6
CLIP = os.path.join(os.path.dirname(__file__), 'data',
                    'v_CricketShot_g04_c01_rgb.gif')
SD15 = unet2d.SD15_CONFIG


class _PooledGroupNorm(torch.nn.Module):
  """Their GroupNorm on a 5-D tensor: (b f) c h w -> b c f h w -> norm."""

  def __init__(self, norm, frames):
    super().__init__()
    self.norm, self.frames = norm, frames

  def forward(self, x):
    n, c, h, w = x.shape
    v = x.reshape(n // self.frames, self.frames, c, h, w).transpose(1, 2)
    y = self.norm(v).transpose(1, 2)
    return y.reshape(n, c, h, w)


class _SparseCausalProcessor:
  """Their SparseCausalAttention.forward as a diffusers processor."""

  def __init__(self, frames):
    self.frames = frames

  def __call__(self, attn, hidden_states, encoder_hidden_states=None,
               attention_mask=None, **kwargs):
    del encoder_hidden_states, attention_mask, kwargs
    f = self.frames
    q = attn.to_q(hidden_states)
    k, v = attn.to_k(hidden_states), attn.to_v(hidden_states)
    former = torch.arange(f) - 1
    former[0] = 0

    def gather(t):
      t = t.reshape(-1, f, *t.shape[1:])
      t = torch.cat([t[:, [0] * f], t[:, former]], dim=2)
      return t.reshape(-1, *t.shape[2:])

    k, v = gather(k), gather(v)
    n, lq, _ = q.shape
    heads = attn.heads

    def split(t):
      return t.reshape(n, t.shape[1], heads, -1).transpose(1, 2)

    o = torch.nn.functional.scaled_dot_product_attention(
        split(q), split(k), split(v))
    o = o.transpose(1, 2).reshape(n, lq, -1)
    return attn.to_out[1](attn.to_out[0](o))


class _TemporalBlock(torch.nn.Module):
  """A BasicTransformerBlock followed by their temporal attention."""

  def __init__(self, block, frames):
    super().__init__()
    dim = block.norm1.normalized_shape[0]
    self.block, self.frames = block, frames
    self.attn_temp = diffusers.models.attention_processor.Attention(
        query_dim=dim, heads=block.attn1.heads,
        dim_head=dim // block.attn1.heads)
    self.norm_temp = torch.nn.LayerNorm(dim)

  def forward(self, hidden_states, *args, **kwargs):
    h = self.block(hidden_states, *args, **kwargs)
    n, d, c = h.shape
    f = self.frames
    h = h.reshape(n // f, f, d, c).transpose(1, 2).reshape(-1, f, c)
    h = self.attn_temp(self.norm_temp(h)) + h
    return h.reshape(n // f, d, f, c).transpose(1, 2).reshape(n, d, c)


def torch_inflated(unet, frames):
  """Their inflated UNet from a diffusers UNet2DConditionModel (in place).

  Returns {flax path of each transformer block: its _TemporalBlock}.
  """
  blocks = {}
  for name, module in list(unet.named_modules()):
    if isinstance(module, diffusers.models.resnet.ResnetBlock2D):
      module.norm1 = _PooledGroupNorm(module.norm1, frames)
      module.norm2 = _PooledGroupNorm(module.norm2, frames)
    if hasattr(module, 'transformer_blocks'):
      for i, block in enumerate(module.transformer_blocks):
        block.attn1.set_processor(_SparseCausalProcessor(frames))
        module.transformer_blocks[i] = _TemporalBlock(block, frames)
        blocks[_flax_path(name) + (f'transformer_blocks_{i}',)] = (
            module.transformer_blocks[i])
  unet.conv_norm_out = _PooledGroupNorm(unet.conv_norm_out, frames)
  return blocks


def _flax_path(torch_name):
  parts, out = torch_name.split('.'), []
  for p in parts:
    if p.isdigit():
      out[-1] += f'_{p}'
    else:
      out.append(p)
  return tuple(out)


def copy_temporal(params, blocks):
  """Writes the Flax attn_temp / norm_temp parameters into the torch
  reference's temporal blocks."""
  flat = flax.traverse_util.flatten_dict(params)
  with torch.no_grad():
    for path, block in blocks.items():
      def get(*rest, p=path):
        return torch.from_numpy(np.array(flat[p + rest]))
      for name in ('to_q', 'to_k', 'to_v'):
        getattr(block.attn_temp, name).weight.copy_(
            get('attn_temp', name, 'kernel').T)
      block.attn_temp.to_out[0].weight.copy_(
          get('attn_temp', 'to_out_0', 'kernel').T)
      block.attn_temp.to_out[0].bias.copy_(
          get('attn_temp', 'to_out_0', 'bias'))
      block.norm_temp.weight.copy_(get('norm_temp', 'scale'))
      block.norm_temp.bias.copy_(get('norm_temp', 'bias'))


def perturb_temporal(params, seed=1):
  """Every attn_temp / norm_temp parameter moved well off its init."""
  flat = flax.traverse_util.flatten_dict(params)
  rng = np.random.RandomState(seed)
  for k, v in flat.items():
    if inflate_sd.is_temporal(k):
      scale = 1.0 / np.sqrt(v.shape[0]) if v.ndim == 2 else 0.3
      flat[k] = v + jnp.asarray(scale * rng.randn(*v.shape), jnp.float32)
  return flax.traverse_util.unflatten_dict(flat)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """The tiny SD folder, its UNet (Flax, inflated) and inputs."""
  folder = str(tmp_path_factory.mktemp('tav_sd'))
  pipe = sd_fixtures.tiny_sd_pipeline(folder)
  module, sd_params = unet2d.load(folder)
  video = inflate_sd.inflate_module(module)
  params = inflate_sd.inflate_params(sd_params, video, jax.random.key(0))
  rng = np.random.RandomState(0)
  x = rng.randn(2, FRAMES, 8, 8, 4).astype(np.float32)
  ctx = rng.randn(2, 5, 32).astype(np.float32)
  t = np.asarray([900.0, 37.0], np.float32)
  return dict(folder=folder, pipe=pipe, module=module, sd_params=sd_params,
              video=video, params=params, x=x, ctx=ctx, t=t)


_JITTED = {}


def _apply(module, params, x, t, ctx):
  key = (module.inflated, module.frame_norm)
  if key not in _JITTED:
    _JITTED[key] = jax.jit(module.apply)
  return np.asarray(_JITTED[key]({'params': params}, x, t, ctx))


def _reference(tiny, params):
  unet = diffusers.UNet2DConditionModel.from_pretrained(
      os.path.join(tiny['folder'], 'unet')).eval()
  copy_temporal(params, torch_inflated(unet, FRAMES))
  b, f = tiny['x'].shape[:2]
  x = torch.from_numpy(tiny['x'].reshape(b * f, 8, 8, 4)).permute(0, 3, 1, 2)
  with torch.no_grad():
    out = unet(x, torch.from_numpy(np.repeat(tiny['t'], f)),
               torch.from_numpy(np.repeat(tiny['ctx'], f, axis=0))).sample
  return out.permute(0, 2, 3, 1).numpy().reshape(b, f, 8, 8, 4)


@pytest.mark.parametrize('perturbed', [False, True],
                         ids=['init', 'perturbed'])
def test_inflated_unet_matches_their_reference(tiny, perturbed):
  params = perturb_temporal(tiny['params']) if perturbed else tiny['params']
  want = _reference(tiny, params)
  got = _apply(tiny['video'], params, tiny['x'], tiny['t'], tiny['ctx'])
  assert 0.5 < np.abs(want).max() < 20
  np.testing.assert_allclose(got, want, rtol=0, atol=TOL)


def test_temporal_output_starts_at_zero(tiny):
  """Weight and bias of every attn_temp.to_out.0 are zero (their code
  zeroes the weight only)."""
  flat = flax.traverse_util.flatten_dict(tiny['params'])
  outs = [v for k, v in flat.items() if 'attn_temp' in k and
          'to_out_0' in k]
  assert len(outs) == 2 * 4  # Kernel and bias of 4 transformer blocks.
  assert all(not np.any(np.asarray(v)) for v in outs)


@pytest.mark.parametrize('frame_norm', ['pooled', 'per_frame'])
@pytest.mark.parametrize('frames', [FRAMES, 1])
def test_still_clip_equals_sd(tiny, frame_norm, frames):
  """A clip of one repeated frame (or a single frame) is SD's prediction
  for that frame, in either GroupNorm mode."""
  video = inflate_sd.inflate_module(tiny['module'], frame_norm)
  x = np.repeat(tiny['x'][:, :1], frames, axis=1)
  got = _apply(video, tiny['params'], x, tiny['t'], tiny['ctx'])
  want = _apply(tiny['module'], tiny['sd_params'], tiny['x'][:, 0],
                tiny['t'], tiny['ctx'])
  np.testing.assert_allclose(got, np.repeat(want[:, None], frames, 1),
                             rtol=0, atol=TOL)


def test_per_frame_norm_differs_on_a_moving_clip(tiny):
  video = inflate_sd.inflate_module(tiny['module'], 'per_frame')
  pooled = _apply(tiny['video'], tiny['params'], tiny['x'], tiny['t'],
                  tiny['ctx'])
  per_frame = _apply(video, tiny['params'], tiny['x'], tiny['t'],
                     tiny['ctx'])
  assert np.abs(pooled - per_frame).max() > 1e-2


def test_full_size_trainable_and_lora_counts():
  """SD-1.5 inflated, abstract: their added and trainable counts; LoRA."""
  video = inflate_sd.inflate_module(unet2d.build(SD15))
  abstract = inflate_sd.abstract_params(video)
  assert inflate_sd.count(abstract) == 859_520_964 + 49_599_040
  tuned, frozen = inflate_sd.split(abstract, 'attention_queries')
  assert inflate_sd.count(tuned) == 74_354_880
  flat = flax.traverse_util.flatten_dict(tuned)
  assert not any('norm_temp' in k for k in flat)
  assert {k[-2] for k in flat if 'attn_temp' not in k} == {'to_q'}
  # r (in + out) on q, k, v, out of attn1, attn2 (k, v from 768) and
  # attn_temp of 16 blocks whose widths sum to 5*320 + 5*640 + 6*1280.
  r = 4
  widths = 5 * 320 + 5 * 640 + 6 * 1280
  assert lora.expected_count(abstract, r) == (
      r * (22 * widths + 2 * 768 * 16)) == 1_196_544
  shapes = jax.eval_shape(lambda: lora.init(abstract, jax.random.key(0), r))
  assert inflate_sd.count(shapes) == 1_196_544
  assert inflate_sd.count(frozen) + 74_354_880 == inflate_sd.count(abstract)


def test_lora_starts_at_base_and_scales_as_peft(tiny):
  factors = lora.init(tiny['params'], jax.random.key(1), rank=2)
  assert inflate_sd.count(factors) == lora.expected_count(tiny['params'], 2)
  merged = lora.apply(tiny['params'], factors, 1.0)
  base = _apply(tiny['video'], tiny['params'], tiny['x'], tiny['t'],
                tiny['ctx'])
  np.testing.assert_array_equal(
      _apply(tiny['video'], merged, tiny['x'], tiny['t'], tiny['ctx']), base)
  # One layer against peft's formula W + (alpha / r) B A with alpha = 6.
  rng = np.random.RandomState(0)
  w = rng.randn(8, 5).astype(np.float32)  # Flax [in, out].
  a = rng.randn(8, 2).astype(np.float32)
  b = rng.randn(2, 5).astype(np.float32)
  tree = {'attn1': {'to_q': {'kernel': w}}}
  got = lora.apply(tree, {'attn1': {'to_q': {'lora_a': a, 'lora_b': b}}},
                   6 / 2)['attn1']['to_q']['kernel']
  x = torch.from_numpy(rng.randn(3, 8).astype(np.float32))
  lin = torch.nn.Linear(8, 5, bias=False)
  with torch.no_grad():
    lin.weight.copy_(torch.from_numpy(w.T))
    want = lin(x) + (6 / 2) * (x @ torch.from_numpy(a)) @ torch.from_numpy(b)
  np.testing.assert_allclose(x.numpy() @ np.asarray(got), want.numpy(),
                             rtol=1e-5, atol=1e-5)


def _config(folder, **overrides):
  config = tune_a_video_sd.get_config('tiny')
  config.pretrained.path = folder
  config.tune.video = CLIP
  config.tune.caption = 'a red square moving left'
  config.tune.height = config.tune.width = 16
  config.optimizer.learning_rate = 1e-3
  config.sample.prompt = 'a dog riding a horse'
  config.sample.num_steps = 10
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def _toy_eps(z, timestep):
  """A smooth stand-in for a UNet's noise prediction at a timestep."""
  return np.tanh(z) * (0.5 + timestep / 1000.0) + 0.1


def test_inversion_and_ddim_equal_their_loops():
  """ddim_invert(model_at_next=True) on the SD DDIM grid is their
  ddim_loop / next_step (tuneavideo/util.py), and sampling from its result
  is DDIMScheduler.step's loop, with a toy eps model (10 steps)."""
  from vdm_jax import sampling  # pylint: disable=g-import-not-at-top
  from vdm_jax import schedules  # pylint: disable=g-import-not-at-top
  config = dict(sd_fixtures.SD15_SCHEDULER)
  sched = diffusers.DDIMScheduler.from_config(config)
  sched.set_timesteps(10)
  acp = sched.alphas_cumprod.numpy().astype(np.float64)
  z0 = np.random.RandomState(0).randn(1, 2, 4, 4, 4)
  z = z0.copy()
  for t in sched.timesteps.numpy()[::-1]:  # Their next_step, verbatim.
    cur, nxt = min(t - 1000 // 10, 999), t
    a_t = acp[cur] if cur >= 0 else sched.final_alpha_cumprod.item()
    eps = _toy_eps(z, nxt)
    x0 = (z - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
    z = acp[nxt] ** 0.5 * x0 + (1 - acp[nxt]) ** 0.5 * eps
  want_inv = z
  for t in sched.timesteps:
    z = sched.step(torch.from_numpy(_toy_eps(z, float(t))), t,
                   torch.from_numpy(z)).prev_sample.numpy()
  want_regen = z

  schedule = schedules.from_scheduler_config(config)
  table = schedule.logsnr_table()
  grid = schedule.grid('ddim', 10)

  def denoise_fn(z, logsnr, cond):
    del cond
    t = schedules.discrete_timestep(logsnr, table)[:, None, None, None, None]
    return jnp.tanh(z) * (0.5 + t / 1000.0) + 0.1

  z_t = sampling.ddim_invert(denoise_fn, z0, logsnr_fn=None, target='eps',
                             logsnrs=grid['logsnrs'], model_at_next=True)
  np.testing.assert_allclose(np.asarray(z_t), want_inv, rtol=0, atol=TOL)
  regen = sampling.sample(
      denoise_fn, jax.random.key(0), z0.shape, logsnr_fn=None, target='eps',
      spec=sampling.SamplerSpec(sampler='ddim', num_steps=10, eta=0.0,
                                gamma=0.0, clip_x=False),
      z_init=z_t, logsnrs=grid['logsnrs'], denoise_last=grid['denoise_last'],
      logsnrs_to=grid.get('logsnrs_to'))
  np.testing.assert_allclose(np.asarray(regen), want_regen, rtol=0,
                             atol=TOL)


@pytest.fixture(scope='module')
def tuned(tiny, tmp_path_factory):
  """--mode=tune then --mode=sample (edit) on the tiny folder, its UNet's
  conv_out scaled by 1/50: a random UNet's eps varies so fast with z that
  DDIM inversion cannot be undone in 10 steps (max error 2 on latents of
  max 0.44 here); a slowly varying one, like a trained model's on its
  data, can."""
  import shutil  # pylint: disable=g-import-not-at-top
  folder = str(tmp_path_factory.mktemp('tav_sd_smooth'))
  shutil.rmtree(folder)
  shutil.copytree(tiny['folder'], folder)
  unet = diffusers.UNet2DConditionModel.from_pretrained(
      os.path.join(folder, 'unet'))
  with torch.no_grad():
    unet.conv_out.weight.mul_(0.02)
    unet.conv_out.bias.mul_(0.02)
  unet.save_pretrained(os.path.join(folder, 'unet'))
  workdir = str(tmp_path_factory.mktemp('tav_sd_run'))
  config = _config(folder)
  state = tune_sd.tune(config, workdir)
  paths = edit_sd.edit(config, workdir)
  return dict(config=config, workdir=workdir, state=state, paths=paths)


def test_tune_changes_only_the_trainable_set(tiny, tuned):
  record = tuned_sd.read_record(tuned['workdir'])
  assert int(tuned['state'].step) == 4
  from vdm_jax.pretrained import stable_diffusion  # pylint: disable=g-import-not-at-top
  sd = stable_diffusion.load(tuned['config'].pretrained.path)
  _, after, step, _ = tuned_sd.restore(sd, tuned['workdir'])
  _, before = tuned_sd.inflated(sd, record)
  assert step == 4
  before = flax.traverse_util.flatten_dict(before)
  after = flax.traverse_util.flatten_dict(after)
  assert set(before) == set(after)
  for k, v in before.items():
    same = np.array_equal(np.asarray(v), np.asarray(after[k]))
    assert same != inflate_sd.is_tuned(k, 'attention_queries'), k


def test_edit_reconstructs_and_writes(tuned):
  """Inversion with the empty prompt then regeneration gives back the
  source latents (10 DDIM steps; latents of std ~1): max error 0.1."""
  paths = tuned['paths']
  assert paths['reconstruction_error'] < 0.1, paths['reconstruction_error']
  data = np.load(paths['npz'])
  src = data['latents_source']
  assert src.shape == (1, 4, 8, 8, 4)
  assert data['videos'].shape == (1, 4, 16, 16, 3)
  assert os.path.isfile(paths['grid']) and len(paths['mp4']) == 1


def test_lora_split_trains_factors_only(tiny):
  """LoRA: the trained tree holds the factors only, the frozen one every
  base parameter."""
  record = dict(trainable='lora', lora_rank=2, seed=0)
  trained, frozen = tuned_sd.split_tuned(tiny['params'], record)
  assert frozen is tiny['params']
  assert inflate_sd.count(trained) == lora.expected_count(tiny['params'], 2)


def test_bad_input_before_compiling(tiny, tmp_path, caplog):
  folder = tiny['folder']
  with pytest.raises(ValueError, match='caption'):
    tune_sd.validate(_config(folder, **{'tune.caption': ' '}))
  with pytest.raises(ValueError, match='needs 101'):
    tune_sd.validate(_config(folder, **{'tune.num_frames': 51}))
  with pytest.raises(FileNotFoundError, match='model_index'):
    tune_sd.validate(_config(str(tmp_path)))
  bad = tmp_path / 'svd'
  os.makedirs(bad)
  index = open(os.path.join(folder, 'model_index.json')).read()
  (bad / 'model_index.json').write_text(index.replace(
      '"UNet2DConditionModel"', '"UNetSpatioTemporalConditionModel"'))
  with pytest.raises(ValueError, match='UNetSpatioTemporalConditionModel'):
    tune_sd.validate(_config(str(bad)))
  with caplog.at_level(logging.WARNING):
    frames = tune_sd.validate(_config(folder, **{'tune.height': 15}))
  assert frames.shape == (4, 16, 16, 3)
  assert 'not a multiple' in caplog.text
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    tuned_sd.check_prompts(folder, ['a red square ' * 40])
  assert 'truncated' in caplog.text


def test_one_clip_split_by_frames_equals_one_device(tiny):
  """Batch 1 on 8 devices: the frames are split over them and the state
  and frozen parameters sharded FSDP-style (tune_sd.layout 'frames'); one
  step gives the update of one device."""
  from vdm_jax import schedules  # pylint: disable=g-import-not-at-top
  from vdm_jax import training  # pylint: disable=g-import-not-at-top
  config = _config(tiny['folder'], **{'tune.num_frames': 8})
  schedule = schedules.from_scheduler_config(sd_fixtures.SD15_SCHEDULER)
  record = dict(trainable='attention_queries', lora_rank=4, seed=0)
  rng = np.random.RandomState(3)
  mean = rng.randn(1, 8, 8, 8, 4).astype(np.float32)
  batch = {'mean': mean, 'std': 0.1 * np.abs(mean),
           'text': rng.randn(1, 77, 32).astype(np.float32)}
  results = {}
  for name, devices in (('one', jax.devices()[:1]), ('eight', None)):
    place = tune_sd.layout(config, 8, devices)
    # Host copies: the step donates its state.
    trained, frozen = jax.tree.map(
        np.asarray, tuned_sd.split_tuned(tiny['params'], record))
    tx, lr_fn = training.create_optimizer(config)
    step = tune_sd.make_step(config, tiny['video'], schedule, place, tx,
                             lr_fn, trained, frozen)
    state = training.TrainState.create(trained, tx)
    state, frozen, data = jax.device_put(
        (state, frozen, {k: batch[k] for k in ('mean', 'std', 'text')}),
        (place.params(state), place.params(frozen),
         {'mean': place.latents(), 'std': place.latents(),
          'text': place.text()}))
    new, metrics = step(state, frozen, data, jax.random.key(0))
    results[name] = (place, new, metrics)
  place, new, _ = results['eight']
  assert place.split == 'frames' and place.mesh.size == 8
  assert results['one'][0].mesh.size == 1
  # The largest tuned weight is split in eight, not replicated.
  big = max(jax.tree.leaves(new.params), key=lambda x: x.size)
  assert big.addressable_shards[0].data.size * 8 == big.size
  for key in ('loss', 'grad_norm'):
    np.testing.assert_allclose(float(results['eight'][2][key]),
                               float(results['one'][2][key]), rtol=1e-5)
  # Adam's first step is lr * g / (|g| + eps): where |g| is tiny, rounding
  # moves it by a fraction of lr (1e-3); a wrong update moves it by ~lr.
  for a, b in zip(jax.tree.leaves(results['eight'][1].params),
                  jax.tree.leaves(results['one'][1].params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0,
                               atol=1e-5)


def test_edit_in_calls_of_batch_size_equals_one_call(tiny):
  """sample.batch_size bounds the videos per sampler call of the edit; the
  reconstruction and each edit come out as from one call."""
  from vdm_jax.pretrained import stable_diffusion  # pylint: disable=g-import-not-at-top
  sd = stable_diffusion.load(tiny['folder'])
  frames = np.random.RandomState(0).randint(
      0, 255, (FRAMES, 16, 16, 3)).astype(np.uint8)
  prompts = ['a dog riding a horse', 'a red square moving left']
  outs = [edit_sd.invert_and_edit(
      sd, tiny['video'], tiny['params'], frames, prompts, num_steps=3,
      guidance_scale=5.0, rng=jax.random.key(0), batch_size=b)
          for b in (0, 1)]
  assert outs[0]['edits'].shape[0] == 2
  for key in ('reconstruction', 'edits'):
    # float32 rounding differs with the batch (~2e-5 on latents of ~2).
    np.testing.assert_allclose(np.asarray(outs[1][key]),
                               np.asarray(outs[0][key]), rtol=1e-4,
                               atol=1e-4)
  # The calls differ in what they sample: the edits are not all one.
  assert np.abs(np.asarray(outs[0]['edits'][0] - outs[0]['edits'][1])
                ).max() > 1e-3
