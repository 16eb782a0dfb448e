"""Throughput accounting: FLOPs of a compiled program and peak FLOP/s.

`compiled_flops` reads XLA's cost analysis of a compiled executable; for a
program partitioned over a mesh (jit with shardings) it describes one
device's share, so FLOPs / step time is already a per-device rate.
`peak_flops` gives the dense peak FLOP/s of one chip, from the vendors'
data sheets, for the matmul dtype of the program; on CPU it is a measured
float32 matmul rate. MFU (model FLOPs utilisation, Chowdhery et al. 2022,
PaLM, App. B) is achieved / peak.

Two caveats of XLA's counts, both in the FLOPs that are divided:
  - a while loop (lax.scan, fori_loop) is counted once, whatever its trip
    count; `loops_counted_once` says whether this backend does so, and
    the train loop then scales by the gradient-accumulation microbatches;
  - rematerialised forward passes are counted (they are executed), so with
    model.remat != 'none' this is closer to hardware FLOPs utilisation.
Custom calls (fused attention kernels) count as 0 FLOPs.
"""

import dataclasses
import functools
import math
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

# Dense (no structured sparsity) peak FLOP/s per chip: (bfloat16, float32).
# float32 is what an f32 matmul runs at under JAX's default precision:
# TF32 tensor cores on A100 / H100 / H200, one bfloat16 pass on TPUs
# (https://docs.jax.dev/en/latest/201/precision.html). NVIDIA's sheets
# quote tensor-core rates with sparsity; the dense rate is half of it.
# Keys are `jax.Device.device_kind`, matched exactly (TPUs) or by the
# longest prefix (GPUs: memory size and form factor follow the name).
_TERA = 1e12
PEAK_FLOPS = {
    # NVIDIA A100 Tensor Core GPU data sheet: BF16 312, TF32 156 TFLOPS
    # dense (SXM and PCIe alike).
    'NVIDIA A100': (312 * _TERA, 156 * _TERA),
    # NVIDIA H100 Tensor Core GPU data sheet: SXM BF16 1979 / TF32 989
    # TFLOPS with sparsity; PCIe 1513 / 756; NVL 1671 / 835.
    'NVIDIA H100': (989.5 * _TERA, 494.5 * _TERA),  # SXM: '... 80GB HBM3'
    'NVIDIA H100 PCIe': (756.5 * _TERA, 378 * _TERA),
    'NVIDIA H100 NVL': (835.5 * _TERA, 417.5 * _TERA),
    # NVIDIA H200 Tensor Core GPU data sheet: SXM BF16 1979 / TF32 989
    # TFLOPS with sparsity; NVL 1671 / 835.
    'NVIDIA H200': (989.5 * _TERA, 494.5 * _TERA),
    'NVIDIA H200 NVL': (835.5 * _TERA, 417.5 * _TERA),
    # Google Cloud TPU system architecture pages (cloud.google.com/tpu/docs):
    # bf16 peak per chip; f32 matmuls take one bf16 pass by default.
    'TPU v4': (275 * _TERA, 275 * _TERA),
    'TPU v5 lite': (197 * _TERA, 197 * _TERA),  # v5e
    'TPU v5e': (197 * _TERA, 197 * _TERA),
    'TPU v5': (459 * _TERA, 459 * _TERA),  # v5p
    'TPU v5p': (459 * _TERA, 459 * _TERA),
    'TPU v6 lite': (918 * _TERA, 918 * _TERA),  # v6e (Trillium)
    'TPU v6e': (918 * _TERA, 918 * _TERA),
}
_LOW_PRECISION = (jnp.bfloat16, jnp.float16)

