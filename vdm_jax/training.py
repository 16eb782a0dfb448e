"""The training loop shared by the VDM and SinFusion programs.

A program (vdm_jax/train.py, vdm_jax/sinfusion/train.py) supplies its
initial `TrainState`, a jitted `step_fn(state, batch) -> (state, metrics)`
and its batches; `run` does the rest the same way for both:

  - resumes from the last checkpoint of the workdir (restored into the
    shapes and shardings of the given state), so a restarted job goes on
    without being asked to;
  - checks the metrics for non-finite values one step late (the metrics of
    step s are fetched after step s + 1 is dispatched, so the host never
    waits on the device), and always before a checkpoint is saved, so a
    diverged state is never saved;
  - logs loss, per-model losses ('loss_*'), grad_norm, steps/s, ETA and
    the throughput (TFLOP/s per device and MFU, `perf.Throughput`), and writes
    every metric to TensorBoard (`summary.SummaryWriter`, no TensorFlow);
  - traces the steps of training.profile_steps with jax.profiler into
    workdir/profile (TensorBoard's profile tab);
  - saves a checkpoint every `checkpoint_every_steps` and at the last step;
  - on SIGTERM (a preemption notice: TPU maintenance, SLURM's
    --signal=TERM@300) or orbax's `reached_preemption`, saves at the end of
    the current step and returns;
  - calls periodic hooks `(step, state, writer)` (the VDM preview).

The optimizer (Adam / AdamW with linear warmup, VDM App. A) and the
parameter EMA live here too, in `create_optimizer` and
`TrainState.apply_gradients`.
"""

import dataclasses
import itertools
import signal
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vdm_jax import checkpoint
from vdm_jax import perf
from vdm_jax import summary

OPTIMIZERS = ('adam', 'adamw')
DECAYS = ('constant', 'cosine')

# (step, state, writer) -> None, called after the update of `step`.
Hook = Callable[[int, Any, summary.SummaryWriter], None]
# (state, batch) -> (new_state, scalar metrics); jitted, may donate state.
# A `Step` (a jitted function and its arguments) also gives its FLOPs.
StepFn = Callable[[Any, Any], tuple[Any, Mapping[str, jnp.ndarray]]]


@dataclasses.dataclass(frozen=True)
class Step:
  """A jitted step function and how (state, batch) become its arguments.

  `run` traces, lowers and compiles `fn` for the first batch and reads the
  step's FLOPs from XLA's cost analysis; jax caches that executable, so the
  calls that follow do not compile again. A plain (state, batch) callable
  also trains, but without TFLOP/s or MFU.

  Attributes:
    fn: a jax.jit-wrapped function (may donate the state).
    arguments: (state, batch) -> the positional arguments of `fn`, e.g.
      `lambda s, b: (s, b, rng)`.
  """

  fn: Any
  arguments: Callable[[Any, Any], tuple[Any, ...]]

  def __call__(self, state, batch):
    return self.fn(*self.arguments(state, batch))

  def trace(self, state, batch) -> jax.stages.Traced:
    return self.fn.trace(*self.arguments(state, batch))


@flax.struct.dataclass
class TrainState:
  """Parameters, their EMA and the optimizer state of one run.

  Attributes:
    step: int32 scalar, the number of updates applied.
    params: the parameter pytree.
    ema_params: the exponential moving average of `params` (sampled from).
    opt_state: the optax state of `params`.
  """

  step: jnp.ndarray
  params: Any
  ema_params: Any
  opt_state: Any

  @classmethod
  def create(cls, params: Any,
             tx: optax.GradientTransformation) -> 'TrainState':
    """Step 0; the EMA starts at (a copy of) the parameters."""
    # A copy: the train step donates the state, and one buffer cannot be
    # donated twice (called outside jit, `params` would be both leaves).
    return cls(step=jnp.zeros((), jnp.int32), params=params,
               ema_params=jax.tree.map(jnp.copy, params),
               opt_state=tx.init(params))

  def apply_gradients(self, grads: Any, tx: optax.GradientTransformation,
                      ema_decay: float) -> 'TrainState':
    """One optimizer update, the EMA update and step + 1.

    ema <- decay * ema + (1 - decay) * params, with the updated params.

    Args:
      grads: gradients shaped like `params`.
      tx: the optimizer of `opt_state`.
      ema_decay: the EMA decay (config.optimizer.ema_decay).

    Returns:
      The new TrainState.
    """
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    ema_params = jax.tree.map(
        lambda e, p: ema_decay * e + (1.0 - ema_decay) * p,
        self.ema_params, params)
    return self.replace(step=self.step + 1, params=params,
                        ema_params=ema_params, opt_state=opt_state)


