"""Generative Inbetweening's backward-motion model (Wang et al. 2024).

"Generative Inbetweening: Adapting Image-to-Video Models for Keyframe
Interpolation" (arXiv 2408.15239) turns an image-to-video model, which moves
forward from a first frame, into a keyframe interpolator:
  - Sec. 3.2: rotating a temporal self-attention map by 180 degrees
    (flipping both its query and key frame axes) turns the forward motion it
    encodes into the same motion backwards in time. The backward model is
    the forward model whose temporal attention probabilities are replaced
    by the forward model's, rotated (`pair_fn`; the forward model runs on
    the time-flipped input, so both describe one motion).
  - Sec. 3.3: only the value and output projections of those attentions are
    fine-tuned, on clips reversed in time and conditioned on their last
    frame, while the frozen forward model sees the same clip forward with
    the noise flipped in time (`backward_loss`). Their code controls the
    first temporal self-attention of each temporal block; every block of
    this UNet has exactly one temporal attention, so all are controlled.
  - Sec. 3.4: fused bidirectional sampling (sampling.fused_bidirectional).

The tuned parameters are, per temporal attention, the value columns of its
fused qkv projection and its output projection (`split_backward`,
`merge_backward`); a --mode=tune_backward workdir stores only them, and
`backward.json` names the forward model's workdir and step (`restore`).
"""

import json
import os
from typing import Any, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections

from vdm_jax import checkpoint
from vdm_jax import denoiser
from vdm_jax import diffusion
from vdm_jax import fileio
from vdm_jax import sharding
from vdm_jax.models import layers

RECORD = 'backward.json'


def _is_temporal(path: tuple[str, ...]) -> bool:
  return any(p.startswith('tattn_') or p == 'mid_tattn' for p in path)


def temporal_attention_paths(params: Any) -> list[tuple[str, ...]]:
  """Module paths of every temporal attention in a UNet's parameters."""
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  paths = sorted({k[:k.index(next(p for p in k if p.startswith('tattn_')
                                  or p == 'mid_tattn')) + 1]
                  for k in flat if _is_temporal(k)})
  if not paths:
    raise ValueError('The model has no temporal attention to control'
                     ' (model.temporal_attention=False?).')
  return paths


