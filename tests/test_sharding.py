"""Sharded training: mesh equivalence, FSDP, accumulation, multi-process."""

import os
import re
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import tiny
from vdm_jax import checkpoint
from vdm_jax import denoiser
from vdm_jax import sharding
from vdm_jax import train
from vdm_jax import training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(**overrides):
  config = tiny.get_config()
  config.training.label_dropout = 0.0
  for key, value in overrides.items():
    group, field = key.split('.')
    config[group][field] = value
  return config


def _train(config, steps=2, devices=None, restore=None, after=None):
  """Runs train steps on fixed batches; returns host params, losses, state.

  restore: state -> state (e.g. a checkpoint restore onto this mesh's
  state), then training continues from its step; after: (step, fn) calls
  fn(state) once that many steps are done.
  """
  mesh = sharding.make_mesh(config.mesh, devices)
  model = denoiser.create_model(config)
  tx, lr_fn = training.create_optimizer(config)
  state, shardings = train.create_train_state(
      config, model, tx, jax.random.key(0), mesh)
  first = 0
  if restore is not None:
    state = restore(state)
    first = int(state.step)
  step_fn = train.make_train_step(config, model, tx, lr_fn, mesh, shardings)
  pipe = train.create_pipeline(config)
  losses = []
  for s in range(first, steps):
    batch = sharding.host_to_global(pipe.batch_for_step(s), mesh)
    state, metrics = step_fn(state, batch, jax.random.key(1))
    losses.append(float(metrics['loss']))
    if after is not None and s + 1 == after[0]:
      after[1](state)
  return jax.tree.map(np.asarray, jax.device_get(state.params)), losses, state


# Parameters of two runs that differ only in the order of float32 reductions
# (mesh, microbatches, processes) agree to rtol 1e-4 plus an absolute 1e-5.
# The absolute part is for the parameters whose true gradient is zero (e.g. a
# conv bias right before a GroupNorm with one channel per group): their
# gradient is rounding noise of ~1e-11, which Adam turns into steps of
# lr * g / (|g| + eps) ~ 1e-6 that differ between runs (seen: 1.7e-6 after 4
# steps). A real error (a lost step, a wrong batch) moves parameters by ~lr =
# 1e-3, far outside it.
RTOL, ATOL = 1e-4, 1e-5


def _assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def test_mesh_shape_resolution():
  cfg = ml_collections.ConfigDict(dict(data=-1, fsdp=2))
  assert sharding.mesh_shape(cfg, 8) == (4, 2)
  cfg = ml_collections.ConfigDict(dict(data=2, fsdp=-1))
  assert sharding.mesh_shape(cfg, 8) == (2, 4)
  with pytest.raises(ValueError, match='exactly the 8 devices'):
    sharding.mesh_shape(ml_collections.ConfigDict(dict(data=3, fsdp=1)), 8)


def test_fsdp_shards_parameters_along_a_divisible_axis():
  config = _config(**{'mesh.data': 4, 'mesh.fsdp': 2})
  config.mesh.param_sharding = 'fsdp'
  mesh = sharding.make_mesh(config.mesh)
  model = denoiser.create_model(config)
  tx, _ = training.create_optimizer(config)
  state, _ = train.create_train_state(config, model, tx, jax.random.key(0),
                                      mesh)
  kernels = [x for x in jax.tree.leaves(state.params) if x.ndim >= 2]
  sharded = [x for x in kernels if 'fsdp' in tuple(x.sharding.spec)]
  assert len(sharded) == len(kernels)
  for x in sharded:  # Each device holds half of the sharded axis.
    shard = x.addressable_shards[0].data
    assert shard.size * 2 == x.size


@pytest.fixture(scope='module')
def data8_run():
  """data=8: params after 2 and after 4 steps, the 4 losses (the reference
  of the mesh and FSDP-restore tests: only reduction order differs)."""
  at2 = {}
  keep = lambda state: at2.update(params=jax.device_get(state.params))
  p4, losses, _ = _train(_config(**{'mesh.data': 8}), 4, after=(2, keep))
  return {'params2': at2['params'], 'params4': p4, 'losses': losses}


