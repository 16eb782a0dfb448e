"""SD-1.5 UNet fine-tuning step: FLOPs and memory per device, compiled
abstractly (no weights, no accelerator) for CPU, GPU and TPU targets.

  JAX_PLATFORMS=cpu .venv/bin/python experiments/sd_train_cost.py \
      --targets=cpu,gpu:h100:1,tpu:v5p:2x2x1 --dtypes=float32,bfloat16 \
      --remats=none,block --batch=1 --size=64

The step is the plain latent-diffusion fine-tuning step of Stable Diffusion
(Rombach et al. 2022, eq. 2): eps-MSE of the full UNet2DConditionModel
(859,520,964 parameters) at a discrete timestep, given the latents
(64x64 = 512x512 images) and 77 text states, with AdamW on every parameter
(float32 parameters and optimizer state), jitted with the parameters and
optimizer state split FSDP-style over all devices of the target
(sharding.state_shardings) and the batch over them too when it divides.
GPU and TPU programs are compiled by the real compilers without the
hardware (vdm_jax/plan.py; requirements-plan.txt); a TPU program that does
not fit fails fast and is reported as not fitting. FLOPs are counted on the
jaxpr (perf.matmul_flops: 2 per multiply-add of dots and convolutions).
Prints one JSON line per (target, dtype, remat) and a Markdown table.
"""

import json
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vdm_jax import perf
from vdm_jax import plan
from vdm_jax import sharding
from vdm_jax.pretrained import convert
from vdm_jax.pretrained import unet2d

_TARGETS = flags.DEFINE_list('targets', ['cpu'], 'plan.py target names.')
_DTYPES = flags.DEFINE_list('dtypes', ['float32'], 'Compute dtypes.')
_REMATS = flags.DEFINE_list('remats', ['none'], 'sd_unet.REMAT policies.')
_BATCH = flags.DEFINE_integer('batch', 1, 'Global batch.')
_SIZE = flags.DEFINE_integer('size', 64, 'Latent height and width.')
_TOKENS = flags.DEFINE_integer('tokens', 77, 'Text states.')
_TINY = flags.DEFINE_bool('tiny', False, 'A tiny UNet (checks the script).')

SD15 = unet2d.SD15_CONFIG
TINY = dict(SD15, block_out_channels=[32, 64, 64, 64], norm_num_groups=8,
            attention_head_dim=4)


def step_program(module, tx):
  """(params, opt_state, x0, eps, t, context, alpha, sigma) -> new state."""

  def loss_fn(params, x0, eps, t, context, alpha, sigma):
    z = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
    pred = module.apply({'params': params}, z, t, context)
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - eps))

  def step(params, opt_state, x0, eps, t, context, alpha, sigma):
    loss, grads = jax.value_and_grad(loss_fn)(params, x0, eps, t, context,
                                              alpha, sigma)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def measure(target_name: str, dtype: str, remat: str) -> dict:
  target = plan.parse_target(target_name)
  devices = plan.target_devices(target)
  mesh = jax.sharding.Mesh(np.array(devices).reshape(1, -1),
                           ('data', 'fsdp'))
  cfg = TINY if _TINY.value else SD15
  module = unet2d.build(cfg, dtype=dtype, remat=remat)
  params = unet2d.abstract_params(module)
  tx = optax.adamw(1e-5, weight_decay=1e-2)
  opt_state = jax.eval_shape(tx.init, params)
  p_sh = sharding.state_shardings(params, mesh, 'fsdp')
  o_sh = sharding.state_shardings(opt_state, mesh, 'fsdp')
  b, s = _BATCH.value, _SIZE.value
  batch_axis = 'fsdp' if b % len(devices) == 0 else None
  bspec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
      batch_axis))
  def arg(shape, sh, dt=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dt, sharding=sh)
  args = (jax.tree.map(lambda x, h: arg(x.shape, h, x.dtype), params, p_sh),
          jax.tree.map(lambda x, h: arg(x.shape, h, x.dtype), opt_state,
                       o_sh),
          arg((b, s, s, 4), bspec), arg((b, s, s, 4), bspec),
          arg((b,), bspec), arg((b, _TOKENS.value, cfg['cross_attention_dim']),
                                bspec),
          arg((b,), bspec), arg((b,), bspec))
  fn = jax.jit(step_program(module, tx), donate_argnums=(0, 1))
  start = time.time()
  traced, compiled = plan.compile_program(fn, args, target)
  row = {'target': target_name, 'dtype': dtype, 'remat': remat,
         'devices': len(devices), 'batch': b, 'latent': s,
         'params': convert.count(params),
         'compile_s': round(time.time() - start, 1),
         'flops_per_device': perf.matmul_flops(traced.jaxpr) / len(devices),
         'device_kind': devices[0].device_kind}
  memory = plan.chip_memory(target, devices[0].device_kind)
  row['device_memory'] = memory
  if isinstance(compiled, str):
    row.update(fits=False, error=compiled.splitlines()[0][:300])
    return row
  mem = plan.compiled_memory(compiled)
  row['memory'] = mem
  row['fits'] = None if memory is None else mem['total'] <= memory
  return row


def _gib(n):
  return '-' if n is None else f'{n / 2**30:.2f}'


def main(argv):
  del argv
  plan.prepare_host()
  rows = []
  for target in _TARGETS.value:
    for dtype in _DTYPES.value:
      for remat in _REMATS.value:
        row = measure(target, dtype, remat)
        print(json.dumps(row), flush=True)
        rows.append(row)
  print('\n| target | dtype | remat | devices | params+opt (arg) GiB | temp '
        'GiB | total GiB | device GiB | fits | TFLOP/step/device | compile s |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  for r in rows:
    m = r.get('memory', {})
    print(f"| {r['target']} | {r['dtype']} | {r['remat']} | {r['devices']} |"
          f" {_gib(m.get('argument'))} | {_gib(m.get('temp'))} |"
          f" {_gib(m.get('total'))} | {_gib(r['device_memory'])} |"
          f" {r['fits']} | {r['flops_per_device'] / 1e12:.2f} |"
          f" {r['compile_s']} |")


if __name__ == '__main__':
  app.run(main)
