"""What breaks a pipeline on a distributed runner, tested directly.

On Flink, Spark or Dataflow every DoFn, CombineFn and model handler is
pickled on the submitting machine and unpickled in another process that
shares nothing with it. So:

- every fn in every registered pipeline's graph pickles with both of Beam's
  picklers (cloudpickle, the default, and dill) and round-trips;
- unpickled in a fresh interpreter it sets up, processes real elements and
  gives the same outputs (the handler loads the model and predicts the same);
- our fn classes are importable by reference (top-level, not in a function);
- modules hold no mutable state: no module-level mutable containers except
  the ones listed with a reason, and running a pipeline changes no module's
  globals (what a worker would not see);
- a class of ours that crosses a PCollection boundary has a coder registered.

The EXTERNAL-worker-pool cell of tests/test_runners.py runs every fn of every
pipeline in separate worker processes end to end.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import pkgutil
import typing

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.ml.inference.base import ModelHandler

from tests import runner_matrix as rm

# Module-level mutable containers that are not state: filled at import, the
# same in every process, never changed while a pipeline runs.
ALLOWED_MODULE_CONTAINERS = {
  'beam_dl.models.registry._FACTORIES': 'model registry, filled by @register at import on every worker',
}
# Per-process caches that running a pipeline may fill: each worker process
# starts empty and behaves correctly without them.
ALLOWED_PROCESS_CACHES = {
  'beam_dl.serving.handler._LAST_GOOD': 'the model dir each handler last loaded in this process: a refresh that '
  "fails falls back to it; a new worker falls back to the constructor's dir",
}
MUTABLE = (dict, list, set, bytearray)


def project_modules() -> list:
  """Every module under beam_dl/, transforms/ and pipelines/, imported."""
  modules = []
  for package_name in rm.PROJECT_PACKAGES:
    package = importlib.import_module(package_name)
    modules.append(package)
    for info in pkgutil.walk_packages(package.__path__, prefix=package_name + '.'):
      modules.append(importlib.import_module(info.name))
  return modules


def project_classes(base: type) -> list[type]:
  return sorted(
    {
      obj
      for m in project_modules()
      for _, obj in inspect.getmembers(m, inspect.isclass)
      if issubclass(obj, base) and obj.__module__.split('.')[0] in rm.PROJECT_PACKAGES
    },
    key=lambda c: f'{c.__module__}.{c.__qualname__}',
  )


@pytest.fixture(scope='module')
def graphs(tmp_path_factory):
  """pipeline name -> (data dir, built graph) for every registered pipeline here."""
  data_root = str(tmp_path_factory.getbasetemp() / 'matrix_data')
  out = tmp_path_factory.mktemp('portability')
  built = {}
  for name, case in rm.PIPELINES.items():
    if rm.pipeline_exists(case.module):
      data_dir = rm.prepared_data(data_root, name)
      built[name] = (data_dir, rm.build_graph(name, case.argv(data_dir, str(out / name))))
  return built


def _model_handlers(obj, depth: int = 6) -> list:
  """ModelHandler objects reachable through attributes (a DoFn's handler and
  the handlers it wraps: KeyedModelHandler -> JaxModelHandler)."""
  if depth == 0 or not hasattr(obj, '__dict__'):
    return []
  found = [obj] if isinstance(obj, ModelHandler) else []
  return found + [h for value in vars(obj).values() for h in _model_handlers(value, depth - 1)]


def _same_class(restored, original) -> bool:
  """Same class by name (a class defined in a function is pickled by value: a copy)."""
  a, b = type(restored), type(original)
  return (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


@pytest.mark.parametrize('library', ['cloudpickle', 'dill'])
def test_every_fn_and_handler_in_every_pipeline_pickles(graphs, library):
  pickler = rm._pickler(library)
  checked = 0
  for name, (_, graph) in graphs.items():
    for label, fn in rm.graph_fns(graph):
      assert _same_class(pickler.loads(pickler.dumps(fn)), fn), (name, label)
      for handler in _model_handlers(fn):
        assert _same_class(pickler.loads(pickler.dumps(handler)), handler), (name, label)
      checked += 1
  assert checked > 0


def test_fn_classes_are_importable_by_reference():
  """Workers import our classes by module path: none may be defined in a function."""
  classes = project_classes(beam.DoFn) + project_classes(beam.CombineFn) + project_classes(ModelHandler)
  assert classes, 'no DoFn/CombineFn/ModelHandler classes found'
  for cls in classes:
    assert '<locals>' not in cls.__qualname__, cls
    assert getattr(importlib.import_module(cls.__module__), cls.__qualname__) is cls


def _decode_fn(graph):
  ((label, fn),) = [(l, f) for l, f in rm.graph_fns(graph) if type(f).__name__ == '_DecodeImageFn']
  return label, fn


@pytest.mark.parametrize('library', ['cloudpickle', 'dill'])
def test_fns_run_in_a_fresh_worker_process(graphs, library, tmp_path):
  """Every fn of ours, from every pipeline, unpickles and sets up in a new
  interpreter; classify_images' decode and model give the same results there."""
  ours = [
    (f'{name}:{label}', fn)
    for name, (_, graph) in graphs.items()
    for label, fn in rm.graph_fns(graph)
    if rm.is_project_object(fn)
  ]
  assert len({label.split(':')[0] for label, _ in ours}) == len(graphs)
  data_dir, graph = graphs['classify_images']
  decode_label, decode_fn = _decode_fn(graph)
  decode_label = f'classify_images:{decode_label}'
  images = os.path.join(data_dir, 'images')
  files = ['digit_0000_label7.png', 'digit_0001_label6.jpg', 'broken_truncated.jpg', 'broken_not_an_image.jpg']
  elements = [(f, open(os.path.join(images, f), 'rb').read()) for f in files]
  (handler,) = {
    id(h): h for _, fn in rm.graph_fns(graph) for h in _model_handlers(fn) if type(h).__name__ == 'JaxModelHandler'
  }.values()

  decode_fn.setup()
  here = rm.run_bundle(decode_fn, elements)
  decode_fn.teardown()
  arrays = [array for _, (_, array) in here[:2]]
  expected = [r.inference for r in handler.run_inference(arrays, handler.load_model())]

  response = rm.run_in_fresh_process(library, ours, {decode_label: elements}, [(handler, arrays)], str(tmp_path))
  assert response['setup'] == [label for label, _ in ours]
  there = response['outputs'][decode_label]
  assert len(here) == len(there) == len(elements)
  for (_, (key, array)), (tag, (got_key, got_array)) in zip(here[:2], there[:2]):
    assert tag is None and got_key == key
    np.testing.assert_array_equal(got_array, array)
  for tag, letter in there[2:]:
    assert tag == 'failed' and letter['stage'] == 'decode' and letter['reason']
  (inference,) = response['inference']
  np.testing.assert_allclose(np.stack(inference), np.stack(expected), rtol=1e-5, atol=1e-6)