def _fsdp_config(data, fsdp):
  config = _config(**{'mesh.data': data, 'mesh.fsdp': fsdp})
  config.mesh.param_sharding = 'fsdp'
  return config


@pytest.fixture(scope='module')
def fsdp8_run(tmp_path_factory):
  """data=2 x fsdp=4 (FSDP params) on 8 devices, 2 steps, saved at 2."""
  path = str(tmp_path_factory.mktemp('fsdp8'))
  ckpt = checkpoint.Checkpointer(path)
  save = lambda state: ckpt.save(2, state, force=True)
  params, losses, _ = _train(_fsdp_config(2, 4), 2, after=(2, save))
  ckpt.wait()
  return {'params': params, 'losses': losses, 'path': path}


def test_same_parameters_on_every_mesh(data8_run, fsdp8_run):
  """data=8, data=2 x fsdp=4 (FSDP params) and data=1 give the same update.

  Only the order of floating-point reductions differs between meshes (the
  batch mean and the gradient all-reduce), so losses agree to rtol 1e-5 and
  parameters to float32 rounding amplified by Adam (RTOL, ATOL above).
  """
  p1, l1, _ = _train(_config(**{'mesh.data': 1}),
                            devices=jax.devices()[:1])
  for params, losses in ((fsdp8_run['params'], fsdp8_run['losses']),
                         (p1, l1)):
    np.testing.assert_allclose(losses, data8_run['losses'][:2], rtol=1e-5)
    _assert_trees_close(params, data8_run['params2'])


# ~50 s. Faster tests cover what it checks: the one accumulation routine
# (training.accumulate_gradients) equals the full batch for k = 1, 2, 4 in
# test_sinfusion's microbatch test, and train_step with 2 microbatches on
# the 8-device mesh in test_train's per-frame label test.
@pytest.mark.slow
def test_gradient_accumulation_equals_the_full_batch():
  """4 microbatches of 2 give the full-batch update (float32 rounding)."""
  full, lf, _ = _train(_config())
  acc, la, _ = _train(_config(**{'training.grad_accum_steps': 4}))
  np.testing.assert_allclose(lf, la, rtol=1e-5)
  _assert_trees_close(full, acc)


def test_fsdp_checkpoint_restores_onto_a_smaller_mesh(data8_run, fsdp8_run):
  """Saved on 8 devices (data=2 x fsdp=4), resumed on 4 (data=2 x fsdp=2).

  The restored arrays take the new mesh's shardings (each parameter shard
  grows from a quarter to a half), and steps 3-4 on 4 devices give what an
  uninterrupted 8-device run gives (data=8: the meshes agree,
  test_same_parameters_on_every_mesh), to the same tolerances.
  """
  def restore(state):  # Checked here: the train step donates the state.
    want = [x.sharding for x in jax.tree.leaves(state)]
    state = checkpoint.Checkpointer(fsdp8_run['path']).restore(state)
    assert int(state.step) == 2
    for x, s in zip(jax.tree.leaves(state), want):
      assert x.sharding.is_equivalent_to(s, x.ndim)
      assert len(x.sharding.device_set) == 4
    kernel = state.params['conv_in']['kernel']
    assert 'fsdp' in tuple(kernel.sharding.spec)
    assert kernel.addressable_shards[0].data.size * 2 == kernel.size
    return state

  params, losses, _ = _train(_fsdp_config(2, 2), 4, jax.devices()[:4],
                             restore=restore)
  assert len(losses) == 2
  np.testing.assert_allclose(losses, data8_run['losses'][2:], rtol=1e-5)
  _assert_trees_close(params, data8_run['params4'])


