"""The model checkpoint format that training writes and the handler serves.

A model directory holds two things:

  model_dir/spec.json   `ModelSpec`: registry name, constructor kwargs, the
                        per-example input shape/dtype, input scaling, labels.
  model_dir/variables/  the Flax variables, written by orbax
                        (`StandardCheckpointer`), or
  model_dir/variables.msgpack   the same variables as flax msgpack bytes.

Nothing is ever unpickled: the module is rebuilt from the registry by name,
and the variables are plain arrays. Paths may be local or any filesystem Beam
knows (gs://...) for spec.json; orbax handles gs:// itself. A model registry
URI (`models:/<name>/<version>`, `models:/<name>@<alias>`) loads the
registered version's directory (`resolve`, beam_dl.operations.registry_mlflow).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import numbers
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from apache_beam.io.filesystems import FileSystems
from flax import serialization

from beam_dl import models
from beam_dl.models.errors import CheckpointError

SPEC_FILE = 'spec.json'
ORBAX_DIR = 'variables'
MSGPACK_FILE = 'variables.msgpack'
# Lists and objects in spec.json nest at most this deep (kwargs of real
# models nest two or three levels).
MAX_SPEC_DEPTH = 32


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything needed to rebuild and feed a saved model.

  Attributes:
    name: registry name of the Flax module (`beam_dl.models.names()`).
    kwargs: JSON-serialisable constructor arguments for the module.
    input_shape: shape of ONE example, e.g. (8, 8, 1) for NHWC images or
      (None, 3) for variable-length sequences of 3 features.
    input_dtype: dtype the serving pipeline feeds (e.g. 'uint8' images).
    input_scale: inputs are multiplied by this before the model (1/255 for
      uint8 images), inside the jitted function so hosts ship small dtypes.
    input_offset: added after scaling (e.g. -mean/std folded in).
    labels: optional class names, index-aligned with the model's outputs.
    task: 'classification' | 'regression' | 'sequence_classification' | ...
    extra: free-form metadata (training config, metrics) kept for reference.
    quantization: None for a float model, else how its variables are
      quantized (`beam_dl.compression.quantize`): `build` wraps the module
      and `load` checks and restores the variables to match.
  """

  name: str
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  input_shape: Sequence[int | None] = ()
  input_dtype: str = 'float32'
  input_scale: float = 1.0
  input_offset: float = 0.0
  labels: Sequence[str] | None = None
  task: str = 'classification'
  extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  quantization: Mapping[str, Any] | None = None

  def build(self, **overrides) -> nn.Module:
    """The Flax module this spec names; `overrides` replace kwargs (e.g. dtype)."""
    module = self.build_float(**overrides)
    if self.quantization:
      from beam_dl.compression import quantize  # qwix only for quantized models

      module = quantize.wrap_module(module, self.quantization)
    return module

  def build_float(self, **overrides) -> nn.Module:
    """The registered module without any quantization wrapper."""
    return models.build(self.name, **{**self.kwargs, **overrides})

  def normalize(self, x):
    """Model input from fed input: float32 x * input_scale + input_offset.

    Training and serving both call this (inside jit), so the two can't skew.
    """
    import jax.numpy as jnp

    return x.astype(jnp.float32) * self.input_scale + self.input_offset

  @property
  def is_sequence(self) -> bool:
    """Variable-length inputs [T, F]: the model also takes a [T] mask."""
    return len(self.input_shape) > 0 and self.input_shape[0] is None

  def example_inputs(self) -> tuple[np.ndarray, ...]:
    """A one-example model input (after normalize): shapes for `jax.eval_shape`."""
    if self.is_sequence:
      return np.zeros((1, 1, *self.input_shape[1:]), np.float32), np.ones((1, 1), bool)
    return (np.zeros((1, *self.input_shape), np.float32),)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> 'ModelSpec':
    """The spec in `text`, every field checked (`validate_spec`); raises
    CheckpointError naming the first bad field."""
    try:
      raw = json.loads(text)
    except json.JSONDecodeError as e:
      raise CheckpointError(f'not JSON: {e}') from None
    except RecursionError:  # the parser recurses once per level
      raise CheckpointError(f'lists and objects nested more than {MAX_SPEC_DEPTH} levels deep') from None
    if _nesting_depth(raw) > MAX_SPEC_DEPTH:
      raise CheckpointError(f'lists and objects nested more than {MAX_SPEC_DEPTH} levels deep')
    if not isinstance(raw, dict):
      raise CheckpointError(f'expected a JSON object, got {type(raw).__name__}')
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - known
    if unknown:
      raise CheckpointError(f'unknown fields {sorted(unknown)}')
    if 'name' not in raw:
      raise CheckpointError("field 'name': missing")
    if isinstance(raw.get('input_shape'), list):
      raw['input_shape'] = tuple(raw['input_shape'])
    spec = cls(**raw)
    validate_spec(spec)
    return spec


