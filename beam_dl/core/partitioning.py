"""Fitting a PartitionSpec to an array on a mesh: shared by serving
(`beam_dl.serving.devices`) and training (`beam_dl.training.sharding`).

A mesh axis that does not divide an array dimension is dropped for that array
(the dimension is replicated), so small heads (10 classes on 8 devices) never
fail to shard.
"""

from __future__ import annotations

import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P


def fit_spec(spec: P, shape, mesh: Mesh) -> P:
  """Drops mesh axes that do not divide their dimension (that dim replicates)."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    out.append(axes if names and dim % size == 0 else None)
  return P(*out)
