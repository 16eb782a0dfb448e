"""Evaluation program (--mode=eval): sample, then score FVD under a protocol.

`sample_and_evaluate(config, workdir)` samples `config.eval.num_videos`
videos the way --mode=sample does (sample.py), scores them against clips of
the config's dataset with FVD under the preset `config.eval.protocol`
(evaluation/, the metric), and writes
`workdir/eval/fvd_<protocol>_<task>_step_<N>.json` atomically.

`plan(config, task, model)` resolves config.eval against the protocol
preset and checks, before anything is sampled or compiled, that the
task's videos can be scored (frames = the protocol's, at least I3D's 9, the
protocol's resolution).
`score` runs `fvd.evaluate_videos` and adds what the preset does not say:
where the run deviates from the protocol (counts, task, split).
"""

import dataclasses
import datetime
import hashlib
import json
import os
import subprocess
import time
from typing import Any, Optional

from absl import logging
import jax
import ml_collections
import numpy as np

from vdm_jax import denoiser
from vdm_jax import fileio
from vdm_jax import sample
from vdm_jax import sample_inputs
from vdm_jax import sharding
from vdm_jax import tasks
from vdm_jax import video_io
from vdm_jax.evaluation import fvd
from vdm_jax.evaluation import i3d
from vdm_jax.evaluation import protocols


@dataclasses.dataclass(frozen=True)
class Plan:
  """A resolved FVD run.

  Attributes:
    protocol: the preset.
    num_generated: videos to sample.
    num_real: real clips.
    split: the real clips' split.
    num_frames: frames of the scored videos (the task's output).
    deviations: differences from the protocol known before sampling.
  """

  protocol: protocols.Protocol
  num_generated: int
  num_real: int
  split: str
  num_frames: int
  deviations: tuple[str, ...]


def plan(config: ml_collections.ConfigDict, task: tasks.Task,
         model: tasks.ModelShape) -> Plan:
  """Checks config.eval against its protocol; raises ValueError early.

  Args:
    config: the full config.
    task: the task of config.sample.
    model: the model's block shape.

  Returns:
    The Plan.
  """
  e, s, d = config.eval, config.sample, config.data
  if e.protocol not in protocols.PROTOCOLS:
    raise ValueError(f'Unknown eval.protocol {e.protocol!r}; choose one of'
                     f' {list(protocols.PROTOCOLS)}.')
  proto = protocols.PROTOCOLS[e.protocol]
  task.validate_eval(bool(s.input))
  num_frames = task.num_output_frames(model, task.num_input_frames(model))
  if num_frames < i3d.MIN_FRAMES:
    raise ValueError(
        f'FVD needs videos of at least {i3d.MIN_FRAMES} frames (I3D), but'
        f' task {s.task!r} of this {d.num_frames}-frame model makes'
        f' {num_frames}; use a model with more frames or a task that makes'
        ' longer videos (extend, interpolate).')
  if num_frames != proto.num_frames:
    raise ValueError(
        f'Protocol {proto.name} scores {proto.num_frames}-frame videos; task'
        f' {s.task!r} makes {num_frames} frames.')
  if proto.resolution and proto.resolution != d.image_size:
    raise ValueError(
        f'Protocol {proto.name} scores at {proto.resolution}x'
        f'{proto.resolution}; the model makes {d.image_size}x'
        f'{d.image_size}.')
  num_generated = e.num_videos or proto.num_generated
  num_real = e.num_real or proto.num_real
  if min(num_generated, num_real) < 2 * proto.folds:
    raise ValueError(
        f'eval.num_videos={num_generated} and eval.num_real={num_real} must'
        f' be at least 2 per fold ({proto.folds} folds).')
  split = e.split or d.split
  deviations = []
  k = task.eval_conditioning_frames()
  if k is None:
    deviations.append(f'task {s.task!r} is not the protocol\'s')
  elif k != proto.conditioning_frames:
    deviations.append(f'{k} conditioning frames (task {s.task!r}) !='
                      f' {proto.conditioning_frames}')
  if split.split('[')[0] not in proto.real_split.split(' (')[0]:
    deviations.append(f'real split {split!r} != {proto.real_split!r}')
  return Plan(proto, num_generated, num_real, split, num_frames,
              tuple(deviations))


def real_clips(config: ml_collections.ConfigDict, run: Plan,
               inputs: sample_inputs.TaskInputs) -> np.ndarray:
  """uint8 [num_real, T, H, W, C] real clips of the run.

  The ground truth of dataset inputs when there is one, else clips of
  config.data (split run.split, seed eval.seed).
  """
  if inputs.reference is not None:
    return inputs.reference
  clips, _ = sample_inputs.dataset_clips(
      config, run.num_real, run.num_frames, seed=config.eval.seed,
      split=run.split, random_start=run.protocol.clip_start == 'random')
  return clips


