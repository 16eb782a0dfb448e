"""Prompt alignment of a text-to-video model on the synthetic shapes.

  PYTHONPATH=. python experiments/t2v_alignment.py [--workdir=runs/t2v]
      [--config=configs/t2v_quickstart.py] [--per_prompt=8]
      [--num_steps=64] [--cfg=0,1,2,5] [--num_seen=12] [--fvd=1]
      [--real_seed=1] [--out=...]

The truth is known here: every prompt names a shape, a colour and a
direction of synthetic.py's renderer, and vdm_jax/data/detect.py reads the
three back from each sample (1.000 accuracy on the renderer's own clips,
tests/test_detect.py). Prompts use one template, 'a {colour} {shape} moving
{direction}', for
  held-out: the 12 (shape, colour, direction) combinations of 3 x 8 x 4
    that data.caption_holdout=8 keeps out of training (each attribute seen,
    the combination never: composition);
  seen: --num_seen combinations drawn (seed 0) from the other 84.
Each prompt is sampled --per_prompt times at each classifier-free guidance
weight w of --cfg (sample.guidance_weight; 0 = the conditional model, no
guidance), all weights from the same initial noise. The 'null text' row
samples the same number of videos with the empty prompt (the model's
learned null text, i.e. the unconditional model) and scores them against
the same prompts: what a model that ignores the text gets. A sample without
one valid object (detect.py's 'valid') counts as wrong on every attribute;
a second table reads the attributes of every sample regardless.

FVD (--fvd, on by default) compares each row's videos with as many real
clips of the training data (data seed --real_seed) through the I3D of
vdm_jax/evaluation. That I3D needs T >= 9 frames and the quickstart model
makes 8, so both sets are repeated 2x in time, alike (as
experiments/quickstart_quality.py does): compare the rows of one run with
each other (the shape of VDM Table 5: guidance weight against FVD and
alignment), not with published FVDs.

Prints a markdown table and, last, one JSON line.
"""

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=g-import-not-at-top
from vdm_jax import denoiser
from vdm_jax import sample
from vdm_jax import sample_inputs
from vdm_jax import sharding
from vdm_jax.data import detect
from vdm_jax.data import synthetic
from vdm_jax.evaluation import fvd

HOLDOUT = 8  # data.caption_holdout of configs/t2v_quickstart.py.
NUM_KINDS = 3
ATTRIBUTES = ('colour', 'shape', 'direction', 'all')


