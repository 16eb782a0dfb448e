"""What each model.remat policy keeps for the train loss's backward pass.

  python experiments/remat_memory.py --config=configs/tiny.py
  python experiments/remat_memory.py --config=configs/ucf101_64.py \
      --batch_size=1 --nocompile [--json]

For every policy (--policies) and compute dtype (--dtypes), two figures:

- residuals: the bytes that the backward pass of the train loss
  (train._make_loss_fn: label dropout, the VDM loss, dropout on) keeps from
  its forward pass, per example: the outputs of the jaxpr of jax.vjp's
  closure (what jax.ad_checkpoint.print_saved_residuals lists); traced,
  nothing compiled or allocated, so exact for what JAX asks to keep
  under the policy on any backend. Per example = (batch_size + 1 examples)
  minus (batch_size examples), which cancels the parameters and their
  casts. 'device' and 'host' split them by memory space: 'offload' moves the
  block outputs to pinned host memory.
- temp: XLA's memory_analysis() of the compiled loss gradient
  (jax.jit(jax.grad(loss)) lowered from abstract shapes), temp and host temp
  bytes at --batch_size; skipped with --nocompile (the ucf101_64 UNet takes
  about 4 minutes per compile on a 2-core CPU). XLA:CPU does not realise
  rematerialisation's savings (docs/benchmarks.md), so the CPU temp bytes
  are not what an accelerator needs: run the same command on the GPU/TPU.

Sizes come from the config and its overrides (--config.data.num_frames,
--config.data.image_size, --config.data.image_frames, --config.model.*).
Prints a markdown table, then one JSON object per line (only those with
--json).
"""

import json
import os
import sys
import time
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vdm_jax import denoiser  # pylint: disable=g-import-not-at-top
from vdm_jax import train  # pylint: disable=g-import-not-at-top
from vdm_jax.models import unet3d  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file(
    'config', 'configs/tiny.py', 'Config file (sizes from it and overrides).')
_POLICIES = flags.DEFINE_list('policies', list(unet3d.REMAT),
                              'model.remat policies to measure.')
_DTYPES = flags.DEFINE_list('dtypes', ['float32', 'bfloat16'],
                            'model.dtype values to measure.')
_BATCH_SIZE = flags.DEFINE_integer(
    'batch_size', 1, 'Examples of the compiled step (the residuals are per '
    'example: the difference between batch_size + 1 and batch_size).')
_COMPILE = flags.DEFINE_bool(
    'compile', True, 'Also compile the loss gradient for memory_analysis().')
_JSON = flags.DEFINE_bool('json', False, 'Print only the JSON lines.')

GIB = 2**30


def abstract_microbatch(config, batch_size: int) -> dict[str, Any]:
  """The shapes of the microbatch that train._make_loss_fn's loss takes."""
  d = config.data
  t = d.num_frames + d.image_frames
  key = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch_size))
  sds = jax.ShapeDtypeStruct
  mb = {
      'video': sds((batch_size, t, d.image_size, d.image_size, d.channels),
                   jnp.uint8),
      'label': sds((batch_size,), jnp.int32),
      'frame_mask': sds((batch_size, t), jnp.bool_),
      'loss_rng': key,
      'label_u': sds((batch_size,), jnp.float32),
      'image_label_u': sds((batch_size, d.image_frames), jnp.float32),
  }
  if d.image_frames and config.model.num_classes:
    mb['image_label'] = sds((batch_size, d.image_frames), jnp.int32)
  return mb


def _loss(config, model):
  # pylint: disable-next=protected-access
  loss_fn = train._make_loss_fn(model, config)
  return lambda params, mb, rng: loss_fn(params, mb, rng)[0]


