"""One attention dispatch: XLA einsum, cuDNN flash attention, Pallas (TPU).

Spatial self-attention (VDM, Ho et al. 2022, Sec. 3), sparse-causal
attention (Tune-A-Video, Wu et al. 2022) and text cross-attention (Imagen
Video, Ho et al. 2022b) all call `dot_product_attention` with q, k, v in
the [batch, tokens, heads, head_dim] layout of `jax.nn.dot_product_attention`
(BTNH). Implementations (`model.attention`):

  'xla'    the einsum below: float32 logits, float32 softmax, probabilities
           cast to v's dtype for the value product. Runs everywhere; memory
           grows with Tq * Tk.
  'cudnn'  cuDNN flash attention through `jax.nn.dot_product_attention(...,
           implementation='cudnn')` (Dao 2023, FlashAttention-2). NVIDIA GPU
           only; bf16/fp16 inputs; head_dim a multiple of 8 and <= 128
           (<= 256 from Hopper, compute capability 9.0); with a mask or bias,
           even Tq and Tk (its training kernels need them).
  'pallas' the Pallas TPU flash attention kernel
           (`jax.experimental.pallas.ops.tpu.flash_attention`; Dao et al.
           2022). TPU only; head_dim <= 128 or a multiple of 128; the token
           axes are padded to multiples of its 128-wide blocks (padded keys
           are masked out through segment ids, padded queries cut off).
           On several devices only within `kernels_on(mesh, ...)` (the
           train step and the sampler's denoiser enter it), which runs the
           kernel per device in a shard_map over the batch.
  'auto'   per call, from the backend and the shape: GPU with bf16/fp16
           inputs that cuDNN supports -> 'cudnn'; TPU with >= 1024 query and
           >= 128 key tokens, within `kernels_on` or on a one-device
           process -> 'pallas'; otherwise (CPU, small attention,
           float32 on GPU) -> 'xla'.

Contract shared by every implementation: q is already scaled by
1/sqrt(head_dim) by the caller, so each computes softmax(q k^T + bias) v with
scale 1 (`scale=1.0`, `sm_scale=1.0`); `mask` is boolean, True = attend; a
query row must be allowed at least one key (for a row with none the
implementations differ: 'xla' averages all keys).

Temporal attention (layers.TemporalAttention) keeps the einsum on purpose:
its sequences are 16-64 frames, so its logits are tiny and a flash kernel's
128-wide blocks would be mostly padding; it adds a learned relative-position
bias (whose gradient cuDNN gives only for a batch of one) and the joint
image-video frame mask; and Generative Inbetweening (Wang et al. 2024,
Sec. 3.2) captures and injects its softmax probabilities, which flash
kernels never materialise.
"""

import contextlib
import contextvars
import math
from typing import Any, Iterator, Optional, Sequence

import jax
from jax.experimental.pallas.ops.tpu import flash_attention as fa
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Array = jax.Array

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'pallas')
# 'auto' takes the Pallas kernel on TPU from this many query tokens (32x32
# pixels): below it the [Tq, Tk] logits of a frame fit easily and XLA's fused
# einsum is as fast (docs/scaling.md).
PALLAS_MIN_QUERIES = 1024
# ... and from one kernel block of keys: a shorter key axis (a 16-token text)
# would be padded to 128, and its logits are small anyway.
PALLAS_MIN_KEYS = 128
PALLAS_BLOCK = 128
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# The einsum spec of the BTNH layout: queries, keys, logits.
BTNH = ('bqhd', 'bkhd', 'bhqk')