# Memory per chip: (capacity in bytes, bandwidth in bytes/s), from the same
# data sheets, matched like PEAK_FLOPS. Google gives GiB and GB/s; NVIDIA
# GB (10^9 bytes; the cards report a little more: XLA's H100 SXM target
# config has 84,942,979,072 B) and TB/s or GB/s.
_GB, _GIB = 1e9, 2**30
MEMORY = {
    # NVIDIA A100 data sheet: 80GB SXM 2,039 GB/s, 80GB PCIe 1,935 GB/s;
    # 40GB SXM and PCIe 1,555 GB/s.
    'NVIDIA A100-SXM4-80GB': (80 * _GB, 2039 * _GB),
    'NVIDIA A100 80GB PCIe': (80 * _GB, 1935 * _GB),
    'NVIDIA A100-SXM4-40GB': (40 * _GB, 1555 * _GB),
    'NVIDIA A100-PCIE-40GB': (40 * _GB, 1555 * _GB),
    # NVIDIA H100 data sheet: SXM 80 GB at 3.35 TB/s, PCIe 80 GB at 2 TB/s,
    # NVL 94 GB at 3.9 TB/s.
    'NVIDIA H100': (80 * _GB, 3350 * _GB),
    'NVIDIA H100 PCIe': (80 * _GB, 2000 * _GB),
    'NVIDIA H100 NVL': (94 * _GB, 3900 * _GB),
    # NVIDIA H200 data sheet: 141 GB at 4.8 TB/s (SXM and NVL).
    'NVIDIA H200': (141 * _GB, 4800 * _GB),
    # Cloud TPU system architecture pages: HBM capacity and bandwidth per
    # chip.
    'TPU v4': (32 * _GIB, 1200 * _GB),
    'TPU v5 lite': (16 * _GIB, 819 * _GB),  # v5e
    'TPU v5e': (16 * _GIB, 819 * _GB),
    'TPU v5': (95 * _GIB, 2765 * _GB),  # v5p
    'TPU v5p': (95 * _GIB, 2765 * _GB),
    'TPU v6 lite': (32 * _GIB, 1640 * _GB),  # v6e (Trillium)
    'TPU v6e': (32 * _GIB, 1640 * _GB),
}


def _lookup(table: dict, device_kind: str):
  """TPUs by exact kind, GPUs by the longest matching prefix; or None."""
  if device_kind.startswith('TPU'):
    return table.get(device_kind)
  prefixes = [k for k in table
              if not k.startswith('TPU') and device_kind.startswith(k)]
  return table[max(prefixes, key=len)] if prefixes else None


def table_memory(device_kind: str) -> tuple[float | None, float | None]:
  """(HBM bytes, bytes/s) of one chip from the data sheets, or Nones."""
  return _lookup(MEMORY, device_kind) or (None, None)


def table_peak_flops(device_kind: str, dtype: str = 'bfloat16'
                     ) -> float | None:
  """The data-sheet dense peak of one chip, or None for an unknown kind.

  Args:
    device_kind: `jax.Device.device_kind`, e.g. 'NVIDIA H100 80GB HBM3'.
    dtype: 'bfloat16' (also for float16) or 'float32'.
  """
  column = 1 if dtype == 'float32' else 0
  if device_kind.startswith('TPU'):
    entry = PEAK_FLOPS.get(device_kind)
    return None if entry is None else entry[column]
  prefixes = [k for k in PEAK_FLOPS
              if not k.startswith('TPU') and device_kind.startswith(k)]
  if not prefixes:
    return None
  return PEAK_FLOPS[max(prefixes, key=len)][column]


@functools.cache
def cpu_matmul_flops(n: int = 1024, repeats: int = 3) -> float:
  """FLOP/s of an n x n x n float32 matmul on the first CPU device.

  Measured once per process (about 0.2 s on 2 cores) and cached: the CPU
  has no data-sheet peak, so its MFU is relative to this.
  """
  device = jax.devices('cpu')[0]
  a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  mm = jax.jit(jnp.matmul)
  jax.block_until_ready(mm(a, a))
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(mm(a, a))
    best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def peak_flops(device: jax.Device | None = None,
               dtype: str = 'bfloat16') -> float | None:
  """Peak FLOP/s of one device: the table, a measured rate on CPU, or None.

  Args:
    device: defaults to jax.devices()[0].
    dtype: the matmul dtype, 'bfloat16' or 'float32'.
  """
  device = device or jax.devices()[0]
  if device.platform == 'cpu':
    return cpu_matmul_flops()
  return table_peak_flops(device.device_kind, dtype)


