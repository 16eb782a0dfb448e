"""--mode=plan: what a config needs on a TPU slice or GPU nodes, on a CPU host.

  python -m vdm_jax.main --config=configs/ucf101_64.py --mode=plan \
      --config.plan.targets=tpu:v5p:4x4x4,gpu:h100:8

For each target this builds the config's own mesh (`sharding.make_mesh`)
over the target's devices, which the real TPU and GPU compilers describe
without the hardware (`jax.experimental.topologies.get_topology_desc`),
compiles the real train step (`train.make_train_step`, its shardings and
donation) and one call of the sampler's denoiser from abstract inputs, and
reports per device: argument / output / temp bytes (XLA's
`memory_analysis()` of that compiled program), whether they fit the chip's
memory with `plan.headroom` to spare, the FLOPs of a step and a roofline
lower bound on its time (FLOPs / peak FLOP/s, bytes / memory bandwidth,
`perf`'s chip tables), and the MFU that bound allows.

Targets: `tpu:<chip>:<topology>[:slices=N]` (chip v4, v5e, v5p, v6e;
e.g. `tpu:v5e:8x8`, `tpu:v5p:4x4x4`, `tpu:v4:2x2x4`, `tpu:v5e:4x4:slices=2`
for multislice), a Cloud TPU accelerator type (`tpu:v4-32`, `tpu:v5p-64`,
`tpu:v5litepod-16`, `tpu:v6e-64`), or `gpu:<chip>:<gpus>` /
`gpu:<chip>:<hosts>x<gpus>` (chip h100, h200, a100_80, a100_40; e.g.
`gpu:h100:8`, `gpu:a100_80:4x8`); `cpu` plans for this host's own devices.
v4 counts one device per chip (megacore), as pods run.

The compilers come from requirements-plan.txt (libtpu; the CUDA PJRT
plugin, which needs `JAX_PLATFORMS=cpu` on a host without a GPU:
`prepare_host` sets it). The GPU compiler does not enforce the card's
memory and gives no cost analysis: the fit is the comparison made here, and
the bytes of the roofline are then the step's arguments and outputs, read
and written once (a lower bound). A TPU compile that overflows HBM fails
with RESOURCE_EXHAUSTED (after XLA has tried to rematerialise under the
limit, which can take long): that is reported as not fitting, with the
compiler's numbers.
"""

import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from vdm_jax import denoiser
from vdm_jax import fileio
from vdm_jax import perf
from vdm_jax import plan_methods
from vdm_jax import sharding
from vdm_jax import train
from vdm_jax import training
from vdm_jax.models import attention

REQUIREMENTS = 'requirements-plan.txt'
GIB = 2**30
_TARGETS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                            'gpu_targets')
# chip -> (get_topology_desc name, chip_config_name, topology dimensions).
TPU_CHIPS = {'v4': ('v4', 'megacore', 3), 'v5e': ('v5e', None, 2),
             'v5p': ('v5', None, 3), 'v6e': ('v6e', None, 2)}
# Cloud TPU accelerator-type prefixes; v4 and v5p count TensorCores (two
# per chip), v5e and v6e chips.
_CLOUD_NAMES = {'v4': ('v4', 2), 'v5p': ('v5p', 2), 'v5litepod': ('v5e', 1),
                'v5e': ('v5e', 1), 'v6e': ('v6e', 1)}
# chip -> XLA's GPU target config (vdm_jax/gpu_targets/*.txtpb).
GPU_CHIPS = {'h100': 'h100_sxm', 'h200': 'h200', 'a100_80': 'a100_sxm_80',
             'a100_40': 'a100_sxm_40'}
# The order in which `search` tries to make a batch fit: cheapest first
# (docs/scaling.md: bfloat16 costs no time, then remat by its recompute).
FIT_LADDER = (('float32', 'none'), ('bfloat16', 'none'),
              ('bfloat16', 'dots_saveable'), ('bfloat16', 'block'),
              ('bfloat16', 'full'), ('bfloat16', 'offload'))