def attention_weights(q: Array, k: Array, spec: Sequence[str],
                      bias: Optional[Array], mask: Optional[Array]) -> Array:
  """Softmax attention probabilities (float32) of `einsum_attention`.

  Args:
    q: queries, scaled by 1/sqrt(head dim) by the caller.
    k: keys.
    spec: (q, k, logits) einsum pieces, e.g. BTNH = ('bqhd', 'bkhd',
      'bhqk').
    bias: logits bias broadcastable to the logits, or None.
    mask: bool, True = attend, broadcastable to the logits, or None.

  Returns:
    float32 probabilities in the logits' layout.
  """
  qs, ks, ls = spec
  logits = jnp.einsum(f'{qs},{ks}->{ls}', q, k,
                      preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  return jax.nn.softmax(logits, axis=-1)


def einsum_attention(q: Array, k: Array, v: Array, spec: Sequence[str],
                     bias: Optional[Array], mask: Optional[Array],
                     weights: Optional[Array] = None) -> Array:
  """Softmax attention with float32 logits in any einsum layout ('xla').

  Args:
    q: queries, scaled by 1/sqrt(head dim) by the caller.
    k: keys.
    v: values (k's layout).
    spec: (q, k, logits) einsum pieces, e.g. BTNH.
    bias: logits bias broadcastable to the logits, or None.
    mask: bool, True = attend, broadcastable to the logits, or None.
    weights: given attention probabilities in the logits' layout, used
      instead of softmax(q k + bias) (attention injection); None computes
      them.

  Returns:
    Attention output in the layout of q.
  """
  qs, ks, ls = spec
  if weights is None:
    weights = attention_weights(q, k, spec, bias, mask)
  return jnp.einsum(f'{ls},{ks}->{qs}', weights.astype(v.dtype), v)


# The platform 'auto' decides for when no backend is passed: None is the
# process's own (jax.default_backend()); `compile_for` sets another while a
# program is traced for a deviceless compile (vdm_jax.plan).
_COMPILE_PLATFORM: contextvars.ContextVar[Optional[str]] = (
    contextvars.ContextVar('attention_compile_platform', default=None))


@contextlib.contextmanager
def compile_for(platform: Optional[str]) -> Iterator[None]:
  """Within the block, 'auto' decides for `platform` instead of this host.

  For programs traced here and compiled for another platform without its
  hardware (vdm_jax.plan compiles TPU programs on a CPU host): on 'tpu' the
  long attentions then take the Pallas kernel, as they would on the slice.
  None leaves the decision to the host's backend.
  """
  token = _COMPILE_PLATFORM.set(platform)
  try:
    yield
  finally:
    _COMPILE_PLATFORM.reset(token)


# The mesh a traced program's Pallas kernels are split over (`kernels_on`).
# Mosaic kernels cannot be partitioned by XLA: on more than one device each
# must run inside a shard_map, per device on its share of the batch.
_KERNEL_MESH: contextvars.ContextVar[Optional[tuple[Any, tuple[str, ...]]]] = (
    contextvars.ContextVar('attention_kernel_mesh', default=None))


@contextlib.contextmanager
def kernels_on(mesh: Any, batch_axes: Sequence[str]) -> Iterator[None]:
  """Within the block, Pallas kernels run per device of `mesh`.

  Enter it around the tracing of a program jitted over `mesh` (the train
  step, the sampler's denoiser): each Pallas attention then runs in a
  shard_map with its batch axis split over `batch_axes` (those of the mesh's
  axes that exist). Without it, 'auto' takes the Pallas kernel only where
  this process has one device: XLA cannot partition the kernel, and
  jitting it over several devices fails ("Mosaic kernels cannot be
  automatically partitioned").
  """
  axes = tuple(a for a in batch_axes if a in mesh.axis_names)
  token = _KERNEL_MESH.set((mesh, axes))
  try:
    yield
  finally:
    _KERNEL_MESH.reset(token)


def _kernel_split() -> tuple[Any, tuple[str, ...], int]:
  """(mesh or None, batch axes, devices the batch is split over)."""
  found = _KERNEL_MESH.get()
  if found is None:
    return None, (), 1
  mesh, axes = found
  return mesh, axes, math.prod(mesh.shape[a] for a in axes)


def _per_device(fn, mesh: Any, axes: tuple[str, ...], *args):
  """fn(*args) in a shard_map over `mesh`, every arg and the output split
  on axis 0 over `axes` (replicated over the mesh's other axes); None args
  pass through."""
  spec = P(axes if axes else None)
  present = [a is not None for a in args]
  given = [a for a in args if a is not None]

  def body(*xs):
    it = iter(xs)
    return fn(*[next(it) if p else None for p in present])

  return jax.shard_map(body, mesh=mesh, in_specs=(spec,) * len(given),
                       out_specs=spec, check_vma=False)(*given)


def _platform(backend: Optional[str]) -> str:
  if backend is None:
    backend = _COMPILE_PLATFORM.get()
  platform = jax.default_backend() if backend is None else backend
  return {'cuda': 'gpu', 'rocm': 'gpu'}.get(platform, platform)


def _gpu_is_rocm() -> bool:
  """An AMD GPU (no cuDNN) is this process's GPU; False without a GPU."""
  try:
    return 'rocm' in jax.devices('gpu')[0].client.platform_version.lower()
  except RuntimeError:
    return False


def _cudnn_max_head_dim() -> int:
  """256 on Hopper and later (compute capability >= 9.0), else 128."""
  try:
    capability = jax.devices('gpu')[0].compute_capability
    return 256 if float(capability) >= 9.0 else 128
  except (RuntimeError, AttributeError, ValueError, IndexError):
    return 128


def check_implementation(name: str, backend: Optional[str] = None) -> None:
  """Raises ValueError if `name` cannot run on `backend` at all.

  Cheap (no tracing, no compilation): for config validation. Shape and dtype
  limits are checked per call by `resolve`.

  Args:
    name: one of IMPLEMENTATIONS.
    backend: 'cpu', 'gpu' or 'tpu'; None is jax.default_backend().
  """
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'Unknown attention implementation {name!r}; choose one'
                     f' of {IMPLEMENTATIONS}.')
  platform = _platform(backend)
  if name == 'cudnn' and platform == 'gpu' and _gpu_is_rocm():
    raise ValueError("model.attention='cudnn' needs an NVIDIA GPU, but this"
                     " GPU is AMD's (ROCm); choose 'auto' or 'xla'.")
  if name == 'cudnn' and platform != 'gpu':
    raise ValueError(
        f"model.attention='cudnn' (cuDNN flash attention) needs an NVIDIA"
        f" GPU, but the backend is {platform!r}; choose 'auto' or 'xla'"
        + (" ('pallas' on TPU)." if platform == 'tpu' else '.'))
  if name == 'pallas' and platform != 'tpu':
    raise ValueError(
        f"model.attention='pallas' (the Pallas TPU flash attention kernel)"
        f" needs a TPU, but the backend is {platform!r}; choose 'auto' or"
        f" 'xla'" + (" ('cudnn' on GPU with bf16/fp16)." if platform == 'gpu'
                     else '.'))


