"""The TensorBoard writer: events TensorBoard reads, and no TensorFlow."""

import os
import subprocess
import sys

import numpy as np
from tensorboard.backend.event_processing import event_accumulator

from vdm_jax import summary

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_scalars_and_images_read_back(tmp_path):
  writer = summary.SummaryWriter(str(tmp_path))
  writer.write_scalars(3, {'loss': 0.25, 'mfu': np.float32(0.5)})
  writer.write_scalars(7, {'loss': 0.125})
  image = np.zeros((2, 4, 6, 3), np.uint8)
  image[1, :, :3] = 255
  writer.write_images(7, {'preview': image})
  writer.close()
  acc = event_accumulator.EventAccumulator(str(tmp_path))
  acc.Reload()
  loss = acc.Scalars('loss')
  assert [(e.step, e.value) for e in loss] == [(3, 0.25), (7, 0.125)]
  assert acc.Scalars('mfu')[0].value == 0.5
  assert sorted(acc.Tags()['images']) == ['preview/0', 'preview/1']
  second = acc.Images('preview/1')[0]
  assert (second.step, second.width, second.height) == (7, 6, 4)
  # Disabled (processes > 0): no event file.
  off = tmp_path / 'off'
  summary.SummaryWriter(str(off), enabled=False).write_scalars(1, {'a': 1})
  assert not off.exists()


def test_programs_do_not_import_tensorflow(tmp_path):
  """Synthetic-data runs start without TensorFlow (seconds per process and
  its start-up lines in the terminal); TFDS sources import it on use."""
  code = ('import sys, vdm_jax.main, vdm_jax.train, vdm_jax.sample, '
          'vdm_jax.evaluate; from vdm_jax import summary; '
          f'w = summary.SummaryWriter({str(tmp_path)!r}); '
          "w.write_scalars(1, {'a': 1.0}); w.close(); "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
          "('tensorflow', 'tensorflow_datasets')))")
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                       capture_output=True, text=True, check=True)
  assert out.stdout.strip() == '[]', out.stdout[-2000:]
