"""Times I3D feature extraction for FVD and estimates protocol run times.

  python experiments/benchmark_fvd.py [--batch_size=4] [--steps=3]
      [--num_frames=16] [--size=64] [--protocol=stylegan_v_2048]

Inputs are uint8 [batch, num_frames, size, size, 3] videos, resized to
224x224 inside the jitted step as in FVD. The last line printed is one JSON
object: compile_s, step_time_s (median after a warm-up step), videos_per_s,
flops_per_video (XLA cost analysis), achieved_flops_per_s, and est_eval_s,
the feature-extraction time of the protocol's generated + real videos at
this rate (the Frechet distance itself takes well under a second).
"""

import json
import os
import statistics
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vdm_jax.evaluation import fvd  # pylint: disable=g-import-not-at-top

_BATCH = flags.DEFINE_integer('batch_size', 4, 'Videos per step.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Timed steps after warm-up.')
_FRAMES = flags.DEFINE_integer('num_frames', 16, 'Frames per video.')
_SIZE = flags.DEFINE_integer('size', 64, 'Input frame size (H = W).')
_PROTOCOL = flags.DEFINE_enum('protocol', 'stylegan_v_2048',
                              list(fvd.PROTOCOLS), 'Protocol to estimate.')


def main(argv):
  del argv
  mesh = fvd.default_mesh()
  batch = _BATCH.value
  shape = (batch, _FRAMES.value, _SIZE.value, _SIZE.value, 3)
  videos = np.random.default_rng(0).integers(0, 256, shape, np.uint8)
  proto = fvd.PROTOCOLS[_PROTOCOL.value]
  fn = fvd._feature_fn(proto.resize, mesh)  # pylint: disable=protected-access
  variables = fvd._variables(mesh)  # pylint: disable=protected-access
  start = time.perf_counter()
  compiled = fn.lower(variables, videos).compile()
  compile_s = time.perf_counter() - start
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', float('nan'))) if cost else float('nan')
  jax.block_until_ready(compiled(variables, videos))  # warm-up
  times = []
  for _ in range(_STEPS.value):
    start = time.perf_counter()
    jax.block_until_ready(compiled(variables, videos))
    times.append(time.perf_counter() - start)
  step = statistics.median(times)
  rate = batch / step
  total = proto.num_generated + proto.num_real
  print(json.dumps({
      'device': jax.devices()[0].device_kind,
      'num_devices': mesh.devices.size,
      'cpu_count': os.cpu_count(),
      'batch_size': batch,
      'input_shape': list(shape),
      'compile_s': round(compile_s, 2),
      'step_time_s': round(step, 3),
      'videos_per_s': round(rate, 4),
      'flops_per_video': flops / batch,
      'achieved_flops_per_s': flops / step,
      'protocol': proto.name,
      'protocol_videos': total,
      'est_eval_s': round(total / rate, 1),
      'est_eval_h': round(total / rate / 3600, 2),
  }))


if __name__ == '__main__':
  app.run(main)
