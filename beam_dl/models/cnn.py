"""Convolutional image classifiers.

Parameters carry logical axis names (`nn.with_logical_partitioning`); the mesh
and the rules that map logical axes to mesh axes live in the training config,
never here.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from beam_dl.models import registry


def _partitioned(init, axes):
  return nn.with_logical_partitioning(init, axes)


@registry.register('small_cnn')
class SmallCNN(nn.Module):
  """Conv-ReLU-MaxPool stages, then a dense hidden layer and a linear head.

  Sized for tiny images (8x8 digits to 32x32); inputs are NHWC, already scaled.
  """

  num_classes: int = 10
  features: Sequence[int] = (32, 64)
  hidden: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no dropout / batch norm: same graph in training and serving
    x = x.astype(self.dtype)
    for width in self.features:
      x = nn.Conv(
        width,
        (3, 3),
        dtype=self.dtype,
        kernel_init=_partitioned(
          nn.initializers.lecun_normal(),
          ('conv_height', 'conv_width', 'conv_in', 'conv_out'),
        ),
        bias_init=_partitioned(nn.initializers.zeros, ('conv_out',)),
      )(x)
      x = nn.relu(x)
      if min(x.shape[1:3]) >= 2:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(
      self.hidden,
      dtype=self.dtype,
      kernel_init=_partitioned(nn.initializers.lecun_normal(), ('embed', 'mlp')),
      bias_init=_partitioned(nn.initializers.zeros, ('mlp',)),
    )(x)
    x = nn.relu(x)
    x = nn.Dense(
      self.num_classes,
      dtype=self.dtype,
      kernel_init=_partitioned(nn.initializers.lecun_normal(), ('mlp', 'vocab')),
      bias_init=_partitioned(nn.initializers.zeros, ('vocab',)),
    )(x)
    return x.astype(jnp.float32)
