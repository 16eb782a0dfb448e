"""Memory of Tune-A-Video's tune step on SD-1.5, compiled for GPU/TPU here.

The real step (vdm_jax.adapt.tune_sd.tune_step: the inflated SD-1.5 UNet,
AdamW, the frozen parameters an argument) is lowered with abstract inputs
(ShapeDtypeStructs: no weights, nothing runs) and compiled for each target
on this CPU host with the deviceless compilers of vdm_jax.plan (libtpu and
the CUDA plugin of requirements-plan.txt). Reported per device: XLA's
memory analysis (arguments + outputs - aliased + temporaries + code), and
for TPU the FLOPs of XLA's cost analysis. GPU compiles do not enforce the
card's size: 'fits' compares with the target config's device memory.

On several devices the step is laid out as --mode=tune lays it out
(tune_sd.layout): batch 1 cannot be split, so the clip's frames are split
over the devices and the parameters and AdamW state sharded FSDP-style,
which divides the activations too. `--mode=plan` of
configs/tune_a_video_sd.py compiles the same step (and the edit's).

  JAX_PLATFORMS=cpu python experiments/tune_a_video_sd_memory.py \\
      --targets=gpu:h100:1,tpu:v5e:2x2 --frames=24 --size=512 \\
      --trainable=attention_queries,lora,all --dtype=bfloat16,float32 \\
      --remat=none,block
"""

import argparse
import itertools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))  # `configs` is importable from the checkout.

from configs import tune_a_video_sd  # pylint: disable=g-import-not-at-top,wrong-import-position
from vdm_jax import perf  # pylint: disable=g-import-not-at-top,wrong-import-position
from vdm_jax import plan  # pylint: disable=g-import-not-at-top,wrong-import-position
from vdm_jax import schedules  # pylint: disable=g-import-not-at-top,wrong-import-position
from vdm_jax.adapt import tune_sd  # pylint: disable=g-import-not-at-top,wrong-import-position
from vdm_jax.pretrained import stable_diffusion  # pylint: disable=g-import-not-at-top,wrong-import-position
from vdm_jax.pretrained import unet2d  # pylint: disable=g-import-not-at-top,wrong-import-position

SD15 = unet2d.SD15_CONFIG
GIB = 2**30


def measure(target, trainable, dtype, remat, frames, size, flops_only=False):
  devices = plan.target_devices(target)
  config = tune_a_video_sd.get_config()
  config.tune.trainable, config.tune.remat = trainable, remat
  config.tune.num_frames = frames
  config.pretrained.dtype = dtype
  # --mode=tune's own layout (tune_sd.layout): on several devices the clip
  # is split by frames, the state and frozen parameters FSDP-sharded, and
  # the Pallas attention kernels ('auto' on TPU) run per chip on its frames.
  step, args, _, _, _ = tune_sd.abstract_program(
      config, unet2d.build(SD15, dtype=dtype),
      schedules.from_scheduler_config(stable_diffusion.SD15_SCHEDULER),
      frames, size // 8, size // 8, devices)
  row = dict(target=target.name, trainable=trainable, dtype=dtype,
             remat=remat, frames=frames, size=size)
  start = time.time()
  if flops_only:
    traced, compiled = plan.trace_program(step, args, target), None
  else:
    traced, compiled = plan.compile_program(step, args, target)
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
