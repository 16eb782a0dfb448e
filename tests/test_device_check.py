"""experiments/device_check.py keeps working: JSON lines, error isolation.

Cheap: only the --smoke items (env, a 256^3 matmul), each in its own
subprocess, one of them made to fail.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_smoke_lines_parse_and_a_failing_item_does_not_stop_the_rest(
    tmp_path):
  out = tmp_path / 'check.jsonl'
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'experiments', 'device_check.py'),
       '--smoke', '--tiny', '--fail_item=env', f'--out={out}'],
      capture_output=True, text=True, cwd=ROOT, timeout=120, check=False,
      env=dict(os.environ, PYTHONPATH=ROOT))
  assert proc.returncode == 0, proc.stderr[-2000:]
  printed = [json.loads(l) for l in proc.stdout.splitlines() if l.strip()]
  written = [json.loads(l) for l in out.read_text().splitlines()]
  assert printed == written
  for record in printed:
    assert {'item', 'ok'} <= set(record), record
  by_item = {}
  for record in printed:
    by_item.setdefault(record['item'], []).append(record)
  env, = by_item['env']
  assert not env['ok'] and 'injected failure' in env['error']
  assert [r['dtype'] for r in by_item['matmul']] == ['bfloat16', 'float32']
  for r in by_item['matmul']:
    assert r['ok'] and r['device'] == 'cpu' and r['tflops'] > 0
    assert {'time_s', 'n', 'fraction_of_peak', 'elapsed_s'} <= set(r)
  summary, = by_item['summary']
  assert summary['items'] == ['env', 'matmul'] and summary['tiny']
