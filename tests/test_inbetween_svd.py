"""Generative Inbetweening on a tiny random Stable Video Diffusion folder.

From the command line (main.main in-process): the backward tune trains
exactly the to_v / to_out_0 kernels of temporal_transformer_blocks_0/attn1
(everything else bitwise as loaded) and writes them with their difference;
in-betweening and image-to-video then run end to end. The tune's loss and
the fused denoiser are pinned to their code's formulas, written here from
train_reverse_motion_with_attnflip.py and the frame-interpolation pipeline
(jeanne-wang/svd_keyframe_interpolation) in diffusers' variance-exploding
terms, so that a flip, a keyframe or a map left out makes them fail.
"""

import os
import sys

from absl import flags
import flax
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

import diffusers  # pylint: disable=g-bad-import-order,unused-import
import torch  # pylint: disable=g-bad-import-order

from vdm_jax import main  # pylint: disable=g-import-not-at-top
from vdm_jax import sampling  # pylint: disable=g-import-not-at-top
from vdm_jax import sharding  # pylint: disable=g-import-not-at-top
from vdm_jax import video_io  # pylint: disable=g-import-not-at-top
from vdm_jax.adapt import inbetween_svd  # pylint: disable=g-import-not-at-top
from vdm_jax.models import svd_unet  # pylint: disable=g-import-not-at-top
from vdm_jax.pretrained import stable_video_diffusion as svdp  # pylint: disable=g-import-not-at-top
import svd_fixtures  # pylint: disable=g-import-not-at-top

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """The tiny SVD folder, two keyframes and a 6-frame video."""
  d = tmp_path_factory.mktemp('svd_inbetween')
  svd_fixtures.tiny_svd_pipeline(str(d / 'svd'))
  for i, name in enumerate(('a.png', 'b.png')):
    PIL.Image.fromarray(svd_fixtures.first_frame(i)).save(d / name)
  video_io.write_gif(str(d / 'v.gif'), np.stack(
      [np.roll(svd_fixtures.first_frame(0), i, axis=1) for i in range(6)]))
  return d


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
  monkeypatch.setattr(sharding, 'initialize_distributed',
                      lambda *args: None, raising=False)


def run_main(workdir, config, mode, *args):
  """`python -m vdm_jax.main --config=configs/svd.py... ` in-process."""
  argv = ['main', f'--config={ROOT}/configs/{config}', f'--workdir={workdir}',
          f'--mode={mode}', *args]
  saved, sys.argv = sys.argv, argv
  try:
    flags.FLAGS.unparse_flags()
    for name in list(flags.FLAGS):
      if name.startswith('config.'):
        delattr(flags.FLAGS, name)
    flags.FLAGS(argv)
    main.main(None)
  finally:
    sys.argv = saved


@pytest.fixture(scope='module')
def model(files):
  return svdp.load(str(files / 'svd'))


def test_tune_then_inbetween_from_the_command_line(files, model, tmp_path):
  common = [f'--config.pretrained.path={files / "svd"}',
            '--config.svd.height=16', '--config.svd.width=16']
  work = tmp_path / 'backward'
  run_main(work, 'svd.py:inbetween', 'tune_backward', *common,
           f'--config.tune.video={files / "v.gif"}',
           '--config.tune.num_frames=3', '--config.tune.backward_steps=2')
  record, tuned, delta = inbetween_svd.restore(str(work))
  assert record['step'] == 2
  flat = flax.traverse_util.flatten_dict(model.unet_params)
  want = {'/'.join(k) for k in flat if svd_unet.trainable_inbetween(k)}
  assert set(tuned) == set(delta) == want
  assert all(k.endswith(('temporal_transformer_blocks_0/attn1/to_v/kernel',
                         'temporal_transformer_blocks_0/attn1/to_out_0/'
                         'kernel')) for k in want)
  assert all(np.abs(d).max() > 0 for d in delta.values())
  merged = flax.traverse_util.flatten_dict(
      inbetween_svd.add_delta(delta, model.unet_params))
  for k, v in flat.items():  # Everything else bitwise as loaded.
    same = np.array_equal(np.asarray(merged[k]), np.asarray(v))
    assert same != ('/'.join(k) in want), k
  run_main(work, 'svd.py:inbetween', 'sample', *common,
           f'--config.sample.keyframes={files / "a.png"},{files / "b.png"}',
           '--config.sample.num_steps=2')
  out = work / 'samples' / 'svd' / 'inbetween'
  with np.load(out / 'samples.npz') as data:
    assert data['videos'].shape == (1, svd_fixtures.FRAMES, 16, 16, 3)
    assert data['latents'].shape == (1, svd_fixtures.FRAMES, 8, 8, 4)