def test_initialize_distributed_single_process_and_real_errors():
  """No cluster: one process. A misconfigured cluster raises, not ignored.

  Run in fresh interpreters: jax.distributed.initialize() must come before
  the XLA backend starts, which this test process has already done.
  """
  env = _env(1)
  for var in ('JAX_COORDINATOR_ADDRESS', 'SLURM_JOB_ID',
              'OMPI_MCA_orte_hnp_uri', 'TPU_WORKER_HOSTNAMES'):
    env.pop(var, None)
  code = ('import jax; from vdm_jax import sharding;'
          ' sharding.initialize_distributed(); print(jax.process_count())')
  run = lambda: subprocess.run([sys.executable, '-c', code], cwd=ROOT,
                               env=env, capture_output=True, text=True,
                               timeout=120)
  alone = run()
  assert alone.returncode == 0, alone.stderr[-2000:]
  assert alone.stdout.split() == ['1']
  # A coordinator address without a process count: JAX raises ValueError,
  # which a blanket `except (ValueError, RuntimeError)` would turn into a
  # silent single-process run on every host.
  env['JAX_COORDINATOR_ADDRESS'] = '127.0.0.1:1'
  broken = run()
  assert broken.returncode != 0
  assert 'Number of processes must be defined' in broken.stderr


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _main_cmd(workdir, steps, *extra):
  return [
      sys.executable, '-m', 'vdm_jax.main', f'--config={ROOT}/configs/tiny.py',
      f'--workdir={workdir}', f'--config.training.num_train_steps={steps}',
      '--config.training.checkpoint_every_steps=2',
      '--config.training.log_every_steps=1', *extra,
  ]


def _env(devices):
  env = dict(os.environ)
  # The suite's XLA flags (tests/conftest.py) with this device count.
  others = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                  env.get('XLA_FLAGS', ''))
  env['XLA_FLAGS'] = (
      f'--xla_force_host_platform_device_count={devices} {others}'.strip())
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _losses(stderr):
  return [float(m) for m in re.findall(r'step \d+/\d+\s+loss ([0-9.]+)',
                                        stderr)]


def test_two_processes_then_resume_on_one(tmp_path):
  """2 processes x 2 devices train 2 steps and save; 1 process x 4 devices
  restores and continues to 4; the losses and parameters match a
  single-process 4-device run."""
  multi, single = str(tmp_path / 'multi'), str(tmp_path / 'single')
  port = _free_port()
  procs = [
      subprocess.Popen(
          _main_cmd(multi, 2, f'--coordinator_address=127.0.0.1:{port}',
                    '--num_processes=2', f'--process_id={i}'),
          cwd=ROOT, env=_env(2), stdout=subprocess.PIPE,
          stderr=subprocess.PIPE, text=True)
      for i in range(2)
  ]
  # The reference run needs nothing from the others: it runs beside them
  # (its 4-device programs differ from their 2-device ones), and the resumed
  # run after it finds its compiled train step in the shared cache.
  ref = subprocess.Popen(_main_cmd(single, 4), cwd=ROOT, env=_env(4),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  _, ref_err = ref.communicate(timeout=600)
  assert ref.returncode == 0, ref_err[-3000:]
  assert sorted(os.listdir(os.path.join(multi, 'checkpoints'))) == ['2']
  # Only process 0 writes TensorBoard events (one file, not one per process)
  # and the config; process 1 logs the same metrics through absl only.
  events = [f for f in os.listdir(multi) if 'tfevents' in f]
  assert len(events) == 1, os.listdir(multi)
  assert os.path.exists(os.path.join(multi, 'config.json'))
  assert _losses(outs[1][1]) == _losses(outs[0][1])
  resumed = subprocess.run(_main_cmd(multi, 4), cwd=ROOT, env=_env(4),
                           capture_output=True, text=True, timeout=600)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'Resuming from checkpoint at step 2' in resumed.stderr
  got = _losses(outs[0][1]) + _losses(resumed.stderr)
  want = _losses(ref_err)
  assert len(want) == 4 and len(got) == 4, (got, want)
  np.testing.assert_allclose(got, want, rtol=1e-3)  # logged with 4 decimals
  ckpt = ocp.StandardCheckpointer()
  a = ckpt.restore(os.path.join(multi, 'checkpoints', '4', 'state'))
  b = ckpt.restore(os.path.join(single, 'checkpoints', '4', 'state'))
  _assert_trees_close(a, b)
