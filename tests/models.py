"""Small model directories for tests, built one way.

A seeded model is the spec's module initialised from `jax.random.key(seed)`
on `spec.example_inputs()` and saved through `checkpoints.save`,
the model-directory format the handler serves. Tests keep their own specs
(the shapes they feed); a test that needs hand-set weights saves them itself.
"""

from __future__ import annotations

import os

import flax.linen as nn
import jax

from beam_dl.models import checkpoints


def seeded_variables(spec: checkpoints.ModelSpec, seed: int = 0):
  """The spec's module's variables initialised from `seed` (unboxed, as saved)."""
  return nn.meta.unbox(spec.build().init(jax.random.key(seed), *spec.example_inputs()))


def save_seeded_model(path, spec: checkpoints.ModelSpec, seed: int = 0, fmt: str = 'orbax'):
  """A model directory at `path` with seeded weights; returns (dir, variables)."""
  variables = seeded_variables(spec, seed)
  return checkpoints.save(str(path), spec, variables, fmt=fmt), variables


def save_broken_model(path, spec: checkpoints.ModelSpec, payload: bytes = b'\x00 not msgpack') -> str:
  """A directory that looks like a model (a valid spec.json) but whose
  msgpack variables are garbage, as a truncated upload leaves it."""
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, checkpoints.SPEC_FILE), 'w') as f:
    f.write(spec.to_json())
  with open(os.path.join(path, checkpoints.MSGPACK_FILE), 'wb') as f:
    f.write(payload)
  return str(path)
