"""Where a served model lives: one device, or a ('data', 'model') mesh.

`Placement` decides, once per model load, which devices serve the model and
how arrays go there:

  single device     variables committed to one device (jax.devices(backend)[0]);
                    host batches follow them into the jitted call.
  data parallel     variables replicated over a 1-D 'data' mesh of every device
                    of the backend; each padded batch is split over 'data'
                    (batch buckets are rounded up to a multiple of the device
                    count so every device gets equal rows).
  model parallel    a ('data', 'model') mesh; wide parameters (logical axes
                    'mlp', 'conv_out', 'rnn_hidden') are split over 'model'
                    using the logical axis names the models annotate, so a
                    model too big for one device still serves.

jit then compiles one SPMD program per padded shape; XLA inserts the
collectives.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from beam_dl.core.partitioning import fit_spec

DATA, MODEL = 'data', 'model'
# Logical parameter axes -> mesh axes for model-parallel serving (the same
# names beam_dl's models annotate; see beam_dl/training/config.py).
SERVING_TENSOR_RULES = (('batch', DATA), ('conv_out', MODEL), ('mlp', MODEL), ('rnn_hidden', MODEL))


def round_buckets(buckets: Sequence[int], multiple: int) -> tuple[int, ...]:
  """Each bucket rounded up to a multiple of `multiple`, deduplicated, sorted."""
  return tuple(sorted({-(-b // multiple) * multiple for b in buckets}))


@dataclasses.dataclass
class Placement:
  """Devices for one served model and how to put variables and batches there."""

  devices: tuple
  mesh: Optional[Mesh] = None

  @classmethod
  def create(
    cls, backend: Optional[str] = None, data_parallel: bool = False, model_parallelism: int = 1
  ) -> 'Placement':
    devices = tuple(jax.devices(backend) if backend else jax.devices())
    if not data_parallel and model_parallelism == 1:
      return cls(devices=devices[:1])
    if len(devices) % model_parallelism:
      raise ValueError(f'model_parallelism={model_parallelism} does not divide {len(devices)} devices')
    grid = np.asarray(devices).reshape(len(devices) // model_parallelism, model_parallelism)
    return cls(devices=devices, mesh=Mesh(grid, (DATA, MODEL)))

  @property
  def data_size(self) -> int:
    """How many ways a batch is split (1 on a single device)."""
    return self.mesh.shape[DATA] if self.mesh is not None else 1

  def describe(self) -> str:
    if self.mesh is None:
      return str(self.devices[0])
    return f'mesh {dict(self.mesh.shape)} of {self.devices[0].platform} devices'

  def put_variables(self, variables: Any, module: nn.Module, example_inputs: Sequence[np.ndarray]) -> Any:
    """Variables on the device(s): committed, replicated, or split over 'model'.

    The logical axis names come from the module's boxed init (shapes only,
    via `jax.eval_shape`; nothing is computed).
    """
    if self.mesh is None:
      return jax.device_put(variables, self.devices[0])
    if self.mesh.shape[MODEL] == 1:
      return jax.device_put(variables, NamedSharding(self.mesh, P()))
    boxed = jax.eval_shape(lambda: module.init(jax.random.key(0), *example_inputs))
    logical = nn.get_partition_spec(boxed)

    def sharding(spec, leaf):
      mesh_spec = nn.logical_to_mesh_axes(spec, SERVING_TENSOR_RULES) if spec is not None else P()
      return NamedSharding(self.mesh, fit_spec(mesh_spec, np.shape(leaf), self.mesh))

    shardings = jax.tree_util.tree_map(sharding, logical, variables, is_leaf=lambda x: isinstance(x, P) or x is None)
    return jax.device_put(variables, shardings)

  def put_batch(self, arrays: tuple[np.ndarray, ...]) -> tuple:
    """Host arrays unchanged (jit moves them next to the variables), or split
    over 'data' on a mesh: one host->device transfer per device shard."""
    if self.mesh is None:
      return arrays
    return tuple(jax.device_put(a, NamedSharding(self.mesh, P(DATA))) for a in arrays)