def fingerprint(config: ml_collections.ConfigDict, run: Plan) -> str:
  """Identifies the real clips (dataset, split, seed, count, frames)."""
  d = config.data
  key = dict(name=d.name, tfds_name=d.tfds_name, path=d.path, view=d.view,
             split=run.split, seed=config.seed, eval_seed=config.eval.seed,
             num_real=run.num_real, num_frames=run.num_frames,
             frame_stride=d.frame_stride, image_size=d.image_size,
             clip_start=run.protocol.clip_start,
             num_examples=d.num_examples)
  return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _rgb(videos: np.ndarray) -> np.ndarray:
  return np.repeat(videos, 3, axis=-1) if videos.shape[-1] == 1 else videos


def score(config: ml_collections.ConfigDict, run: Plan, videos: np.ndarray,
          real: np.ndarray, mesh: Optional[Any] = None) -> dict[str, Any]:
  """FVD/KVD of generated vs real uint8 videos, with the run's settings.

  Returns:
    fvd.evaluate_videos' result plus 'protocol_settings', 'task',
    'sampler', 'num_steps', 'dataset', 'split'; 'deviations' and
    'protocol_compliant' also cover the task and split.
  """
  e, s = config.eval, config.sample
  n_dev = jax.device_count()
  if mesh is None and jax.process_count() == 1 and min(
      len(videos), len(real)) < n_dev:
    # A smoke run with fewer videos than devices: fewer devices rather
    # than I3D passes over padding.
    k = max(d for d in range(1, n_dev + 1)
            if n_dev % d == 0 and d <= min(len(videos), len(real)))
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:k]), ('data',))
  result = fvd.evaluate_videos(
      _rgb(videos), _rgb(real), run.protocol.name,
      cache_dir=e.cache_dir or None,
      fingerprint=fingerprint(config, run) if e.cache_dir else None,
      batch_size=e.batch_size, mesh=mesh)
  result['deviations'] = list(result['deviations']) + list(run.deviations)
  result['protocol_compliant'] = not result['deviations']
  sample_settings = {k: s[k] for k in (
      'task', 'sampler', 'num_steps', 'gamma', 'eta', 'delta',
      'guidance_weight', 'recon_weight', 'num_cond_frames')}
  result.update(
      protocol_settings=dataclasses.asdict(run.protocol),
      sample=sample_settings,
      num_frames=run.num_frames,
      dataset=config.data.name,
      split=run.split,
      eval_seed=config.eval.seed,
  )
  return result


def _git_commit() -> Optional[str]:
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    commit = subprocess.run(
        ['git', 'rev-parse', 'HEAD'], cwd=root, capture_output=True,
        text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(
        ['git', 'status', '--porcelain', '--untracked-files=no'], cwd=root,
        capture_output=True, text=True, timeout=10, check=True).stdout
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ('-dirty' if dirty.strip() else '')


def sample_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        config_path: Optional[str] = None) -> dict:
  """Samples with config.sample and scores FVD under config.eval.protocol.

  Real clips come from config.data (split eval.split); video tasks are
  conditioned on them (generated video i on real clip i mod num_real), so
  samples and ground truth share their given frames (VDM's Kinetics
  protocol).

  Args:
    config: the full config.
    workdir: the run's directory.
    config_path: the config file, recorded in the result.

  Returns:
    The result written to workdir/eval/fvd_<protocol>_<task>_step_<N>.json.
  """
  task = tasks.from_config(config.sample)
  run = plan(config, task, tasks.ModelShape.from_config(config))
  request = sample.prepare(
      config, run.num_real, seed=config.eval.seed, split=run.split,
      random_start=run.protocol.clip_start == 'random')
  real = real_clips(config, run, request.inputs)
  idx = np.arange(run.num_generated) % run.num_real
  inputs = request.inputs
  request = dataclasses.replace(
      request,
      inputs=sample_inputs.TaskInputs(
          None if inputs.video is None else inputs.video[idx]),
      labels=task.labels(request.setup.model.num_classes,
                         None if inputs.labels is None else inputs.labels[idx],
                         run.num_generated))
  mesh = sharding.make_mesh(config.mesh)
  model, params, step = sample.restore_ema_params(config, workdir, mesh)
  start = time.time()
  rng = jax.random.fold_in(jax.random.key(config.seed), 5)
  videos = sample.sample_videos(
      request, denoiser.make_denoise_fn(model, params, mesh), rng, mesh,
      run.num_generated)
  result = score(config, run, videos, real)
  result.update(
      checkpoint_step=int(step), workdir=workdir, config_path=config_path,
      git_commit=_git_commit(), sampling_seconds=round(time.time() - start, 1),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      devices=f'{jax.device_count()} x {jax.devices()[0].device_kind}')
  path = os.path.join(
      workdir, 'eval', f'fvd_{run.protocol.name}_{task.name}_step_{step}.json')
  if jax.process_index() == 0:
    fileio.write_json(path, result)
    if config.eval.save_samples:
      video_io.save_npz(path[:-len('.json')] + '.npz', videos)
    logging.info('FVD %.2f (%s, %d videos) written to %s', result['fvd'],
                 run.protocol.name, len(videos), path)
  result['path'] = path
  return result
