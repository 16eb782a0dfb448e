"""Memory of SVD sampling and Generative Inbetweening's backward tune, compiled
for GPU/TPU on this CPU host (no weights; nothing runs).

Programs, at SVD's size (models/svd_unet.py with the released config,
1,524,623,082 parameters, float32 parameters, `--dtype` compute):
  sample:    one denoiser call of image-to-video (the UNet on the
             conditional and unconditional batch: 2 x F frames);
  inbetween: one call of the fused bidirectional denoiser (forward and
             backward UNets, each on 2 x F frames, the maps captured and
             injected: adapt/inbetween_svd.make_pair_fn), both parameter
             sets as arguments;
  tune:      one step of the backward tune (adapt/tune_backward_svd.
             tune_step: the reference UNet forward, the tuned UNet forward
             and backward, AdamW on the 24,780,800 tuned weights), under
             `--remat`.
Latents [1, F, 72, 128, 4] (1024x576 frames), batch 1. Attention: on TPU
targets what 'auto' picks there (Pallas flash attention from 1024 tokens);
on GPU targets the XLA einsum, since cuDNN's flash attention cannot be
compiled without a GPU: an upper bound there. Reported per
device: XLA's memory analysis (arguments + outputs - aliased + temporaries
+ code). GPU compiles do not enforce the card's size: 'fits' compares with
the target config's device memory; a TPU overflow is reported as such.
On several devices this script shards the parameters FSDP-style and
splits the frames over the devices where F divides: a layout studied here,
not the one the drivers use (--mode=sample replicates the parameters on
the config's mesh, --mode=tune_backward runs on one device; --mode=plan
of configs/svd.py plans those).

  JAX_PLATFORMS=cpu python experiments/svd_memory.py \\
      --targets=gpu:h100:1,gpu:a100_40:1 --programs=sample,inbetween,tune \\
      --frames=14,25 --dtype=bfloat16 --remat=none,block
"""

import argparse
import functools
import itertools
import time

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import optax

from vdm_jax import denoiser
from vdm_jax import plan
from vdm_jax import sampling
from vdm_jax import sharding
from vdm_jax.adapt import inbetween_svd
from vdm_jax.adapt import tune_backward_svd
from vdm_jax.pretrained import svd

SVD = svd.SVD_XT_CONFIG
GIB = 2**30
LATENT = (72, 128)  # 576x1024 frames / 8.


def _cond(b, mesh):
  s = lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32,
                                         sharding=NamedSharding(mesh, P()))
  return {'image_latent': s((b,) + LATENT + (4,)),
          'image_embed': s((b, 1, 1024)), 'added_time_ids': s((b, 3))}


def abstract_args(program, module, frames, mesh):
  """The program's function and its ShapeDtypeStruct arguments."""
  n = mesh.size
  params = svd.abstract_params(module)

  def place(x):
    spec = sharding._param_spec(x.shape, n) if n > 1 else P()  # pylint: disable=protected-access
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=NamedSharding(mesh, spec))

  frame_axis = P(None, 'fsdp') if n > 1 and frames % n == 0 else P()
  z = jax.ShapeDtypeStruct((1, frames) + LATENT + (4,), jnp.float32,
                           sharding=NamedSharding(mesh, frame_axis))
  logsnr = jax.ShapeDtypeStruct((1,), jnp.float32,
                                sharding=NamedSharding(mesh, P()))
  scale = sampling.guidance_ramp(1.0, 3.0, frames)
  if program == 'sample':
    def fn(p, z, logsnr, cond):
      return sampling.image_guided(
          denoiser.make_edm_denoise_fn(module, p), scale)(z, logsnr, cond)
    return jax.jit(fn), (jax.tree.map(place, params), z, logsnr,
                         _cond(1, mesh))
  if program == 'inbetween':
    def fn(pf, pb, z, logsnr, cf, cb):
      fused = sampling.fused_bidirectional(
          inbetween_svd.make_pair_fn(module, pf, pb),
          sampling.fusion_weights('half', frames),
          sampling.averaged_ramp(scale))
      return fused(z, logsnr, {'forward': cf, 'backward': cb})
    return jax.jit(fn), (jax.tree.map(place, params),
                         jax.tree.map(place, params), z, logsnr,
                         _cond(1, mesh), _cond(1, mesh))
  tx = optax.adamw(1e-4, 0.9, 0.999, 1e-8, 1e-2)
  tuned = jax.eval_shape(inbetween_svd.split, params)
  opt = jax.eval_shape(tx.init, tuned)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32,
                             sharding=NamedSharding(mesh, P()))
  step = jax.jit(functools.partial(tune_backward_svd.tune_step, unet=module,
                                   tx=tx), donate_argnums=(0, 1))
  return step, (jax.tree.map(place, tuned), jax.tree.map(place, opt),
                jax.tree.map(place, params), z, _cond(1, mesh),
                _cond(1, mesh), rng)


def measure(target, program, dtype, remat, frames):
  devices = plan.target_devices(target)
  mesh = sharding.make_mesh(ml_collections.ConfigDict(
      {'data': 1, 'fsdp': len(devices), 'param_sharding': 'fsdp'}), devices)
  module = svd.build(SVD, dtype=dtype, remat=remat)
  fn, args = abstract_args(program, module, frames, mesh)
  # On TPU targets 'auto' takes the Pallas flash kernel from 1024 tokens
  # (plan.attention_platform), per chip on its frames (the frames are split
  # over 'fsdp'); GPU targets run the XLA einsum, whose logits
  # [F, heads, H*W, H*W] make these an upper bound for a GPU.
  kernels = (mesh, ('fsdp',) if frames % mesh.size == 0 else ())
  start = time.time()
  _, compiled = plan.compile_program(fn, args, target, kernels)
  row = dict(target=target.name, program=program, dtype=dtype, remat=remat,
             frames=frames, compile_s=round(time.time() - start))
  if isinstance(compiled, str):
    row['result'] = 'overflow: ' + compiled.splitlines()[0][:200]
    return row
  mem = plan.compiled_memory(compiled)
  row.update(argument_gib=round(mem['argument'] / GIB, 2),
             temp_gib=round(mem['temp'] / GIB, 2),
             total_gib=round(mem['total'] / GIB, 2))
  cap = plan.chip_memory(target, devices[0].device_kind)
  if cap:
    row['device_gib'] = round(cap / GIB, 1)
    row['fits'] = mem['total'] <= cap
  return row


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--targets', default='gpu:h100:1')
  p.add_argument('--programs', default='sample,inbetween,tune')
  p.add_argument('--dtype', default='bfloat16')
  p.add_argument('--remat', default='block')
  p.add_argument('--frames', default='14')
  a = p.parse_args()
  plan.prepare_host()
  targets = [plan.parse_target(t) for t in a.targets.split(',')]
  plan.check_packages(targets)
  for target, prog, dt, rm, fr in itertools.product(
      targets, a.programs.split(','), a.dtype.split(','),
      a.remat.split(','), [int(f) for f in a.frames.split(',')]):
    if prog != 'tune' and rm != a.remat.split(',')[0]:
      continue  # Remat only changes the tune step.
    print(measure(target, prog, dt, rm, fr), flush=True)


if __name__ == '__main__':
  main()
