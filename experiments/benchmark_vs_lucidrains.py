"""Our train step against lucidrains/video-diffusion-pytorch's, side by side.

  python3 -m venv /tmp/tv && /tmp/tv/bin/pip install --no-deps \
      -r experiments/requirements-lucidrains.txt
  python experiments/benchmark_vs_lucidrains.py --torch_python=/tmp/tv/bin/python

The same shape for both (issue 15's reference): base width 64, channel
multipliers (1, 2, 4), 2 residual blocks per level, 8 frames of 32x32,
batch 2, float32, on this machine's CPU cores. Theirs
(experiments/lucidrains_step.py): Unet3D(dim=64, dim_mults=(1, 2, 4)), which
has linear spatial attention at every level, full spatial attention in the
middle only and temporal attention everywhere; ours
(experiments/benchmark_train.py): attention at 16x16 and 8x8, heads of 64.
The models differ, so the comparison is of FLOP rates: matmul and
convolution FLOPs per second, counted alike on both sides (2 per
multiply-add, padding included: torch.utils.flop_counter and
perf.matmul_flops). The two run in turn, --rounds times, each in its own
process, so that both see the machine in the same state; the last line is
one JSON object with the medians and our rate over theirs.
"""

import json
import os
import re
import statistics
import subprocess
import sys

from absl import app
from absl import flags

_TORCH_PYTHON = flags.DEFINE_string(
    'torch_python', None,
    'A Python with torch and video-diffusion-pytorch (see the docstring).')
_ROUNDS = flags.DEFINE_integer('rounds', 2, 'Alternations of the two.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per run.')

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
OURS = [
    os.path.join(HERE, 'benchmark_train.py'),
    f'--config={ROOT}/configs/quickstart.py',
    '--config.data.num_frames=8', '--config.data.image_size=32',
    '--config.model.base_channels=64', "--config.model.channel_mults=(1,2,4)",
    '--config.model.num_res_blocks=2', "--config.model.attn_resolutions=(8,16)",
    '--config.model.head_dim=64', '--config.training.batch_size=2',
    '--config.mesh.data=1', '--num_devices=1',
]
THEIRS = [os.path.join(HERE, 'lucidrains_step.py'), '--dim=64',
          '--dim_mults=1,2,4', '--frames=8', '--size=32', '--batch=2']


def _last_json(cmd, env):
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                        check=False)
  if proc.returncode != 0:
    raise RuntimeError(f'{cmd[0]} {cmd[1]} failed:\n{proc.stderr[-3000:]}')
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  torch_python = _TORCH_PYTHON.value
  if not torch_python or not os.access(torch_python, os.X_OK):
    raise SystemExit(
        f'--torch_python={torch_python!r} is not an executable Python; make'
        ' one as the docstring of experiments/benchmark_vs_lucidrains.py'
        ' says.')
  env = dict(os.environ)
  # One real CPU device (a test setting of fake devices would split it).
  env['XLA_FLAGS'] = re.sub(r'--xla_force_host_platform_device_count=\d+',
                            '', env.get('XLA_FLAGS', '')).strip()
  env['JAX_PLATFORMS'] = 'cpu'
  steps = f'--steps={_STEPS.value}'
  ours, theirs = [], []
  for r in range(_ROUNDS.value):
    ours.append(_last_json([sys.executable, *OURS, steps], env))
    theirs.append(_last_json([torch_python, *THEIRS, steps], env))
    print(f'round {r + 1}/{_ROUNDS.value}: ours'
          f' {ours[-1]["step_time_s"]:.3f} s/step'
          f' {ours[-1]["matmul_conv_flops_per_s"] / 1e9:.1f} GFLOP/s, theirs'
          f' {theirs[-1]["step_time_s"]:.3f} s/step'
          f' {theirs[-1]["matmul_conv_flops_per_s"] / 1e9:.1f} GFLOP/s',
          flush=True)
  med = lambda runs, key: statistics.median(x[key] for x in runs)
  ours_rate = med(ours, 'matmul_conv_flops_per_s')
  theirs_rate = med(theirs, 'matmul_conv_flops_per_s')
  print(json.dumps({
      'ours': {'step_time_s': med(ours, 'step_time_s'),
               'matmul_conv_flops_per_step':
                   ours[0]['matmul_conv_flops_per_step'],
               'matmul_conv_flops_per_s': ours_rate,
               'params': ours[0]['params'],
               'matmul_flops_per_s': med(ours, 'matmul_flops_per_s')},
      'theirs': {'step_time_s': med(theirs, 'step_time_s'),
                 'matmul_conv_flops_per_step':
                     theirs[0]['matmul_conv_flops_per_step'],
                 'matmul_conv_flops_per_s': theirs_rate,
                 'params': theirs[0]['params'],
                 'torch': theirs[0]['torch'], 'threads': theirs[0]['threads']},
      'flop_rate_ratio': ours_rate / theirs_rate,
      'step_time_ratio': med(ours, 'step_time_s') / med(theirs, 'step_time_s'),
      'rounds': _ROUNDS.value,
  }))


if __name__ == '__main__':
  app.run(main)