def unsupported_reason(name: str, q_shape: Sequence[int],
                       k_shape: Sequence[int], dtype: Any,
                       masked: bool = False,
                       backend: Optional[str] = None) -> Optional[str]:
  """Why `name` cannot run this attention here, or None if it can.

  Args:
    name: 'xla', 'cudnn' or 'pallas'.
    q_shape: [B, Tq, heads, head_dim].
    k_shape: [B, Tk, heads, head_dim].
    dtype: the dtype of q, k and v.
    masked: a mask or a bias is given.
    backend: 'cpu', 'gpu' or 'tpu'; None is jax.default_backend().
  """
  try:
    check_implementation(name, backend)
  except ValueError as e:
    return str(e)
  _, tq, _, d = q_shape
  tk = k_shape[1]
  if name == 'cudnn':
    if jnp.dtype(dtype) not in [jnp.dtype(t) for t in CUDNN_DTYPES]:
      return (f'cuDNN flash attention needs bf16/fp16 inputs, got'
              f' {jnp.dtype(dtype).name} (model.dtype)')
    h_max = _cudnn_max_head_dim()
    if d % 8 or d > h_max:
      return (f'cuDNN flash attention needs head_dim a multiple of 8 and'
              f' <= {h_max} on this GPU, got {d}')
    if masked and (tq % 2 or tk % 2):
      return (f'cuDNN flash attention with a mask or bias needs even query'
              f' and key lengths, got Tq={tq}, Tk={tk}')
  if name == 'pallas' and d > PALLAS_BLOCK and d % PALLAS_BLOCK:
    return (f'the Pallas TPU flash attention kernel needs head_dim <= 128 or'
            f' a multiple of 128, got {d}')
  if name == 'pallas' and q_shape[0] % _kernel_split()[2]:
    return (f'within kernels_on the Pallas kernel runs per device on an'
            f' equal share of the batch, and {q_shape[0]} attention rows do'
            f' not divide over {_kernel_split()[2]} devices')
  return None