def known_targets() -> str:
  return ('tpu:{' + ','.join(TPU_CHIPS) + '}:<topology>[:slices=N] (e.g.'
          ' tpu:v5e:8x8, tpu:v5p:4x4x4), tpu:<accelerator type> (e.g.'
          ' tpu:v4-32, tpu:v5litepod-16), gpu:{' + ','.join(GPU_CHIPS) +
          '}:<gpus> or <hosts>x<gpus> (e.g. gpu:h100:8, gpu:a100_80:4x8),'
          ' cpu')


@dataclasses.dataclass(frozen=True)
class Target:
  """A parsed target name.

  Attributes:
    name: as given, e.g. 'tpu:v5e:2x2'.
    platform: 'tpu', 'gpu' or 'cpu'.
    chip: 'v5e', 'h100', ... ('' for cpu).
    topology: TPU '2x2' / '4x4x4'; GPU '<slices>x<hosts>x<gpus>'.
    num_slices: TPU slices (multislice).
  """

  name: str
  platform: str
  chip: str = ''
  topology: str = ''
  num_slices: int = 1


def _cloud_topology(gen: str, cores: int) -> str:
  """A Cloud TPU accelerator type's default topology, e.g. v4-32: 2x2x4."""
  chip, per_chip = _CLOUD_NAMES[gen]
  chips = cores // per_chip
  dims = [1] * TPU_CHIPS[chip][2]
  while math.prod(dims) < chips:
    dims[dims.index(min(dims))] *= 2
    dims.sort()
  if math.prod(dims) != chips or cores % per_chip:
    raise ValueError(f'{gen}-{cores}: not a slice size (a power of 2).')
  return 'x'.join(map(str, dims))


def parse_target(name: str) -> Target:
  """'tpu:v5e:2x2' -> Target; ValueError listing the known forms."""
  parts = name.strip().split(':')
  bad = ValueError(f'Unknown target {name!r}; known: {known_targets()}.')
  if parts == ['cpu']:
    return Target(name, 'cpu')
  if parts[0] == 'tpu' and len(parts) == 2 and '-' in parts[1]:
    gen, _, cores = parts[1].partition('-')
    if gen not in _CLOUD_NAMES or not cores.isdigit():
      raise bad
    return Target(name, 'tpu', _CLOUD_NAMES[gen][0],
                  _cloud_topology(gen, int(cores)))
  if parts[0] == 'tpu' and len(parts) in (3, 4) and parts[1] in TPU_CHIPS:
    dims = parts[2].split('x')
    slices = 1
    if len(parts) == 4:
      m = re.fullmatch(r'slices=(\d+)', parts[3])
      if not m:
        raise bad
      slices = int(m.group(1))
    if (len(dims) != TPU_CHIPS[parts[1]][2] or not all(d.isdigit()
                                                      for d in dims)):
      raise ValueError(
          f'Target {name!r}: a {parts[1]} topology has'
          f' {TPU_CHIPS[parts[1]][2]} dimensions, e.g.'
          f" {'4x4x4' if TPU_CHIPS[parts[1]][2] == 3 else '8x8'}.")
    return Target(name, 'tpu', parts[1], parts[2], slices)
  if parts[0] == 'gpu' and len(parts) == 3 and parts[1] in GPU_CHIPS:
    m = re.fullmatch(r'(?:(\d+)x)?(\d+)', parts[2])
    if not m:
      raise bad
    return Target(name, 'gpu', parts[1], f'1x{m.group(1) or 1}x{m.group(2)}')
  raise bad


def check_packages(targets: list[Target]) -> None:
  """Raises RuntimeError naming requirements-plan.txt if a compiler is missing.

  Checked before anything is built or compiled.
  """
  need = {'tpu': ('libtpu',), 'gpu': ('jax_plugins.xla_cuda12',
                                      'jax_cuda12_plugin')}
  for target in targets:
    for module in need.get(target.platform, ()):
      try:
        found = importlib.util.find_spec(module) is not None
      except ModuleNotFoundError:
        found = False
      if not found:
        raise RuntimeError(
            f'Planning for {target.name} needs the {target.platform.upper()}'
            f' compiler ({module} is not installed): pip install -r'
            f' {REQUIREMENTS}')