def residual_bytes(config, batch_size: int) -> dict[str, int]:
  """Bytes the loss's backward pass keeps, by memory space (traced only)."""
  model = denoiser.create_model(config)
  params = denoiser.abstract_params(config, model)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  mb = abstract_microbatch(config, batch_size)
  loss = _loss(config, model)
  # The outputs of the jaxpr of jax.vjp's closure are its residuals (what
  # jax.ad_checkpoint.print_saved_residuals lists), with their memory space.
  closed = jax.make_jaxpr(
      lambda p, mb, rng: jax.vjp(lambda q: loss(q, mb, rng), p)[1])(
          params, mb, rng)
  out = {'device': 0, 'host': 0}
  seen = set()
  for var in closed.jaxpr.outvars:
    if id(var) in seen:
      continue
    seen.add(id(var))
    aval = var.aval
    space = getattr(getattr(aval, 'memory_space', None), 'name', 'Device')
    key = 'host' if space.lower() == 'host' else 'device'
    out[key] += int(np.prod(aval.shape)) * aval.dtype.itemsize
  return out


def compiled_memory(config, batch_size: int) -> dict[str, Any]:
  """memory_analysis() of the jitted loss gradient, from abstract shapes."""
  model = denoiser.create_model(config)
  params = denoiser.abstract_params(config, model)
  rng = jax.eval_shape(lambda: jax.random.key(0))
  mb = abstract_microbatch(config, batch_size)
  start = time.time()
  compiled = jax.jit(jax.grad(_loss(config, model))).lower(
      params, mb, rng).compile()
  mem = compiled.memory_analysis()
  return {'temp': int(mem.temp_size_in_bytes),
          'host_temp': int(mem.host_temp_size_in_bytes),
          'argument': int(mem.argument_size_in_bytes),
          'compile_s': round(time.time() - start, 1)}


def measure(config, policy: str, dtype: str, batch_size: int,
            compile_: bool) -> dict[str, Any]:
  """One row: residuals per example and (optionally) compiled temp bytes."""
  config = config.copy_and_resolve_references()
  config.model.remat = policy
  config.model.dtype = dtype
  start = time.time()
  one = residual_bytes(config, batch_size)
  two = residual_bytes(config, batch_size + 1)
  row = {
      'policy': policy, 'dtype': dtype, 'batch_size': batch_size,
      'residual_device_per_example': two['device'] - one['device'],
      'residual_host_per_example': two['host'] - one['host'],
      'residual_device_batch': one['device'],
      'residual_host_batch': one['host'],
      'trace_s': round(time.time() - start, 1),
  }
  if compile_:
    row.update(compiled_memory(config, batch_size))
  return row


def _size(n: float) -> str:
  if n >= GIB:
    return f'{n / GIB:.2f} GiB'
  return f'{n / 2**20:.2f} MiB'


def table(rows: list[dict[str, Any]]) -> str:
  """Markdown table of the rows (bytes in MiB or GiB)."""
  compiled = any('temp' in r for r in rows)
  head = ['remat', 'dtype', 'residuals / example (device)',
          'residuals / example (host)']
  if compiled:
    head += [f'temp (batch {rows[0]["batch_size"]})', 'host temp']
  lines = ['| ' + ' | '.join(head) + ' |',
           '|' + '---|' * len(head)]
  for r in rows:
    cells = [r['policy'], r['dtype'], _size(r['residual_device_per_example']),
             _size(r['residual_host_per_example'])]
    if compiled:
      cells += [_size(r['temp']), _size(r['host_temp'])]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def main(argv):
  del argv
  config = _CONFIG.value
  d = config.data
  size = {'config': config_flags.get_config_filename(flags.FLAGS['config']),
          'num_frames': d.num_frames, 'image_frames': d.image_frames,
          'image_size': d.image_size, 'base_channels':
          config.model.base_channels,
          'channel_mults': list(config.model.channel_mults),
          'backend': jax.default_backend()}
  rows = []
  for dtype in _DTYPES.value:
    for policy in _POLICIES.value:
      row = {**measure(config, policy, dtype, _BATCH_SIZE.value,
                       _COMPILE.value), **size}
      rows.append(row)
      if not _JSON.value:
        print(f'{policy} {dtype}: {row}', file=sys.stderr, flush=True)
  if not _JSON.value:
    print(table(rows))
  for r in rows:
    print(json.dumps(r))


if __name__ == '__main__':
  app.run(main)