def update_metrics(grads: Any, params: Any,
                   lr: jnp.ndarray) -> dict[str, jnp.ndarray]:
  """The scalars every train step reports besides its losses.

  Args:
    grads: the gradients of the update.
    params: the parameters after the update.
    lr: the learning rate of the update (lr_fn(state.step) before it).

  Returns:
    {'grad_norm', 'param_norm' (global L2 norms), 'lr'}.
  """
  return {'grad_norm': optax.tree.norm(grads),
          'param_norm': optax.tree.norm(params), 'lr': lr}


def split_microbatches(tree: Any, k: int) -> Any:
  """[B, ...] -> [k, B / k, ...]; microbatch j holds examples j, j + k, ...

  Strided so that every microbatch takes an equal share from every device's
  slice of a batch sharded over its leading axis.
  """
  def split(x):
    x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
    return jnp.moveaxis(x, 1, 0)

  return jax.tree.map(split, tree)


def accumulate_gradients(value_and_grad_fn: Callable[..., Any], params: Any,
                         inputs: Any, k: int) -> Any:
  """The mean of value_and_grad_fn's (values, grads) over k microbatches.

  The activations held are those of B / k examples: the same update as the
  whole batch (up to float rounding) when the loss is a mean over examples
  whose random draws are per example.

  Args:
    value_and_grad_fn: (params, microbatch, j) -> (values, grads), j the
      microbatch index (int32 scalar), or None when k == 1 (the whole batch).
    params: the parameters.
    inputs: pytree of [B, ...] arrays, B divisible by k.
    k: the number of microbatches (lax.scan over split_microbatches).
  """
  if k == 1:
    return value_and_grad_fn(params, inputs, None)

  def accumulate(carry, xs):
    j, mb = xs
    return jax.tree.map(jnp.add, carry, value_and_grad_fn(params, mb, j)), None

  shapes = jax.eval_shape(value_and_grad_fn, params,
                          jax.tree.map(lambda x: x[0], split_microbatches(
                              inputs, k)), jnp.int32(0))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  total, _ = jax.lax.scan(
      accumulate, zeros, (jnp.arange(k), split_microbatches(inputs, k)))
  return jax.tree.map(lambda a: a / k, total)


def learning_rate_schedule(opt: ml_collections.ConfigDict,
                           num_train_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `learning_rate`, then constant (VDM App. A).

  With opt.decay == 'cosine' the rate then follows a half cosine from
  `learning_rate` at the end of the warmup to `decay_to * learning_rate` at
  num_train_steps (and stays there): a short run ends on small steps
  instead of relying on the EMA alone. The rate is a function of the step,
  so resuming is exact; a resumed run given a larger num_train_steps
  follows the longer schedule from its step on.
  """
  warmup = int(opt.warmup_steps)
  if opt.decay == 'constant':
    if warmup > 0:
      return optax.linear_schedule(0.0, opt.learning_rate, warmup)
    return optax.constant_schedule(opt.learning_rate)
  return optax.warmup_cosine_decay_schedule(
      0.0, opt.learning_rate, warmup, max(num_train_steps, warmup + 1),
      end_value=opt.decay_to * opt.learning_rate)


def check_optimizer(opt: ml_collections.ConfigDict) -> None:
  """Raises ValueError on an unknown config.optimizer.name."""
  if opt.name not in OPTIMIZERS:
    raise ValueError(
        f'Unknown optimizer.name {opt.name!r}; choose one of {OPTIMIZERS}.')
  if opt.decay not in DECAYS:
    raise ValueError(
        f'Unknown optimizer.decay {opt.decay!r}; choose one of {DECAYS}.')
  if not 0.0 <= opt.decay_to <= 1.0:
    raise ValueError(f'optimizer.decay_to={opt.decay_to} must be in [0, 1]'
                     ' (the final learning rate as a fraction of'
                     ' optimizer.learning_rate).')


def create_optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Adam or AdamW with warmup and optional global-norm gradient clipping.

  Args:
    config: the full config (reads config.optimizer).

  Returns:
    (tx, lr_fn): the optimizer and its learning-rate schedule.
  """
  opt = config.optimizer
  check_optimizer(opt)
  lr = learning_rate_schedule(opt, int(config.training.num_train_steps))
  if opt.name == 'adam':
    tx = optax.adam(lr, b1=opt.b1, b2=opt.b2)
  else:
    tx = optax.adamw(lr, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)
  if opt.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip), tx)
  return tx, lr