def prepare_host() -> None:
  """Runs JAX on this host's CPU (call before any device is used).

  With the CUDA plugin installed, JAX would otherwise try (and fail) to
  start a GPU, and the deviceless GPU compiler needs the CPU platform.
  """
  jax.config.update('jax_platforms', 'cpu')


def target_devices(target: Target) -> list[Any]:
  """The target's devices (descriptions of them: nothing runs there)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if target.platform == 'cpu':
    return jax.devices()
  if target.platform == 'tpu':
    # libtpu takes a host-wide lock file when it starts, unless told that
    # several processes may load it: a plan only compiles, so it need not
    # wait for (or block) a training run or another plan on this host.
    os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
    name, chip_config, _ = TPU_CHIPS[target.chip]
    kwargs = {'chip_config_name': chip_config} if chip_config else {}
    topo = topologies.get_topology_desc(
        f'{name}:{target.topology}', platform='tpu',
        num_slices=target.num_slices, **kwargs)
  else:
    with open(os.path.join(_TARGETS_DIR,
                           GPU_CHIPS[target.chip] + '.txtpb')) as f:
      text = f.read()
    topo = topologies.get_topology_desc(
        target.chip, platform='cuda', target_config=text,
        topology=target.topology)
  return list(topo.devices)


def gpu_memory_bytes(chip: str) -> int:
  """device_memory_size of a GPU target config (what the card reports)."""
  with open(os.path.join(_TARGETS_DIR, GPU_CHIPS[chip] + '.txtpb')) as f:
    return int(re.search(r'device_memory_size: (\d+)', f.read()).group(1))


def abstract_batch(config: ml_collections.ConfigDict, batch_size: int,
                   mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """The global batch that data.pipeline makes, as sharded abstract arrays.

  {'video': uint8[B, T + N, H, W, C], 'label': int32[B], 'image_label':
  int32[B, N], 'frame_mask': bool[B, T + N]} and, for a text model,
  'text', 'text_mask', 'image_text', 'image_text_mask'
  (`pipeline.Pipeline.batch_for_step`).
  """
  d = config.data
  t, n = d.num_frames + d.image_frames, d.image_frames
  shapes = {'video': ((t, d.image_size, d.image_size, d.channels), jnp.uint8),
            'label': ((), jnp.int32), 'image_label': ((n,), jnp.int32),
            'frame_mask': ((t,), jnp.bool_)}
  encoder = denoiser.text_encoder(config)
  if encoder is not None:
    length = int(config.text.max_length)
    shapes.update({'text': ((length, encoder.dim), jnp.float32),
                   'text_mask': ((length,), jnp.bool_),
                   'image_text': ((n, length, encoder.dim), jnp.float32),
                   'image_text_mask': ((n, length), jnp.bool_)})
  spec = sharding.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct((batch_size,) + s, dt, sharding=spec)
          for k, (s, dt) in shapes.items()}


def train_step_program(config: ml_collections.ConfigDict,
                       mesh: jax.sharding.Mesh) -> tuple[Any, tuple]:
  """(the jitted train step of --mode=train, its abstract arguments)."""
  model = denoiser.create_model(config)
  tx, lr_fn = training.create_optimizer(config)
  state, shardings = train.abstract_state(config, model, tx, mesh)
  step = train.make_train_step(config, model, tx, lr_fn, mesh, shardings)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype,
                             sharding=sharding.replicated(mesh))
  args = (sharding.abstract(state, shardings),
          abstract_batch(config, config.training.batch_size, mesh), rng)
  return step, args


def sample_step_program(config: ml_collections.ConfigDict,
                        mesh: jax.sharding.Mesh) -> tuple[Any, tuple]:
  """(one jitted denoiser call of the sampler, its abstract arguments).

  The EMA parameters are replicated, as --mode=sample restores them; the
  batch is sample.batch_size rounded up to the devices (as
  sample.sample_videos rounds it), of num_frames frames.
  """
  model = denoiser.create_model(config)
  params = denoiser.abstract_params(config, model)
  n = mesh.size
  b = -(-config.sample.batch_size // n) * n
  z, logsnr, cond = jax.eval_shape(
      lambda: denoiser.example_inputs(config, b))
  z = jax.ShapeDtypeStruct((b, config.data.num_frames) + z.shape[2:],
                           z.dtype)
  batch = sharding.batch_sharding(mesh)
  args = (sharding.abstract(params, jax.tree.map(
      lambda _: sharding.replicated(mesh), params)),
          *sharding.abstract((z, logsnr, cond), jax.tree.map(
              lambda _: batch, (z, logsnr, cond))))
  fn = jax.jit(lambda p, z, logsnr, cond: denoiser.make_denoise_fn(
      model, p, mesh)(z, logsnr, cond))
  return fn, args


def tune_program(config: ml_collections.ConfigDict, devices: list[Any]
                 ) -> 'plan_methods.Program':
  """--mode=tune of a 'vdm' config (adapt/tune.py): the tuned step of the
  inflated model on the devices its batch splits over (one device for
  Tune-A-Video's batch of 1: adapt.tune.batch_mesh)."""
  from vdm_jax.adapt import inflate  # pylint: disable=g-import-not-at-top
  from vdm_jax.adapt import tune as tune_lib  # pylint: disable=g-import-not-at-top
  b = config.training.batch_size
  mesh = tune_lib.batch_mesh(config, devices)
  data, fsdp = sharding.mesh_shape(config.mesh, mesh.size)
  repl = sharding.replicated(mesh)
  model = denoiser.create_model(config)
  params = denoiser.abstract_params(config, model)
  tuned, frozen = jax.eval_shape(
      lambda p: inflate.split(p, config.tune.trainable), params)
  tx, lr_fn = training.create_optimizer(config)
  state = jax.eval_shape(lambda p: training.TrainState.create(p, tx), tuned)
  step = jax.jit(functools.partial(tune_lib.tune_step, model=model, tx=tx,
                                   lr_fn=lr_fn, config=config),
                 out_shardings=(repl, repl), donate_argnums=0)
  video = abstract_batch(config, b, mesh)
  d = config.data
  video['video'] = jax.ShapeDtypeStruct(
      (b, config.tune.num_frames, d.image_size, d.image_size, d.channels),
      jnp.uint8, sharding=sharding.batch_sharding(mesh))
  batch = {k: video[k] for k in ('video', 'text', 'text_mask') if k in video}
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=repl)
  return plan_methods.Program(
      'tune', step, (sharding.abstract(state, jax.tree.map(lambda _: repl, state)),
                     sharding.abstract(frozen, jax.tree.map(lambda _: repl, frozen)),
                     batch, rng),
      list(mesh.devices.flat), f'data={data} fsdp={fsdp}', b,
      denoiser.count_params(params),
      config.model.remat, config.model.dtype)


