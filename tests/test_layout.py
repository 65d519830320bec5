"""The layout holds: one folder per role, imports that run one way, no cycles.

- `beam_dl/` holds only role packages (and its `__init__.py`), each with a
  docstring that says what it is for; transforms/ and pipelines/ build on
  beam_dl, never the other way round.
- Serving never imports training; the model format (`models.checkpoints`)
  does not depend on the MLflow integration (a registry is a plugin:
  `beam_dl.model_locations` entry points); no two beam_dl modules import each
  other, even lazily.
- Library code speaks of behaviour, not of the issue that asked for it.
"""

import ast
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROLES = {
  'beam_fixes',
  'cli',
  'compression',
  'core',
  'decoding',
  'features',
  'formats',
  'io',
  'models',
  'operations',
  'preprocessing',
  'services',
  'serving',
  'training',
}


def imported_modules(path: str) -> set[str]:
  """Every module a Python file imports, at any depth (lazy imports too);
  `from a.b import c` counts as both `a.b` and `a.b.c`."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return names


def python_files(folder: str) -> list[str]:
  return sorted(
    os.path.join(root, name)
    for root, _, files in os.walk(os.path.join(REPO, folder))
    for name in files
    if name.endswith('.py')
  )


def module_name(path: str) -> str:
  rel = os.path.relpath(path, REPO)[: -len('.py')].replace(os.sep, '.')
  return rel[: -len('.__init__')] if rel.endswith('.__init__') else rel


BEAM_DL = {module_name(p): p for p in python_files('beam_dl')}


def _top(module: str) -> str:
  return module.split('.')[0]


def test_beam_dl_root_holds_role_packages_only():
  entries = sorted(os.listdir(os.path.join(REPO, 'beam_dl')))
  modules = [e for e in entries if e.endswith('.py')]
  packages = {e for e in entries if os.path.isfile(os.path.join(REPO, 'beam_dl', e, '__init__.py'))}
  assert modules == ['__init__.py']
  assert packages == ROLES


@pytest.mark.parametrize('role', sorted(ROLES))
def test_every_role_says_what_it_is_for(role):
  with open(os.path.join(REPO, 'beam_dl', role, '__init__.py')) as f:
    doc = ast.get_docstring(ast.parse(f.read()))
  assert doc and len(doc.split()) >= 8, f'beam_dl/{role}/__init__.py needs a docstring saying what the role holds'


@pytest.mark.parametrize('path', python_files('beam_dl'), ids=lambda p: os.path.relpath(p, REPO))
def test_beam_dl_never_imports_transforms_or_pipelines(path):
  assert not {m for m in imported_modules(path) if _top(m) in ('transforms', 'pipelines', 'tests')}


@pytest.mark.parametrize('path', python_files('beam_dl/serving'), ids=lambda p: os.path.relpath(p, REPO))
def test_serving_never_imports_training(path):
  assert not {m for m in imported_modules(path) if m.startswith('beam_dl.training')}


def test_the_model_format_does_not_depend_on_mlflow():
  imports = imported_modules(BEAM_DL['beam_dl.models.checkpoints'])
  assert not {m for m in imports if m.startswith(('beam_dl.operations', 'mlflow'))}


def _graph() -> dict[str, set[str]]:
  graph = {}
  for name, path in BEAM_DL.items():
    deps = {m for m in imported_modules(path) if m in BEAM_DL and m != name}
    # a package's __init__ is imported by its modules' imports; only count its own code's imports
    graph[name] = {d for d in deps if not name.startswith(d + '.')}
  return graph


def _cycle(graph):
  """A list of modules forming an import cycle, or None."""
  state, stack = {}, []

  def visit(node):
    state[node] = 'open'
    stack.append(node)
    for dep in sorted(graph.get(node, ())):
      if state.get(dep) == 'open':
        return stack[stack.index(dep) :] + [dep]
      if dep not in state:
        found = visit(dep)
        if found:
          return found
    stack.pop()
    state[node] = 'done'
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_no_import_cycles_in_beam_dl():
  assert _cycle(_graph()) is None


def test_the_cycle_check_finds_a_cycle():
  assert _cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']


def test_io_holds_io_only():
  """beam_dl/io reads and writes bytes where they live; formats and decoders live elsewhere."""
  names = sorted(n for n in os.listdir(os.path.join(REPO, 'beam_dl', 'io')) if n.endswith('.py'))
  assert names == ['__init__.py', 'files.py', 'kafka.py', 'tfrecord.py']


ISSUE_REFERENCE = re.compile(
  r'\b(?:issue|stop|pass) ?#?\d+\b|\bissue #\d+|\b(?:first|second|third|fourth|fifth) pass\b', re.IGNORECASE
)

UPSTREAM = re.compile(r'Beam issue|apache/beam|BEAM-\d+|Beam PR', re.IGNORECASE)


@pytest.mark.parametrize('folder', ['beam_dl', 'transforms', 'pipelines'])
def test_library_code_speaks_of_behaviour_not_of_issues(folder):
  found = []
  for path in python_files(folder):
    with open(path) as f:
      for number, line in enumerate(f, 1):
        if ISSUE_REFERENCE.search(line) and not UPSTREAM.search(line):
          found.append(f'{os.path.relpath(path, REPO)}:{number}: {line.strip()}')
  assert not found, '\n'.join(found)