def _pallas_is_placed() -> bool:
  """'auto' may take the Pallas kernel: inside `kernels_on`, or where the
  program can only run on one device (XLA cannot partition the kernel)."""
  if _KERNEL_MESH.get() is not None:
    return True
  return _COMPILE_PLATFORM.get() is None and jax.device_count() == 1


def resolve(implementation: str, q_shape: Sequence[int],
            k_shape: Sequence[int], dtype: Any, masked: bool = False,
            backend: Optional[str] = None) -> str:
  """The implementation that runs: 'auto' decided, an explicit one checked.

  Args: as `unsupported_reason`, with implementation one of IMPLEMENTATIONS.

  Returns:
    'xla', 'cudnn' or 'pallas'.

  Raises:
    ValueError: an explicit choice that cannot run this attention here.
  """
  check_implementation(implementation, backend)
  platform = _platform(backend)
  args = (q_shape, k_shape, dtype, masked, backend)
  if implementation == 'auto':
    if platform == 'gpu' and unsupported_reason('cudnn', *args) is None:
      return 'cudnn'
    if (platform == 'tpu' and q_shape[1] >= PALLAS_MIN_QUERIES
        and k_shape[1] >= PALLAS_MIN_KEYS and _pallas_is_placed()
        and unsupported_reason('pallas', *args) is None):
      return 'pallas'
    return 'xla'
  reason = unsupported_reason(implementation, *args)
  if reason is not None:
    raise ValueError(
        f'model.attention={implementation!r} cannot run attention q'
        f' {tuple(q_shape)}, k {tuple(k_shape)} ({jnp.dtype(dtype).name}) on'
        f' {platform!r}: {reason}. Choose \'auto\' (it falls back to \'xla\''
        f' here) or \'xla\'.')
  return implementation


def _jax_nn_attention(q: Array, k: Array, v: Array, mask: Optional[Array],
                      bias: Optional[Array], implementation: str) -> Array:
  """jax.nn.dot_product_attention with scale 1 and full-length mask/bias.

  cuDNN folds the mask into the bias and needs both with the full [Tq, Tk]
  axes (jax-ml/jax#28974), so size-1 query/key axes are broadcast; size-1
  batch and head axes stay as they are. cuDNN takes the bias in q's dtype.
  """
  tq, tk = q.shape[1], k.shape[1]
  if bias is not None and implementation == 'cudnn':
    bias = jnp.asarray(bias, q.dtype)

  def full(x):
    if x is None:
      return None
    x = jnp.asarray(x)
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    return jnp.broadcast_to(x, x.shape[:2] + (tq, tk))

  return jax.nn.dot_product_attention(
      q, k, v, bias=full(bias), mask=full(mask), scale=1.0,
      implementation=implementation)


def _pad_axis(x: Array, axis: int, size: int) -> Array:
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, pad)