def check_finite(step: int, metrics: Mapping[str, Any]) -> None:
  """Host-side guard: stop with the step named when training diverges."""
  bad = {k: v for k, v in metrics.items() if not np.isfinite(v)}
  if bad:
    raise FloatingPointError(
        f'Non-finite training metrics at step {step}: {bad}. The last good'
        ' checkpoint is kept; lower optimizer.learning_rate, raise'
        ' optimizer.warmup_steps or set optimizer.grad_clip.'
    )


class _Preemption:
  """Turns SIGTERM (preemption notice) into a save-and-exit at a step end."""

  def __init__(self):
    self.requested = False
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # Not in the main thread.
      self._old = None

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM received: saving a checkpoint and stopping.')
    self.requested = True

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


@dataclasses.dataclass(frozen=True)
class LoopSettings:
  """The step counts of `run` (from config.training).

  Attributes:
    num_train_steps: the last step.
    log_every_steps: log line and TensorBoard scalars every N steps (and
      at the last one).
    checkpoint_every_steps: checkpoint every N steps (and at the last one).
    profile_steps: None, or (start, stop): steps start .. stop - 1 are
      traced with jax.profiler into workdir/profile.
    grad_accum_steps: microbatches per update; XLA counts a loop body
      once, so the step's FLOPs are scaled by it (perf.loops_counted_once).
  """

  num_train_steps: int
  log_every_steps: int
  checkpoint_every_steps: int
  profile_steps: tuple[int, int] | None = None
  grad_accum_steps: int = 1

  def __post_init__(self):
    if self.log_every_steps < 1 or self.checkpoint_every_steps < 1:
      raise ValueError('training.log_every_steps and'
                       ' training.checkpoint_every_steps must be >= 1.')
    if self.profile_steps is not None:
      p = self.profile_steps
      if (len(p) != 2 or not all(isinstance(x, int) for x in p)
          or not 1 <= p[0] < p[1] <= self.num_train_steps + 1):
        raise ValueError(
            f'training.profile_steps={p!r} must be None or (start, stop)'
            f' with 1 <= start < stop <= num_train_steps + 1'
            f' = {self.num_train_steps + 1}: steps start .. stop - 1 are'
            ' traced.')

  @classmethod
  def from_config(cls, training_config: ml_collections.ConfigDict
                  ) -> 'LoopSettings':
    t = training_config
    profile = t.get('profile_steps')
    return cls(num_train_steps=int(t.num_train_steps),
               log_every_steps=int(t.log_every_steps),
               checkpoint_every_steps=int(t.checkpoint_every_steps),
               profile_steps=None if profile is None else tuple(profile),
               grad_accum_steps=int(t.get('grad_accum_steps', 1)))


def open_workdir(config: ml_collections.ConfigDict, workdir: str
                 ) -> tuple[checkpoint.Checkpointer,
                            summary.SummaryWriter]:
  """Saves config.json; returns (checkpointer, TensorBoard writer).

  Only process 0 writes events; the others log through absl.
  """
  ckpt = checkpoint.Checkpointer(
      workdir, keep=config.training.keep_checkpoints)
  checkpoint.save_config(config, workdir)
  writer = summary.SummaryWriter(workdir, enabled=jax.process_index() == 0)
  return ckpt, writer


def log_progress(step: int, total: int, metrics: Mapping[str, float],
                 rate: float, writer: summary.SummaryWriter,
                 throughput: Mapping[str, float] | None = None) -> None:
  """One log line (loss, 'loss_*' terms, grad_norm, rate, TFLOP/s, MFU,
  ETA) + scalars; `throughput` is perf.Throughput.metrics(rate)."""
  throughput = throughput or {}
  eta = (total - step) / max(rate, 1e-9)
  parts = ', '.join(f'{k[len("loss_"):]} {v:.4f}' for k, v in metrics.items()
                    if k.startswith('loss_'))
  speed = ''
  if 'tflops_per_device' in throughput:
    speed = f'  {throughput["tflops_per_device"]:.3g} TFLOP/s/device'
    speed += (f'  MFU {100 * throughput["mfu"]:.1f}%' if 'mfu' in throughput
              else '  MFU unknown')
  logging.info(
      'step %d/%d  loss %.4f%s  grad_norm %.3f  %.2f steps/s%s  ETA %s',
      step, total, metrics['loss'], f' ({parts})' if parts else '',
      metrics['grad_norm'], rate, speed,
      time.strftime('%H:%M:%S', time.gmtime(eta)),
  )
  writer.write_scalars(step, {**metrics, 'steps_per_sec': rate,
                              **throughput})


