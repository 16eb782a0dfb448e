"""Atomic file writes, local or on cloud storage, and NaN-safe JSON.

Every file vdm-jax writes for others to read (videos, JSON results, label
names, feature caches) goes through `atomic_path`, so a reader never sees a
partial file and a failed write leaves the previous file intact:

  with fileio.atomic_path(path) as tmp:
    with open(tmp, 'wb') as f:
      f.write(data)

Local paths: the writer fills a temporary file in the target directory,
which is moved into place with `os.replace` (atomic on POSIX). Paths with a
scheme (gs://, s3://, ...; anything `etils.epath` opens): the writer fills a
local temporary file, which is uploaded in one call once complete; an
object store shows an object only once its upload has finished.
"""

import contextlib
import json
import math
import os
import secrets
import shutil
import tempfile
from typing import Any, Iterator, Union

from etils import epath
import numpy as np

PathLike = Union[str, os.PathLike]


def is_remote(path: PathLike) -> bool:
  """Whether `path` names cloud storage (has a scheme such as gs://)."""
  return '://' in os.fspath(path)


def _temp_name(path: str) -> str:
  """A fresh hidden name beside `path` that keeps its extension.

  The extension stays last, so writers that pick the format from it
  (ffmpeg, PIL, np.savez) still work; '.tmp' marks leftovers of a killed
  process.
  """
  directory, name = os.path.split(path)
  base, ext = os.path.splitext(name)
  return os.path.join(directory,
                      f'.{base}.{secrets.token_hex(6)}.tmp{ext}')


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[str]:
  """Yields a local temporary path; it becomes `path` if the block succeeds.

  The parent directory of `path` is created if missing. The temporary file
  does not exist yet when yielded: the block creates it (open(tmp, 'wb'),
  an encoder writing to the name, ...) and must close it before the block
  ends. If the block raises, the temporary file is removed, `path` is left
  as it was, and the exception propagates. Concurrent writers of the same
  path do not collide; the last one to finish wins.

  Args:
    path: destination, a local path or a URL that `etils.epath` opens
      (gs://bucket/dir/file).

  Yields:
    A local filesystem path (str) with the extension of `path`.

  Raises:
    FileNotFoundError: the block did not create the temporary file.
  """
  path = os.fspath(path)
  if is_remote(path):
    dest = epath.Path(path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    directory = tempfile.mkdtemp(prefix='vdm_jax_upload_')
    try:
      tmp = _temp_name(os.path.join(directory, dest.name))
      yield tmp
      with open(tmp, 'rb') as src, dest.open('wb') as dst:
        shutil.copyfileobj(src, dst)
    finally:
      shutil.rmtree(directory, ignore_errors=True)
    return
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = _temp_name(path)
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def to_json_safe(obj: Any) -> Any:
  """`obj` with every non-finite float (NaN, +-inf) replaced by None.

  Recurses through dicts, lists and tuples (tuples become lists); numpy
  scalars and arrays become Python numbers and nested lists. Other values
  are returned unchanged.

  Args:
    obj: a JSON-like structure.

  Returns:
    The same structure, valid for `json.dumps(..., allow_nan=False)`.
  """
  if isinstance(obj, dict):
    return {k: to_json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_json_safe(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return to_json_safe(obj.tolist())
  if isinstance(obj, np.generic):
    return to_json_safe(obj.item())
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  return obj


def write_json(path: PathLike, obj: Any, *, indent: int = 2,
               sort_keys: bool = False) -> None:
  """Writes `obj` as strict JSON to `path`, atomically.

  NaN and infinities anywhere in `obj` are written as null (they are not
  JSON; `json.dump` would write the non-standard token NaN).

  Args:
    path: destination, local or a URL (see `atomic_path`).
    obj: a structure of dicts, lists, tuples, str, numbers, bools, None and
      numpy scalars or arrays.
    indent: indentation of the output.
    sort_keys: sort the keys of every dict.

  Raises:
    TypeError: `obj` holds a value JSON cannot represent.
  """
  text = json.dumps(to_json_safe(obj), indent=indent, sort_keys=sort_keys,
                    allow_nan=False)
  with atomic_path(path) as tmp:
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(text + '\n')