def _nesting_depth(value: Any) -> int:
  """How deeply lists and objects nest in parsed JSON (counted up to one
  past MAX_SPEC_DEPTH), without recursion: a spec nested as deep as the
  parser allows would overflow the stack of whatever walks it recursively
  next (copying, pickling, repr)."""
  deepest, stack = 0, [(value, 1)]
  while stack:
    item, depth = stack.pop()
    children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
    if children is not None:
      deepest = max(deepest, depth)
      if depth <= MAX_SPEC_DEPTH:
        stack.extend((child, depth + 1) for child in children)
  return deepest


def _field_error(field: str, problem: str) -> CheckpointError:
  return CheckpointError(f'field {field!r}: {problem}')


def _is_number(value: Any) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def validate_spec(spec: ModelSpec) -> None:
  """Checks every field of `spec` the way serving will use it; raises
  CheckpointError("field 'x': ...") for the first that is wrong.

  A bad spec must fail a job before it starts: left to serving, a wrong
  dtype or shape dead-letters every input, and wrong labels crash
  formatting after the model ran.
  """
  if not isinstance(spec.name, str) or spec.name not in models.names():
    raise _field_error('name', f'{spec.name!r} is not a registered model; registered: {models.names()}')
  if not isinstance(spec.kwargs, Mapping):
    raise _field_error('kwargs', f'expected an object of constructor arguments, got {spec.kwargs!r}')
  shape = spec.input_shape
  if not isinstance(shape, (list, tuple)) or not shape:
    raise _field_error('input_shape', f'expected a non-empty list of positive integers, got {shape!r}')
  for i, size in enumerate(shape):
    variable_length = i == 0 and size is None and len(shape) > 1  # sequences [T, F...]
    if not variable_length and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
      raise _field_error(
        'input_shape', f'expected positive integers (null only first, for sequences), got {list(shape)!r}'
      )
  try:
    np.dtype(spec.input_dtype)
    if not isinstance(spec.input_dtype, str):
      raise TypeError(spec.input_dtype)
  except TypeError:
    raise _field_error('input_dtype', f'{spec.input_dtype!r} is not a numpy dtype name') from None
  for field in ('input_scale', 'input_offset'):
    if not _is_number(getattr(spec, field)):
      raise _field_error(field, f'expected a finite number, got {getattr(spec, field)!r}')
  if spec.labels is not None:
    if not isinstance(spec.labels, (list, tuple)) or not all(isinstance(l, str) for l in spec.labels):
      raise _field_error('labels', f'expected a list of strings or null, got {spec.labels!r}')
    num_classes = spec.kwargs.get('num_classes')
    if isinstance(num_classes, int) and len(spec.labels) != num_classes:
      raise _field_error('labels', f'{len(spec.labels)} labels for num_classes={num_classes}')
  if not isinstance(spec.task, str):
    raise _field_error('task', f'expected a string, got {spec.task!r}')
  if not isinstance(spec.extra, Mapping):
    raise _field_error('extra', f'expected an object, got {spec.extra!r}')
  try:
    spec.build()
  except Exception as e:  # a dataclass module raises TypeError for an unknown argument
    raise _field_error('kwargs', f'not accepted by {spec.name}: {type(e).__name__}: {e}') from None


