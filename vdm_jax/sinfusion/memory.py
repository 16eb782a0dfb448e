"""Memory of SinFusion training, estimated before anything is allocated.

SinFusion (Nikankin, Haim, Irani 2022, arXiv 2211.11743) trains each model
on ~95% crops of whole frames, and a NextNet keeps no down-sampling, so the
activations of the backward pass are a few dozen maps of `model.width`
channels at the crop's full resolution per ConvNeXt block and example
(about 44 KB per crop pixel with the defaults, docs/sinfusion.md). They,
not the ~4M parameters, are the memory of training. `train.train` compiles
the step on abstract inputs first (no buffer exists yet), reads XLA's
buffer assignment (`memory_analysis`) and calls `check` with what the
device (or, on CPU, the host) has free:

  estimate = estimate_step(compiled, abstract_state, video_shape, config)
  check(estimate, available_memory(config), config, frame_hw, crop_hw)

`check` logs the estimate and raises InsufficientMemoryError, naming the
numbers and the fields to lower, when it does not fit.
"""

import dataclasses
import os
from typing import Any, Optional

from absl import logging
import jax
import ml_collections
import numpy as np

GIB = 2**30
# Share of the free memory the step may plan for; the rest is left to the
# runtime, the allocator's slack and the checkpoint writer.
USABLE_FRACTION = 0.9


class InsufficientMemoryError(ValueError):
  """The config's train step does not fit in the available memory."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
  """Bytes of one SinFusion train step, from XLA's buffer assignment.

  Attributes:
    temp: XLA's temporary buffers: the activations of one microbatch of
      each model (the three models run one after the other and share them)
      and the gradients.
    state: parameters, their EMA and Adam's two moments (three models).
    video: the training frames [T, H, W, C] float32 on the device.
    other: the rest of the step's non-donated inputs and outputs (metrics,
      keys, the new state while the donated one is in use).
  """

  temp: int
  state: int
  video: int
  other: int

  @property
  def total(self) -> int:
    return self.temp + self.state + self.video + self.other

  def describe(self) -> str:
    return (f'{self.total / GIB:.2f} GiB (activations and other XLA'
            f' temporaries {self.temp / GIB:.2f}, parameters + EMA + Adam'
            f' {self.state / GIB:.3f}, video {self.video / GIB:.3f}, other'
            f' {self.other / GIB:.3f})')


def tree_bytes(tree: Any) -> int:
  """Bytes of the arrays (or ShapeDtypeStructs) of a pytree."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def estimate_step(compiled: jax.stages.Compiled, abstract_state: Any,
                  video_shape: tuple[int, ...]) -> MemoryEstimate:
  """The MemoryEstimate of a compiled train step.

  Args:
    compiled: `make_train_step(...).lower(state, video, rng).compile()`,
      lowered on abstract inputs (jax.eval_shape) so that nothing exists.
    abstract_state: the TrainState's shapes (its bytes are `state`).
    video_shape: [T, H, W, C] of the float32 training frames.
  """
  m = compiled.memory_analysis()
  state = tree_bytes(abstract_state)
  video = int(np.prod(video_shape)) * 4
  live = (m.argument_size_in_bytes + m.output_size_in_bytes
          - m.alias_size_in_bytes)
  return MemoryEstimate(temp=int(m.temp_size_in_bytes), state=state,
                        video=video, other=max(0, int(live) - state - video))


def process_rss() -> Optional[int]:
  """This process's resident bytes now (VmRSS), None where unknown.

  On CPU the step's buffers come on top of it: the peak RSS of training is
  about process_rss() + MemoryEstimate.total (docs/sinfusion.md, 'Memory').
  """
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmRSS:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def _host_available() -> tuple[int, str]:
  """Free host RAM (MemAvailable, or free pages) and a cgroup v2 limit."""
  available, source = None, 'host RAM'
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          available = int(line.split()[1]) * 1024
          source = 'host RAM (MemAvailable in /proc/meminfo)'
          break
  except OSError:
    pass
  if available is None:
    available = os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
    source = 'host RAM (free pages)'
  try:
    with open('/sys/fs/cgroup/memory.max') as f:
      limit = f.read().strip()
    with open('/sys/fs/cgroup/memory.current') as f:
      current = int(f.read().strip())
    if limit != 'max' and int(limit) - current < available:
      available = int(limit) - current
      source = 'the cgroup memory limit (/sys/fs/cgroup/memory.max)'
  except (OSError, ValueError):
    pass
  return available, source


