"""Cost of text conditioning: train-step time with and without it.

  python experiments/benchmark_text.py   # --steps=20 --repeats=3

configs/t2v_quickstart.py's train step (8x16x16, batch 8) timed side by
side in one process, interleaved round by round so that machine load
falls on every variant alike: no text (text.encoder='none'), the pooled
caption only, cross-attention only, and both (the config's default). Each
variant's batches come from the same pipeline (captions embedded by
wordllama on the host, inside the timing, as in training). Prints the
median seconds per step, the ratio to the text-free step, parameter
counts, and one JSON line.
"""

import functools
import json
import os
import platform
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from configs import t2v_quickstart  # pylint: disable=g-import-not-at-top,wrong-import-position
from vdm_jax import denoiser  # pylint: disable=g-import-not-at-top,wrong-import-position
from vdm_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from vdm_jax import training  # pylint: disable=g-import-not-at-top,wrong-import-position

_STEPS = flags.DEFINE_integer('steps', 20, 'Timed steps per round.')
_REPEATS = flags.DEFINE_integer('repeats', 3, 'Rounds.')

VARIANTS = {
    'no text': dict(encoder='none', cross=False, pool=False),
    'pooled only': dict(encoder='wordllama', cross=False, pool=True),
    'cross-attention only': dict(encoder='wordllama', cross=True,
                                 pool=False),
    'cross-attention + pooled': dict(encoder='wordllama', cross=True,
                                     pool=True),
}


def _setup(variant):
  config = t2v_quickstart.get_config()
  config.text.encoder = variant['encoder']
  config.model.text_cross_attention = variant['cross']
  config.model.text_pooling = variant['pool']
  model = denoiser.create_model(config)
  tx, lr_fn = training.create_optimizer(config)
  state = jax.jit(functools.partial(train.init_state, config, model, tx))(
      jax.random.key(0))
  step = jax.jit(functools.partial(train.train_step, model=model, tx=tx,
                                   lr_fn=lr_fn, config=config),
                 donate_argnums=0)
  pipe = train.create_pipeline(config)
  state, metrics = step(state, pipe.batch_for_step(0), jax.random.key(1))
  jax.block_until_ready(metrics)  # Compiled.
  return dict(step=step, state=state, pipe=pipe,
              params=denoiser.count_params(state.params))


def main(argv):
  del argv
  runs = {name: _setup(v) for name, v in VARIANTS.items()}
  times = {name: [] for name in VARIANTS}
  for r in range(_REPEATS.value):
    for name, run in runs.items():
      start = time.perf_counter()
      for i in range(_STEPS.value):
        batch = run['pipe'].batch_for_step(1 + r * _STEPS.value + i)
        run['state'], metrics = run['step'](run['state'], batch,
                                            jax.random.key(1))
      jax.block_until_ready(metrics)
      times[name].append((time.perf_counter() - start) / _STEPS.value)
  base = float(np.median(times['no text']))
  rows = []
  for name in VARIANTS:
    t = float(np.median(times[name]))
    rows.append(dict(variant=name, s_per_step=round(t, 4),
                     ratio=round(t / base, 3),
                     params=runs[name]['params']))
  print(f'{platform.processor() or platform.machine()}, {os.cpu_count()}'
        f' CPUs, JAX {jax.__version__}, {jax.devices()[0].platform};'
        f' {_REPEATS.value} rounds x {_STEPS.value} steps')
  print('| variant | s / step | ratio | parameters |')
  print('|---|---|---|---|')
  for r in rows:
    print(f"| {r['variant']} | {r['s_per_step']} | {r['ratio']} |"
          f" {r['params']:,} |")
  print(json.dumps(rows))


if __name__ == '__main__':
  app.run(main)
