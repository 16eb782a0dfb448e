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

Both sets stream: `RealClips` reads the real clips from the data pipeline a
chunk at a time, `generated_batches` samples one batch at a time, and each
batch is dropped once I3D has its features. Only the features ([N, 400]
float32 per set) grow with the clip count, so a 50,000-clip protocol runs in
bounded memory (docs/benchmarks.md, "Evaluation memory").
"""

import dataclasses
import datetime
import hashlib
import json
import os
import subprocess
import time
from typing import Any, Iterator, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from vdm_jax import denoiser
from vdm_jax import fileio
from vdm_jax import sample
from vdm_jax import sample_inputs
from vdm_jax import sharding
from vdm_jax import tasks
from vdm_jax import video_io
from vdm_jax.data import pipeline
from vdm_jax.data import sources
from vdm_jax.evaluation import fvd
from vdm_jax.evaluation import i3d
from vdm_jax.evaluation import protocols

# Clips per pipeline read: `sample_inputs.dataset_clips`' chunk, so clip j
# is the same clip in both.
_CHUNK = 64
# eval.save_samples keeps the first this many generated videos, not all.
MAX_SAVED_SAMPLES = 64


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
  """uint8 [num_real, T, H, W, C]: all real clips of the run in memory.

  For notebooks and small sets; --mode=eval streams them (`RealClips`).
  The ground truth of dataset inputs when there is one, else clips of
  config.data (split run.split, seed eval.seed).
  """
  if inputs.reference is not None:
    return inputs.reference
  clips, _ = sample_inputs.dataset_clips(
      config, run.num_real, run.num_frames, seed=config.eval.seed,
      split=run.split, random_start=run.protocol.clip_start == 'random')
  return clips


class RealClips:
  """The run's real clips, read from config.data one chunk at a time.

  Clip j is row j of `sample_inputs.dataset_clips(config, run.num_real,
  run.num_frames, seed=eval.seed, ...)` (the same pipeline, seed, split and
  clip starts), which is also the ground truth the video tasks condition
  on; at most one chunk of `_CHUNK` clips is held.
  """

  def __init__(self, config: ml_collections.ConfigDict, run: Plan,
               captions: bool = False):
    """Builds the pipeline (reads nothing yet).

    Args:
      config: the full config (data, seed, eval.seed).
      run: the plan (num_real, num_frames, split, protocol's clip start).
      captions: also read each clip's caption (text models).
    """
    data = ml_collections.ConfigDict(config.data.to_dict())
    data.num_frames = run.num_frames
    data.image_frames = 0
    if run.split:
      data.split = run.split
    self.num = run.num_real
    self._captions = captions
    self._chunk = min(run.num_real, _CHUNK)
    self._pipe = pipeline.Pipeline(
        sources.get_source(data, seed=config.seed),
        global_batch_size=self._chunk, num_frames=run.num_frames,
        seed=config.eval.seed, frame_stride=data.frame_stride,
        random_start=run.protocol.clip_start == 'random', random_flip=False,
        random_crop=False)
    self._cached = (-1, None)

  def _read(self, step: int) -> dict[str, np.ndarray]:
    if self._cached[0] != step:
      self._cached = (-1, None)  # Drop the old chunk before reading.
      self._cached = (step, self._pipe.batch_for_step(
          step, captions=self._captions))
    return self._cached[1]

  def get(self, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Clips idx (int [b], each in [0, num)).

    Returns:
      {'video': uint8 [b, T, H, W, C], 'label': int32 [b]} and 'caption'
      (str [b]) with captions.
    """
    out = {}
    steps = idx // self._chunk
    for step in dict.fromkeys(steps.tolist()):  # In order of first use.
      here = steps == step
      batch = self._read(step)
      for key in ('video', 'label') + (('caption',) if self._captions
                                       else ()):
        value = batch[key][idx[here] % self._chunk]
        if key not in out:
          dtype = object if value.dtype.kind in 'US' else value.dtype
          out[key] = np.empty((len(idx),) + value.shape[1:], dtype)
        out[key][here] = value
    return out

  def batches(self, size: int) -> Iterator[np.ndarray]:
    """Yields the clips in order, uint8 [<= size, T, H, W, C] at a time."""
    for start in range(0, self.num, size):
      yield self.get(np.arange(start, min(start + size, self.num)))['video']


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


def score(config: ml_collections.ConfigDict, run: Plan, videos: Any,
          real: Any, mesh: Optional[Any] = None) -> dict[str, Any]:
  """FVD/KVD of generated vs real uint8 videos, with the run's settings.

  Args:
    config: the full config.
    run: the plan.
    videos: generated [N, T, H, W, C] uint8, or an iterator of batches of
      them (run.num_generated videos in all).
    real: real clips, the same way (run.num_real).
    mesh: the I3D mesh (default: all devices, fewer for smoke runs).

  Returns:
    fvd.evaluate_videos' result plus 'protocol_settings', 'task',
    'sampler', 'num_steps', 'dataset', 'split'; 'deviations' and
    'protocol_compliant' also cover the task and split.
  """
  e, s = config.eval, config.sample
  n_dev = jax.device_count()
  num = min(run.num_generated, run.num_real)
  if mesh is None and jax.process_count() == 1 and num < n_dev:
    # A smoke run with fewer videos than devices: fewer devices rather
    # than I3D passes over padding.
    k = max(d for d in range(1, n_dev + 1) if n_dev % d == 0 and d <= num)
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:k]), ('data',))
  result = fvd.evaluate_videos(
      _rgb_stream(videos), _rgb_stream(real), run.protocol.name,
      cache_dir=e.cache_dir or None,
      fingerprint=fingerprint(config, run) if e.cache_dir else None,
      batch_size=e.batch_size, mesh=mesh, num_generated=run.num_generated,
      num_real=run.num_real)
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


