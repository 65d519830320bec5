"""The package boundaries hold: imports run one way.

transforms/ and pipelines/ build on beam_dl; beam_dl never imports them, and
serving (the handler and its device placement) never imports training.
"""
import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def imported_modules(path: str) -> set[str]:
  """Every module a Python file imports, at any depth (lazy imports too)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
  return names


def python_files(folder: str) -> list[str]:
  return [os.path.join(root, name) for root, _, files in os.walk(os.path.join(REPO, folder))
          for name in files if name.endswith('.py')]


def _top(module: str) -> str:
  return module.split('.')[0]


@pytest.mark.parametrize('path', python_files('beam_dl'), ids=lambda p: os.path.relpath(p, REPO))
def test_beam_dl_never_imports_transforms_or_pipelines(path):
  assert not {m for m in imported_modules(path) if _top(m) in ('transforms', 'pipelines', 'tests')}


@pytest.mark.parametrize('module', ['handler', 'inference_devices', 'inference_oom', 'savedmodel_handler'])
def test_serving_never_imports_training(module):
  imports = imported_modules(os.path.join(REPO, 'beam_dl', f'{module}.py'))
  assert not {m for m in imports if m.startswith('beam_dl.training')}


def test_io_holds_io_only():
  """beam_dl/io reads and writes bytes where they live; formats and decoders live elsewhere."""
  names = sorted(n for n in os.listdir(os.path.join(REPO, 'beam_dl', 'io')) if n.endswith('.py'))
  assert names == ['__init__.py', 'files.py', 'kafka.py', 'tfrecord.py']
