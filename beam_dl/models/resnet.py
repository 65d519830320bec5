"""ResNet image classifiers (v1.5, as in the Flax ImageNet example).

`ResNet` (registered as 'resnet') takes its depth from `stage_sizes` and its
block type by name ('basic' for ResNet-18/34, 'bottleneck' for ResNet-50+),
so a checkpoint's JSON kwargs rebuild it. `resnet18`, `resnet50` and the
test-only `resnet_tiny` are registered `functools.partial` aliases.

Inputs are NHWC, already scaled; outputs are float32 logits. `dtype` is the
compute dtype ('bfloat16' for mixed precision); parameters stay float32.
`remat=True` recomputes each block's activations in the backward pass
(`nn.remat`, i.e. `jax.checkpoint`) to trade compute for memory.
Parameters carry logical axis names; the mesh rules live in the training
config.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from beam_dl.models import registry

_CONV_AXES = ('conv_height', 'conv_width', 'conv_in', 'conv_out')


def _partitioned(init, axes):
  return nn.with_logical_partitioning(init, axes)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual connection (ResNet-18/34)."""

  filters: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=_partitioned(nn.initializers.zeros, ('conv_out',)))(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name='conv_proj')(residual)
      residual = self.norm(name='norm_proj')(residual)
    return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3, 1x1 expand (x4) with a residual connection (ResNet-50+)."""

  filters: int
  conv: Callable[..., nn.Module]
  norm: Callable[..., nn.Module]
  strides: tuple[int, int] = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = nn.relu(self.norm()(self.conv(self.filters, (1, 1))(x)))
    y = nn.relu(self.norm()(self.conv(self.filters, (3, 3), self.strides)(y)))
    y = self.conv(self.filters * 4, (1, 1))(y)
    y = self.norm(scale_init=_partitioned(nn.initializers.zeros, ('conv_out',)))(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters * 4, (1, 1), self.strides, name='conv_proj')(residual)
      residual = self.norm(name='norm_proj')(residual)
    return nn.relu(residual + y)


_BLOCKS = {'basic': BasicBlock, 'bottleneck': BottleneckBlock}


@registry.register('resnet')
class ResNet(nn.Module):
  """ResNet v1.5 with batch norm.

  Attributes:
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    block: 'basic' or 'bottleneck'.
    num_classes: output logits.
    num_filters: width of the first stage (doubles every stage).
    small_inputs: 3x3 stride-1 stem without max pool, for 8x8..64x64 images;
      False gives the ImageNet 7x7/2 stem + 3x3/2 max pool.
    dtype: compute dtype name ('float32' or 'bfloat16').
    remat: rematerialise each block in the backward pass.
  """

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block: str = 'basic'
  num_classes: int = 1000
  num_filters: int = 64
  small_inputs: bool = False
  dtype: Any = 'float32'
  remat: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    if self.block not in _BLOCKS:
      raise ValueError(f'block must be one of {sorted(_BLOCKS)}, got {self.block!r}')
    dtype = jnp.dtype(self.dtype)
    conv = functools.partial(
      nn.Conv,
      use_bias=False,
      dtype=dtype,
      kernel_init=_partitioned(nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'), _CONV_AXES),
    )
    norm = functools.partial(
      nn.BatchNorm,
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=dtype,
      scale_init=_partitioned(nn.initializers.ones, ('conv_out',)),
      bias_init=_partitioned(nn.initializers.zeros, ('conv_out',)),
    )
    x = jnp.asarray(x, dtype)
    if self.small_inputs:
      x = conv(self.num_filters, (3, 3), name='conv_init')(x)
      x = nn.relu(norm(name='bn_init')(x))
    else:
      x = conv(self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], name='conv_init')(x)
      x = nn.relu(norm(name='bn_init')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    block_cls = _BLOCKS[self.block]
    if self.remat:
      block_cls = nn.remat(block_cls)
    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        # Explicit names keep parameter paths identical with and without remat.
        x = block_cls(
          self.num_filters * 2**i,
          conv=conv,
          norm=norm,
          strides=strides,
          name=f'stage{i + 1}_block{j + 1}',
        )(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(
      self.num_classes,
      dtype=dtype,
      kernel_init=_partitioned(nn.initializers.lecun_normal(), ('mlp', 'vocab')),
      bias_init=_partitioned(nn.initializers.zeros, ('vocab',)),
      name='head',
    )(x)
    return jnp.asarray(x, jnp.float32)


ResNet18 = registry.register('resnet18')(functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block='basic'))
ResNet34 = registry.register('resnet34')(functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block='basic'))
ResNet50 = registry.register('resnet50')(functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block='bottleneck'))
ResNet101 = registry.register('resnet101')(functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block='bottleneck'))
# Test-only: one tiny block per stage, for 8x8 images.
ResNetTiny = registry.register('resnet_tiny')(
  functools.partial(ResNet, stage_sizes=(1, 1), block='basic', num_filters=8, small_inputs=True)
)
