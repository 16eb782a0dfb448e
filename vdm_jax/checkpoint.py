"""Checkpoints in `workdir/checkpoints` with orbax, plus the saved config.

Each step is saved as two orbax items: 'state' (step, params, opt_state) and
'ema_params', so that sampling restores the EMA parameters alone. Orbax
writes a step into a temporary directory and renames it when complete, so a
crash or SIGKILL during a save leaves the previous checkpoint intact; the
unfinished directory is ignored and removed at the next start.
"""

import json
import os
from typing import Any

from absl import logging
from etils import epath
import jax
import ml_collections
import orbax.checkpoint as ocp

from vdm_jax import fileio

CONFIG_FILE = 'config.json'

# Fields that must agree between a workdir's saved config and a new run that
# restores from it: they fix the parameter shapes or what the network means.
# A path naming a group, e.g. ('model',), stands for every field of it.
COMPATIBILITY_FIELDS = (
    ('data', 'image_size'),
    ('data', 'channels'),
    ('model', 'base_channels'),
    ('model', 'channel_mults'),
    ('model', 'num_res_blocks'),
    ('model', 'attn_resolutions'),
    ('model', 'temporal_attn_resolutions'),
    ('model', 'head_dim'),
    ('model', 'num_classes'),
    ('model', 'emb_dim'),
    ('model', 'emb_mlp_layers'),
    ('model', 'max_temporal_distance'),
    ('model', 'text_cross_attention'),
    ('model', 'text_pooling'),
    ('model', 'temporal_attention'),
    ('model', 'spatial_attention'),
    ('model', 'image_condition'),
    ('model', 'frame_positions'),
    ('videofusion', 'enabled'),
    ('diffusion', 'target'),
    # A model trained on one encoder's embeddings needs that encoder.
    ('text', 'encoder'),
    ('text', 'max_length'),
)
# What a field absent from an older saved config.json meant.
_ABSENT = {
    ('model', 'text_cross_attention'): True,
    ('model', 'text_pooling'): True,
    ('model', 'temporal_attention'): True,
    ('model', 'spatial_attention'): 'self',
    ('model', 'image_condition'): False,
    ('model', 'frame_positions'): False,
    ('videofusion', 'enabled'): False,
    ('text', 'encoder'): 'none',
    ('text', 'max_length'): 16,
}
# Fields whose None stands for another field's value.
_SAME_AS = {
    ('model', 'temporal_attn_resolutions'): ('model', 'attn_resolutions'),
}
# SinFusion (configs/single_video.py): every NextNet field.
SINFUSION_COMPATIBILITY_FIELDS = (('model',),)


def _use_single_replica_writes_on_cpu() -> None:
  """Writes each replicated array from one replica when running on CPU.

  Orbax splits the writing of a replicated array across its replicas, which
  costs one small compiled slice per array and device. That pays off on
  accelerators (parallel writes from many hosts) but on (fake) CPU devices
  it only adds compile time.
  """
  if jax.default_backend() == 'cpu':
    ocp.type_handlers.register_type_handler(
        jax.Array,
        ocp.type_handlers.ArrayHandler(use_replica_parallel=False),
        override=True,
    )


class Checkpointer:
  """Saves and restores train states under `workdir/checkpoints`."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    _use_single_replica_writes_on_cpu()
    if '://' not in workdir:  # orbax needs absolute local paths.
      workdir = os.path.abspath(workdir)
    self.directory = epath.Path(workdir) / 'checkpoints'
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
    )
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves `state` (a TrainState) at `step`; returns whether it saved."""
    return self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave({
                'step': state.step,
                'params': state.params,
                'opt_state': state.opt_state,
            }),
            ema_params=ocp.args.StandardSave(state.ema_params),
        ),
        force=force,
    )

  def restore(self, abstract_state: Any, step: int | None = None) -> Any:
    """Restores a full TrainState shaped (and sharded) like `abstract_state`."""
    step = self.latest_step() if step is None else step
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore({
                'step': abstract_state.step,
                'params': abstract_state.params,
                'opt_state': abstract_state.opt_state,
            }),
            ema_params=ocp.args.StandardRestore(abstract_state.ema_params),
        ),
    )
    s = restored['state']
    return abstract_state.replace(
        step=s['step'],
        params=s['params'],
        opt_state=s['opt_state'],
        ema_params=restored['ema_params'],
    )

  def restore_ema_params(
      self, abstract_params: Any, step: int | None = None
  ) -> tuple[Any, int]:
    """Restores only the EMA parameters; returns (params, step)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(
          f'No checkpoint in {self.directory}; train first with'
          ' --mode=train on this workdir.'
      )
    restored = self.manager.restore(
        step,
        args=ocp.args.Composite(
            ema_params=ocp.args.StandardRestore(abstract_params)
        ),
    )
    return restored['ema_params'], step

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def latest_step(workdir: str) -> int | None:
  """The last checkpoint step of a workdir (None: no checkpoint)."""
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def restore_ema_params(workdir: str, abstract_params: Any,
                       step: int | None = None,
                       sharding: jax.sharding.Sharding | None = None
                       ) -> tuple[Any, int]:
  """A workdir's EMA parameters at `step` (default: the last): (params, step).

  Args:
    workdir: the run's directory.
    abstract_params: the parameter shapes and dtypes to restore into.
    step: the checkpoint step; None: the last.
    sharding: placement of every restored array (e.g. replicated on a
      mesh); None: abstract_params' own.
  """
  if sharding is not None:
    abstract_params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
        abstract_params)
  ckpt = Checkpointer(workdir, async_save=False)
  try:
    return ckpt.restore_ema_params(abstract_params, step)
  finally:
    ckpt.close()


def save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes config.json into the workdir (process 0 only, atomically)."""
  if jax.process_index() != 0:
    return
  fileio.write_json(str(epath.Path(workdir) / CONFIG_FILE),
                    json.loads(config.to_json_best_effort()), sort_keys=True)