def _host(metrics: Mapping[str, jnp.ndarray]) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


class _Profile:
  """jax.profiler trace of steps [start, stop) (LoopSettings.profile_steps)."""

  def __init__(self, steps: tuple[int, int] | None, first: int,
               log_dir: str):
    # A resumed run traces what is left of the window.
    self.start = None if steps is None else max(steps[0], first)
    self.stop = None if steps is None else steps[1]
    self.log_dir = log_dir
    self.active = False

  def before(self, step: int) -> None:
    if self.start is not None and step == self.start < self.stop:
      logging.info('Profiling steps %d..%d into %s.', step, self.stop - 1,
                   self.log_dir)
      jax.profiler.start_trace(self.log_dir)
      self.active = True

  def after(self, step: int, state: Any) -> None:
    if self.active and step == self.stop - 1:
      jax.block_until_ready(state)
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False


def _loop(state, step_fn, batches, start, ckpt, writer, settings, hooks,
          preemption):
  """Steps start + 1 .. num_train_steps; returns the last state."""
  total = settings.num_train_steps
  if start >= total:
    return state
  first = next(batches)
  throughput = perf.step_throughput(step_fn, state, first,
                               settings.grad_accum_steps)
  logging.info('Train step: %s.', throughput.describe())
  batches = itertools.chain([first], batches)
  profile = _Profile(settings.profile_steps, start + 1,
                     str(ckpt.directory.parent / 'profile'))
  pending = None  # (step, device metrics) checked one step late
  t0 = time.time()
  try:
    for step in range(start + 1, total + 1):
      profile.before(step)
      with jax.profiler.StepTraceAnnotation('train', step_num=step):
        state, metrics = step_fn(state, next(batches))
      profile.after(step, state)
      if pending is not None:
        check_finite(pending[0], jax.device_get(pending[1]))
      pending = (step, metrics)
      if step % settings.log_every_steps == 0 or step == total:
        host = _host(metrics)
        check_finite(step, host)
        rate = (step - start) / (time.time() - t0)
        log_progress(step, total, host, rate, writer,
                     throughput.metrics(rate))
      for every, hook in hooks:
        if every and step % every == 0:
          hook(step, state, writer)
      stop = preemption.requested or ckpt.reached_preemption(step)
      if step % settings.checkpoint_every_steps == 0 or step == total or stop:
        check_finite(step, jax.device_get(metrics))
        ckpt.save(step, state, force=True)
      if stop:
        logging.warning('Stopped for preemption after step %d.', step)
        break
  finally:
    profile.close()
  return state


def run(
    state: Any,
    step_fn: StepFn,
    batches: Callable[[int], Iterator[Any]],
    *,
    ckpt: checkpoint.Checkpointer,
    writer: summary.SummaryWriter,
    settings: LoopSettings,
    hooks: Sequence[tuple[int, Hook]] = (),
) -> Any:
  """Trains to settings.num_train_steps (module docstring), resuming.

  Args:
    state: the initial TrainState; if the workdir has a checkpoint, its last
      one is restored into this state's shapes and shardings instead.
    step_fn: (state, batch) -> (new_state, metrics); metrics hold scalar
      'loss', 'grad_norm' and optionally 'loss_<name>' terms. A `Step` is
      compiled before the first update (the rate excludes compilation) and
      its FLOPs give TFLOP/s per device and MFU.
    batches: start -> iterator of the batches of updates start, start + 1,
      ... (start = the restored step); closed at the end if it has close().
    ckpt: the workdir's Checkpointer; waited for and closed at the end.
    writer: the TensorBoard writer; flushed at the end.
    settings: the step counts.
    hooks: (every_steps, hook) pairs; hook(step, state, writer) runs after
      every `every_steps`-th update (0 disables it).

  Returns:
    The final TrainState (after num_train_steps, or at the preemption).
  """
  if ckpt.latest_step() is not None:
    logging.info('Resuming from checkpoint at step %d.', ckpt.latest_step())
    state = ckpt.restore(state)
  start = int(state.step)
  preemption = _Preemption()
  iterator = batches(start)
  try:
    return _loop(state, step_fn, iterator, start, ckpt, writer, settings,
                 hooks, preemption)
  finally:
    preemption.restore()
    if hasattr(iterator, 'close'):
      iterator.close()
    ckpt.wait()
    ckpt.close()
    writer.flush()
