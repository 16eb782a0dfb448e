"""Tune-A-Video's inflation of Stable Diffusion's UNet: the parameter side.

Tune-A-Video (Wu et al. 2022, arXiv 2212.11565, Sec. 4.1-4.2) inflates SD's
UNet into a video UNet (models/sd_unet.py with `inflated=True`): SD's
parameters are used unchanged, and every transformer block gains a temporal
attention `attn_temp` and its LayerNorm `norm_temp`. As their code
(showlab/Tune-A-Video, tuneavideo/models/attention.py) initialises them:
LayerNorm scale 1, bias 0; to_q / to_k / to_v as torch.nn.Linear's default
(uniform in +-1/sqrt(fan_in)); to_out.0's weight zero. Their to_out.0 bias
keeps torch's nonzero default, so their inflated model is not SD at step 0;
here the bias is zeroed too, so the inflated model starts as SD with
sparse-causal attention (tests/test_tune_a_video_sd.py).

The tuned set (their train_tuneavideo.py `trainable_modules`):
'attention_queries' = every attn1.to_q, attn2.to_q and all of attn_temp
(not norm_temp); 'all' = full fine-tuning; 'lora' trains low-rank updates
of every attention (adapt/lora.py) and no base parameter. Built from
abstract shapes: nothing here initialises the full model at random.
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp

from vdm_jax.adapt import inflate
from vdm_jax.models import sd_unet

TRAINABLE = ('attention_queries', 'lora', 'all')
TEMPORAL = ('attn_temp', 'norm_temp')

merge = inflate.merge


def _flat(tree: Any) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def is_temporal(path: tuple[str, ...]) -> bool:
  """Whether a parameter is one inflation adds (attn_temp, norm_temp)."""
  return any(p in TEMPORAL for p in path)


def check_trainable(trainable: str) -> None:
  if trainable not in TRAINABLE:
    raise ValueError(f'Unknown tune.trainable {trainable!r}; choose one of '
                     f'{TRAINABLE}.')


def is_tuned(path: tuple[str, ...], trainable: str) -> bool:
  """Whether the base parameter at `path` is trained (module docstring)."""
  check_trainable(trainable)
  if trainable == 'all':
    return True
  if trainable == 'lora':
    return False
  if 'attn_temp' in path:
    return True
  return (len(path) >= 3 and path[-2] == 'to_q'
          and path[-3] in ('attn1', 'attn2'))


def split(params: Any, trainable: str) -> tuple[dict, dict]:
  """(tuned, frozen) halves of the inflated tree; `merge` joins them."""
  flat = _flat(params)
  tuned = {k: v for k, v in flat.items() if is_tuned(k, trainable)}
  frozen = {k: v for k, v in flat.items() if k not in tuned}
  return (flax.traverse_util.unflatten_dict(tuned),
          flax.traverse_util.unflatten_dict(frozen))


def inflate_module(unet: sd_unet.UNet2DConditionModel,
                   frame_norm: str = 'pooled', remat: str | None = None,
                   dtype: str | None = None
                   ) -> sd_unet.UNet2DConditionModel:
  """The inflated video UNet of an SD UNet module (same fields otherwise)."""
  kw = dict(inflated=True, frame_norm=frame_norm)
  if remat is not None:
    kw['remat'] = remat
  if dtype is not None:
    kw['dtype'] = dtype
  module = unet.clone(**kw)
  module.check()
  return module


def abstract_params(module: sd_unet.UNet2DConditionModel) -> Any:
  """The (inflated) module's parameters as ShapeDtypeStructs."""
  size = 2 ** (len(module.block_out_channels) - 1)
  inputs = module.example_inputs(batch=1, context_length=1, size=size,
                                 frames=2)
  return jax.eval_shape(module.init, jax.random.PRNGKey(0),
                        *inputs)['params']


def _temporal_init(path: tuple[str, ...], shape: tuple[int, ...],
                   rng: jax.Array) -> jax.Array:
  """Their initialisation of one attn_temp / norm_temp parameter, but
  to_out.0's bias zero too (module docstring)."""
  if 'norm_temp' in path:
    return (jnp.ones if path[-1] == 'scale' else jnp.zeros)(shape,
                                                            jnp.float32)
  if path[-2] == 'to_out_0':
    return jnp.zeros(shape, jnp.float32)
  bound = shape[0] ** -0.5  # torch Linear: kaiming_uniform(a=sqrt(5)).
  return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


def init_temporal(abstract: Any, rng: jax.Array) -> dict:
  """The new parameters (attn_temp, norm_temp) of an abstract inflated
  tree, as a nested dict (only those leaves)."""
  out = {}
  for i, (path, leaf) in enumerate(sorted(_flat(abstract).items())):
    if is_temporal(path):
      out[path] = _temporal_init(path, tuple(leaf.shape),
                                 jax.random.fold_in(rng, i))
  return flax.traverse_util.unflatten_dict(out)


def inflate_params(sd_params: Any, module: sd_unet.UNet2DConditionModel,
                   rng: jax.Array) -> dict:
  """The inflated UNet's parameters: SD's unchanged + the new ones.

  Args:
    sd_params: the SD UNet's parameters (vdm_jax.pretrained.unet2d.load).
    module: the inflated module (`inflate_module` of that UNet).
    rng: initialises attn_temp's to_q / to_k / to_v.

  Returns:
    The whole inflated tree.

  Raises:
    ValueError: SD's tree and the inflated one differ in more than the
      temporal parameters (names or shapes), i.e. not this UNet.
  """
  abstract = _flat(abstract_params(module))
  sd = _flat(sd_params)
  want = {k: v for k, v in abstract.items() if not is_temporal(k)}
  missing = sorted('/'.join(k) for k in set(want) - set(sd))
  extra = sorted('/'.join(k) for k in set(sd) - set(want))
  shapes = sorted('/'.join(k) for k in set(want) & set(sd)
                  if tuple(want[k].shape) != tuple(sd[k].shape))
  if missing or extra or shapes:
    raise ValueError(
        'The SD parameters do not fit the inflated UNet: missing '
        f'{missing[:4]}, unexpected {extra[:4]}, shape differs {shapes[:4]}.')
  temporal = _flat(init_temporal(abstract_params(module), rng))
  return flax.traverse_util.unflatten_dict({**sd, **temporal})


def count(tree: Any) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(tree))
