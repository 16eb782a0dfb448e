"""Tune-A-Video on synthetic clips, where the truth is known.

  PYTHONPATH=. python experiments/tune_a_video_edits.py --base=runs/t2i \
      [--num_sources=4] [--tune_steps=500] [--lr=3e-5] [--num_steps=50] \
      [--cfg=11.5] [--out=runs/tav_edits]

The base is a text-to-image model of configs/t2i_quickstart.py (train it
first). Each source is a synthetic clip (8 frames, one shape moving
straight) with its caption; each gets two edit prompts, its colour changed
and its shape changed, direction kept. Four methods, all sampled with DDIM
(--num_steps, eta 0) and classifier-free guidance at each w of --cfg
(this library's w; Tune-A-Video's 12.5 is w = 11.5), the tuned methods at
each learning rate of --lr:
  tune_a_video   inflate, tune the attention queries and temporal
                 attentions on the clip (configs/tune_a_video.py), DDIM
                 inversion with the empty prompt, sample each edit from it;
  image_per_frame  the base model on each frame, from its own per-frame
                 inversion (no tuning, no temporal layers);
  no_inversion   the Tune-A-Video model from fresh noise;
  full_finetune  every parameter tuned (tune.trainable='all'), inverted.
vdm_jax/data/detect.py reads the edited frames: edit success = a valid
object with the asked colour (colour edits) or shape (shape edits);
motion error = mean distance (pixels) between the source's and the edit's
per-frame centroids; reconstruction = mean |x - x_source| (in [-1, 1]
units) of the empty-prompt regeneration from the inverted latent. Also the
tune step's time (steps/s after compilation, same run, side by side) and
its compiled memory (XLA's temp + argument bytes) for query tuning vs full
fine-tuning. Writes a PNG per source (rows: source, reconstruction, edits;
one block per method) and prints a markdown table and one JSON line.
"""

import argparse
import datetime
import functools
import json
import os
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
from configs import t2i_quickstart
from configs import tune_a_video
from vdm_jax import checkpoint
from vdm_jax import denoiser
from vdm_jax import sample
from vdm_jax import tasks
from vdm_jax import training
from vdm_jax import video_io
from vdm_jax.adapt import inflate
from vdm_jax.adapt import tune as tune_lib
from vdm_jax.adapt import tuned as tuned_lib
from vdm_jax.data import detect
from vdm_jax.data import synthetic

METHODS = ('tune_a_video', 'image_per_frame', 'no_inversion', 'full_finetune')


def sources(num: int, num_frames: int, size: int):
  """num synthetic clips whose object the detector reads correctly."""
  data = synthetic.SyntheticVideos(num_frames, size, motion='straight',
                                   seed=1)
  out = []
  for i in range(200):
    clip = data.render_batch([i])['video']
    a = data.attributes([i])
    kind, colour, direction = (int(a['kind'][0]), int(a['colour'][0, 0]),
                               int(a['direction'][0, 0]))
    found = detect.detect(clip)
    if not (found['valid'][0] and found['kind'][0] == kind
            and found['colour'][0] == colour):
      continue
    if any(s['kind'] == kind and s['colour'] == colour for s in out):
      continue
    out.append(dict(clip=clip[0], kind=kind, colour=colour,
                    direction=direction))
    if len(out) == num:
      return out
  raise RuntimeError('Too few clean synthetic sources.')


def edits(src):
  """(prompt, attribute, target) of the colour and the shape edit."""
  c2 = (src['colour'] + 3) % len(synthetic.PALETTE)
  k2 = (src['kind'] + 1) % 3
  d = src['direction']
  return [(synthetic.caption(src['kind'], c2, d, 0), 'colour', c2),
          (synthetic.caption(k2, src['colour'], d, 0), 'kind', k2)]


def run_edit(config, model, params, clip, prompts, rng, invert=True):
  """uint8 [1 + E, T, H, W, C]: reconstruction, then each edit."""
  setup = tasks.Setup.from_config(config)
  emb = denoiser.text_encoder(config).encode([''] + prompts)
  text = {'text': emb.tokens, 'text_mask': emb.mask}
  fn = denoiser.make_denoise_fn(model, params)
  n = 1 + len(prompts)
  video = np.repeat(clip[None], n, 0).astype(np.float32) / 127.5 - 1.0
  task = (tasks.Edit(edit_strength=config.sample.edit_strength) if invert
          else tasks.Unconditional())
  x = tasks.run(task, fn, rng, setup, video=video if invert else None,
                num_videos=n, text=text)
  return video_io.to_uint8(np.asarray(x))


