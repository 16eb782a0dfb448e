"""Device mesh, shardings of the train state and batches, global arrays.

One code path for 1 CPU, 8 fake CPU devices, one GPU and a multi-host pod:
`jax.jit` with `NamedSharding` over a `Mesh(('data', 'fsdp'))`. Batches are
split over both axes; parameters are replicated or, with
`config.mesh.param_sharding = 'fsdp'`, split along one divisible dimension
over the 'fsdp' axis. `initialize_distributed` joins the processes of a
multi-host run (TPU pod, SLURM, or explicit coordinator) before any of this.
"""

from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')
PARAM_SHARDINGS = ('replicated', 'fsdp')

# What jax.distributed.initialize() (JAX 0.10.2) raises when no cluster
# (TPU pod, SLURM, Open MPI, ...) is detected and nothing was given.
_NO_CLUSTER = 'coordinator_address should be defined'


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> None:
  """Joins the multi-process runtime, or runs as a single process.

  With a coordinator address, the three values are passed on as given.
  Without one, JAX auto-detects TPU pods and SLURM; where it finds no cluster
  this is one process. Every other error (a coordinator that cannot be
  reached, a half-set JAX_COORDINATOR_ADDRESS, a second call) is raised:
  swallowing it would let each host of a pod train alone on its own devices.
  """
  if coordinator_address is not None:
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id)
    return
  try:
    jax.distributed.initialize()
  except ValueError as e:
    if _NO_CLUSTER not in str(e):
      raise
    logging.info('No cluster detected: running as a single process.')


def mesh_shape(
    mesh_config: ml_collections.ConfigDict, num_devices: int
) -> tuple[int, int]:
  """Resolves (data, fsdp) sizes; one of them may be -1 (all remaining)."""
  data, fsdp = int(mesh_config.data), int(mesh_config.fsdp)
  if data == -1 and fsdp == -1:
    raise ValueError('Only one of mesh.data and mesh.fsdp may be -1.')
  if data == -1:
    data = num_devices // fsdp if fsdp > 0 else 0
  if fsdp == -1:
    fsdp = num_devices // data if data > 0 else 0
  if data < 1 or fsdp < 1 or data * fsdp != num_devices:
    raise ValueError(
        f'mesh.data={mesh_config.data} x mesh.fsdp={mesh_config.fsdp}'
        f' does not use exactly the {num_devices} devices available; set'
        ' them so that data * fsdp equals the device count (-1 takes all'
        ' remaining devices).'
    )
  return data, fsdp


def make_mesh(
    mesh_config: ml_collections.ConfigDict, devices=None
) -> Mesh:
  """A ('data', 'fsdp') mesh over `devices` (default: all devices).

  On TPU the devices are laid out along the chips' physical torus
  (`mesh_utils.create_device_mesh`), so that the 'fsdp' all-gathers run
  between neighbouring chips; elsewhere this is `devices` in order.
  """
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  try:
    grid = mesh_utils.create_device_mesh(
        shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError) as e:
    logging.warning('No topology-aware %s mesh (%s); using device order.',
                    shape, e)
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every mesh axis."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def abstract(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of a tree (arrays or abstract) with the given
  shardings (a tree of the same structure): inputs to lower or trace a
  program without allocating it."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      tree, shardings)


def _param_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """Shards the largest dimension divisible by `fsdp`; else replicates."""
  if fsdp <= 1 or not shape:
    return P()
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in order:
    if shape[i] % fsdp == 0:
      spec = [None] * len(shape)
      spec[i] = 'fsdp'
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, param_sharding: str):
  """NamedShardings for every leaf of an abstract (eval_shape) state.

  Args:
    abstract_state: pytree of jax.ShapeDtypeStruct.
    mesh: the ('data', 'fsdp') mesh.
    param_sharding: 'replicated' or 'fsdp'.

  Returns:
    A pytree of NamedSharding with the structure of `abstract_state`.
  """
  if param_sharding not in PARAM_SHARDINGS:
    raise ValueError(
        f'Unknown mesh.param_sharding {param_sharding!r}; choose one of'
        f' {PARAM_SHARDINGS}.'
    )
  fsdp = mesh.shape['fsdp'] if param_sharding == 'fsdp' else 1

  def leaf(x):
    return NamedSharding(mesh, _param_spec(tuple(x.shape), fsdp))

  return jax.tree.map(leaf, abstract_state)


def host_to_global(batch: Any, mesh: Mesh) -> Any:
  """Makes global arrays from this process's share of a batch.

  Args:
    batch: pytree of host-local numpy arrays whose leading axis is this
      process's part of the global batch.
    mesh: the mesh; the global batch is split over all of its axes.

  Returns:
    The same pytree of global jax.Arrays sharded along the batch axis.
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), batch
  )


def full_to_global(x: np.ndarray, mesh: Mesh) -> jax.Array:
  """The same whole host array on every process -> a batch-sharded global
  array (each device takes its slice; cf. `host_to_global` for per-process
  shares)."""
  return jax.make_array_from_callback(
      x.shape, batch_sharding(mesh), lambda idx: x[idx])


def check_batch_size(
    global_batch: int, mesh: Mesh, what: str = 'training.batch_size'
) -> None:
  """The global batch must split evenly over devices and processes."""
  n = mesh.devices.size
  if global_batch % n:
    raise ValueError(
        f'{what}={global_batch} is not divisible by the {n}'
        f' devices of the mesh; use a multiple of {n}.'
    )
  if global_batch % jax.process_count():
    raise ValueError(
        f'{what}={global_batch} is not divisible by the'
        f' {jax.process_count()} processes.'
    )