TEXT_FILE = 'text.json'


def save_text_encoder(workdir: str, name: str, dim: int,
                      max_length: int) -> None:
  """Records the text encoder a model trains on (workdir/text.json)."""
  if jax.process_index() != 0:
    return
  fileio.write_json(str(epath.Path(workdir) / TEXT_FILE),
                    {'encoder': name, 'dim': int(dim),
                     'max_length': int(max_length)})


def check_text_dim(workdir: str, dim: int, what: str) -> None:
  """Raises ValueError if `what` gives dim-d embeddings but the workdir's
  model was trained on others (nothing is checked without text.json)."""
  path = epath.Path(workdir) / TEXT_FILE
  if not path.exists():
    return
  saved = json.loads(path.read_text())
  if int(saved['dim']) != int(dim):
    raise ValueError(
        f'{what} gives {dim}-d text embeddings, but the model in {workdir}'
        f' was trained on {saved["dim"]}-d ones (text.encoder'
        f' {saved["encoder"]!r}, {path}): use the encoder (or embeddings'
        ' file) it was trained with, or a new --workdir.')


def load_config(workdir: str) -> dict | None:
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    return None
  return json.loads(path.read_text())


def _get(tree, keys):
  for k in keys:
    if not isinstance(tree, dict) or k not in tree:
      return None
    tree = tree[k]
  return tree


def _normalize(v):
  return list(v) if isinstance(v, (list, tuple)) else v


def _expand(fields, requested):
  """Key paths, with a path naming a requested group split into its fields."""
  for keys in fields:
    group = _get(requested, keys)
    if isinstance(group, dict):
      yield from (tuple(keys) + (k,) for k in group)
    else:
      yield tuple(keys)


def _field(config: dict, keys: tuple[str, ...]) -> Any:
  """A saved or requested field as the network reads it: None takes the
  value of the field _SAME_AS names, then (absent from an older config)
  _ABSENT's."""
  keys = tuple(keys)
  value = _get(config, keys)
  if value is None and keys in _SAME_AS:
    value = _get(config, _SAME_AS[keys])
  return _ABSENT.get(keys) if value is None else value


def check_compatible(config: ml_collections.ConfigDict, workdir: str,
                     fields=COMPATIBILITY_FIELDS) -> None:
  """Raises ValueError if the workdir's saved config cannot be restored into.

  Called before any compilation, so that a wrong --workdir or a changed model
  field fails at once with the differing fields named.

  Args:
    config: the requested config.
    workdir: the workdir whose config.json (if any) is compared.
    fields: key paths that must agree (COMPATIBILITY_FIELDS for VDM,
      SINFUSION_COMPATIBILITY_FIELDS for SinFusion); a path naming a group
      compares each of the requested group's fields. `config.method`
      ('vdm' when absent) must always agree.
  """
  saved = load_config(workdir)
  if saved is None:
    return
  requested = json.loads(config.to_json_best_effort())
  diffs = []
  methods = saved.get('method', 'vdm'), requested.get('method', 'vdm')
  if methods[0] != methods[1]:
    diffs.append(f'method: saved {methods[0]!r}, requested {methods[1]!r}')
  for keys in _expand(fields, requested):
    a, b = _field(saved, keys), _field(requested, keys)
    if _normalize(a) != _normalize(b):
      diffs.append(f'{".".join(keys)}: saved {a!r}, requested {b!r}')
  if diffs:
    raise ValueError(
        f'The workdir {workdir} holds a run with an incompatible config:\n  '
        + '\n  '.join(diffs)
        + '\nUse a new --workdir, or the saved config '
        f'({epath.Path(workdir) / CONFIG_FILE}).'
    )
  logging.info('Saved config in %s is compatible.', workdir)
