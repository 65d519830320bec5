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
registered version's directory (`resolve`, beam_dl.registry_mlflow).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from apache_beam.io.filesystems import FileSystems
from flax import serialization

from beam_dl import models

SPEC_FILE = 'spec.json'
ORBAX_DIR = 'variables'
MSGPACK_FILE = 'variables.msgpack'


class CheckpointError(ValueError):
  """A model directory that cannot be loaded, with the reason."""


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

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

  @classmethod
  def from_json(cls, text: str) -> 'ModelSpec':
    raw = json.loads(text)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(raw) - known
    if unknown:
      raise CheckpointError(f'unknown fields in {SPEC_FILE}: {sorted(unknown)}')
    raw['input_shape'] = tuple(raw.get('input_shape', ()))
    return cls(**raw)


def _join(model_dir: str, name: str) -> str:
  return FileSystems.join(model_dir, name)


def resolve(model_dir: str) -> str:
  """A local directory for a registry URI (`models:/<name>/<version>` or
  `models:/<name>@<alias>`, downloaded once per process by
  `beam_dl.registry_mlflow`); any other path unchanged."""
  if model_dir.startswith('models:/'):
    from beam_dl import registry_mlflow  # imports mlflow only for registry URIs

    return registry_mlflow.local_model_dir(model_dir)
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

    with ocp.StandardCheckpointer() as ckptr:
      ckptr.save(_abs(_join(model_dir, ORBAX_DIR)), variables, force=True)
  elif fmt == 'msgpack':
    with FileSystems.create(_join(model_dir, MSGPACK_FILE)) as f:
      f.write(serialization.msgpack_serialize(_to_numpy(variables)))
  else:
    raise ValueError(f"fmt must be 'orbax' or 'msgpack', got {fmt!r}")
  return model_dir


def load_spec(model_dir: str) -> ModelSpec:
  model_dir = resolve(model_dir)
  path = _join(model_dir, SPEC_FILE)
  if not FileSystems.exists(path):
    raise CheckpointError(f'{model_dir!r} is not a beam_dl model directory: no {SPEC_FILE}')
  with FileSystems.open(path) as f:
    try:
      return ModelSpec.from_json(f.read().decode('utf-8'))
    except (json.JSONDecodeError, TypeError) as e:
      raise CheckpointError(f'{path}: unreadable spec: {e}') from e


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
  return spec, _to_numpy(variables)


def _to_numpy(tree):
  return jax.tree_util.tree_map(np.asarray, tree)