def _rgb_stream(videos: Any) -> Any:
  """`_rgb` of an array, or of each batch of an iterator (lazily)."""
  if isinstance(videos, np.ndarray):
    return _rgb(videos)
  return (_rgb(np.asarray(v)) for v in videos)


class _Conditioning:
  """Per-batch inputs of the generated videos (what sample.prepare builds
  for all N at once): video i is conditioned on real clip i mod num_real,
  or on file video i mod (videos in sample.input), with its label and
  prompt."""

  def __init__(self, config: ml_collections.ConfigDict, run: Plan,
               request: sample.Request, real: RealClips,
               mesh: jax.sharding.Mesh):
    s, task, model = config.sample, request.task, request.setup.model
    self._run, self._request, self._real = run, request, real
    self._mesh = mesh
    self._file = None
    if task.needs_video and s.input:
      self._file = task.input_from_file(model, sample_inputs.read_input(
          s.input))
    self._from_dataset = task.needs_video and not s.input
    self._labels = None
    if not self._from_dataset:
      self._labels = task.labels(model.num_classes, None, run.num_generated)
    self._prompts = None
    self._captions = (denoiser.has_text(config) and self._from_dataset
                      and not s.prompt and not s.prompts_file)
    if denoiser.has_text(config) and not self._captions:
      self._prompts = sample.prompts_for(
          config, sample_inputs.TaskInputs(None), run.num_generated)
    # Built once: a 'files' encoder reads its whole embeddings file.
    self._encoder = denoiser.text_encoder(config)

  def __call__(self, idx: np.ndarray) -> dict[str, Any]:
    """The tasks.run keyword arguments of generated videos idx (int [b])."""
    request, mesh, kwargs = self._request, self._mesh, {}
    model, task = request.setup.model, request.task
    video, labels, prompts = None, None, None
    if self._from_dataset:
      clips = self._real.get(idx % self._run.num_real)
      video = task.input_from_clips(model, clips['video'])
      labels = task.labels(model.num_classes, clips['label'], len(idx))
      if self._captions:
        prompts = [str(c) for c in clips['caption']]
    elif self._file is not None:
      video = self._file[idx % len(self._file)]
    if self._labels is not None:
      labels = self._labels[idx]
    if self._prompts is not None:
      prompts = [self._prompts[i] for i in idx]
    if video is not None:
      kwargs['video'] = sharding.full_to_global(
          video.astype(np.float32) / 127.5 - 1.0, mesh)
    if labels is not None:
      kwargs['labels'] = sharding.full_to_global(labels, mesh)
    if prompts is not None:
      text = self._encoder.encode(prompts)
      kwargs['text'] = {
          'text': sharding.full_to_global(text.tokens, mesh),
          'text_mask': sharding.full_to_global(text.mask, mesh)}
    return kwargs


