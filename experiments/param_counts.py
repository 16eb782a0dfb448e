"""Prints the parameter count of each config's UNet (no compute, eval_shape).

  python experiments/param_counts.py [configs/ucf101_64.py ...]
"""

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from vdm_jax import denoiser  # pylint: disable=g-import-not-at-top

DEFAULT = ('quickstart', 'tiny', 'ucf101_64', 'bair_64', 'kinetics600_64')


def load_config(path):
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main(paths):
  paths = paths or [os.path.join(ROOT, 'configs', f'{n}.py') for n in DEFAULT]
  for path in paths:
    config = load_config(path)
    model = denoiser.create_model(config)
    n = denoiser.count_params(denoiser.abstract_params(config, model))
    print(f'{os.path.basename(path):24s} {n:>14,d}')


if __name__ == '__main__':
  main(sys.argv[1:])
