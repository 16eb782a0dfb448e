"""Atomic writes and strict JSON (vdm_jax/fileio.py)."""

import json
import math
import os
from unittest import mock

import numpy as np
import pytest

from vdm_jax import fileio


def test_atomic_path_moves_into_place_and_keeps_extension(tmp_path):
  path = tmp_path / 'sub' / 'dir' / 'clip.mp4'  # Parents are created.
  with fileio.atomic_path(path) as tmp:
    assert os.path.dirname(tmp) == str(path.parent)
    assert tmp.endswith('.mp4') and '.tmp' in tmp
    assert not path.exists()
    with open(tmp, 'wb') as f:
      f.write(b'new')
  assert path.read_bytes() == b'new'
  assert os.listdir(path.parent) == ['clip.mp4']


def test_failure_mid_write_keeps_old_file_and_leaves_no_partial(tmp_path):
  path = tmp_path / 'result.json'
  path.write_text('old')
  with pytest.raises(RuntimeError, match='interrupted'):
    with fileio.atomic_path(str(path)) as tmp:
      with open(tmp, 'w') as f:
        f.write('partial')
      raise RuntimeError('interrupted')
  assert path.read_text() == 'old'
  assert os.listdir(tmp_path) == ['result.json']
  # A write that dies before creating its file leaves nothing either.
  with pytest.raises(KeyboardInterrupt):
    with fileio.atomic_path(str(tmp_path / 'never.json')):
      raise KeyboardInterrupt
  assert os.listdir(tmp_path) == ['result.json']


def test_write_json_failure_keeps_old_file(tmp_path):
  path = tmp_path / 'r.json'
  fileio.write_json(path, {'a': 1})
  with pytest.raises(TypeError):
    fileio.write_json(path, {'a': object()})  # Not serialisable.
  with mock.patch.object(os, 'replace', side_effect=OSError('disk full')):
    with pytest.raises(OSError, match='disk full'):
      fileio.write_json(path, {'a': 2})
  assert json.loads(path.read_text()) == {'a': 1}
  assert os.listdir(tmp_path) == ['r.json']


def test_concurrent_writers_use_distinct_temporary_files(tmp_path):
  path = tmp_path / 'x.bin'
  with fileio.atomic_path(path) as a, fileio.atomic_path(path) as b:
    assert a != b
    for name, data in ((a, b'a'), (b, b'b')):
      with open(name, 'wb') as f:
        f.write(data)
  assert path.read_bytes() == b'a'  # The last to finish (outer) wins.


def test_write_json_turns_non_finite_floats_into_null(tmp_path):
  path = tmp_path / 'fvd.json'
  obj = {
      'fvd': 12.5,
      'kvd_std': float('nan'),
      'folds': [1.0, math.inf, (-math.inf, 2)],
      'np': {'f32': np.float32('nan'), 'f64': np.float64(3.0),
             'i': np.int64(4), 'arr': np.array([1.0, np.nan])},
      'ok': True,
      'none': None,
  }
  fileio.write_json(path, obj, sort_keys=True)
  text = path.read_text()
  assert 'NaN' not in text and 'Infinity' not in text
  # Strict parsing: the file is standard JSON.
  back = json.loads(text, parse_constant=lambda c: pytest.fail(c))
  assert back == {
      'fvd': 12.5,
      'kvd_std': None,
      'folds': [1.0, None, [None, 2]],
      'np': {'f32': None, 'f64': 3.0, 'i': 4, 'arr': [1.0, None]},
      'ok': True,
      'none': None,
  }
  assert list(back) == sorted(back)


def test_to_json_safe_leaves_finite_values_alone():
  obj = {'a': [1, 2.5, 'x', None, False], 'b': {'c': -0.0}}
  assert fileio.to_json_safe(obj) == obj


def test_remote_paths_upload_once_complete(tmp_path):
  uploads = {}

  class FakeRemote:
    """The slice of etils.epath.Path that atomic_path uses."""

    def __init__(self, url):
      self.url = url
      self.name = url.rsplit('/', 1)[-1]

    @property
    def parent(self):
      return mock.MagicMock()

    def open(self, mode):
      assert mode == 'wb'
      remote = self

      class Writer:

        def __enter__(self):
          self.chunks = []
          return self

        def write(self, data):
          self.chunks.append(data)

        def __exit__(self, *exc):
          uploads[remote.url] = b''.join(self.chunks)

      return Writer()

  url = 'gs://bucket/run/config.json'
  with mock.patch.object(fileio.epath, 'Path', FakeRemote):
    with fileio.atomic_path(url) as tmp:
      assert '://' not in tmp and tmp.endswith('.json')
      with open(tmp, 'w') as f:
        f.write('{}')
      assert url not in uploads  # Nothing is visible before the end.
    local_dir = os.path.dirname(tmp)
    assert uploads == {url: b'{}'}
    assert not os.path.exists(local_dir)  # The local copy is removed.
    with pytest.raises(ValueError):
      with fileio.atomic_path('gs://bucket/run/other.json') as tmp:
        with open(tmp, 'w') as f:
          f.write('partial')
        raise ValueError('interrupted')
  assert 'gs://bucket/run/other.json' not in uploads
