"""A linear (logistic-regression) model: the baseline, and the model whose
outputs tests can compute by hand from set weights."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from beam_dl.models import registry


@registry.register('linear')
class Linear(nn.Module):
  """Flattens each example and applies one Dense layer: y = x W + b."""

  num_outputs: int = 10
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.reshape((x.shape[0], -1)).astype(self.dtype)
    return nn.Dense(
      self.num_outputs,
      dtype=self.dtype,
      kernel_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed', 'vocab')),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('vocab',)),
    )(x).astype(jnp.float32)
