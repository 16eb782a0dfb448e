"""Does a bfloat16 run track the float32 run? And what is bfloat16 in it?

  python experiments/precision_tracking.py --config=configs/tiny.py \
      --steps=300 --window=50 [--json]

Trains the config's model twice from the same initial parameters on the
same batches and keys (a fixed set of synthetic bouncing-shape clips,
cycled), with model.dtype='float32' and 'bfloat16', through the real
train.train_step (label dropout, the VDM loss, Adam, EMA). Prints the mean
loss of each window of --window steps for both runs and their relative
difference (bf16 - f32) / f32, then the audit of the bfloat16 step: the
dtypes of params, EMA, optimizer state and loss after one step, and the
input dtypes of every convolution, matmul and exp (softmax) in its jaxpr.
The last line is one JSON object (the only output with --json).
"""

import collections
import functools
import json
import os
import sys

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vdm_jax import train  # pylint: disable=g-import-not-at-top
from vdm_jax import training  # pylint: disable=g-import-not-at-top
from vdm_jax import denoiser  # pylint: disable=g-import-not-at-top
from vdm_jax.data import synthetic  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/tiny.py',
                                          'Config file.')
_STEPS = flags.DEFINE_integer('steps', 300, 'Train steps per run.')
_WINDOW = flags.DEFINE_integer('window', 50, 'Steps per averaged window.')
_JSON = flags.DEFINE_bool('json', False, 'Print only the JSON line.')


def batches(config, num_steps: int) -> list[dict[str, np.ndarray]]:
  """num_steps batches cycling over data.num_examples synthetic clips."""
  d = config.data
  data = synthetic.SyntheticVideos(d.num_frames, d.image_size,
                                   num_examples=d.num_examples,
                                   num_classes=max(d.num_classes, 0))
  clips = [data[i] for i in range(d.num_examples)]
  b = config.training.batch_size
  out = []
  for step in range(num_steps):
    idx = [(step * b + j) % d.num_examples for j in range(b)]
    out.append({
        'video': np.stack([clips[i]['video'] for i in idx]),
        'label': np.stack([clips[i]['label'] for i in idx]).astype(np.int32),
        'frame_mask': np.ones((b, d.num_frames), bool)})
  return out


def make_step(config):
  """(init_state(rng), jitted train_step) for config."""
  model = denoiser.create_model(config)
  tx, lr_fn = training.create_optimizer(config)
  init = jax.jit(functools.partial(train.init_state, config, model, tx))
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx,
                                   lr_fn=lr_fn, config=config))
  return init, step


def run(config, dtype: str, data, rng) -> tuple[np.ndarray, object]:
  """Losses per step of a run in `dtype`, and the state after step 1."""
  config = config.copy_and_resolve_references()
  config.model.dtype = dtype
  init, step = make_step(config)
  state = init(jax.random.key(config.seed))
  losses, first = [], None
  for batch in data:
    state, metrics = step(state, batch, rng)
    losses.append(metrics['loss'])
    if first is None:
      first = (state, metrics)
  return np.asarray(jax.device_get(losses), np.float64), first


def _dtypes(tree) -> list[str]:
  return sorted({str(x.dtype) for x in jax.tree.leaves(tree)
                 if jnp.issubdtype(x.dtype, jnp.floating)})


def op_dtypes(config, batch, rng) -> dict[str, dict[str, int]]:
  """Counts of (primitive, input dtypes) in the jaxpr of the train step."""
  init, _ = make_step(config)
  model = denoiser.create_model(config)
  tx, lr_fn = training.create_optimizer(config)
  state = jax.eval_shape(init, jax.random.key(0))
  step = functools.partial(train.train_step, model=model, tx=tx,
                           lr_fn=lr_fn, config=config)
  counts = collections.defaultdict(collections.Counter)

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      name = eqn.primitive.name
      if name in ('conv_general_dilated', 'dot_general', 'exp'):
        ins = ','.join(str(v.aval.dtype) for v in eqn.invars)
        counts[name][f'{ins}->{eqn.outvars[0].aval.dtype}'] += 1
      for v in eqn.params.values():
        for sub in (v if isinstance(v, (tuple, list)) else (v,)):
          if hasattr(sub, 'eqns'):
            walk(sub)
          elif hasattr(getattr(sub, 'jaxpr', None), 'eqns'):
            walk(sub.jaxpr)

  walk(jax.make_jaxpr(step)(state, batch, rng).jaxpr)
  return {k: dict(v) for k, v in counts.items()}


def main(argv):
  del argv
  config = _CONFIG.value
  data = batches(config, _STEPS.value)
  rng = jax.random.key(1)
  f32, _ = run(config, 'float32', data, rng)
  bf16, (state, metrics) = run(config, 'bfloat16', data, rng)
  w = _WINDOW.value
  windows = []
  for start in range(0, len(f32) - w + 1, w):
    a, b = f32[start:start + w].mean(), bf16[start:start + w].mean()
    windows.append({'steps': [start, start + w], 'f32': round(a, 5),
                    'bf16': round(b, 5), 'rel_diff': round((b - a) / a, 5)})
  bf16_config = config.copy_and_resolve_references()
  bf16_config.model.dtype = 'bfloat16'
  result = {
      'steps': len(f32), 'window': w, 'windows': windows,
      'max_abs_rel_diff': max(abs(x['rel_diff']) for x in windows),
      'per_step_rel_diff_median': float(np.median(np.abs(bf16 - f32) / f32)),
      'bf16_state_dtypes': {'params': _dtypes(state.params),
                            'ema_params': _dtypes(state.ema_params),
                            'opt_state': _dtypes(state.opt_state)},
      'bf16_loss_dtype': str(metrics['loss'].dtype),
      'bf16_op_dtypes': op_dtypes(bf16_config, data[0], rng),
  }
  if not _JSON.value:
    print('| steps | float32 loss | bfloat16 loss | (bf16 - f32) / f32 |')
    print('|---|---|---|---|')
    for x in windows:
      print(f'| {x["steps"][0]}-{x["steps"][1]} | {x["f32"]:.4f} | '
            f'{x["bf16"]:.4f} | {100 * x["rel_diff"]:+.2f}% |')
  print(json.dumps(result))


if __name__ == '__main__':
  app.run(main)