def test_bad_input_is_refused_before_loading(files, tmp_path):
  common = [f'--config.pretrained.path={files / "svd"}']
  with pytest.raises(ValueError, match='differ in size'):
    small = tmp_path / 'small.png'
    PIL.Image.fromarray(svd_fixtures.first_frame(0, 8)).save(small)
    run_main(tmp_path, 'svd.py:inbetween', 'sample', *common,
             f'--config.sample.keyframes={files / "a.png"},{small}')
  with pytest.raises(FileNotFoundError, match='svd_backward.json'):
    run_main(tmp_path, 'svd.py:inbetween', 'sample', *common,
             f'--config.sample.keyframes={files / "a.png"},{files / "b.png"}')
  not_svd = tmp_path / 'sd'
  not_svd.mkdir()
  (not_svd / 'model_index.json').write_text(
      '{"_class_name": "StableDiffusionPipeline"}')
  with pytest.raises(ValueError, match='not Stable Video Diffusion'):
    run_main(tmp_path, 'svd.py', 'sample',
             f'--config.pretrained.path={not_svd}',
             f'--config.sample.input={files / "a.png"}')


def _cond(model, frame, noise):
  return svdp.conditioning(model, frame, None, fps=7, motion_bucket_id=127,
                           noise_aug_strength=0.02, height=16, width=16,
                           aug_noise=noise)


def _edm_apply(model, params, x_in, c_noise, cond, probs=None, store=False):
  """diffusers' unet(cat[x_in, image latent], c_noise, embed, ids) with the
  attention control of attn_ctrl/attention_control.py."""
  f = x_in.shape[1]
  img = jnp.broadcast_to(cond['image_latent'][:, None],
                         (x_in.shape[0], f) + cond['image_latent'].shape[1:])
  variables = {'params': params}
  if probs is not None:
    variables['attention_inject'] = probs
  out = model.unet.apply(variables, jnp.concatenate([x_in, img], -1),
                         c_noise, cond['image_embed'],
                         cond['added_time_ids'],
                         mutable=['attention_capture'] if store else False)
  return out


