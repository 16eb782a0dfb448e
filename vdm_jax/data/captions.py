"""Captions of video files: a sidecar .txt beside each video, or one table.

For a folder of videos (or one video file), the caption of `clip.mp4` is,
in this order:
  1. `clip.txt` beside it (the whole file, stripped);
  2. its row in `captions.csv` in the root folder (columns `path,caption`,
     with a header; `path` relative to the root, or the bare file name);
  3. its entry in `captions.json` in the root folder (an object mapping
     the same paths to captions).
A missing or empty caption is an error that names the files (the first
few and how many), unless `allow_empty`, which gives them the empty text
(the null text of classifier-free guidance).
"""

import csv
import json
import os
from typing import Sequence

TABLES = ('captions.csv', 'captions.json')


def _table(root: str) -> dict[str, str]:
  """{path or name: caption} from the root's captions.csv / .json."""
  table = {}
  csv_path = os.path.join(root, 'captions.csv')
  if os.path.exists(csv_path):
    with open(csv_path, newline='', encoding='utf-8') as f:
      reader = csv.DictReader(f)
      if not reader.fieldnames or not {'path', 'caption'} <= set(
          reader.fieldnames):
        raise ValueError(
            f'{csv_path} needs a header with columns path,caption; got'
            f' {reader.fieldnames}.')
      for row in reader:
        table[os.path.normpath(row['path'])] = row['caption'] or ''
  json_path = os.path.join(root, 'captions.json')
  if os.path.exists(json_path):
    with open(json_path, encoding='utf-8') as f:
      entries = json.load(f)
    if not isinstance(entries, dict):
      raise ValueError(f'{json_path} must hold an object {{path: caption}}.')
    for k, v in entries.items():
      table.setdefault(os.path.normpath(k), str(v or ''))
  return table


def load_captions(root: str, files: Sequence[str],
                  allow_empty: bool = False) -> list[str]:
  """The caption of every file, in order.

  Args:
    root: the folder given as data.path (for one file: its folder).
    files: the video files (absolute or relative to the working directory).
    allow_empty: missing or empty captions become '' instead of an error.

  Raises:
    ValueError: some files have no caption (or an empty one), naming them
      and where their captions may be put.
  """
  table = _table(root)
  captions, missing = [], []
  for path in files:
    sidecar = os.path.splitext(path)[0] + '.txt'
    text = None
    if os.path.exists(sidecar):
      with open(sidecar, encoding='utf-8') as f:
        text = f.read()
    else:
      rel = os.path.normpath(os.path.relpath(path, root))
      text = table.get(rel, table.get(os.path.basename(path)))
    text = ' '.join((text or '').split())
    if not text:
      missing.append(path)
    captions.append(text)
  if missing and not allow_empty:
    shown = ', '.join(missing[:3]) + (', ...' if len(missing) > 3 else '')
    raise ValueError(
        f'{len(missing)} of {len(files)} videos under {root!r} have no'
        f' caption (or an empty one): {shown}. Put each caption in a .txt'
        ' beside its video, or in captions.csv (columns path,caption) or'
        ' captions.json ({path: caption}) in that folder; or set'
        ' data.allow_empty_captions=True to train them on the empty (null)'
        ' text.')
  return captions