def available_memory(config: Optional[ml_collections.ConfigDict] = None,
                     device: Optional[jax.Device] = None
                     ) -> tuple[Optional[int], str]:
  """(free bytes, where the number comes from) for the train step.

  training.memory_limit_gib > 0 in `config` is taken as given; < 0
  disables the check (None). Otherwise an accelerator's free memory
  (memory_stats: bytes_limit - bytes_in_use), or on CPU the free host RAM.
  """
  limit = float(config.training.get('memory_limit_gib', 0.0)) if config else 0
  if limit < 0:
    return None, 'training.memory_limit_gib < 0 (check disabled)'
  if limit > 0:
    return int(limit * GIB), f'training.memory_limit_gib={limit:g}'
  device = device or jax.devices()[0]
  if device.platform != 'cpu':
    stats = device.memory_stats() or {}
    if 'bytes_limit' in stats:
      return (stats['bytes_limit'] - stats.get('bytes_in_use', 0),
              f'{device.device_kind} memory (memory_stats of {device})')
  return _host_available()


def _fitting_accum_steps(estimate: MemoryEstimate, budget: int,
                         batch_size: int, accum_steps: int) -> Optional[int]:
  """The fewest microbatches (a divisor of the batch) that would fit.

  Activations scale with the microbatch B / k; the rest does not.
  """
  fixed = estimate.total - estimate.temp
  for k in range(accum_steps + 1, batch_size + 1):
    if batch_size % k == 0 and fixed + estimate.temp * accum_steps / k <= (
        budget):
      return k
  return None


def check(estimate: MemoryEstimate, available: tuple[Optional[int], str],
          config: ml_collections.ConfigDict, frame_hw: tuple[int, int],
          crop_hw: tuple[int, int]) -> None:
  """Logs the estimate; raises InsufficientMemoryError if it cannot fit.

  Args:
    estimate: estimate_step of the compiled step.
    available: available_memory(config) (bytes None: no check).
    config: the training config (for the message).
    frame_hw: the frames' (H, W) after data.max_size.
    crop_hw: the training crops' (h, w).

  Raises:
    InsufficientMemoryError: estimate.total > USABLE_FRACTION * available;
      the message gives both, the crop and batch behind the activations,
      and what to lower.
  """
  free, source = available
  t = config.training
  micro = t.batch_size // t.grad_accum_steps
  rss = process_rss()
  logging.info(
      'SinFusion train step memory: %s for microbatches of %d of %d %dx%d'
      ' crops (of %dx%d frames) per model; available %s: %s%s.',
      estimate.describe(), micro, t.batch_size, *crop_hw, *frame_hw,
      source, 'unknown' if free is None else f'{free / GIB:.2f} GiB',
      '' if rss is None else f' (this process already holds'
      f' {rss / GIB:.2f} GiB resident)')
  if free is None:
    return
  budget = int(USABLE_FRACTION * free)
  if estimate.total <= budget:
    return
  hints = []
  k = _fitting_accum_steps(estimate, budget, t.batch_size,
                           t.grad_accum_steps)
  if k is not None:
    hints.append(f'training.grad_accum_steps={k} (now {t.grad_accum_steps};'
                 ' the same update in smaller microbatches)')
  elif t.grad_accum_steps < t.batch_size:
    hints.append(f'training.grad_accum_steps (now {t.grad_accum_steps}, up'
                 f' to training.batch_size={t.batch_size})')
  hints += [
      f'data.max_size (now {config.data.max_size}: frames'
      f' {frame_hw[0]}x{frame_hw[1]}; activations scale with the pixels)',
      f'training.batch_size (now {t.batch_size})',
      f'model.width (now {config.model.width}) or model.depth (now'
      f' {config.model.depth})',
  ]
  raise InsufficientMemoryError(
      f'The SinFusion train step needs about {estimate.describe()}, but'
      f' {source} has {free / GIB:.2f} GiB free ({USABLE_FRACTION:.0%}'
      f' usable: {budget / GIB:.2f} GiB). The activations are those of'
      f' {micro} {crop_hw[0]}x{crop_hw[1]} crops per model at once. Lower '
      + '; or '.join(hints)
      + '. Set training.memory_limit_gib to override the detected limit'
      ' (a negative value skips this check).'
  )