def _mutable_globals(module) -> dict[str, object]:
  return {
    f'{module.__name__}.{name}': value
    for name, value in vars(module).items()
    if isinstance(value, MUTABLE) and not (name.startswith('__') and name.endswith('__'))
  }


def test_no_module_level_mutable_state():
  """Mutable module globals must be UPPER_CASE constants or listed with a reason."""
  offenders = []
  for module in project_modules():
    for qualified, _ in _mutable_globals(module).items():
      name = qualified.rsplit('.', 1)[1]
      if name.lstrip('_').isupper() or qualified in ALLOWED_MODULE_CONTAINERS:
        continue
      offenders.append(qualified)
  assert not offenders, f'module-level mutable state (workers will not share it): {offenders}'


def _module_state() -> dict[str, str]:
  """repr of every project module global that is not a module, class or function.

  Lazily imported modules cached in a global (`_TF = tensorflow`) are
  per-process and idempotent, so module objects are left out.
  """
  state = {}
  for module in project_modules():
    for name, value in vars(module).items():
      if name.startswith('__') or inspect.ismodule(value) or inspect.isclass(value) or callable(value):
        continue
      state[f'{module.__name__}.{name}'] = repr(value)
  return state


def test_running_a_pipeline_changes_no_module_state(graphs, tmp_path):
  """In-process FnApiRunner: what a DoFn writes to a module global would show up here."""
  data_dir, _ = graphs['classify_images']
  before = _module_state()
  argv = rm.PIPELINES['classify_images'].argv(data_dir, str(tmp_path)) + ['--runner=FnApiRunner']
  graph = rm.build_graph('classify_images', argv)
  graph.run().wait_until_finish()
  assert rm.read_classify_images(str(tmp_path))['predictions']
  after = _module_state()
  changed = {
    k: (before.get(k), after.get(k))
    for k in set(before) | set(after)
    if before.get(k) != after.get(k) and k not in ALLOWED_PROCESS_CACHES
  }
  assert not changed, changed


def _leaf_types(hint) -> set:
  """Classes named anywhere in a Beam or typing type hint."""
  if isinstance(hint, type) and not typing.get_args(hint):
    return {hint}
  found = set()
  for attr in ('tuple_types', 'inner_type', 'key_type', 'value_type', 'union_types', 'element_type'):
    inner = getattr(hint, attr, None)
    if inner is None:
      continue
    for sub in inner if isinstance(inner, (tuple, list, set, frozenset)) else (inner,):
      found |= _leaf_types(sub)
  for sub in typing.get_args(hint):
    found |= _leaf_types(sub)
  return found


def test_our_classes_that_cross_pcollections_have_coders(graphs):
  """A class of ours as a PCollection element type must not fall back to pickling."""
  fallback = (beam.coders.FastPrimitivesCoder, beam.coders.PickleCoder)
  crossing = {}
  for name, (_, graph) in graphs.items():
    for node in rm.applied_transforms(graph):
      for pcoll in node.outputs.values():
        for cls in _leaf_types(pcoll.element_type):
          if cls.__module__.split('.')[0] in rm.PROJECT_PACKAGES:
            crossing.setdefault(cls, []).append(f'{name}:{node.full_label}')
  missing = {
    f'{c.__module__}.{c.__qualname__}': where[:3]
    for c, where in crossing.items()
    if isinstance(beam.coders.registry.get_coder(c), fallback)
  }
  assert not missing, f'register a coder (beam.coders.registry.register_coder) for: {missing}'


def test_classify_images_declares_its_boundary_types(graphs):
  """Reading yields typed (path, ReadableFile): classify_images reads each file
  where it decodes it (ReadImageFiles(defer_read=True)); no guessed types."""
  _, graph = graphs['classify_images']
  types = {n.full_label: [str(p.element_type) for p in n.outputs.values()] for n in rm.applied_transforms(graph)}
  # .images is typed (path, ReadableFile); .failed holds the unreadable matches' dead letters.
  assert "Tuple[<class 'str'>, <class 'apache_beam.io.fileio.ReadableFile'>]" in types['ReadImageFiles']


def test_leaf_types_finds_classes_in_nested_hints():
  @dataclasses.dataclass
  class Point:
    x: float

  hint = beam.typehints.Tuple[str, beam.typehints.List[Point]]
  assert _leaf_types(hint) == {str, Point}
  assert _leaf_types(typing.Optional[Point]) >= {Point}