def generated_batches(
    request: sample.Request, conditioning: Any,
    denoise_fn: Any, rng: jax.Array, mesh: jax.sharding.Mesh,
    num_videos: int, keep: Optional[list[np.ndarray]] = None,
    stats: Optional[dict[str, float]] = None,
    pair_fn: Any = None,
) -> Iterator[np.ndarray]:
  """Samples num_videos videos a batch at a time, as sample.sample_videos.

  The same padded batches and keys (batch i uses fold_in(rng, i)) as
  `sample.sample_videos`, so the videos are the same; each batch is yielded
  and not kept.

  Args:
    request: from `sample.prepare` (task, setup, batch size).
    conditioning: idx (int [b]) -> tasks.run keyword arguments.
    denoise_fn: from `denoiser.make_denoise_fn`.
    rng: PRNG key.
    mesh: the device mesh.
    num_videos: N.
    keep: if given, the first MAX_SAVED_SAMPLES videos are appended to it
      (batch by batch) for eval.save_samples.
    stats: if given, 'sampling_seconds' (sampling alone, without the
      consumer's I3D time) is updated in it after each batch.
    pair_fn: task 'inbetween': from `sample.restore_sampler`.

  Yields:
    uint8 [<= batch, T_out, H, W, C] on every process.
  """
  n_dev = mesh.size
  batch = -(-min(request.batch_size, num_videos) // n_dev) * n_dev
  num_batches = -(-num_videos // batch)
  spec = request.setup.spec
  start_time, kept, sampling = time.time(), 0, 0.0
  for i in range(num_batches):
    t0 = time.time()
    idx = np.minimum(np.arange(i * batch, (i + 1) * batch), num_videos - 1)
    x = tasks.run(request.task, denoise_fn, jax.random.fold_in(rng, i),
                  request.setup, num_videos=batch, pair_fn=pair_fn,
                  **conditioning(idx))
    x = multihost_utils.process_allgather(x, tiled=True)
    n = min(batch, num_videos - i * batch)
    videos = video_io.to_uint8(np.asarray(x)[:n])
    del x
    sampling += time.time() - t0
    if stats is not None:
      stats['sampling_seconds'] = round(sampling, 1)
    if keep is not None and kept < MAX_SAVED_SAMPLES:
      keep.append(videos[:MAX_SAVED_SAMPLES - kept].copy())
      kept += len(keep[-1])
    yield videos
    done, elapsed = min((i + 1) * batch, num_videos), time.time() - start_time
    # Elapsed time includes the I3D features of the batches yielded so far.
    logging.info(
        'Sampled and scored %d/%d videos (%s, %s, %d steps): %.1f s,'
        ' %.2f videos/s, ETA %.0f s.', done, num_videos, request.task.name,
        spec.sampler, spec.num_steps, elapsed, done / max(elapsed, 1e-9),
        elapsed / (i + 1) * (num_batches - i - 1))


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
  protocol). Both sets stream through I3D a batch at a time; only their
  features are kept.

  Args:
    config: the full config.
    workdir: the run's directory.
    config_path: the config file, recorded in the result.

  Returns:
    The result written to workdir/eval/fvd_<protocol>_<task>_step_<N>.json.
  """
  if denoiser.has_latent(config):
    raise ValueError('--mode=eval does not decode latents yet: sample a latent'
                     ' model (latent.path) with --mode=sample and score the '
                     'videos with experiments/fvd_between.py.')
  task = tasks.from_config(config.sample)
  run = plan(config, task, tasks.ModelShape.from_config(config))
  # Checks the request (task, inputs, labels, prompts) on one video.
  request = sample.prepare(
      config, 1, seed=config.eval.seed, split=run.split,
      random_start=run.protocol.clip_start == 'random')
  real = RealClips(config, run, captions=denoiser.has_text(config))
  mesh = sharding.make_mesh(config.mesh)
  denoise_fn, pair_fn, step = sample.restore_sampler(config, workdir, mesh)
  start = time.time()
  rng = jax.random.fold_in(jax.random.key(config.seed), 5)
  saved = [] if config.eval.save_samples else None
  stats = {'sampling_seconds': 0.0}
  videos = generated_batches(
      request, _Conditioning(config, run, request, real, mesh),
      denoise_fn, rng, mesh, run.num_generated, keep=saved, stats=stats,
      pair_fn=pair_fn)
  result = score(config, run, videos,
                 real.batches(max(config.eval.batch_size, 1)))
  result.update(
      checkpoint_step=int(step), workdir=workdir, config_path=config_path,
      git_commit=_git_commit(), sampling_seconds=stats['sampling_seconds'],
      eval_seconds=round(time.time() - start, 1),
      date=datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      devices=f'{jax.device_count()} x {jax.devices()[0].device_kind}')
  path = os.path.join(
      workdir, 'eval', f'fvd_{run.protocol.name}_{task.name}_step_{step}.json')
  if jax.process_index() == 0:
    fileio.write_json(path, result)
    if saved:
      video_io.save_npz(path[:-len('.json')] + '.npz', np.concatenate(saved))
    logging.info('FVD %.2f (%s, %d videos) written to %s', result['fvd'],
                 run.protocol.name, result['num_generated'], path)
  result['path'] = path
  return result