# Entry points that turn a registry URI into a model directory (`resolve`).
LOCATION_PLUGINS = 'beam_dl.model_locations'


def _join(model_dir: str, name: str) -> str:
  return FileSystems.join(model_dir, name)


def resolve(model_dir: str) -> str:
  """A directory Beam's FileSystems can read for `model_dir`.

  A registry URI `<scheme>:/<...>` whose scheme a plugin serves is handed to
  it (entry point group `beam_dl.model_locations`, name = scheme, value = a
  function URI -> directory; beam_dl's own is `models:/<name>/<version>` and
  `models:/<name>@<alias>` from the MLflow registry, setup.py). Any other path,
  `gs://...` and `hdfs://...` included, comes back unchanged.
  """
  scheme, sep, rest = model_dir.partition(':/')
  if sep and not rest.startswith('/'):
    for plugin in importlib.metadata.entry_points(group=LOCATION_PLUGINS, name=scheme):
      return plugin.load()(model_dir)
  return model_dir


def _abs(path: str) -> str:
  return path if '://' in path else os.path.abspath(path)


def save(model_dir: str, spec: ModelSpec, variables: Any, *, fmt: str = 'orbax') -> str:
  """Writes `spec` and unboxed `variables` to `model_dir`; returns model_dir.

  `fmt` is 'orbax' (a directory of arrays, resharding-friendly) or 'msgpack'
  (one file, for small models and byte-level transport).
  """
  variables = jax.device_get(nn.meta.unbox(variables))
  FileSystems.mkdirs(model_dir) if not FileSystems.exists(model_dir) else None
  with FileSystems.create(_join(model_dir, SPEC_FILE)) as f:
    f.write(spec.to_json().encode('utf-8'))
  if fmt == 'orbax':
    import orbax.checkpoint as ocp  # heavy import, only when writing orbax

    # The variables are host arrays and this process writes them alone: in a
    # multi-process JAX run orbax would otherwise wait at barriers for peers
    # that never save (only process 0 exports), and hang.
    me = jax.process_index()
    alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
    with ocp.StandardCheckpointer(multiprocessing_options=alone) as ckptr:
      ckptr.save(_abs(_join(model_dir, ORBAX_DIR)), variables, force=True)
  elif fmt == 'msgpack':
    with FileSystems.create(_join(model_dir, MSGPACK_FILE)) as f:
      f.write(serialization.msgpack_serialize(_to_numpy(variables)))
  else:
    raise ValueError(f"fmt must be 'orbax' or 'msgpack', got {fmt!r}")
  # Saving over a model of the other format replaces it: `load` prefers the
  # orbax directory, so a stale one would shadow the msgpack just written.
  stale = _join(model_dir, MSGPACK_FILE if fmt == 'orbax' else ORBAX_DIR)
  if FileSystems.exists(stale):
    FileSystems.delete([stale])
  return model_dir


def load_spec(model_dir: str) -> ModelSpec:
  model_dir = resolve(model_dir)
  path = _join(model_dir, SPEC_FILE)
  if not FileSystems.exists(path):
    raise CheckpointError(f'{model_dir!r} is not a beam_dl model directory: no {SPEC_FILE}')
  with FileSystems.open(path) as f:
    data = f.read()
  try:
    return ModelSpec.from_json(data.decode('utf-8'))
  except (CheckpointError, UnicodeDecodeError, TypeError) as e:
    raise CheckpointError(f'{path}: {e}') from None