def _pallas_attention(q: Array, k: Array, v: Array, mask: Optional[Array],
                      bias: Optional[Array]) -> Array:
  """The Pallas TPU flash attention kernel on BTNH inputs.

  A key mask ([B or 1, 1, 1, Tk]) travels as segment ids (query id 1, key id
  1 where allowed, 0 elsewhere and on padding); any other mask is folded into
  the bias, which the kernel takes at full [B, heads, Tq, Tk].
  """
  b, tq, heads, _ = q.shape
  tk = k.shape[1]
  pq = -(-tq // PALLAS_BLOCK) * PALLAS_BLOCK
  pk = -(-tk // PALLAS_BLOCK) * PALLAS_BLOCK
  keys = jnp.ones((b, tk), bool)
  if mask is not None:
    mask = jnp.asarray(mask)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
    if mask.shape[1] == 1 and mask.shape[2] == 1:
      keys = jnp.broadcast_to(mask[:, 0, 0], (b, tk))
    else:
      fold = jnp.where(mask, 0.0, fa.DEFAULT_MASK_VALUE).astype(jnp.float32)
      bias = fold if bias is None else bias + fold
  if bias is not None:
    bias = jnp.asarray(bias)
    bias = bias.reshape((1,) * (4 - bias.ndim) + bias.shape)
    bias = jnp.broadcast_to(bias, (b, heads, tq, tk)).astype(jnp.float32)
    bias = _pad_axis(_pad_axis(bias, 2, pq), 3, pk)
  segment_ids = None
  if mask is not None or pk != tk:
    segment_ids = fa.SegmentIds(
        q=jnp.ones((b, pq), jnp.int32),
        kv=_pad_axis(keys.astype(jnp.int32), 1, pk))
  to_bnth = lambda x, size: jnp.swapaxes(_pad_axis(x, 1, size), 1, 2)

  def kernel(q, k, v, bias, segment_q, segment_kv):
    ids = (None if segment_q is None
           else fa.SegmentIds(q=segment_q, kv=segment_kv))
    return fa.flash_attention(q, k, v, ab=bias, segment_ids=ids,
                              sm_scale=1.0)

  args = (to_bnth(q, pq), to_bnth(k, pk), to_bnth(v, pk), bias,
          None if segment_ids is None else segment_ids.q,
          None if segment_ids is None else segment_ids.kv)
  mesh, axes, split = _kernel_split()
  if mesh is not None and mesh.size > 1:
    out = _per_device(kernel, mesh, axes if split > 1 else (), *args)
  else:
    out = kernel(*args)
  return jnp.swapaxes(out, 1, 2)[:, :tq]


def dot_product_attention(q: Array, k: Array, v: Array,
                          mask: Optional[Array] = None,
                          bias: Optional[Array] = None,
                          implementation: str = 'auto',
                          backend: Optional[str] = None) -> Array:
  """softmax(q k^T + bias) v, masked, by the chosen implementation.

  Args:
    q: [B, Tq, heads, head_dim] queries, already scaled by 1/sqrt(head_dim).
    k: [B, Tk, heads, head_dim] keys.
    v: [B, Tk, heads, head_dim] values.
    mask: bool, broadcastable to [B, heads, Tq, Tk], True = attend; every
      query row needs at least one True. None attends to every key.
    bias: logits bias broadcastable to [B, heads, Tq, Tk], or None.
    implementation: one of IMPLEMENTATIONS ('auto' decides per call).
    backend: the platform to decide for; None is jax.default_backend().

  Returns:
    [B, Tq, heads, head_dim] in v's dtype.
  """
  masked = mask is not None or bias is not None
  name = resolve(implementation, q.shape, k.shape, q.dtype, masked, backend)
  if name == 'cudnn':
    return _jax_nn_attention(q, k, v, mask, bias, 'cudnn')
  if name == 'pallas':
    return _pallas_attention(q, k, v, mask, bias)
  return einsum_attention(q, k, v, BTNH, bias, mask)