def measure(videos, src, targets):
  """Edit success, motion error (px) and reconstruction error."""
  found = detect.detect(videos[1:])
  ref = detect.detect(src['clip'][None])['centroid'][0]
  ok = []
  for j, (attribute, target) in enumerate(targets):
    ok.append(bool(found['valid'][j] and found[attribute][j] == target))
  motion = np.linalg.norm(found['centroid'] - ref[None], axis=-1).mean(1)
  recon = np.abs(videos[0].astype(np.float32) - src['clip']).mean() / 127.5
  return ok, motion.tolist(), float(recon)


def tune_config(base, video, caption, trainable, steps, lr):
  config = tune_a_video.get_config()
  config.tune.base_workdir = base
  config.tune.video = video
  config.tune.caption = caption
  config.tune.trainable = trainable
  config.training.num_train_steps = steps
  config.training.checkpoint_every_steps = steps
  config.training.log_every_steps = max(steps // 5, 1)
  config.optimizer.learning_rate = lr
  return config


def step_cost(config, clip, steps=10):
  """(steps/s, compiled bytes) of the tune step of config.tune.trainable."""
  record = tuned_lib.make_record(
      config, checkpoint.latest_step(config.tune.base_workdir))
  mesh = tune_lib.batch_mesh(config)
  model, inflated = tuned_lib.inflated_params(config, record, mesh,
                                              jax.random.key(0))
  tuned, frozen = inflate.split(inflated, config.tune.trainable)
  tx, lr_fn = training.create_optimizer(config)
  state = training.TrainState.create(tuned, tx)
  emb = denoiser.text_encoder(config).encode([config.tune.caption])
  batch = {'video': clip[None], 'text': emb.tokens, 'text_mask': emb.mask}
  step = jax.jit(functools.partial(tune_lib.tune_step, model=model, tx=tx,
                                   lr_fn=lr_fn, config=config))
  compiled = step.lower(state, frozen, batch, jax.random.key(1)).compile()
  mem = compiled.memory_analysis()
  nbytes = int(mem.temp_size_in_bytes + mem.argument_size_in_bytes
               + mem.output_size_in_bytes) if mem is not None else -1
  state, m = compiled(state, frozen, batch, jax.random.key(1))
  jax.block_until_ready(m)
  t0 = time.time()
  for _ in range(steps):
    state, m = compiled(state, frozen, batch, jax.random.key(1))
  jax.block_until_ready(m)
  return steps / (time.time() - t0), nbytes, denoiser.count_params(tuned)


def main():
  p = argparse.ArgumentParser()
  p.add_argument('--base', default='runs/t2i')
  p.add_argument('--num_sources', type=int, default=4)
  p.add_argument('--tune_steps', type=int, default=500)
  p.add_argument('--lr', default='3e-5', help='comma-separated')
  p.add_argument('--num_steps', type=int, default=50)
  p.add_argument('--cfg', default='11.5', help='comma-separated')
  p.add_argument('--strength', default='1',
                 help='comma-separated sample.edit_strength values')
  p.add_argument('--methods', default=','.join(METHODS))
  p.add_argument('--out', default='runs/tav_edits')
  args = p.parse_args()
  lrs = [float(v) for v in args.lr.split(',')]
  cfgs = [float(v) for v in args.cfg.split(',')]
  strengths = [float(v) for v in args.strength.split(',')]
  methods = args.methods.split(',')
  os.makedirs(args.out, exist_ok=True)
  base_cfg = t2i_quickstart.get_config()
  frames = tune_a_video.get_config().data.num_frames
  base_cfg.data.num_frames = frames  # Frames as a batch of images.
  base_cfg.sample.sampler = 'ddim'
  base_cfg.sample.eta = 0.0
  base_cfg.sample.num_steps = args.num_steps
  image_model, image_params, base_step = sample.restore_ema_params(
      base_cfg, args.base)
  srcs = sources(args.num_sources, frames, base_cfg.data.image_size)
  # Rows: (method, lr or None, cfg, strength).
  keys = [('image_per_frame', None, w, e) for w in cfgs for e in strengths
          if 'image_per_frame' in methods] + [
              (m, lr, w, e) for m in METHODS
              if m != 'image_per_frame' and m in methods
              for lr in lrs for w in cfgs
              for e in (strengths if m != 'no_inversion' else [1.0])]
  results = {k: {'ok': [], 'motion': [], 'recon': []} for k in keys}
  tune_time = {}
  t_start = time.time()
  for s, src in enumerate(srcs):
    caption = synthetic.caption(src['kind'], src['colour'],
                                src['direction'], 0)
    video = os.path.join(args.out, f'source_{s}.gif')
    video_io.write_gif(video, src['clip'])
    prompt_targets = edits(src)
    prompts = [e[0] for e in prompt_targets]
    targets = [(e[1], e[2]) for e in prompt_targets]
    rng = jax.random.key(s)
    rows = {}
    models = {}
    for method, lr, w, strength in keys:
      if method == 'image_per_frame':
        config, model, params = base_cfg, image_model, image_params
      else:
        trainable = 'all' if method == 'full_finetune' else (
            'attention_queries')
        workdir = os.path.join(args.out, f'{trainable}_lr{lr:g}_{s}')
        config = tune_config(args.base, video, caption, trainable,
                             args.tune_steps, lr)
        config.sample.num_steps = args.num_steps
        if workdir not in models:
          t0 = time.time()
          tune_lib.tune(config, workdir)
          tune_time.setdefault(trainable, []).append(time.time() - t0)
          models[workdir] = sample.restore_ema_params(config, workdir)[:2]
        model, params = models[workdir]
      config = config.copy_and_resolve_references()
      config.sample.guidance_weight = w
      config.sample.edit_strength = strength
      out = run_edit(config, model, params, src['clip'], prompts, rng,
                     invert=method != 'no_inversion')
      ok, motion, recon = measure(out, src, targets)
      r = results[(method, lr, w, strength)]
      r['ok'] += ok
      r['motion'] += motion
      if method != 'no_inversion':
        r['recon'].append(recon)
      rows[(method, lr, w, strength)] = out
      print(f'source {s} {method} lr {lr} w {w} strength {strength}: edits'
            f' {ok} motion'
            f' {np.round(motion, 2)} recon {recon:.3f}', flush=True)
    shown = [k for k in keys if k[1] in (None, lrs[0])]
    grid = np.concatenate([src['clip'][None]] + [rows[k] for k in shown])
    labels = ['source: ' + caption] + [
        f'{k[0]} w={k[2]:g} s={k[3]:g}: ' + (q or 'reconstruction')
        for k in shown for q in [''] + prompts]
    video_io.write_png_grid(os.path.join(args.out, f'edits_{s}.png'), grid,
                            captions=labels)
  costs = {}
  for trainable in ('attention_queries', 'all'):
    config = tune_config(args.base, os.path.join(args.out, 'source_0.gif'),
                         'x', trainable, 1, lrs[0])
    rate, nbytes, count = step_cost(config, srcs[0]['clip'])
    costs[trainable] = {'steps_per_s': rate, 'compiled_mib': nbytes / 2**20,
                        'tuned_params': count}
  print(f'\nBase {args.base} step {base_step}; {len(srcs)} sources x 2 edits;'
        f' tune {args.tune_steps} steps; DDIM {args.num_steps} steps\n')
  print('| method | tune lr | CFG w | edit strength | edit success |'
        ' motion error (px) | reconstruction |')
  print('|---|---|---|---|---|---|---|')
  summary = []
  for k in keys:
    r = results[k]
    row = {'method': k[0], 'lr': k[1], 'cfg': k[2], 'strength': k[3],
           'edit_success': float(np.mean(r['ok'])),
           'motion_px': float(np.mean(r['motion'])),
           'recon': float(np.mean(r['recon'])) if r['recon'] else None}
    summary.append(row)
    rec = f'{row["recon"]:.3f}' if r['recon'] else '-'
    lr = f'{k[1]:g}' if k[1] is not None else '-'
    print(f'| {k[0]} | {lr} | {k[2]:g} | {k[3]:g} |'
          f' {row["edit_success"]:.2f} |'
          f' {row["motion_px"]:.2f} | {rec} |')
  print('\n| tuned | parameters | steps/s | compiled MiB |')
  print('|---|---|---|---|')
  for k, c in costs.items():
    print(f'| {k} | {c["tuned_params"]} | {c["steps_per_s"]:.2f} |'
          f' {c["compiled_mib"]:.1f} |')
  print(json.dumps({
      'experiment': 'tune_a_video_edits', 'args': vars(args),
      'summary': summary, 'costs': costs,
      'tune_seconds': {k: float(np.mean(v)) for k, v in tune_time.items()},
      'wall_s': time.time() - t_start, 'host': platform.node(),
      'cpus': os.cpu_count(), 'jax': jax.__version__,
      'date': datetime.date.today().isoformat()}))


if __name__ == '__main__':
  main()