def compiled_flops(compiled: jax.stages.Compiled) -> float | None:
  """FLOPs of one execution on one device (XLA cost analysis), or None."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # Not every backend.
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get('flops')
  return None if flops is None or flops < 0 else float(flops)


_HLO_KINDS = ('convolution', 'dot', 'reduce-window', 'reduce', 'scatter',
          'gather', 'transpose', 'concatenate', 'pad', 'slice')
_INSTRUCTION = re.compile(r'\s*(?:ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\(')


def parse_hlo(text: str) -> tuple[dict, dict]:
  """A compiled module's text (`Compiled.as_text()`), indexed.

  Returns:
    (computation name -> its body lines, instruction name -> (opcode, the
    computation it calls or None, its line)). Instruction names are those
    of the executed operations in a jax.profiler trace.
  """
  comps, current = {}, None
  for line in text.splitlines():
    if line and not line.startswith(' ') and line.rstrip().endswith('{'):
      current = line.split()[1 if line.startswith('ENTRY') else 0].lstrip('%')
      comps[current] = []
    elif current is not None and line.startswith(' '):
      comps[current].append(line)
  instructions = {}
  for lines in comps.values():
    for line in lines:
      m = _INSTRUCTION.match(line)
      if m:
        called = re.findall(r'calls=%?([\w.\-]+)', line)
        instructions[m.group(1)] = (m.group(2), called[0] if called else None,
                                    line)
  return comps, instructions


def hlo_kind(name: str, comps: dict, instructions: dict) -> str | None:
  """What an instruction of `parse_hlo` computes; None if it is not there.

  Its opcode, or for a fusion 'fusion:' and the first of convolution, dot,
  reduce-window, reduce, scatter, gather, transpose, concatenate, pad and
  slice that its body contains ('fusion:elementwise' for none of them).
  """
  if name not in instructions:
    return None
  opcode, called, _ = instructions[name]
  if opcode != 'fusion' or called is None:
    return opcode
  body = ' '.join(comps.get(called, []))
  for kind in _HLO_KINDS:
    if f' {kind}(' in body:
      return 'fusion:' + kind
  return 'fusion:elementwise'


_SHAPE = re.compile(r'\s*(?:ROOT )?%?[\w.\-]+ = \w+\[([\d,]*)\]')


def _hlo_shape(line: str) -> tuple[int, ...]:
  dims = _SHAPE.match(line).group(1)
  return tuple(int(d) for d in dims.split(',') if d)


def hlo_conv_flops(name: str, comps: dict, instructions: dict) -> float:
  """FLOPs of a convolution of `parse_hlo`, or of those a fusion calls.

  Counted as `matmul_flops` counts (2 per multiply-add, padding included):
  the output's elements times the kernel's elements per output feature,
  which holds for the kernel gradient too (XLA writes it as a convolution
  of the input with the output gradient).
  """
  opcode, called, line = instructions[name]
  lines = comps.get(called, []) if opcode == 'fusion' else [line]
  total = 0.0
  for conv in (x for x in lines if ' convolution(' in x):
    operands = re.search(r' convolution\(%?([\w.\-]+), %?([\w.\-]+)\)', conv)
    labels = re.search(r'dim_labels=[^_]+_([^-]+)->', conv)
    if operands is None or labels is None or operands.group(2) not in instructions:
      continue
    rhs = _hlo_shape(instructions[operands.group(2)][2])
    out_features = rhs[labels.group(1).index('o')]
    total += 2.0 * math.prod(_hlo_shape(conv)) * math.prod(rhs) / out_features
  return total


@functools.cache
def loops_counted_once() -> bool:
  """True if this backend's cost analysis counts a loop body once.

  A two-iteration fori_loop of a matmul is compiled (once per process,
  tens of milliseconds) and its FLOPs compared with one matmul's.
  """
  x = jnp.ones((16, 16), jnp.float32)
  loop = jax.jit(lambda x: jax.lax.fori_loop(0, 2, lambda i, c: c @ x, x))
  flops = compiled_flops(loop.lower(x).compile())
  return flops is not None and flops < 1.5 * 2 * 16**3


def matmul_dtype(jaxpr: Any) -> str:
  """'bfloat16' if any dot or convolution of the jaxpr takes bf16 / f16.

  Args:
    jaxpr: a (closed) jaxpr, e.g. `jitted.trace(*args).jaxpr`; sub-jaxprs
      (scan, remat, custom_vjp, pjit) are searched too.

  Returns:
    'bfloat16' or 'float32': which peak applies to the program.
  """
  for eqn in _eqns(jaxpr):
    if eqn.primitive.name in ('dot_general', 'conv_general_dilated'):
      if any(getattr(v.aval, 'dtype', None) in _LOW_PRECISION
             for v in eqn.invars):
        return 'bfloat16'
  return 'float32'


def matmul_flops(jaxpr: Any) -> float:
  """FLOPs of the jaxpr's dots and convolutions: 2 per multiply-add.

  Counted the way PyTorch's torch.utils.flop_counter counts (matmuls,
  convolutions and attention, nothing elementwise), so that FLOP rates of
  the two frameworks compare; XLA's cost analysis (`compiled_flops`) also
  counts elementwise work. A scan body counts `length` times, a cond its
  most expensive branch, a shard_map body once per distinct shard (the
  mesh axes its inputs are split over), a Pallas kernel once per program
  instance of its grid (flash attention's backward kernels as they run:
  they recompute the logits), a while body once (its trip count is not in
  the jaxpr).

  Args:
    jaxpr: a (closed) jaxpr, e.g. `jitted.trace(*args).jaxpr` of a train
      step (its backward pass included).
  """
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (lhs_contract, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(
          lhs[d] for d in lhs_contract)
    elif name == 'conv_general_dilated':
      rhs = eqn.invars[1].aval.shape
      out_features = rhs[eqn.params['dimension_numbers'].rhs_spec[0]]
      # Each output element: the kernel window times its input features.
      total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * (
          math.prod(rhs) / out_features)
    elif name == 'scan':
      total += eqn.params['length'] * matmul_flops(eqn.params['jaxpr'])
    elif name == 'cond':
      total += max(matmul_flops(b) for b in eqn.params['branches'])
    elif name == 'shard_map':
      total += _shards(eqn) * matmul_flops(eqn.params['jaxpr'])
    elif name == 'pallas_call':
      # The kernel's jaxpr is one program instance: one block of the grid.
      total += math.prod(eqn.params['grid_mapping'].grid) * matmul_flops(
          eqn.params['jaxpr'])
    else:
      for param in eqn.params.values():
        for sub in (param if isinstance(param, (list, tuple)) else (param,)):
          if hasattr(sub, 'eqns') or hasattr(getattr(sub, 'jaxpr', None),
                                             'eqns'):
            total += matmul_flops(sub)
  return total


def _shards(eqn) -> int:
  """Distinct shards of a shard_map: the sizes of the mesh axes its inputs
  are split over (devices along its other axes hold copies). Its body has
  one shard's shapes."""
  axes = set()
  for spec in eqn.params['in_specs']:
    for entry in spec:
      axes.update((entry,) if isinstance(entry, str) else entry or ())
  shape = dict(eqn.params['mesh'].shape)
  return math.prod(shape[a] for a in axes)