def load(model_dir: str) -> tuple[ModelSpec, Any]:
  """Returns (spec, variables as numpy arrays) from a model directory."""
  model_dir = resolve(model_dir)
  spec = load_spec(model_dir)
  msgpack_path = _join(model_dir, MSGPACK_FILE)
  orbax_path = _join(model_dir, ORBAX_DIR)
  if FileSystems.exists(orbax_path):
    import orbax.checkpoint as ocp

    try:
      with ocp.StandardCheckpointer() as ckptr:
        variables = ckptr.restore(_abs(orbax_path))
    except Exception as e:  # orbax raises many types for a damaged directory
      raise CheckpointError(f'{orbax_path}: cannot restore: {e}') from e
  elif FileSystems.exists(msgpack_path):
    with FileSystems.open(msgpack_path) as f:
      try:
        variables = serialization.msgpack_restore(f.read())
      except Exception as e:
        raise CheckpointError(f'{msgpack_path}: cannot decode: {e}') from e
  else:
    raise CheckpointError(f'{model_dir!r} has {SPEC_FILE} but no variables ({ORBAX_DIR}/ or {MSGPACK_FILE})')
  if spec.quantization:
    from beam_dl.compression import quantize

    quantize.check_metadata(spec.quantization, _join(model_dir, SPEC_FILE))
    source = orbax_path if FileSystems.exists(orbax_path) else msgpack_path
    variables = quantize.restore_variables(spec, _to_numpy(variables), source)
  variables = _numeric_arrays(variables, model_dir)
  problems = variable_mismatches(spec, variables)
  if problems:
    shown = '; '.join(problems[:5]) + (f'; and {len(problems) - 5} more' if len(problems) > 5 else '')
    raise CheckpointError(f'{model_dir}: variables do not match {SPEC_FILE} ({spec.name}): {shown}')
  return spec, variables


def expected_variables(spec: ModelSpec) -> Any:
  """The variables `spec`'s module makes, as shapes only (`jax.eval_shape`
  of init: nothing is computed or allocated)."""
  module = spec.build()
  abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), *spec.example_inputs()))
  return nn.meta.unbox(abstract)


def variable_mismatches(spec: ModelSpec, variables: Any) -> list[str]:
  """What differs between restored `variables` and what the spec's module
  expects: missing arrays, unexpected arrays, wrong shapes. Empty if they fit.

  Checked at load, before serving: a checkpoint from another model or a
  different config otherwise fails every batch (each input dead-lettered)
  or, worse, serves wrong outputs from broadcasting shapes.
  """

  def by_path(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}

  try:
    want = by_path(expected_variables(spec))
  except Exception as e:  # kwargs the module accepts but cannot build with
    return [f'{spec.name}{dict(spec.kwargs)} cannot be built: {type(e).__name__}: {e}']
  have = by_path(variables)
  problems = [f'missing {p} {tuple(want[p].shape)}' for p in sorted(set(want) - set(have))]
  problems += [f'unexpected {p} {tuple(np.shape(have[p]))}' for p in sorted(set(have) - set(want))]
  problems += [
    f'{p} has shape {tuple(np.shape(have[p]))}, expected {tuple(want[p].shape)}'
    for p in sorted(set(want) & set(have))
    if tuple(np.shape(have[p])) != tuple(want[p].shape)
  ]
  return problems


def _to_numpy(tree):
  return jax.tree_util.tree_map(np.asarray, tree)


def _numeric_arrays(tree: Any, model_dir: str) -> Any:
  """`tree`'s leaves as numpy arrays; CheckpointError naming the first leaf
  that is not an array of numbers (object or string dtype, a ragged list):
  such a leaf restores, but fails every batch that reaches the model."""

  def as_array(path, leaf):
    name = jax.tree_util.keystr(path)
    try:
      array = np.asarray(leaf)
    except (ValueError, TypeError) as e:  # ragged nested lists
      raise CheckpointError(f'{model_dir}: variable {name} is not an array: {e}') from None
    if array.dtype != np.bool_ and not jax.dtypes.issubdtype(array.dtype, np.number):
      raise CheckpointError(f'{model_dir}: variable {name} has dtype {array.dtype}, not numbers')
    return array

  return jax.tree_util.tree_map_with_path(as_array, tree)