def _module(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def split_backward(params: Any) -> dict:
  """The tuned parameters of the backward model, taken from `params`.

  Returns:
    {path...: {'value': {'kernel' [C, C], 'bias' [C]}, 'out': {'kernel',
    'bias'}}} nested like `params`: per temporal attention the value part
    (columns 2C:3C) of its qkv projection and its output projection.
  """
  flat = {}
  for path in temporal_attention_paths(params):
    m = _module(params, path)
    c = m['out']['kernel'].shape[-1]
    flat[path + ('value', 'kernel')] = m['qkv']['kernel'][:, 2 * c:]
    flat[path + ('value', 'bias')] = m['qkv']['bias'][2 * c:]
    flat[path + ('out', 'kernel')] = m['out']['kernel']
    flat[path + ('out', 'bias')] = m['out']['bias']
  return flax.traverse_util.unflatten_dict(flat)


def merge_backward(tuned: Mapping[str, Any], params: Any) -> Any:
  """The backward model's whole parameters: `params` with `tuned` set.

  A new tree; `params` is not modified (the forward model stays as it is).
  """
  out = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  out = dict(out)
  tuned_flat = flax.traverse_util.flatten_dict(dict(tuned))
  paths = {k[:-2] for k in tuned_flat}
  for path in paths:
    c = tuned_flat[path + ('out', 'kernel')].shape[-1]
    kernel = out[path + ('qkv', 'kernel')]
    bias = out[path + ('qkv', 'bias')]
    out[path + ('qkv', 'kernel')] = kernel.at[:, 2 * c:].set(
        tuned_flat[path + ('value', 'kernel')])
    out[path + ('qkv', 'bias')] = bias.at[2 * c:].set(
        tuned_flat[path + ('value', 'bias')])
    out[path + ('out', 'kernel')] = tuned_flat[path + ('out', 'kernel')]
    out[path + ('out', 'bias')] = tuned_flat[path + ('out', 'bias')]
  return flax.traverse_util.unflatten_dict(out)


def rotate(probs: Any) -> Any:
  """Attention maps rotated by 180 degrees: both frame axes flipped."""
  return jax.tree.map(lambda p: jnp.flip(p, axis=(-2, -1)), probs)


def capture(model, params, z, logsnr, cond) -> tuple[jnp.ndarray, Any]:
  """(prediction, the temporal attention probabilities of every layer)."""
  pred, state = model.apply({'params': params}, z, logsnr, train=False,
                            mutable=[layers.CAPTURE], **cond)
  return pred, state[layers.CAPTURE]


def inject(model, params, z, logsnr, cond, probs, *, train: bool = False,
           rngs=None) -> jnp.ndarray:
  """The prediction with the given temporal attention probabilities."""
  return model.apply({'params': params, layers.INJECT: probs}, z, logsnr,
                     train=train, rngs=rngs, **cond)


class _Pair(flax.struct.PyTreeNode):
  """(params, z_f, z_b, logsnr, cond_f, cond_b) -> (pred_f, pred_b)."""

  model: Any = flax.struct.field(pytree_node=False)
  mesh: Optional[jax.sharding.Mesh] = flax.struct.field(pytree_node=False,
                                                        default=None)

  def __call__(self, params, z_f, z_b, logsnr, cond_f, cond_b):
    if self.mesh is not None and z_f.shape[0] % self.mesh.size == 0:
      z_f, z_b = (jax.lax.with_sharding_constraint(
          a, sharding.batch_sharding(self.mesh)) for a in (z_f, z_b))
    pred_f, probs = capture(self.model, params['forward'], z_f, logsnr,
                            cond_f)
    pred_b = inject(self.model, params['backward'], z_b, logsnr, cond_b,
                    rotate(jax.lax.stop_gradient(probs)))
    return pred_f, pred_b


def make_pair_fn(model, forward_params, backward_params, mesh=None):
  """The forward and backward models as one pair_fn of
  sampling.fused_bidirectional: the backward model runs with the forward
  model's temporal attention probabilities, rotated (a Partial: the
  parameters stay traced)."""
  return jax.tree_util.Partial(
      _Pair(model, mesh), {'forward': forward_params,
                           'backward': backward_params})


def backward_loss(model, forward_params, tuned, x, rng, *, logsnr_fn,
                  target: str, noise, image_kwargs: Mapping[str, float],
                  dropout_rng: jax.Array) -> diffusion.LossOutput:
  """The backward fine-tune's loss on clips x [B, T, H, W, C] in [-1, 1].

  The backward model learns the reversed clip flip(x) conditioned on its
  first frame (x's last), its attention taken from the frozen forward
  model on the forward clip, conditioned on x's first frame, with the same
  noise flipped in time: the forward model sees flip(z) for the backward
  model's z (Sec. 3.3). Gradients reach only `tuned`.

  Args:
    model: the image-to-video UNet.
    forward_params: the frozen forward model's parameters.
    tuned: the tuned parameters (`split_backward`'s structure).
    x: the clips, forward in time.
    rng: key of the diffusion loss and the image augmentation.
    logsnr_fn, target, noise: the model's schedule, parameterization and
      noise.Noise.
    image_kwargs: training_image_cond's dropout / noise_mean / noise_std.
    dropout_rng: the backward model's dropout key.
  """
  b = x.shape[0]
  r_loss, r_image = jax.random.split(rng)
  x_rev = jnp.flip(x, axis=1)
  # One augmentation level, noise draw and dropout for both keyframes.
  cond_f = denoiser.training_image_cond(x[:, 0], r_image, **image_kwargs)
  cond_b = dict(cond_f, image=cond_f['image'] - x[:, 0] + x_rev[:, 0])
  params_b = merge_backward(tuned, forward_params)

  def denoise_b(z_b, logsnr, cond):
    del cond
    _, probs = capture(model, forward_params, jnp.flip(z_b, axis=1), logsnr,
                       cond_f)
    return inject(model, params_b, z_b, logsnr, cond_b,
                  rotate(jax.lax.stop_gradient(probs)), train=True,
                  rngs={'dropout': dropout_rng})

  return diffusion.loss(denoise_b, x_rev, jax.random.split(r_loss, b),
                        logsnr_fn=logsnr_fn, target=target, cond={},
                        noise=noise)


def is_backward_workdir(workdir: str) -> bool:
  return os.path.isfile(os.path.join(workdir, RECORD))


def read_record(workdir: str) -> dict:
  path = os.path.join(workdir, RECORD)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'{workdir} holds no backward-motion model ({RECORD} missing); run'
        ' --mode=tune_backward with --config.tune.base_workdir=<the'
        ' image-to-video workdir> into it first.')
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def write_record(workdir: str, record: dict) -> None:
  fileio.write_json(os.path.join(workdir, RECORD), record)


def check_base(config: ml_collections.ConfigDict, base_workdir: str) -> None:
  """Raises ValueError unless base_workdir holds config's image-to-video
  model (differing fields named)."""
  saved = checkpoint.load_config(base_workdir)
  if saved is None:
    raise FileNotFoundError(
        f'tune.base_workdir={base_workdir} has no {checkpoint.CONFIG_FILE}:'
        ' train the image-to-video model there first'
        ' (configs/i2v_quickstart.py).')
  if not saved.get('model', {}).get('image_condition', False):
    raise ValueError(
        f'tune.base_workdir={base_workdir} holds a model without image'
        ' conditioning (model.image_condition=False): the backward-motion'
        ' tune adapts an image-to-video model; train one with'
        ' configs/i2v_quickstart.py.')
  if not config.model.get('image_condition', False):
    raise ValueError('The backward-motion tune needs the image-to-video'
                     ' model\'s config (model.image_condition=True).')
  checkpoint.check_compatible(config, base_workdir)


def forward_params(config: ml_collections.ConfigDict, base_workdir: str,
                   step: Optional[int], mesh=None) -> tuple[Any, Any, int]:
  """(model, the forward model's EMA parameters, their step)."""
  model = denoiser.create_model(config)
  repl = sharding.replicated(mesh) if mesh is not None else None
  params, step = checkpoint.restore_ema_params(
      base_workdir, denoiser.abstract_params(config, model), step,
      sharding=repl)
  return model, params, step


def restore(config: ml_collections.ConfigDict, workdir: str, mesh=None
            ) -> tuple[Any, Any, Any, int]:
  """(model, forward params, backward params, step) of a backward workdir."""
  record = read_record(workdir)
  check_base(config, record['base_workdir'])
  model, fwd, _ = forward_params(config, record['base_workdir'],
                                 record['base_step'], mesh)
  tuned, step = checkpoint.restore_ema_params(
      workdir, jax.eval_shape(split_backward, fwd),
      sharding=sharding.replicated(mesh) if mesh is not None else None)
  return model, fwd, merge_backward(tuned, fwd), step
