"""A pytest plugin: where the test suite's time goes in JAX's compile path.

  PYTHONPATH=experiments python -m pytest -q -p no:cacheprovider \
      -p suite_compile_profile [tests/test_x.py ...]
  python experiments/suite_compile_profile.py [--top=25]

Each test process (each xdist worker too) records the seconds JAX reports
through jax.monitoring for tracing (jaxpr_trace_duration), lowering
(jaxpr_to_mlir_module_duration) and XLA compilation (backend_compile_duration,
which includes persistent-cache lookups) by test and by jitted function, and
writes them to $SUITE_PROFILE_DIR (default /tmp/suite_compile_profile) when
it ends. Run as a script, this file sums those files: totals, then the tests
and the jitted functions with the most compile-path time. Subprocesses that
tests start are not counted.
"""

import argparse
import collections
import glob
import json
import os

_EVENTS = ('jaxpr_trace_duration', 'jaxpr_to_mlir_module_duration',
           'backend_compile_duration')
_DIR = os.environ.get('SUITE_PROFILE_DIR', '/tmp/suite_compile_profile')


class _Recorder:

  def __init__(self):
    self.test = '(collection)'
    self.seconds = collections.defaultdict(float)
    self.counts = collections.defaultdict(int)

  def __call__(self, event, duration, **kwargs):
    name = event.rsplit('/', 1)[-1]
    if name in _EVENTS:
      key = (self.test, name, str(kwargs.get('fun_name', '')))
      self.seconds[key] += duration
      self.counts[key] += 1


_recorder = None


def pytest_configure(config):
  del config
  global _recorder
  from jax import monitoring  # pylint: disable=g-import-not-at-top
  _recorder = _Recorder()
  monitoring.register_event_duration_secs_listener(_recorder)


def pytest_runtest_logstart(nodeid, location):
  del location
  _recorder.test = nodeid


def pytest_sessionfinish(session):
  del session
  os.makedirs(_DIR, exist_ok=True)
  worker = os.environ.get('PYTEST_XDIST_WORKER', 'main')
  path = os.path.join(_DIR, f'{worker}_{os.getpid()}.json')
  rows = [[*key, _recorder.seconds[key], _recorder.counts[key]]
          for key in _recorder.seconds]
  with open(path + '.tmp', 'w') as f:
    json.dump(rows, f)
  os.replace(path + '.tmp', path)


def _report(top):
  rows = []
  for path in sorted(glob.glob(os.path.join(_DIR, '*.json'))):
    with open(path) as f:
      rows += json.load(f)
  if not rows:
    raise SystemExit(f'No profiles in {_DIR}: run pytest with '
                     '-p suite_compile_profile first (see the docstring).')
  totals = collections.defaultdict(lambda: [0.0, 0])
  by_test = collections.defaultdict(float)
  by_fun = collections.defaultdict(lambda: [0.0, 0])
  for test, event, fun, seconds, count in rows:
    totals[event][0] += seconds
    totals[event][1] += count
    by_test[test] += seconds
    if event == 'backend_compile_duration':
      by_fun[fun][0] += seconds
      by_fun[fun][1] += count
  for event in _EVENTS:
    print(f'{event:32s} {totals[event][0]:8.1f} s  {totals[event][1]:6d}x')
  print(f'\nTests with the most trace + lower + compile time (top {top}):')
  for test, seconds in sorted(by_test.items(), key=lambda kv: -kv[1])[:top]:
    print(f'{seconds:8.1f} s  {test}')
  print(f'\nJitted functions with the most compile time (top {top}):')
  for fun, (seconds, count) in sorted(by_fun.items(),
                                      key=lambda kv: -kv[1][0])[:top]:
    print(f'{seconds:8.1f} s  {count:5d}x  {fun}')


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--top', type=int, default=25)
  _report(parser.parse_args().top)
