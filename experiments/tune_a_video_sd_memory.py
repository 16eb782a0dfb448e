"""Memory of Tune-A-Video's tune step on SD-1.5, compiled for GPU/TPU here.

The real step (vdm_jax.adapt.tune_sd.tune_step: the inflated SD-1.5 UNet,
AdamW, the frozen parameters an argument) is lowered with abstract inputs
(ShapeDtypeStructs: no weights, nothing runs) and compiled for each target
on this CPU host with the deviceless compilers of vdm_jax.plan (libtpu and
the CUDA plugin of requirements-plan.txt). Reported per device: XLA's
memory analysis (arguments + outputs - aliased + temporaries + code), and
for TPU the FLOPs of XLA's cost analysis. GPU compiles do not enforce the
card's size: 'fits' compares with the target config's device memory.

On a TPU slice the parameters and AdamW state are sharded FSDP-style over
the slice and the clip's frames are split over it (batch 1 cannot be),
so that activations are divided too.

  JAX_PLATFORMS=cpu python experiments/tune_a_video_sd_memory.py \\
      --targets=gpu:h100:1,tpu:v5e:2x2 --frames=24 --size=512 \\
      --trainable=attention_queries,lora,all --dtype=bfloat16,float32 \\
      --remat=none,block
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

from vdm_jax import perf
from vdm_jax import plan
from vdm_jax import sharding
from vdm_jax import training
from vdm_jax.adapt import inflate_sd
from vdm_jax.adapt import lora
from vdm_jax.adapt import tune_sd
from vdm_jax.pretrained import unet2d
from vdm_jax import schedules

SD15 = unet2d.SD15_CONFIG
GIB = 2**30
# SD-1.5's scheduler_config.json (the betas; the sampler does not matter).
SCHEDULER = {'beta_end': 0.012, 'beta_schedule': 'scaled_linear',
             'beta_start': 0.00085, 'num_train_timesteps': 1000,
             'set_alpha_to_one': False, 'steps_offset': 1,
             'clip_sample': False}


def abstract_args(module, trainable, frames, size, mesh, fsdp):
  """ShapeDtypeStructs (state, frozen, batch, rng) with shardings."""
  params = inflate_sd.abstract_params(module)
  if trainable == 'lora':
    trained = jax.eval_shape(lambda: lora.init(params, jax.random.key(0)))
    frozen = params
  else:
    trained, frozen = inflate_sd.split(params, trainable)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(3e-5, 0.9, 0.999, 1e-8, 1e-2))
  state = jax.eval_shape(lambda p: training.TrainState.create(p, tx),
                         trained)
  n = mesh.size

  def place(x):
    spec = sharding._param_spec(x.shape, n) if fsdp else P()  # pylint: disable=protected-access
    return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                sharding=NamedSharding(mesh, spec))

  h = size // 8
  frame_axis = P(None, 'fsdp') if fsdp and frames % n == 0 else P()
  lat = jax.ShapeDtypeStruct((1, frames, h, h, 4), jnp.float32,
                             sharding=NamedSharding(mesh, frame_axis))
  batch = {'mean': lat, 'std': lat, 'text': jax.ShapeDtypeStruct(
      (1, 77, 768), jnp.float32, sharding=NamedSharding(mesh, P()))}
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                             sharding=NamedSharding(mesh, P()))
  return (jax.tree.map(place, state), jax.tree.map(place, frozen), batch,
          rng), tx


def measure(target, trainable, dtype, remat, frames, size, flops_only=False):
  devices = plan.target_devices(target)
  fsdp = len(devices) > 1
  mesh = sharding.make_mesh(ml_collections.ConfigDict(
      {'data': 1, 'fsdp': len(devices), 'param_sharding': 'fsdp'}), devices)
  module = inflate_sd.inflate_module(unet2d.build(SD15), remat=remat,
                                     dtype=dtype)
  args, tx = abstract_args(module, trainable, frames, size, mesh, fsdp)
  schedule = schedules.from_scheduler_config(SCHEDULER)
  step = jax.jit(functools.partial(
      tune_sd.tune_step, module=module,
      table=tuple(float(x) for x in schedule.logsnr_table()),
      logsnr_fn=schedule.logsnr_fn(), target='eps', trainable=trainable,
      lora_scale=1.0, tx=tx, lr_fn=lambda s: 3e-5, ema_decay=0.0),
      donate_argnums=0)
  # On a TPU slice the frames are split over 'fsdp': the Pallas attention
  # kernels ('auto' on TPU) run per chip on its frames.
  kernels = (mesh, ('fsdp',) if frames % mesh.size == 0 else ())
  row = dict(target=target.name, trainable=trainable, dtype=dtype,
             remat=remat, frames=frames, size=size)
  start = time.time()
  if flops_only:
    traced, compiled = plan.trace_program(step, args, target, kernels), None
  else:
    traced, compiled = plan.compile_program(step, args, target, kernels)
    row['compile_s'] = round(time.time() - start)
  # Dots and convolutions, backward and rematerialised forward included,
  # counted as torch.utils.flop_counter counts (perf.matmul_flops); the
  # time bound is one chip's data-sheet peak for the matmul dtype.
  flops = perf.matmul_flops(traced.jaxpr)
  row['tflop_step'] = round(flops / 1e12, 1)
  for chip in ('NVIDIA A100', 'NVIDIA H100'):
    peak = perf.table_peak_flops(chip, perf.matmul_dtype(traced.jaxpr))
    row[f'{chip.split()[1].lower()}_500_steps_min_ge'] = round(
        500 * flops / peak / 60, 1)
  if compiled is None:
    return row
  if isinstance(compiled, str):
    row['result'] = 'overflow: ' + compiled.splitlines()[0][:160]
    return row
  mem = plan.compiled_memory(compiled)
  row.update(argument_gib=mem['argument'] / GIB, temp_gib=mem['temp'] / GIB,
             total_gib=mem['total'] / GIB)
  cap = plan.chip_memory(target, devices[0].device_kind)
  if cap:
    row['device_gib'] = cap / GIB
    row['fits'] = mem['total'] <= cap
  cost = compiled.cost_analysis()
  if cost:
    cost = cost[0] if isinstance(cost, list) else cost
    row['tflop'] = cost.get('flops', 0.0) / 1e12
  return row


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--targets', default='gpu:h100:1')
  p.add_argument('--trainable', default='attention_queries')
  p.add_argument('--dtype', default='bfloat16')
  p.add_argument('--remat', default='block')
  p.add_argument('--frames', default='24')
  p.add_argument('--size', type=int, default=512)
  p.add_argument('--flops_only', action='store_true',
                 help='trace only: FLOPs and the time bound, no compile')
  a = p.parse_args()
  plan.prepare_host()
  targets = [plan.parse_target(t) for t in a.targets.split(',')]
  plan.check_packages(targets)
  for target, tr, dt, rm, fr in itertools.product(
      targets, a.trainable.split(','), a.dtype.split(','),
      a.remat.split(','), [int(f) for f in a.frames.split(',')]):
    print(measure(target, tr, dt, rm, fr, a.size, a.flops_only), flush=True)


if __name__ == '__main__':
  main()