def model_arguments(parser: argparse.ArgumentParser) -> None:
  """--workdir and --config of the text-to-video model to score."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  parser.add_argument('--workdir', default=os.path.join(root, 'runs', 't2v'))
  parser.add_argument('--config', default=os.path.join(
      root, 'configs', 't2v_quickstart.py'))


def load_config(path: str):
  """get_config() of the config file at path."""
  spec = importlib.util.spec_from_file_location('alignment_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def combinations(num_seen: int, seed: int = 0) -> dict[str, np.ndarray]:
  """The prompts' (kind, colour, direction): held-out and seen ones.

  Returns:
    {'held_out': int [12, 3], 'seen': int [num_seen, 3]} rows of (kind,
    colour, direction), in lexicographic order.
  """
  grid = np.stack(np.meshgrid(np.arange(NUM_KINDS),
                              np.arange(len(synthetic.PALETTE)),
                              np.arange(len(synthetic.DIRECTIONS)),
                              indexing='ij'), -1).reshape(-1, 3)
  held = synthetic.held_out(grid[:, 0], grid[:, 1], grid[:, 2], HOLDOUT)
  seen = grid[~held]
  pick = np.random.default_rng(seed).choice(len(seen), num_seen,
                                            replace=False)
  return {'held_out': grid[held], 'seen': seen[np.sort(pick)]}


def prompt(kind: int, colour: int, direction: int) -> str:
  """'a {colour} {shape} moving {direction}' (synthetic's template 0)."""
  return synthetic.caption(kind, colour, direction, template=0)


def alignment(videos: np.ndarray, combos: np.ndarray
              ) -> dict[str, float]:
  """Mean agreement of detected and requested attributes.

  Args:
    videos: uint8 [N, T, H, W, 3].
    combos: int [N, 3] requested (kind, colour, direction).
  """
  found = detect.detect(videos, NUM_KINDS)
  agree = detect.score(found, combos[:, 0], combos[:, 1], combos[:, 2])
  out = {k: float(v.mean()) for k, v in agree.items()}
  # Ungated: the detector's reading whether or not the object is valid.
  agree = detect.score(dict(found, valid=np.ones(len(videos), bool)),
                       combos[:, 0], combos[:, 1], combos[:, 2])
  out.update({f'{k}_ungated': float(agree[k].mean()) for k in ATTRIBUTES})
  return out


def table(rows: list[dict], suffix: str = '') -> str:
  """Markdown table of alignment rows (held-out | seen, per attribute).

  Args:
    rows: {'name', 'held_out': {...}, 'seen': {...}} alignment rows.
    suffix: '' (invalid samples count as wrong) or '_ungated'.
  """
  head = ('| sampling | valid | held-out: colour | shape | direction |'
          ' all three | seen: colour | shape | direction | all three |')
  lines = [head, '|---|---|---|---|---|---|---|---|---|---|']
  for row in rows:
    h, s = row['held_out'], row['seen']
    cells = [row['name'], f'{row["valid"]:.2f}' if 'valid' in row else '-']
    cells += [f'{h.get(a + suffix, h.get(a)):.3f}' for a in ATTRIBUTES]
    cells += [f'{s.get(a + suffix, s.get(a)):.3f}' for a in ATTRIBUTES]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def doubled_features(videos: np.ndarray) -> np.ndarray:
  """I3D logits of uint8 [N, T, H, W, 3] videos, each frame shown twice."""
  return fvd.extract_features(np.repeat(videos, 2, axis=1),
                              progress=False)['logits_mean']


def frechet(videos: np.ndarray, real_feats: np.ndarray) -> float:
  """FVD of videos against the real clips' doubled_features."""
  return round(fvd.compute_fvd(doubled_features(videos),
                               real_feats)['fvd'], 1)


def fvd_table(rows: list[dict]) -> str:
  """Markdown: each sampling row's FVD beside its 'all three' accuracy."""
  lines = ['| sampling | FVD | held-out: all three | seen: all three |',
           '|---|---|---|---|']
  for row in rows:
    if 'fvd' in row:
      lines.append(f'| {row["name"]} | {row["fvd"]:.1f} |'
                   f' {row["held_out"]["all"]:.3f} |'
                   f' {row["seen"]["all"]:.3f} |')
  return '\n'.join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  model_arguments(parser)
  parser.add_argument('--per_prompt', type=int, default=8)
  parser.add_argument('--num_steps', type=int, default=64)
  parser.add_argument('--cfg', default='0,1,2,5')
  parser.add_argument('--num_seen', type=int, default=12)
  parser.add_argument('--batch_size', type=int, default=96)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--fvd', type=int, default=1,
                      help='1: FVD of every row against real clips')
  parser.add_argument('--real_seed', type=int, default=1)
  parser.add_argument('--out', default='',
                      help='optional .npz for the samples and prompts')
  args = parser.parse_args()
  weights = [float(w) for w in args.cfg.split(',') if w]

  config = load_config(args.config)
  combos = combinations(args.num_seen)
  requested = np.repeat(np.concatenate([combos['held_out'], combos['seen']]),
                        args.per_prompt, axis=0)  # [N, 3]
  is_held = np.repeat(np.arange(len(combos['held_out'])
                                + len(combos['seen']))
                      < len(combos['held_out']), args.per_prompt)
  prompts = [prompt(*c) for c in requested]
  n = len(prompts)
  mesh = sharding.make_mesh(config.mesh)
  model, params, step = sample.restore_ema_params(config, args.workdir, mesh)
  denoise_fn = denoiser.make_denoise_fn(model, params, mesh)
  rng = jax.random.fold_in(jax.random.key(args.seed), 3)
  with tempfile.NamedTemporaryFile('w', suffix='.txt', delete=False) as f:
    f.write('\n'.join(prompts) + '\n')
  config.sample.prompts_file, config.sample.prompt = f.name, ''
  config.sample.num_steps = args.num_steps
  config.sample.num_videos = config.sample.batch_size = min(
      args.batch_size, n)
  real_feats = None
  if args.fvd:
    real, _ = sample_inputs.dataset_clips(
        config, n, config.data.num_frames, seed=args.real_seed)
    real_feats = doubled_features(real)
  runs = [(f'w = {w:g}', w, True) for w in weights] + [
      ('null text (unconditional)', 0.0, False)]
  rows, saved, start = [], {}, time.time()
  for name, w, conditional in runs:
    config.sample.guidance_weight = w
    request = sample.prepare(config, n, seed=args.seed)
    if not conditional:
      empty = [''] * n
      request = dataclasses.replace(
          request, prompts=empty,
          text=denoiser.text_encoder(config).encode(empty))
    t0 = time.time()
    videos = sample.sample_videos(request, denoise_fn, rng, mesh, n)
    row = {'name': name, 'w': w, 'seconds': round(time.time() - t0, 1)}
    for subset, mask in (('held_out', is_held), ('seen', ~is_held)):
      row[subset] = alignment(videos[mask], requested[mask])
    row['valid'] = float(np.mean(np.where(
        is_held, row['held_out']['valid'], row['seen']['valid'])))
    if args.fvd:
      row['fvd'] = frechet(videos, real_feats)
    rows.append(row)
    saved[name] = videos
    print(f'{name}: {row}', flush=True)
  os.unlink(f.name)
  chance = detect.chance()
  rows.append({'name': 'chance', 'held_out': chance, 'seen': chance})
  if args.out:
    np.savez_compressed(
        args.out, prompts=np.asarray(prompts), requested=requested,
        held_out=is_held, **{f'videos_{i}': v for i, v in
                             enumerate(saved.values())})
  print(f'\nCheckpoint step {step}, {n} videos per row'
        f' ({len(combos["held_out"])} held-out + {len(combos["seen"])} seen'
        f' prompts x {args.per_prompt}), {args.num_steps} ancestral steps.\n')
  print(table(rows))
  print('\nUngated (attributes read even where no valid object is found):\n')
  print(table(rows, '_ungated'))
  if args.fvd:
    print(f'\nFVD against {n} real clips (data seed {args.real_seed}),'
          ' both sets repeated 2x in time:\n')
    print(fvd_table(rows))
  print(json.dumps({
      'step': step, 'per_prompt': args.per_prompt,
      'num_steps': args.num_steps, 'num_videos_per_row': n,
      'rows': rows, 'real_seed': args.real_seed if args.fvd else None,
      'seconds': round(time.time() - start, 1),
      'machine': f'{platform.machine()} {os.cpu_count()} cpu,'
                 f' {jax.default_backend()}',
      'date': datetime.date.today().isoformat()}))


if __name__ == '__main__':
  main()