def check_fits_mesh(config: ml_collections.ConfigDict, target: Target,
                    devices: list[Any]) -> tuple[int, int]:
  """(data, fsdp) on the target; ValueError before anything compiles."""
  try:
    data, fsdp = sharding.mesh_shape(config.mesh, len(devices))
  except ValueError as e:
    raise ValueError(f'{target.name} ({len(devices)} devices): {e}') from e
  # Every host has as many devices, so this also divides over the hosts.
  b, k, n = (config.training.batch_size, config.training.grad_accum_steps,
             len(devices))
  if b % k or (b // k) % n:
    raise ValueError(
        f'{target.name}: training.batch_size={b} (microbatches of'
        f' {b // max(k, 1)}, grad_accum_steps={k}) does not divide over'
        f' the {data} x {fsdp} devices of the mesh; use a multiple of'
        f' {n * k}.')
  return data, fsdp


def chip_memory(target: Target, kind: str) -> Optional[int]:
  """Bytes of one device's memory (None for the host's CPU)."""
  if target.platform == 'gpu':
    return gpu_memory_bytes(target.chip)
  if target.platform == 'tpu':
    return perf.table_memory(kind)[0]
  return None


_OOM = re.compile(r'required for HLO temporaries \(([\d.]+)([KMGT]?)\)'
                  r'.*?available HBM \(([\d.]+)([KMGT]?)\)', re.S)
_UNIT = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def overflow_bytes(message: str) -> Optional[tuple[int, int]]:
  """(required, available) bytes of a TPU compiler's HBM overflow, or None.

  E.g. 'Ran out of memory on HBM, the total memory required for HLO
  temporaries (36.46G) exceeds available HBM (15.75G)'.
  """
  m = _OOM.search(message)
  if m is None:
    return None
  return (int(float(m.group(1)) * _UNIT[m.group(2)]),
          int(float(m.group(3)) * _UNIT[m.group(4)]))


def compiled_memory(compiled) -> dict[str, int]:
  """XLA's memory analysis per device, in bytes, with the total."""
  m = compiled.memory_analysis()
  out = {k: int(getattr(m, f'{k}_size_in_bytes')) for k in (
      'argument', 'output', 'alias', 'temp', 'generated_code', 'host_temp')}
  out['total'] = (out['argument'] + out['output'] - out['alias'] +
                  out['temp'] + out['generated_code'])
  return out


def attention_platform(target: Target) -> Optional[str]:
  """The platform model.attention='auto' decides for while tracing.

  TPU: the target's ('auto' takes the Pallas kernel for long attention, as
  on the slice; libtpu compiles it here). GPU: None, so this CPU host's
  choice, XLA's einsum: cuDNN's kernel needs the cuDNN library to be traced,
  which a GPU-less host does not have, so GPU rows are upper bounds where
  'auto' would take cuDNN there (bf16/fp16).
  """
  return 'tpu' if target.platform == 'tpu' else None


def trace_program(fn, args, target: Optional[Target] = None,
                  kernels: Optional[tuple[Any, Sequence[str]]] = None):
  """fn (jitted) traced on `args` as it is traced for `target`.

  With `target`, attention 'auto' decides as `attention_platform` says.
  `kernels` = (mesh, batch axes): trace within attention.kernels_on, for
  programs that do not enter it themselves (the train step and the
  sampler's denoiser do).
  """
  placed = (contextlib.nullcontext() if kernels is None
            else attention.kernels_on(*kernels))
  with attention.compile_for(None if target is None
                             else attention_platform(target)), placed:
    return fn.trace(*args)


def compile_program(fn, args, target: Optional[Target] = None,
                    kernels: Optional[tuple[Any, Sequence[str]]] = None
                    ) -> tuple[Any, Any]:
  """(traced, compiled) as `trace_program` traces; compiled is the error
  message on an overflow."""
  traced = trace_program(fn, args, target, kernels)
  try:
    return traced, traced.lower().compile()
  except Exception as e:  # pylint: disable=broad-except
    if 'RESOURCE_EXHAUSTED' not in str(e):
      raise
    return traced, str(e)


def vdm_program(config: ml_collections.ConfigDict, devices: list[Any],
                program: str = 'train') -> 'plan_methods.Program':
  """The train step or the sampler's denoiser call of method 'vdm'."""
  data, fsdp = sharding.mesh_shape(config.mesh, len(devices))
  mesh = sharding.make_mesh(config.mesh, devices)
  batch = (config.training.batch_size if program == 'train'
           else -(-config.sample.batch_size // mesh.size) * mesh.size)
  fn, args = (train_step_program if program == 'train'
              else sample_step_program)(config, mesh)
  params = args[0].params if program == 'train' else args[0]
  return plan_methods.Program(
      program, fn, args, list(devices), f'data={data} fsdp={fsdp}', batch,
      denoiser.count_params(params),
      config.model.remat, config.model.dtype,
      config.training.grad_accum_steps if program == 'train' else 1,
      param_sharding=config.mesh.param_sharding)


def measure(config: ml_collections.ConfigDict, target: Target,
            devices: list[Any], program: str = 'train',
            settings: Optional[ml_collections.ConfigDict] = None,
            progress: Callable[[str], None] = logging.info) -> dict[str, Any]:
  """Compiles one program of a 'vdm' config for `target`: one result row.

  Args:
    config: the full config (its mesh, batch, model.remat, model.dtype).
    target: the parsed target; devices: its devices (`target_devices`).
    program: 'train' (train.make_train_step) or 'sample' (one denoiser
      call of the sampler).
    settings: config.plan (headroom, gpu_memory_fraction).
    progress: where the progress lines go.

  Returns:
    A JSON-able dict: target, program, mesh, batch, remat, dtype, params,
    per-device bytes, fits, flops and the roofline (see the module doc).
  """
  check_fits_mesh(config, target, devices)
  return measure_program(vdm_program(config, devices, program), target,
                         settings or config.plan, progress)


def measure_program(program: 'plan_methods.Program', target: Target,
                    settings: ml_collections.ConfigDict,
                    progress: Callable[[str], None] = logging.info
                    ) -> dict[str, Any]:
  """Compiles a built program for `target`: one result row (`measure`)."""
  devices = program.devices
  kind = devices[0].device_kind
  row = {'target': target.name, 'program': program.name, 'device_kind': kind,
         'devices': len(devices),
         'hosts': len({getattr(d, 'process_index', 0) for d in devices}),
         'mesh': program.mesh, 'batch': program.batch,
         'grad_accum_steps': program.grad_accum_steps,
         'remat': program.remat, 'dtype': program.dtype}
  for key in ('param_sharding', 'model'):
    if getattr(program, key):
      row[key] = getattr(program, key)
  progress(f'{target.name}: compiling the {program.name} step'
           f' ({row["mesh"]}, batch {row["batch"]}, remat {row["remat"]},'
           f' {row["dtype"]}) ...')
  start = time.time()
  traced, compiled = compile_program(program.fn, program.args, target,
                                     program.kernels)
  row['compile_s'] = round(time.time() - start, 1)
  row['params'] = program.params
  capacity = chip_memory(target, kind)
  if capacity and target.platform == 'gpu':
    capacity = int(capacity * settings.gpu_memory_fraction)
  row['capacity'] = capacity
  usable = None if capacity is None else capacity * (1 - settings.headroom)
  if isinstance(compiled, str):
    row.update(fits=False, error=compiled.strip().splitlines()[0][:400])
    numbers = overflow_bytes(compiled)
    if numbers:
      row['required'], row['available'] = numbers
  else:
    row['memory'] = compiled_memory(compiled)
    row['fits'] = usable is None or row['memory']['total'] <= usable
  row['work_split'] = program.work_split
  row.update(_roofline(traced, compiled, row, program.work_split))
  total = row.get('memory', {}).get('total', row.get('required'))
  progress(f'{target.name}: {program.name} compiled in {row["compile_s"]} s;'
           f' {_size(total)} GiB per device of {_size(capacity)};'
           f' fits: {row["fits"]}')
  return row


def _roofline(traced, compiled, row: dict, num_devices: int) -> dict:
  """FLOPs per device (matmuls, scans unrolled), bytes and the bound."""
  # XLA partitions the program's work over the devices its batch splits
  # over (num_devices); a shard_map body (Pallas kernels, kernels_on) runs
  # one shard per device whatever the rest does.
  whole, one = perf.shard_map_flops(traced.jaxpr)
  flops = (perf.matmul_flops(traced.jaxpr) - whole) / num_devices + one
  out = {'flops_per_device': flops}
  kind = row['device_kind']
  dtype = perf.matmul_dtype(traced.jaxpr)
  peak = perf.table_peak_flops(kind, dtype)
  _, bandwidth = perf.table_memory(kind)
  if isinstance(compiled, str):
    return out
  # XLA's own count (scan and while bodies once; None on GPU), for reference.
  out['xla_flops'] = perf.compiled_flops(compiled)
  cost = out['xla_flops'] is not None and compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  accessed = (cost or {}).get('bytes accessed')
  if accessed is not None and row['grad_accum_steps'] > 1 and (
      row['program'] == 'train'):
    accessed *= row['grad_accum_steps']  # The scan body is counted once.
  if accessed is None:
    mem = row['memory']
    accessed, source = mem['argument'] + mem['output'], 'arguments+outputs'
  else:
    source = 'xla cost analysis'
  out.update(bytes_per_device=float(accessed), bytes_source=source,
             matmul_dtype=dtype, peak_flops=peak, bandwidth=bandwidth)
  if peak and bandwidth:
    t_flops, t_bytes = flops / peak, accessed / bandwidth
    out['step_time_lower_bound_s'] = max(t_flops, t_bytes)
    out['bound_by'] = 'flops' if t_flops >= t_bytes else 'memory'
    out['mfu_bound'] = t_flops / max(t_flops, t_bytes)
  return out


def with_settings(config: ml_collections.ConfigDict, **fields
                  ) -> ml_collections.ConfigDict:
  """A copy of config with model/training fields replaced."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for key, value in fields.items():
      group, name = key.split('.')
      config[group][name] = value
  return config


def largest_batch(config, target, devices, progress) -> tuple[int, list]:
  """The largest global batch (a multiple of the devices x microbatches)
  whose train step fits: doubling from the smallest, then bisection
  (batch or 0, rows). Each probe is a compile, an overflowing one slow."""
  unit = len(devices) * config.training.grad_accum_steps
  rows = []

  def fits(m):
    row = measure(with_settings(config, **{'training.batch_size': m * unit}),
                  target, devices, 'train', progress=progress)
    rows.append(row)
    return row['fits']

  lo, hi = 0, 1
  while fits(hi):
    lo, hi = hi, hi * 2
    if hi > 4096:
      return lo * unit, rows
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if fits(mid) else (lo, mid)
  return lo * unit, rows


def cheapest_fit(config, target, devices, progress) -> tuple[Optional[dict],
                                                             list]:
  """The first (dtype, remat) of FIT_LADDER at which the requested batch
  fits, not cheaper than the config's own dtype; (settings or None, rows)."""
  rows = []
  ladder = [s for s in FIT_LADDER
            if not (config.model.dtype == 'bfloat16' and s[0] == 'float32')]
  for dtype, remat in ladder:
    row = measure(with_settings(config, **{'model.dtype': dtype,
                                           'model.remat': remat}),
                  target, devices, 'train', progress=progress)
    rows.append(row)
    if row['fits']:
      return {'dtype': dtype, 'remat': remat}, rows
  return None, rows


def _size(n: Optional[float]) -> str:
  return '-' if n is None else f'{n / GIB:.2f}'


def table(rows: list[dict[str, Any]]) -> str:
  """The rows as a Markdown table (bytes per device in GiB)."""
  head = ('target', 'program', 'mesh', 'batch', 'remat', 'dtype', 'params',
          'argument GiB', 'temp GiB', 'output GiB', 'total GiB',
          'capacity GiB', 'fits', 'TFLOP/dev', 'step >= ms', 'MFU <=')
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for r in rows:
    mem = r.get('memory', {})
    total = mem.get('total', r.get('required'))
    bound = r.get('step_time_lower_bound_s')
    lines.append('| ' + ' | '.join(str(x) for x in (
        r['target'], r['program'], r['mesh'], r['batch'], r['remat'],
        r['dtype'], f"{r['params'] / 1e6:.1f} M", _size(mem.get('argument')),
        _size(mem.get('temp')), _size(mem.get('output')),
        _size(total) + ('' if mem else ' (overflow)'),
        _size(r['capacity']), 'yes' if r['fits'] else 'NO',
        f"{r['flops_per_device'] / 1e12:.3g}",
        '-' if bound is None else f'{bound * 1e3:.1f}',
        '-' if 'mfu_bound' not in r else f"{r['mfu_bound']:.2f}")) + ' |')
  return '\n'.join(lines)


def plan(config: ml_collections.ConfigDict,
         workdir: Optional[str] = None,
         progress: Callable[[str], None] = logging.info,
         emit: Callable[[str], None] = print) -> list[dict[str, Any]]:
  """--mode=plan: every target of config.plan.targets; rows as JSON lines.

  Prints the Markdown table and the JSON lines (`emit`); with a workdir
  also writes them to workdir/plan.md and workdir/plan.jsonl. Raises
  ValueError / RuntimeError on bad input before compiling anything.
  """
  method = config.get('method', 'vdm')
  if method == 'vdm' and config.get('latent', {}).get('path'):
    raise ValueError(
        '--mode=plan does not plan latent diffusion with this library\'s'
        ' UNet (latent.path) yet: plan the same UNet in pixel space at the'
        ' latent size (data.image_size / 8, model.channels 4) and add the'
        ' frozen autoencoder\'s encoder pass.')
  if method != 'vdm' and method not in plan_methods.METHODS:
    raise ValueError(f'--mode=plan has no programs for config.method='
                     f'{method!r}; it plans vdm,'
                     f' {", ".join(plan_methods.METHODS)}.')
  settings = config.plan
  if settings.mode not in ('train', 'tune'):
    raise ValueError(f"plan.mode={settings.mode!r}: 'train' or 'tune'.")
  if (method != 'vdm' or settings.mode == 'tune') and settings.search:
    raise ValueError(
        f'plan.search finds batch and remat settings of method \'vdm\''
        ' training;'
        f' for config.method={method!r} plan each setting you consider'
        ' (e.g. --config.tune.remat, --config.pretrained.dtype).')
  names = [t for t in str(settings.targets).split(',') if t.strip()]
  if not names:
    raise ValueError('No targets: set --config.plan.targets, e.g.'
                     f' tpu:v5e:2x2,gpu:h100:8; known: {known_targets()}.')
  targets = [parse_target(n) for n in names]
  check_packages(targets)
  if method == 'vdm' and settings.mode == 'train':
    with tempfile.TemporaryDirectory() as empty:  # No saved config to match.
      train.validate_config(config, workdir or empty)
  wanted = [n.strip() for n in str(settings.get('programs', '')).split(',')
            if n.strip()]
  prepared = []
  for target in targets:  # Every bad input is reported before compiling.
    devices = target_devices(target)
    if method == 'vdm' and settings.mode == 'tune':
      prepared.append((target, devices, [tune_program(config, devices)]))
    elif method == 'vdm':
      check_fits_mesh(config, target, devices)
      prepared.append((target, devices, None))
    else:
      built = plan_methods.programs(config, devices, target.platform)
      if not settings.sample and len(built) > 1 and not wanted:
        built = [p for p in built if p.name != 'sample']
      prepared.append((target, devices, built))
  for i, (target, devices, built) in enumerate(prepared):
    names = (['train', 'sample'] if built is None
             else [p.name for p in built])
    if not set(wanted) <= set(names):
      raise ValueError(f'plan.programs={settings.programs!r}: this config'
                       f' plans {", ".join(names)}.')
    if wanted and built is not None:
      prepared[i] = (target, devices, [p for p in built if p.name in wanted])
  rows = []

  def write(final: bool = False) -> None:
    """plan.md and plan.jsonl (atomically) after every row, so that a plan
    stopped part way keeps what it measured; printed at the end."""
    measured = [r for r in rows if 'search' not in r]
    text = table(measured)
    lines = [json.dumps(r, default=float) for r in rows]
    if final:
      emit(text)
      for line in lines:
        emit(line)
    if workdir:
      for name, content in (('plan.md', text), ('plan.jsonl',
                                                '\n'.join(lines))):
        with fileio.atomic_path(os.path.join(workdir, name)) as tmp:
          with open(tmp, 'w') as f:
            f.write(content + '\n')

  def add(*new: dict) -> None:
    rows.extend(new)
    write()

  for target, devices, built in prepared:
    if built is not None:
      for program in built:
        add(measure_program(program, target, settings, progress))
      continue
    if not wanted or 'train' in wanted:
      add(measure(config, target, devices, 'train', progress=progress))
    if (settings.sample and not wanted) or 'sample' in wanted:
      add(measure(config, target, devices, 'sample', progress=progress))
    if settings.search:
      best, tried = largest_batch(config, target, devices, progress)
      add(*tried)
      add({'target': target.name, 'search': 'largest_batch', 'batch': best,
           'remat': config.model.remat, 'dtype': config.model.dtype})
      fit, tried = cheapest_fit(config, target, devices, progress)
      add(*tried)
      add({'target': target.name, 'search': 'cheapest_fit',
           'batch': config.training.batch_size, 'fit': fit})
  write(final=True)
  return rows