def shard_map_flops(jaxpr: Any) -> tuple[float, float]:
  """(all shards', one device's) `matmul_flops` of the jaxpr's shard_map
  bodies (nested in scans and conds as matmul_flops counts them).

  A program partitioned by XLA over n devices does 1/n of its other work
  per device only where its batch splits n ways; a shard_map body's work
  per device is known exactly: plan.py combines the two.
  """
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  whole = one = 0.0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'shard_map':
      body = matmul_flops(eqn.params['jaxpr'])
      whole, one = whole + _shards(eqn) * body, one + body
      continue
    if name == 'scan':
      w, o = shard_map_flops(eqn.params['jaxpr'])
      whole += eqn.params['length'] * w
      one += eqn.params['length'] * o
      continue
    if name == 'cond':
      w, o = max(shard_map_flops(b) for b in eqn.params['branches'])
      whole, one = whole + w, one + o
      continue
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else (param,)):
        if hasattr(sub, 'eqns') or hasattr(getattr(sub, 'jaxpr', None),
                                           'eqns'):
          w, o = shard_map_flops(sub)
          whole, one = whole + w, one + o
  return whole, one


def _eqns(jaxpr):
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)  # ClosedJaxpr -> Jaxpr
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in (param if isinstance(param, (list, tuple)) else (param,)):
        if hasattr(sub, 'eqns') or hasattr(getattr(sub, 'jaxpr', None),
                                           'eqns'):
          yield from _eqns(sub)