def test_backward_loss_is_their_formula(model):
  """backward_loss == their train_reverse_motion_with_attnflip.py step:
  the reference UNet on the forward clip + flip(noise) sigma, conditioned
  on its first frame, stores its maps; the tuned UNet on the reversed clip
  + noise sigma, conditioned on its first frame (the forward clip's last),
  uses them flipped on both frame axes; weight (1 + s^2) / s^2 on D - x."""
  rng = np.random.RandomState(0)
  f = svd_fixtures.FRAMES
  latents = jnp.asarray(rng.randn(1, f, 8, 8, 4).astype(np.float32))
  frames = [jnp.asarray(rng.rand(1, 16, 16, 3).astype(np.float32))
            for _ in range(2)]
  noise = jnp.asarray(rng.randn(1, 16, 16, 3).astype(np.float32))
  cond_f, cond_b = _cond(model, frames[0], noise), _cond(model, frames[1],
                                                         noise)
  frozen = model.unet_params
  tuned = {k: v * 1.5 for k, v in inbetween_svd.split(frozen).items()}
  key = jax.random.PRNGKey(3)
  got = inbetween_svd.backward_loss(model.unet, frozen, tuned, latents,
                                    cond_f, cond_b, key)
  # Their step, with backward_loss's draws.
  r_sigma, r_noise = jax.random.split(key)
  sigma = jnp.exp(0.7 + 1.6 * jax.random.normal(r_sigma, (1,)))[0]
  eps = jax.random.normal(r_noise, latents.shape)
  x = jnp.flip(latents, 1)  # batch['pixel_values'] is the reversed clip.
  noisy = x + eps * sigma
  noisy_ref = jnp.flip(x, 1) + jnp.flip(eps, 1) * sigma
  c_in = 1 / jnp.sqrt(sigma**2 + 1)
  c_noise = jnp.full((1,), 0.25 * jnp.log(sigma))
  _, store = _edm_apply(model, frozen, noisy_ref * c_in, c_noise, cond_f,
                        store=True)
  probs = jax.tree.map(lambda p: jnp.flip(p, (-2, -1)),
                       store['attention_capture'])
  pred = _edm_apply(model, inbetween_svd.merge(tuned, frozen), noisy * c_in,
                    c_noise, cond_b, probs=probs)
  denoised = pred * (-sigma * c_in) + noisy / (sigma**2 + 1)
  want = (1 + sigma**2) / sigma**2 * jnp.mean((denoised - x) ** 2)
  assert float(want) > 1e-3
  np.testing.assert_allclose(float(got[0]), float(want), rtol=1e-4)


def test_fused_denoiser_is_their_fusion(model):
  """The SVD pair in sampling.fused_bidirectional (w = 0.5, their averaged
  guidance 2 per frame) == their pipeline's step: forward UNet on z from
  keyframe 1 (maps stored), backward UNet on flip(z) from keyframe 2 with
  the maps rotated, each guided, the backward prediction flipped back and
  averaged."""
  rng = np.random.RandomState(1)
  f = svd_fixtures.FRAMES
  z = jnp.asarray(rng.randn(1, f, 8, 8, 4).astype(np.float32))
  frames = [jnp.asarray(rng.rand(1, 16, 16, 3).astype(np.float32))
            for _ in range(2)]
  noise = jnp.asarray(rng.randn(1, 16, 16, 3).astype(np.float32))
  cond_f, cond_b = _cond(model, frames[0], noise), _cond(model, frames[1],
                                                         noise)
  fwd = model.unet_params
  bwd = inbetween_svd.merge(
      {k: v * 1.5 for k, v in inbetween_svd.split(fwd).items()}, fwd)
  scale = sampling.averaged_ramp(sampling.guidance_ramp(1.0, 3.0, f))
  fused = sampling.fused_bidirectional(
      inbetween_svd.make_pair_fn(model.unet, fwd, bwd),
      sampling.fusion_weights('half', f), scale)
  logsnr = jnp.full((1,), -2.0 * np.log(3.0), jnp.float32)
  got = fused(z, logsnr, {'forward': cond_f, 'backward': cond_b})
  # Theirs: [uncond, cond] batches; CFG per branch; flip back; average.
  c_noise = jnp.full((2,), 0.25 * np.log(3.0), jnp.float32)

  def both(c):
    return {k: jnp.concatenate([jnp.zeros_like(v) if k != 'added_time_ids'
                                else v, v]) for k, v in c.items()}

  zz = jnp.concatenate([z, z])
  v_f, store = _edm_apply(model, fwd, zz, c_noise, both(cond_f), store=True)
  probs = jax.tree.map(lambda p: jnp.flip(p, (-2, -1)),
                       store['attention_capture'])
  v_b = _edm_apply(model, bwd, jnp.flip(zz, 1), c_noise, both(cond_b),
                   probs=probs)
  s = 2.0  # (linspace(1, 3) + its flip) / 2.
  guided = lambda v: v[:1] + s * (v[1:] - v[:1])
  want = 0.5 * guided(v_f) + 0.5 * jnp.flip(guided(v_b), 1)
  assert float(jnp.abs(want).max()) > 0.1
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0,
                             atol=1e-5)
