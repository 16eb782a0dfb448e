"""Where the train step's time goes: device time per kind of XLA operation.

  python experiments/profile_step.py --config=configs/quickstart.py \
      [--config.training.batch_size=4 ...] [--steps=3] [--top=15]

Compiles the config's train step, runs it a few times, then traces
--steps steps with jax.profiler (a Perfetto JSON in --trace_dir) and sums
the duration of each executed XLA operation (one event per thunk on CPU,
per kernel on GPU) by what its HLO computes: convolution, dot, reduce,
transpose, slice, concatenate or elementwise (a fusion counts as the first
of these its body contains). Then the slowest convolutions with their
FLOP rates (perf.hlo_conv_flops: 2 per multiply-add, padding included) and
shapes, and the slowest memory-bound operations with the model op (flax
module path) they come from.

The sums are of per-operation times, which on several threads overlap: they
can exceed the step's wall time; compare their shares, not their total with
the step. The last line printed is one JSON object (ms per step by kind,
step_time_s).
"""

import collections
import glob
import gzip
import json
import os
import re
import shutil
import sys
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vdm_jax import denoiser  # pylint: disable=g-import-not-at-top
from vdm_jax import perf  # pylint: disable=g-import-not-at-top
from vdm_jax import sharding  # pylint: disable=g-import-not-at-top
from vdm_jax import train  # pylint: disable=g-import-not-at-top
from vdm_jax import training  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file.')
_STEPS = flags.DEFINE_integer('steps', 3, 'Traced steps.')
_TOP = flags.DEFINE_integer('top', 15, 'Rows of each list.')
_TRACE_DIR = flags.DEFINE_string('trace_dir', '/tmp/vdm_jax_profile_step',
                                 'Where the trace is written (replaced).')

def _op_name(line):
  m = re.search(r'op_name="([^"]+)"', line)
  return re.sub(r'^jit\([^)]*\)/', '', m.group(1)) if m else '?'


def main(argv):
  del argv
  config = _CONFIG.value
  mesh = sharding.make_mesh(config.mesh)
  model = denoiser.create_model(config)
  tx, lr_fn = training.create_optimizer(config)
  state, shardings = train.create_train_state(
      config, model, tx, jax.random.key(0), mesh)
  step_fn = train.make_train_step(config, model, tx, lr_fn, mesh, shardings)
  batch = sharding.host_to_global(
      train.create_pipeline(config).batch_for_step(0), mesh)
  key = jax.random.key(1)
  compiled = getattr(step_fn, 'fn', step_fn).lower(state, batch, key).compile()
  comps, instructions = perf.parse_hlo(compiled.as_text())

  def run(n):
    nonlocal state
    for _ in range(n):
      state, metrics = step_fn(state, batch, key)
      jax.block_until_ready(metrics)

  run(3)  # Compile and warm up.
  start = time.perf_counter()
  run(_STEPS.value)
  step_time = (time.perf_counter() - start) / _STEPS.value
  shutil.rmtree(_TRACE_DIR.value, ignore_errors=True)
  with jax.profiler.trace(_TRACE_DIR.value, create_perfetto_trace=True):
    run(_STEPS.value)
  path = glob.glob(os.path.join(_TRACE_DIR.value, '**', '*.trace.json.gz'),
                   recursive=True)[0]
  with gzip.open(path) as f:
    events = json.load(f)
  events = events['traceEvents'] if isinstance(events, dict) else events
  per_op = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and e.get('name') in instructions:
      per_op[e['name']] += e.get('dur', 0) / 1e3 / _STEPS.value  # ms/step.

  by_kind, count = collections.Counter(), collections.Counter()
  for name, ms in per_op.items():
    kind = perf.hlo_kind(name, comps, instructions)
    by_kind[kind] += ms
    count[kind] += 1
  print(f'step {step_time:.3f} s (mean of {_STEPS.value} untraced steps);'
        f' operations traced per step: {sum(count.values())}')
  print('ms/step  ops  kind')
  for kind, ms in by_kind.most_common():
    print(f'{ms:7.1f} {count[kind]:5d}  {kind}')

  print('\nslowest convolutions (ms/step, GFLOP/s, output shape, window)')
  convs = []
  for name, ms in per_op.items():
    if perf.hlo_kind(name, comps, instructions) not in (
        'convolution', 'fusion:convolution'):
      continue
    opcode, called, line = instructions[name]
    body = comps.get(called, []) if opcode == 'fusion' else [line]
    conv = next(x for x in body if ' convolution(' in x)
    shape = re.findall(r'[a-z0-9]+\[[\d,]*\]', conv.split('=', 1)[1])[0]
    window = re.findall(r'window=\{([^}]*)\}', conv)
    flops = perf.hlo_conv_flops(name, comps, instructions)
    convs.append((ms, flops / (ms * 1e6) if ms else 0.0, name, shape, window))
  conv_ms = sum(c[0] for c in convs)
  conv_flops = sum(c[1] * c[0] * 1e6 for c in convs)
  for ms, rate, name, shape, window in sorted(convs, reverse=True)[:_TOP.value]:
    print(f'{ms:7.2f} {rate:6.1f}  {name:22s} {shape}  {window}')
  if conv_ms:
    print(f'all convolutions: {conv_flops / 1e9:.2f} GFLOP in {conv_ms:.1f} ms'
          f' per step, {conv_flops / (conv_ms * 1e6):.1f} GFLOP/s')

  print('\nslowest memory-bound operations (ms/step, kind, model op)')
  memory_bound = []
  for name, ms in per_op.items():
    kind = perf.hlo_kind(name, comps, instructions)
    if kind in ('fusion:transpose', 'fusion:slice', 'fusion:concatenate',
                'copy', 'fusion:reduce', 'fusion:elementwise', 'transpose'):
      memory_bound.append((ms, kind, name, _op_name(instructions[name][2])))
  for ms, kind, name, op in sorted(memory_bound, reverse=True)[:_TOP.value]:
    print(f'{ms:7.2f}  {kind:20s} {name:28s} {op[-80:]}')
  print(json.dumps({'step_time_s': round(step_time, 4),
                    'conv_gflops_per_s': (round(conv_flops / (conv_ms * 1e6), 2)
                                          if conv_ms else None),
                    'ms_per_step_by_kind': {k: round(v, 2) for k, v in
                                            by_kind.most_common()}}))


if __name__ == '__main__':
  app.run(main)
