"""Import guards: the layers of vdm_jax only import downwards.

  programs   main, train (+ training), sample, evaluate, sinfusion.train
  libraries  schedules, noise, diffusion, sampling, conditioning, tasks,
             denoiser, sample_inputs, models.*, data.*, text.*, sharding,
             checkpoint, video_io, fileio
  metric     evaluation.* (FVD: knows nothing of diffusion or sampling)

A program imports libraries, never another program, and the sampling and
evaluation programs never import the optimizer. Each check reads
`sys.modules` in a fresh interpreter; the checks share three interpreters,
run in parallel, and each violation names the first imported module that
brought the forbidden one in. The same edges are also read from the source
(every import statement, also those inside functions, which `sys.modules`
after an import cannot see).
"""

import ast
import glob
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAMS = ('vdm_jax.main', 'vdm_jax.train', 'vdm_jax.training',
            'vdm_jax.sample', 'vdm_jax.evaluate', 'vdm_jax.sinfusion.train',
            'vdm_jax.adapt.tune')


def _package(name):
  """The modules of a subpackage of vdm_jax, from its files."""
  folder = os.path.join(ROOT, 'vdm_jax', name)
  return tuple(sorted(
      f'vdm_jax.{name}.{os.path.basename(p)[:-3]}'
      for p in glob.glob(os.path.join(folder, '*.py'))
      if not p.endswith('__init__.py')))


METRIC = _package('evaluation')
LIBRARIES = tuple(f'vdm_jax.{m}' for m in (
    'schedules', 'noise', 'diffusion', 'sampling', 'conditioning', 'tasks',
    'denoiser', 'sample_inputs', 'sharding', 'checkpoint', 'video_io',
    'fileio', 'perf', 'adapt.inflate', 'adapt.tuned')) + _package('models') + (
        _package('data') + _package('text') + METRIC)

# The metric needs none of the diffusion model or the programs.
NOT_IN_METRIC = ('vdm_jax.sampling', 'vdm_jax.tasks', 'vdm_jax.conditioning',
                 'vdm_jax.diffusion', 'vdm_jax.train', 'vdm_jax.training',
                 'vdm_jax.sample', 'vdm_jax.evaluate')
# The sampling and evaluation programs run without the optimizer.
NOT_IN_SAMPLING = ('optax', 'vdm_jax.train', 'vdm_jax.training')

# Interpreters: each is a sequence of steps (modules to import, modules that
# must not be loaded after them). A later step sees what the earlier ones
# loaded (reported, never hidden), so steps only share an interpreter when
# the earlier imports are allowed to be checked by the later step too: the
# metric is among the libraries.
RUNS = {
    'metric_and_libraries': [('metric', METRIC, NOT_IN_METRIC),
                             ('libraries', LIBRARIES, PROGRAMS)],
    'sampling_programs': [('sampling_programs',
                           ('vdm_jax.sample', 'vdm_jax.evaluate'),
                           NOT_IN_SAMPLING)],
    'train_program': [('train_program', ('vdm_jax.train',),
                       ('vdm_jax.sample', 'vdm_jax.evaluate'))],
}

# Prints {step: {imported module: [forbidden modules it loaded]}}.
_PROBE = r"""
import importlib, json, sys
result = {}
for name, modules, forbidden in json.loads(sys.argv[1]):
  culprits = {}
  loaded = [f for f in forbidden if f in sys.modules]
  if loaded:
    culprits['(an earlier step)'] = loaded
  for module in modules:
    importlib.import_module(module)
    new = [f for f in forbidden if f in sys.modules and f not in loaded]
    if new:
      culprits[module] = new
      loaded += new
  result[name] = culprits
print(json.dumps(result))
"""


@pytest.fixture(scope='module')
def violations():
  """{step: {module: [forbidden modules]}} of all runs (started at once)."""
  procs = [
      subprocess.Popen([sys.executable, '-c', _PROBE, json.dumps(steps)],
                       cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True)
      for steps in RUNS.values()]
  result = {}
  for proc in procs:
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    result.update(json.loads(out.strip().splitlines()[-1]))
  return result


def test_library_lists_are_complete():
  assert 'vdm_jax.models.unet3d' in LIBRARIES
  assert 'vdm_jax.data.pipeline' in LIBRARIES
  assert set(METRIC) >= {'vdm_jax.evaluation.fvd', 'vdm_jax.evaluation.i3d',
                         'vdm_jax.evaluation.protocols'}


def test_sample_and_evaluate_do_not_import_the_optimizer(violations):
  assert not violations['sampling_programs']


def test_metric_imports_no_diffusion_and_no_program(violations):
  assert not violations['metric']


def test_libraries_import_no_program(violations):
  assert not violations['libraries']


def test_train_does_not_import_sample_or_evaluate(violations):
  assert not violations['train_program']


# (modules, what their own import statements must not name).
STATIC_RULES = (
    (('vdm_jax.sample', 'vdm_jax.evaluate'), NOT_IN_SAMPLING),
    (METRIC, NOT_IN_METRIC),
    (LIBRARIES, PROGRAMS),
    (('vdm_jax.train',), ('vdm_jax.sample', 'vdm_jax.evaluate')),
)


def imported_names(module):
  """Every module an import statement of `module` may load (anywhere)."""
  path = os.path.join(ROOT, *module.split('.')) + '.py'
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:  # Relative: from the module's package.
        package = module.split('.')[:-node.level]
        base = '.'.join(package + ([base] if base else []))
      names.add(base)
      names.update(f'{base}.{alias.name}' for alias in node.names)
  return names


def _forbidden(names, forbidden):
  return sorted(n for n in names for f in forbidden
                if n == f or n.startswith(f + '.'))


def test_no_forbidden_import_statements_even_inside_functions():
  found = {}
  for modules, forbidden in STATIC_RULES:
    for module in modules:
      bad = _forbidden(imported_names(module), forbidden)
      if bad:
        found[module] = bad
  assert not found


def test_static_check_sees_imports_inside_functions():
  names = imported_names('vdm_jax.main')  # Dispatches inside main().
  assert _forbidden(names, PROGRAMS) == [
      'vdm_jax.adapt.tune', 'vdm_jax.evaluate', 'vdm_jax.sample',
      'vdm_jax.sinfusion.train', 'vdm_jax.train']