@dataclasses.dataclass(frozen=True)
class Throughput:
  """FLOPs of one train step on one device and the device's peak FLOP/s.

  Attributes:
    flops: FLOPs per device per step (XLA cost analysis of the compiled
      step), or None when unknown (a plain step callable, no analysis).
    peak: the device's peak FLOP/s for the step's matmul dtype
      (peak_flops), or None for an unknown device kind.
    dtype: 'bfloat16' or 'float32', the matmul dtype of the step.
    device_kind: jax.devices()[0].device_kind.
  """

  flops: float | None
  peak: float | None
  dtype: str
  device_kind: str

  def metrics(self, steps_per_sec: float) -> dict[str, float]:
    """{'tflops_per_device', 'mfu'} at this rate (only the known ones)."""
    if self.flops is None:
      return {}
    achieved = self.flops * steps_per_sec
    out = {'tflops_per_device': achieved / 1e12}
    if self.peak:
      out['mfu'] = achieved / self.peak
    return out

  def describe(self) -> str:
    """One line for the log: FLOPs per step and the peak (or why not)."""
    if self.flops is None:
      return 'TFLOP/s unknown (the step has no trace(); see training.Step)'
    peak = (f'peak {self.peak / 1e12:.1f} TFLOP/s ({self.dtype})'
            if self.peak else 'MFU unknown: no peak FLOP/s for this device')
    return (f'{self.flops / 1e9:.3g} GFLOP per step per device (XLA cost'
            f' analysis) on {self.device_kind!r}; {peak}')


def step_throughput(step_fn: Any, state: Any, batch: Any,
                    grad_accum_steps: int = 1) -> Throughput:
  """Compiles a `Step` for (state, batch) and reads its FLOPs.

  The executable is jax's cached one: calling step_fn(state, batch) next
  does not compile again. A plain callable is not compiled here.

  Args:
    step_fn: a `training.Step` of a jitted function, a jitted
      (state, batch) function, or any callable (FLOPs unknown).
    state, batch: the first arguments (abstract shapes are enough).
    grad_accum_steps: the microbatch loop's trip count (see LoopSettings).
  """
  device = jax.devices()[0]
  # A training.Step traces its `fn`; a jitted (state, batch) function
  # traces itself; a plain Python function (or a Step around one) cannot.
  if not hasattr(getattr(step_fn, 'fn', step_fn), 'trace'):
    return Throughput(None, None, 'float32', device.device_kind)
  traced = step_fn.trace(state, batch)
  flops = compiled_flops(traced.lower().compile())
  if flops is not None and grad_accum_steps > 1 and loops_counted_once():
    flops *= grad_accum_steps
  dtype = matmul_dtype(traced.jaxpr)
  return Throughput(flops, peak_flops(device, dtype), dtype,
                    device.device_kind)
